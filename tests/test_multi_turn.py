"""Multi-turn rollouts with tools (`rollout.multi_turn`): masks, the loop, and GRPO / PPO training with tools."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch

from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule
from rlhf_lightning.rollout import RolloutBatch, RolloutEngine
from rlhf_lightning.rollout.multi_turn import ToolInteraction, marked_conversations, multi_turn_generate
from rlhf_lightning.tokenizer import build_char_tokenizer
from rlhf_lightning.tools import CharToolFormat, ToolRunner, calculator


class ScriptedEngine(RolloutEngine):
    """Writes the given turns, one per call, for every row (so the loop's bookkeeping can be checked by hand)."""

    def __init__(self, tok, turns: list[str]):
        super().__init__(torch.nn.Identity())
        self.tok, self.turns, self.calls, self.rows = tok, turns, 0, []

    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        text = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        self.rows.append(prompt_ids.shape[0])
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: params.max_new_tokens]
        B, T = prompt_ids.shape[0], len(ids)
        comp = torch.tensor([ids] * B)
        ends = torch.tensor([ids[-1] in (params.eos_token_id, *params.stop_token_ids)] * B)
        return RolloutBatch(prompt_ids, prompt_mask, comp, torch.ones(B, T, dtype=torch.long),
                            torch.full((B, T), -0.5), ~ends)


def _tok_and_interaction(tools=(calculator,), timeout_s=5.0):
    tok = build_char_tokenizer()
    return tok, ToolInteraction(ToolRunner(list(tools), timeout_s=timeout_s), CharToolFormat(list(tools)), tok)


def _prompt(tok, text="12*3="):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    return ids, torch.ones_like(ids)


def _params(tok, max_new_tokens=64):
    from rlhf_lightning.rollout import SamplingParams
    return SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def test_tool_output_is_attended_but_masked_from_the_loss():
    tok, inter = _tok_and_interaction()
    engine = ScriptedEngine(tok, ["[calculator: 12*3]", "36<eos>"])
    ids, mask = _prompt(tok)
    out = multi_turn_generate(engine, ids, mask, _params(tok), None, inter, tok, max_turns=4)
    text = tok.decode(out.completion_ids[0][out.completion_mask[0].bool()])
    assert text == "[calculator: 12*3]=36\n36<eos>"
    call, reply = len("[calculator: 12*3]"), len("=36\n")
    expected = [1] * call + [0] * reply + [1] * 3  # policy, tool, policy (with EOS)
    assert out.action_mask[0].tolist() == expected
    assert out.completion_mask[0].tolist() == [1] * len(expected)
    assert out.logprobs[0].tolist() == [-0.5] * call + [0.0] * reply + [-0.5] * 3
    assert not bool(out.is_truncated[0])
    assert out.turns.turns.tolist() == [2.0] and out.turns.tool_calls.tolist() == [1.0]
    assert marked_conversations(tok, out) == ["[calculator: 12*3]<<tool: =36\n>>36"]
    # the second turn saw the call and the tool's reply after the prompt
    assert engine.calls == 2


def test_losses_kl_and_entropy_skip_tool_tokens():
    """GRPO's loss mask is the action mask: a hand-built rollout with a tool span gets no loss there."""
    from rlhf_lightning import losses

    tok, inter = _tok_and_interaction()
    ids, mask = _prompt(tok)
    out = multi_turn_generate(ScriptedEngine(tok, ["[calculator: 12*3]", "36<eos>"]), ids, mask, _params(tok), None,
                              inter, tok, max_turns=4)
    m = out.trained_mask.float()
    logp = torch.randn_like(m)
    ref = torch.randn_like(m)
    kl = losses.kl_estimate(logp, ref, "k3")
    agg = losses.aggregate(kl, m, "token-mean", float(m.sum()))
    by_hand = (kl * m).sum() / m.sum()
    assert torch.allclose(agg, by_hand)
    assert int(m.sum()) == len("[calculator: 12*3]") + 3


def test_a_hanging_or_failing_tool_answers_with_an_error_and_the_rollout_goes_on():
    def slow(x: str) -> str:
        """Sleeps.

        Args:
            x: anything
        """
        time.sleep(30)
        return x

    tok, inter = _tok_and_interaction(tools=(slow,), timeout_s=0.2)
    ids, mask = _prompt(tok)
    t0 = time.perf_counter()
    out = multi_turn_generate(ScriptedEngine(tok, ["[slow: 1]", "[nope: 2]", "done<eos>"]), ids, mask,
                              _params(tok, 200), None, inter, tok, max_turns=4)
    assert time.perf_counter() - t0 < 5
    assert out.turns.tool_timeouts.tolist() == [1.0] and out.turns.tool_errors.tolist() == [2.0]
    assert tok.decode(out.completion_ids[0][out.completion_mask[0].bool()]).endswith("done<eos>")


