"""The reward-source interface: custom sources are used by GRPO (Python and YAML), function sources keep every
check a reward function gets, and the reward-model source scores the same in GRPO, PPO and the iterative callback."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import run_script

from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule
from rlhf_lightning.infra.errors import RewardFunctionError
from rlhf_lightning.iterative import IterativeRewardModelCallback
from rlhf_lightning.models import load_sequence_classifier
from rlhf_lightning.modules.reward_model import RewardModelScorer
from rlhf_lightning.rewards import (
    FunctionSource,
    RewardModelSource,
    RewardOutput,
    RewardSource,
    WeightedSources,
    exact_match,
    resolve_reward_fn,
)
from rlhf_lightning.rewards.model_inputs import reward_input_ids, right_pad
from rlhf_lightning.rollout import RolloutBatch
from rlhf_lightning.tokenizer import build_char_tokenizer


class DigitShare(RewardSource):
    """A custom source: the share of digits in each completion; remembers what it was given."""

    def __init__(self):
        self.calls: list[tuple[list, list, dict]] = []

    def score(self, prompts, completions, columns=None):
        self.calls.append((list(prompts), list(completions), dict(columns or {})))
        rewards = torch.tensor([sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions])
        return RewardOutput(rewards, {"digit_share": rewards})


def _fit(module, tmp_path, steps=2):
    data = PromptDataModule(task="addition", task_kwargs={"digits": 1}, num_train=32, num_val=0, batch_size=2)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        accelerator="cpu", devices=1)
    trainer.fit(module, data)
    return trainer


def test_a_custom_source_passed_in_python_is_what_grpo_trains_on(tmp_path):
    source = DigitShare()
    module = GRPOModule("tiny", reward_fns=[source], group_size=2, max_new_tokens=4, log_samples_every_n_steps=0)
    trainer = _fit(module, tmp_path)
    assert len(source.calls) == 2  # one scoring per rollout
    prompts, completions, columns = source.calls[0]
    assert len(completions) == 4 and columns["answer"]  # 2 prompts x group_size 2, with the dataset's columns
    # its per-source values are what reward/<name> logs (read from the scoring's RewardOutput): the last rollout's
    last = source.calls[-1][1]
    expected = sum(sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in last) / len(last)
    assert float(trainer.callback_metrics["reward/digit_share"]) == pytest.approx(expected)
    assert float(trainer.callback_metrics["reward/mean"]) == pytest.approx(expected)


def test_a_source_class_named_by_import_path_is_built_and_used(tmp_path):
    """In YAML / on the command line a source is named by its class's import path and built with no arguments."""
    (tmp_path / "my_sources.py").write_text(
        "from pathlib import Path\n"
        "import torch\n"
        "from rlhf_lightning.rewards import RewardOutput, RewardSource\n\n"
        "class Longer(RewardSource):\n"
        "    def score(self, prompts, completions, columns=None):\n"
        "        with open(Path(__file__).parent / 'calls.txt', 'a') as f:\n"
        "            f.write(f\"{len(completions)} {'answer' in columns}\\n\")\n"
        "        return RewardOutput(torch.tensor([float(len(c)) for c in completions]))\n")
    proc = run_script(["fit", "--model", "rlhf_lightning.GRPOModule", "--model.model_name_or_path", "tiny",
                       "--model.reward_fns", "[my_sources.Longer]", "--data", "rlhf_lightning.PromptDataModule",
                       "--data.task", "addition", "--data.num_train", "32", "--data.num_val", "4",
                       "--data.batch_size", "2", "--model.group_size", "2", "--model.max_new_tokens", "4",
                       "--model.log_samples_every_n_steps", "0", "--trainer.max_steps", "2",
                       "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                       "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
                       "--trainer.default_root_dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "calls.txt").read_text().splitlines() == ["4 True"] * 2
    assert isinstance(resolve_reward_fn("rlhf_lightning.rewards.RewardSource"), RewardSource)


def test_a_custom_source_is_checked_like_a_function():
    class Short(RewardSource):
        def score(self, prompts, completions, columns=None):
            return RewardOutput(torch.ones(len(completions) - 1))

    class Infinite(RewardSource):
        def score(self, prompts, completions, columns=None):
            return RewardOutput(torch.tensor([1.0, math.inf]))

    with pytest.raises(RewardFunctionError, match=r"^reward source 'Short' returned 1 rewards for 2 completions$"):
        WeightedSources([Short()]).score(["p", "q"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match=r"^reward source 'Infinite' returned inf at row 1: "):
        WeightedSources([Infinite()]).score(["p", "q"], ["a", "b"])
    stats: dict[str, int] = {}
    with pytest.warns(RuntimeWarning):
        out = WeightedSources([Infinite(), exact_match], [1.0, 2.0], nonfinite="missing", stats=stats).score(
            ["p", "q"], ["a", "b"], {"answer": ["a", "a"]})
    assert out.rewards.tolist() == [3.0, 0.0] and stats == {"nonfinite": 1}  # inf made missing, the other counts
    assert set(out.per_source) == {"Infinite", "exact_match"}


def test_function_source_keeps_the_checks_of_a_reward_function():
    def wrong_length(prompts, completions, **kw):
        return [1.0]

    def word(prompts, completions, **kw):
        return ["yes"] * len(completions)

    def mutates(prompts, completions, answer, **kw):
        answer[0] = "changed"
        return [0.0] * len(completions)

    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    args = (["p", "q"], ["a", "b"], {"answer": ["a", "x"]})
    with pytest.raises(RewardFunctionError, match=r"'wrong_length' returned 1 values for 2 completions"):
        FunctionSource(wrong_length).score(*args)
    with pytest.raises(RewardFunctionError, match=r"'word' returned a non-number 'yes' at row 0"):
        FunctionSource(word).score(*args)
    with pytest.raises(RewardFunctionError, match=r"'no_kwargs' does not accept \['answer'\]: add \*\*kwargs"):
        FunctionSource(no_kwargs).score(*args)
    columns = {"answer": ["a", "x"]}
    FunctionSource(mutates).score(["p", "q"], ["a", "b"], columns)
    assert columns == {"answer": ["a", "x"]}  # it got a copy
    out = FunctionSource("exact_match").score(*args)
    assert out.rewards.tolist() == [1.0, 0.0] and out.per_source["exact_match"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ the reward model
@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("rm")
    tok = build_char_tokenizer()
    load_sequence_classifier("tiny", tok, seed=7).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


PROMPTS, COMPLETIONS = ["1+2=", "7+5=", "3+3="], ["3", "12", "seven"]


def test_reward_model_source_scores_text_as_the_classifier_reads_it(rm_dir):
    """The text path is the classifier's own logit on `reward_input_ids`; the token-id path (PPO's) gives the same
    scores for the same ids: one scoring, whichever input the caller has."""
    source = RewardModelSource(rm_dir, batch_size=2)
    tok = source.tokenizer
    ids, mask = right_pad([reward_input_ids(tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)], tok.pad_token_id)
    with torch.no_grad():
        expected = source.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    torch.testing.assert_close(torch.tensor(source(PROMPTS, COMPLETIONS)), expected)
    out = source.score(PROMPTS, COMPLETIONS, {"answer": ["3", "12", "6"]})
    torch.testing.assert_close(out.rewards, expected)
    assert list(out.per_source) == ["reward_model"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(source.score_ids(ids, mask, pos, batch_size=2), expected, atol=1e-5, rtol=1e-5)


def test_grpo_ppo_and_the_iterative_callback_score_through_one_source(rm_dir):
    """The same reward model gives the same scores to GRPO (text), the iterative callback (the source it installs
    and trains) and PPO (the policy's token ids, EOS included: what `reward_input_ids` builds for the text)."""
    expected = torch.tensor(RewardModelSource(rm_dir)(PROMPTS, COMPLETIONS))

    grpo = GRPOModule("tiny", reward_model=rm_dir, group_size=2, max_new_tokens=3)
    assert isinstance(grpo.reward_funcs[-1], RewardModelSource) and RewardModelScorer is RewardModelSource
    got = grpo.score_sources(PROMPTS, COMPLETIONS, {"columns": {}})
    torch.testing.assert_close(got.rewards, expected)
    assert list(got.per_source) == ["reward_model"]

    plain = GRPOModule("tiny", reward_fns=["exact_match"], group_size=2, max_new_tokens=3)
    callback = IterativeRewardModelCallback("exact_match", reward_model=rm_dir)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_rows=[], collate=list))
    callback.on_fit_start(trainer, plain)
    assert plain.reward_funcs[-1] is callback.scorer and isinstance(callback.scorer, RewardModelSource)
    both = plain.score_sources(PROMPTS, COMPLETIONS, {"columns": {"answer": ["3", "12", "6"]}})
    torch.testing.assert_close(both.per_source["reward_model"], expected)

    ppo = PPOModule("tiny", reward_model=rm_dir, max_new_tokens=3, micro_batch_size=2)
    assert ppo._reward_model_source.model is ppo.reward_model  # the submodule FSDP2 shards, scored in place
    tok = ppo.tokenizer
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in COMPLETIONS]
    P, T = max(map(len, prompt_ids)), max(map(len, completion_ids))
    samples = RolloutBatch(
        prompt_ids=torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompt_ids]),
        prompt_mask=torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompt_ids]),
        completion_ids=torch.tensor([c + [tok.pad_token_id] * (T - len(c)) for c in completion_ids]),
        completion_mask=torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completion_ids]),
        logprobs=None, is_truncated=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(ppo.reward_model_scores(samples), expected, atol=1e-5, rtol=1e-5)


def test_the_documented_source_example_runs():
    """docs/extending.md's example source is a working source, weighted with a function as the page says."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    section = page[page.index("## Where a new reward source goes"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile("\n".join(line[2:] for line in block.splitlines()), "extending.md", "exec"), namespace)
    out = WeightedSources([namespace["Brevity"](), "exact_match"], [1.0, 1.0]).score(
        ["1+1="], ["2"], {"answer": ["2"]})
    assert out.rewards.tolist() == [pytest.approx(0.99)] and set(out.per_source) == {"brevity", "exact_match"}
