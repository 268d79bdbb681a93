"""Monte-Carlo step labels (Math-Shepherd): prefixes, labels that flip at the known wrong step (scripted policies,
a fake `generate` and a registered engine inside a real GRPOModule), soft fractions, batching, reproducibility."""

from __future__ import annotations

import collections
import math

import lightning as L
import pytest
import torch

from rlhf_lightning import GRPOModule, PromptDataModule
from rlhf_lightning.algorithms.mc_labels import as_stepwise_rows, mc_step_labels, module_generate, step_prefixes
from rlhf_lightning.algorithms.process import step_boundaries
from rlhf_lightning.data.tasks import ChainArithmeticTask
from rlhf_lightning.rewards import apply_op, chain_step_rewards, final_answer_match, parse_chain
from rlhf_lightning.rollout import RolloutBatch, RolloutEngine, base, register_engine
from rlhf_lightning.tokenizer import build_char_tokenizer

TASK = ChainArithmeticTask(num_terms=4, max_operand=9)  # 3 steps per completion
STEPS = TASK.num_terms - 1


# ---------------------------------------------------------------------------------------------- the chain, scripted
def chain_lines(prompt: str, value: int, start: int, error_at: int | None = None) -> list[str]:
    """Step lines `start`.. of the chain from running value `value`, correct arithmetic except +1 at `error_at`."""
    _, terms = parse_chain(prompt)
    lines = []
    for j in range(start, len(terms)):
        op, term = terms[j]
        new = apply_op(value, op, term) + (1 if j == error_at else 0)
        lines.append(f"{value}{op}{term}={new}")
        value = new
    return lines


def completion_with_error(prompt: str, error_at: int | None) -> str:
    """The chain's completion, wrong from step `error_at` on (its result off by one, later steps follow it)."""
    return "\n".join(chain_lines(prompt, parse_chain(prompt)[0], 0, error_at))


def continue_chain(text: str, right: bool) -> str:
    """The scripted policy on "prompt + prefix": the rest of the chain from the prefix's own running value, with an
    off-by-one at the first new step unless `right` (after a complete chain: a wrong extra line). A prefix with a
    wrong step therefore never ends correct."""
    cut = text.index("=") + 1
    prompt, prefix = text[:cut], text[cut:]
    lines = prefix.split("\n") if prefix else []
    value = int(lines[-1].rsplit("=", 1)[1]) if lines else parse_chain(prompt)[0]
    rest = chain_lines(prompt, value, len(lines), None if right else len(lines))
    if not (right or rest):  # the chain is complete: a wrong extra line changes the last number
        rest = [f"{value}+1={value + 1}"]
    return ("\n" if lines and rest else "") + "\n".join(rest)


def prefix_is_correct(text: str) -> bool:
    cut = text.index("=") + 1
    prefix = text[cut:]
    return not prefix or all(chain_step_rewards([text[:cut]], [prefix])[0])


def steps_done(text: str) -> int:
    prefix = text[text.index("=") + 1:]
    return prefix.count("\n") + 1 if prefix else 0