def test_budget_and_turn_limit_end_the_conversation_truncated():
    tok, inter = _tok_and_interaction()
    ids, mask = _prompt(tok)
    engine = ScriptedEngine(tok, ["[calculator: 1+1]"])
    out = multi_turn_generate(engine, ids, mask, _params(tok), None, inter, tok, max_turns=2)
    assert bool(out.is_truncated[0]) and out.turns.turns.tolist() == [2.0] and out.turns.tool_calls.tolist() == [1.0]
    out = multi_turn_generate(ScriptedEngine(tok, ["[calculator: 1+1]"]), ids, mask, _params(tok, 20), None, inter,
                              tok, max_turns=8)
    assert int(out.completion_mask.sum()) == 20 and bool(out.is_truncated[0])


def test_finished_rows_leave_the_batch():
    """Rows that ended at EOS are not sent to the engine again: the next turn batches the active rows only."""
    tok, inter = _tok_and_interaction()

    class TwoKinds(ScriptedEngine):
        def generate(self, prompt_ids, prompt_mask, params, generator=None):
            self.rows.append(prompt_ids.shape[0])
            B = prompt_ids.shape[0]
            texts = (["[calculator: 2*2]", "7<eos>"] if B == 2 else ["4<eos>"])
            ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            T = max(map(len, ids))
            comp = torch.full((B, T), tok.pad_token_id)
            m = torch.zeros(B, T, dtype=torch.long)
            for i, r in enumerate(ids):
                comp[i, :len(r)], m[i, :len(r)] = torch.tensor(r), 1
            return RolloutBatch(prompt_ids, prompt_mask, comp, m, torch.zeros(B, T), torch.zeros(B, dtype=torch.bool))

    engine = TwoKinds(tok, [])
    ids, mask = _prompt(tok)
    ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
    out = multi_turn_generate(engine, ids, mask, _params(tok), None, inter, tok, max_turns=4)
    assert engine.rows == [2, 1]
    texts = [tok.decode(r[m.bool()]) for r, m in zip(out.completion_ids, out.completion_mask)]
    assert texts == ["[calculator: 2*2]=4\n4<eos>", "7<eos>"]


from rlhf_lightning.rollout import AutoEngine  # noqa: E402


class CallsFirst(AutoEngine):
    """The first turn of every conversation is the right calculator call for its prompt; later turns are the
    policy's own samples (a random tiny model never writes a call by itself)."""

    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        tok = build_char_tokenizer()
        texts = [tok.decode(r[m.bool()]) for r, m in zip(prompt_ids, prompt_mask)]
        if all("[calculator:" in t for t in texts):
            return super().generate(prompt_ids, prompt_mask, params, generator)
        calls = [tok(f"[calculator: {t.rstrip('=')}]", add_special_tokens=False)["input_ids"] for t in texts]
        T = max(map(len, calls))
        comp = torch.full((len(calls), T), tok.pad_token_id)
        m = torch.zeros(len(calls), T, dtype=torch.long)
        for i, c in enumerate(calls):
            comp[i, :len(c)], m[i, :len(c)] = torch.tensor(c), 1
        return RolloutBatch(prompt_ids, prompt_mask, comp, m, torch.zeros(comp.shape), torch.zeros(len(calls),
                                                                                                   dtype=torch.bool))


def length_reward(prompts, completions, **kw):
    return [float(len(c) % 5) for c in completions]


def _fit(module, task="calculator", steps=2, tmp_path=None, **data):
    dm = PromptDataModule(task=task, batch_size=2, num_train=8, num_val=4, **data)
    per_rollout, optimizers = module.updates_per_batch()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=steps * per_rollout * optimizers,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=steps)
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.fixture
def calls_first_engine():
    """`rollout_engine: test_calls_first` for one test (registered, then removed: other tests list the engines)."""
    from rlhf_lightning.rollout import base, register_engine

    register_engine("test_calls_first")(CallsFirst)
    yield
    base._ENGINES.pop("test_calls_first")


def test_grpo_and_ppo_train_with_tools(tmp_path, calls_first_engine):
    """Both algorithms train on real multi-turn rollouts (the call, the calculator's reply, the policy's text):
    the weights move, the tool's tokens are out of the loss mask, the tool metrics are logged."""
    torch.manual_seed(0)
    common = dict(max_new_tokens=40, tools=["rlhf_lightning.tools.calculator"], reward_fns=[length_reward],
                  rollout_engine="test_calls_first", lr=1e-3)
    for module in (GRPOModule("tiny", group_size=2, log_samples_every_n_steps=1, **common),
                   PPOModule("tiny", **common)):
        masks = []
        original = module.compute_step_advantages

        def spy(step, original=original, masks=masks):
            original(step)
            masks.append((step.loss_mask.clone(), step.rollout.samples))

        module.compute_step_advantages = spy
        before = [p.detach().clone() for p in module.policy.parameters()]
        logged = []
        log = module.log_step_metrics

        def spy_log(metrics, log=log, logged=logged):
            logged.append(metrics)
            return log(metrics)

        module.log_step_metrics = spy_log
        module, trainer = _fit(module, tmp_path=tmp_path)
        assert module.rollouts == 2
        assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
        for loss_mask, samples in masks:
            tool = samples.completion_mask.bool() & ~samples.action_mask.bool()
            assert bool(tool.any())  # every row's calculator reply is in the completion ...
            assert float(loss_mask[tool].float().abs().sum()) == 0.0  # ... and out of the loss
            assert float(loss_mask[samples.action_mask.bool()].float().sum()) > 0
        assert all(float(m["tools/calls_per_completion"]) >= 1.0 for m in logged)
        assert all(0 < float(m["tools/masked_token_frac"]) < 1 for m in logged)


def test_the_loop_answers_a_hermes_call_through_the_chat_template():
    """Qwen2.5 / Hermes format from a tokenizer with a tools-capable template (written in tests/test_tools.py): the
    call is parsed from the turn, the reply is the template's tool message up to the next assistant turn."""
    from test_tools import qwen_like_tok as make_tok

    from rlhf_lightning.tools import HermesToolFormat

    tok = make_tok.__wrapped__() if hasattr(make_tok, "__wrapped__") else make_tok()
    inter = ToolInteraction(ToolRunner([calculator]), HermesToolFormat(), tok)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*3"}}\n</tool_call>'
    ids = torch.tensor([tok("12*3=", add_special_tokens=False)["input_ids"]])
    out = multi_turn_generate(ScriptedEngine(tok, [call, "36<|im_end|>"]), ids, torch.ones_like(ids), _params(tok, 400),
                              None, inter, tok, max_turns=3)
    text = tok.decode(out.completion_ids[0][out.completion_mask[0].bool()])
    reply = text[len(call):-len("36<|im_end|>")]
    assert "<tool_response>\n36\n</tool_response>" in reply and reply.endswith("<|im_start|>assistant\n")
    tool = out.completion_mask[0].bool() & ~out.action_mask[0].bool()
    assert tok.decode(out.completion_ids[0][tool]) == reply
    assert out.turns.tool_calls.tolist() == [1.0] and out.turns.tool_errors.tolist() == [0.0]


def straight_and_resumed(module, tmp_path, task):
    """(4 rollouts straight, 2 + 2 resumed from the step-2 checkpoint, that checkpoint's path) of `module()`."""
    def fit(m, root, ckpt_path=None):
        dm = PromptDataModule(task=task, batch_size=2, num_train=16, num_val=4)
        every_2 = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(default_root_dir=root, max_steps=4, accelerator="cpu", logger=False, callbacks=[every_2],
                            enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                            enable_model_summary=False)
        trainer.fit(m, datamodule=dm, ckpt_path=ckpt_path)
        return m

    straight = fit(module(), tmp_path / "a")
    mid = next((tmp_path / "a").glob("*step=2.ckpt"))
    return straight, fit(module(), tmp_path / "b", ckpt_path=mid), mid


def test_resume_with_tools_is_exact(tmp_path, calls_first_engine):
    """4 rollouts straight == 2 rollouts, a checkpoint, then 2 more from it (`ckpt_path`), with tool rollouts."""
    def module():
        torch.manual_seed(0)
        return GRPOModule("tiny", group_size=2, max_new_tokens=40, tools=["rlhf_lightning.tools.calculator"],
                          reward_fns=[length_reward], rollout_engine="test_calls_first", lr=1e-3)

    straight, resumed, _ = straight_and_resumed(module, tmp_path, "calculator")
    for (name, p), q in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q), name


def test_an_end_marker_without_a_call_is_not_counted_as_a_call():
    tok, inter = _tok_and_interaction()
    ids, mask = _prompt(tok)
    out = multi_turn_generate(ScriptedEngine(tok, ["[1, 2]", "ok<eos>"]), ids, mask, _params(tok), None, inter, tok,
                              max_turns=4)
    assert tok.decode(out.completion_ids[0][out.completion_mask[0].bool()]) == "[1, 2]ok<eos>"
    assert out.turns.turns.tolist() == [2.0] and out.turns.tool_calls.tolist() == [0.0]