class ScriptedGenerate:
    """A fake `generate`: from a correct prefix of m steps, continuation j of a text (counted per text) is right
    iff j % N < right(m); from a prefix with a wrong step it continues wrongly. Records every call."""

    def __init__(self, right=lambda m: 1, n: int = 1):
        self.right, self.n = right, n
        self.calls: list[list[str]] = []
        self.seen: collections.Counter = collections.Counter()

    def __call__(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        out = []
        for text in texts:
            j = self.seen[text] % self.n
            self.seen[text] += 1
            out.append(continue_chain(text, prefix_is_correct(text) and j < self.right(steps_done(text))))
        return out


def chain_rows(n: int = 3, seed: int = 0):
    """Per prompt: the correct completion and one with an error at each step; (prompts, completions, answers,
    the expected hard labels)."""
    prompts, completions, answers, expected = [], [], [], []
    for ex in TASK.make_examples(n, seed):
        for error_at in [None, *range(STEPS)]:
            prompts.append(ex["prompt"])
            completions.append(completion_with_error(ex["prompt"], error_at))
            answers.append(ex["answer"])
            k = STEPS if error_at is None else error_at
            expected.append([1.0] * k + [0.0] * (STEPS - k))
    return prompts, completions, answers, expected


# ---------------------------------------------------------------------------------------------- prefixes
def test_step_prefixes_by_hand():
    assert step_prefixes("7+5=12\n12-3=9") == ["7+5=12", "7+5=12\n12-3=9"]
    assert step_prefixes("") == [""]  # one (empty) step, as process supervision counts it
    assert step_prefixes("a\n") == ["a", "a\n"]  # a trailing separator starts a last, empty step
    assert step_prefixes("a\n\nb") == ["a", "a\n", "a\n\nb"]
    assert step_prefixes("a<s>b<s>c", "<s>") == ["a", "a<s>b", "a<s>b<s>c"]
    with pytest.raises(ValueError, match="separator must be a non-empty string"):
        step_prefixes("a", "")


def test_prefixes_end_where_process_supervision_ends_each_step(char_tok):
    """Prefix k ends at the token `step_boundaries` (GRPO's process rewards) puts step k's reward on, and there are
    as many prefixes as `chain_step_rewards` gives step rewards."""
    completions = ["7+5=12\n12-3=9", "7+5=13\n13-3=10\n", "1+1=2"]
    prompts = ["7+5-3=", "7+5-3=", "1+1="]
    rewards = chain_step_rewards(prompts, completions)
    seqs = [char_tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    _, ends = step_boundaries(char_tok, completions, ids, mask, rewards, "\n")
    for i, completion in enumerate(completions):
        prefixes = step_prefixes(completion)
        assert len(prefixes) == len(rewards[i])
        for s, prefix in enumerate(prefixes):
            if prefix and not prefix.endswith("\n"):  # an empty step ends where the previous one did
                assert int(ends[i, s]) == len(prefix) - 1  # one token per character


# ---------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("final_step", ["verify", "rollout"])
def test_hard_labels_flip_at_the_wrong_step(final_step):
    prompts, completions, answers, expected = chain_rows()
    generate = ScriptedGenerate()
    labels = mc_step_labels(generate, prompts, completions, final_answer_match, {"answer": answers},
                            num_rollouts=3, final_step=final_step)
    assert labels == expected
    assert len(generate.calls) == 1  # every prefix of the batch in one call


def test_soft_labels_are_the_fractions_of_correct_continuations():
    """From a correct prefix of m steps, m of N=4 continuations end right: step s (s + 1 steps) gets (s + 1) / 4;
    from a wrong step on, 0; the last step is the outcome itself (final_step=verify)."""
    prompts, completions, answers, _ = chain_rows()
    generate = ScriptedGenerate(right=lambda m: m, n=4)
    soft = mc_step_labels(generate, prompts, completions, final_answer_match, {"answer": answers}, num_rollouts=4,
                          mode="soft")
    for i, labels in enumerate(soft):
        error_at = i % (STEPS + 1) - 1  # rows come as: correct, error at 0, 1, 2
        k = STEPS if error_at < 0 else error_at
        want = [(s + 1) / 4 if s < k else 0.0 for s in range(STEPS)]
        want[-1] = 1.0 if error_at < 0 else 0.0
        assert labels == want, (completions[i], labels)
    hard = mc_step_labels(ScriptedGenerate(right=lambda m: m, n=4), prompts, completions, final_answer_match,
                          {"answer": answers}, num_rollouts=4, mode="hard")
    assert hard == [[float(v > 0) for v in row] for row in soft]


def test_soft_fraction_with_the_last_step_rolled_out():
    """final_step=rollout samples from the whole completion too: right from a correct one (the scripted policy
    stops), so the last step's soft label is its fraction, not the outcome."""
    prompts, completions, answers, _ = chain_rows(n=1)
    soft = mc_step_labels(ScriptedGenerate(right=lambda m: 1 if m < STEPS else 3, n=4), prompts, completions,
                          final_answer_match, {"answer": answers}, num_rollouts=4, mode="soft", final_step="rollout")
    assert soft[0] == [0.25, 0.25, 0.75]  # the correct completion
    assert soft[1] == [0.0, 0.0, 0.0]  # wrong from step 0


@pytest.mark.parametrize("batch_size, dedupe, calls", [(None, False, 1), (5, False, 5), (4, True, 4), (1, True, 15)])
def test_generate_calls_are_ceil_of_continuations_over_batch_size(batch_size, dedupe, calls):
    """ceil(Q x N / batch_size) calls, Q the prefixes rolled out: 4 completions of one prompt (correct, wrong at
    step 0, 1, 2) have 2 prefixes each to roll out (final_step=verify), 8 in all, of which 5 differ (dedupe: step
    0 of the correct one and of those wrong at 1 and 2 is the same text, so is step 1 of the correct one and of the
    one wrong at 2)."""
    prompts, completions, answers, expected = chain_rows(n=1)
    generate = ScriptedGenerate()
    labels = mc_step_labels(generate, prompts, completions, final_answer_match, {"answer": answers}, num_rollouts=3,
                            batch_size=batch_size, dedupe=dedupe)
    assert labels == expected
    texts = [t for call in generate.calls for t in call]
    assert len(generate.calls) == calls and len(texts) == (5 if dedupe else 8) * 3
    assert all(len(call) <= (batch_size or len(texts)) for call in generate.calls)
    # each prefix's N continuations are asked for in a row, the prompt followed by the prefix
    assert all(texts[j] == texts[j - j % 3] for j in range(len(texts)))
    assert texts[0] == prompts[0] + completions[0].split("\n")[0]


def test_no_opinion_is_nan_and_leaves_the_row_out_of_the_stepwise_data():
    def abstains_on_the_first_prompt(prompts, completions, answer, **kwargs):
        scores = final_answer_match(prompts, completions, answer)
        return [None if p == first else s for p, s in zip(prompts, scores)]

    prompts, completions, answers, expected = chain_rows(n=2)
    first = prompts[0]
    labels = mc_step_labels(ScriptedGenerate(), prompts, completions, abstains_on_the_first_prompt,
                            {"answer": answers}, num_rollouts=2)
    assert all(math.isnan(v) for row in labels[:4] for v in row) and labels[4:] == expected[4:]
    rows = as_stepwise_rows(prompts, completions, labels)
    assert len(rows) == 4 and all(r["prompt"] == prompts[4] for r in rows)


def test_stepwise_rows_are_trls_format():
    prompts, completions, answers, expected = chain_rows(n=1)
    rows = as_stepwise_rows(prompts, completions, expected)
    assert rows[2] == {"prompt": prompts[2], "completions": completions[2].split("\n"), "labels": [True, False, False]}
    assert [r["labels"] for r in rows] == [[bool(v) for v in e] for e in expected]
    assert as_stepwise_rows(["p"], ["a\nb"], [[0.75, 0.25]])[0]["labels"] == [True, False]  # soft: thresholded
    with pytest.raises(ValueError, match="completion 0 has 2 steps but 1 labels"):
        as_stepwise_rows(["p"], ["a\nb"], [[1.0]])
    with pytest.raises(ValueError, match="differ in length"):
        as_stepwise_rows(["p"], ["a", "b"], [[1.0]])


def test_end_step_is_the_outcome_and_becomes_an_empty_last_step():
    """end_step=True: one label more per completion, the verifier on the whole completion (no extra sampling); a
    chain that stops after one right step is false at its end (and, its one step being the last, verified, at that
    step too: `final_step="rollout"` would label it by continuations). `as_stepwise_rows` writes it as a last
    step "" (what StepwiseDataModule reads as the end step) and leaves out a completion with an empty step that is
    not the end."""
    prompts, completions, answers, expected = chain_rows(n=1)
    stopped = completions[0].split("\n")[0]  # the first right step, then EOS
    prompts, completions, answers = prompts + [prompts[0]], completions + [stopped], answers + [answers[0]]
    generate = ScriptedGenerate()
    plain = mc_step_labels(ScriptedGenerate(), prompts, completions, final_answer_match, {"answer": answers},
                           num_rollouts=2)
    labels = mc_step_labels(generate, prompts, completions, final_answer_match, {"answer": answers},
                            num_rollouts=2, end_step=True)
    assert [row[:-1] for row in labels] == plain and labels[:-1] == [e + [e[-1]] for e in expected]
    assert plain[-1] == [0.0] and labels[-1] == [0.0, 0.0]  # the only step is the last: verified, then the end
    rows = as_stepwise_rows(prompts, completions, labels)
    assert rows[0]["completions"] == completions[0].split("\n") + [""] and rows[0]["labels"] == [True] * 4
    assert rows[-1] == {"prompt": prompts[0], "completions": [stopped, ""], "labels": [False, False]}
    assert as_stepwise_rows(["p"], ["a\n"], [[1.0, 0.0, 0.0]]) == []  # "a", "" and the end: "" is no end step
    assert as_stepwise_rows(["p"], ["a\n"], [[1.0, 0.0]]) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_rollouts=0), "num_rollouts must be an integer >= 1"),
    (dict(mode="mean"), "mode must be hard|soft"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(final_step="skip"), "final_step must be verify|rollout"),
])
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mc_step_labels(ScriptedGenerate(), ["1+1="], ["1+1=2"], final_answer_match, {"answer": ["2"]}, **kwargs)
    with pytest.raises(ValueError, match="generate returned 0 continuations for 2 prompts"):
        mc_step_labels(lambda texts: [], ["1+1+1="], ["1+1=2\n2+1=3"], final_answer_match, {"answer": ["3"]},
                       num_rollouts=2)


# ---------------------------------------------------------------------------------------------- a real module
class ScriptedChainEngine(RolloutEngine):
    """The scripted chain policy as a RolloutEngine: it reads the prompt tokens, writes the continuation's tokens
    and EOS; from a correct prefix it is right with probability `p_right`, drawn from the module's generator."""

    p_right = 1.0
    generators: list = []

    def __init__(self, model):
        super().__init__(model)
        self.tok = build_char_tokenizer()

    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        type(self).generators.append(generator)
        texts = [self.tok.decode(ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        draws = torch.rand(len(texts), generator=generator, device=prompt_ids.device).tolist()
        outs = [continue_chain(t, prefix_is_correct(t) and u < self.p_right) for t, u in zip(texts, draws)]
        seqs = [self.tok(o, add_special_tokens=False)["input_ids"][:params.max_new_tokens - 1] + [params.eos_token_id]
                for o in outs]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), params.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return RolloutBatch(prompt_ids, prompt_mask, ids, mask, torch.zeros(ids.shape), torch.zeros(len(seqs)).bool())


@pytest.fixture
def scripted_engine(monkeypatch):
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))
    monkeypatch.setattr(ScriptedChainEngine, "generators", [])
    register_engine("scripted_chain")(ScriptedChainEngine)
    return ScriptedChainEngine


def _module(engine: str = "scripted_chain", sample_seed: int = 1234) -> GRPOModule:
    return GRPOModule("tiny", group_size=2, max_new_tokens=24, rollout_engine=engine, sample_seed=sample_seed)


def test_module_generate_drives_a_registered_engine_in_a_grpo_module(scripted_engine):
    m = _module()
    prompts, completions, answers, expected = chain_rows()
    labels = mc_step_labels(module_generate(m), prompts, completions, final_answer_match, {"answer": answers},
                            num_rollouts=2, batch_size=8)
    assert labels == expected
    assert isinstance(m.engine, ScriptedChainEngine)
    assert scripted_engine.generators and all(g is m.sample_generator for g in scripted_engine.generators)


def test_the_modules_seeded_stream_makes_labels_reproducible(scripted_engine, monkeypatch):
    monkeypatch.setattr(ScriptedChainEngine, "p_right", 0.5)
    prompts, completions, answers, _ = chain_rows()

    def soft(module):
        return mc_step_labels(module_generate(module), prompts, completions, final_answer_match, {"answer": answers},
                              num_rollouts=8, mode="soft")

    first = soft(_module())
    assert soft(_module()) == first
    assert soft(_module(sample_seed=99)) != first
    assert any(0 < v < 1 for row in first for v in row)  # noisy: fractions, not 0/1


def test_module_generate_on_the_tiny_policy_is_seeded_and_left_padded():
    """The real engine on the tiny preset: the same continuations from the same sample_seed, whatever the padding
    (a prompt alone or in a batch with a longer one), at most max_new_tokens each."""
    a, b = module_generate(_module("auto"), max_new_tokens=5), module_generate(_module("auto"), max_new_tokens=5)
    texts = ["7+5-3=7+5=12", "1+2="]
    first = a(texts)
    assert b(texts) == first and len(first) == 2 and all(len(c) <= 5 for c in first)
    greedy = module_generate(_module("auto"), max_new_tokens=5, temperature=0.0)
    assert greedy(texts)[1] == greedy(texts[1:])[0]


def test_labels_from_a_callback_on_the_live_policy(tmp_path, scripted_engine):
    """What the iterative callback will do: after a GRPO step, label fresh rollouts of the policy being trained."""
    got = []

    class Labeller(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ro = pl_module.rollout(batch)
            labels = mc_step_labels(module_generate(pl_module), ro.prompts, ro.completions, final_answer_match,
                                    ro.columns, num_rollouts=2)
            got.append(as_stepwise_rows(ro.prompts, ro.completions, labels))

    data = PromptDataModule(task="chain", task_kwargs={"num_terms": 4, "max_operand": 9}, num_train=8, num_val=0,
                            batch_size=2)
    m = GRPOModule("tiny", group_size=2, max_new_tokens=24, rollout_engine="scripted_chain", beta=0.0,
                   reward_fns=[final_answer_match])
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
              callbacks=[Labeller()]).fit(m, data)
    (rows,) = got
    # the scripted policy is right from the bare prompt: 4 correct chains, every step labelled correct
    assert len(rows) == 4 and all(r["labels"] == [True] * STEPS for r in rows)
