"""Environments (`rlhf_lightning.environments`): the protocol, the built-in feedback checker, the rollout loop that
plays episodes, their rewards in GRPO (outcome and per-turn process supervision) and PPO, and the errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_multi_turn import ScriptedEngine, _params, _prompt, straight_and_resumed

from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule
from rlhf_lightning.algorithms.process import turn_boundaries
from rlhf_lightning.environments import AnswerFeedback, Environment, EnvStep, load_environment
from rlhf_lightning.rewards import environment_reward, environment_turn_rewards
from rlhf_lightning.rollout import AutoEngine, RolloutBatch
from rlhf_lightning.rollout.multi_turn import EnvironmentInteraction, ToolInteraction, multi_turn_generate
from rlhf_lightning.tokenizer import build_char_tokenizer
from rlhf_lightning.tools import CharToolFormat, ToolRunner, calculator


def _feedback(tok):
    return EnvironmentInteraction(AnswerFeedback, tok)


def _text(tok, out, i=0):
    return tok.decode(out.completion_ids[i][out.completion_mask[i].bool()])


def test_feedback_episode_token_by_token():
    """Wrong, told so, right: the checker's text is attended but untrained, each turn's reward lands on the turn's
    last token (its EOS), and the episode ends when the environment says done."""
    tok = build_char_tokenizer()
    ids, mask = _prompt(tok, "37+45=")
    engine = ScriptedEngine(tok, ["72<eos>", "82<eos>", "99<eos>"])
    out = multi_turn_generate(engine, ids, mask, _params(tok), None, None, tok, max_turns=4,
                              env=_feedback(tok), rows=[{"prompt": "37+45=", "answer": "82"}])
    assert _text(tok, out) == "72<eos>\nwrong\n37+45=82<eos>"
    assert engine.calls == 2  # done after the right answer: no third turn
    n_first, n_obs = len("72") + 1, len("\nwrong\n37+45=")
    assert out.action_mask[0].tolist() == [1] * n_first + [0] * n_obs + [1] * 3
    assert out.logprobs[0, n_first:n_first + n_obs].abs().sum() == 0  # the observation has no behaviour log-prob
    assert out.env_rewards == [[0.0, 1.0]]
    assert out.env_ends == [[n_first - 1, n_first + n_obs + 2]]  # both turns' EOS
    assert out.turns.env_done.tolist() == [1.0] and out.turns.turns.tolist() == [2.0]
    assert not bool(out.is_truncated[0])


def test_turn_limit_budget_and_first_message():
    """`reset`'s first message opens the completion (masked); an episode the environment did not end stops at
    max_turns (env_done 0, every turn's reward kept); a turn cut by the token budget is still judged."""

    class Opener(AnswerFeedback):
        def reset(self, row):
            super().reset(row)
            return "go:"

    tok = build_char_tokenizer()
    ids, mask = _prompt(tok, "1+1=")
    rows = [{"prompt": "1+1=", "answer": "2"}]
    out = multi_turn_generate(ScriptedEngine(tok, ["3<eos>"]), ids, mask, _params(tok), None, None, tok, max_turns=2,
                              env=EnvironmentInteraction(Opener, tok), rows=rows)
    assert _text(tok, out) == "go:3<eos>\nwrong\n1+1=3<eos>"  # no observation after the last allowed turn
    assert out.action_mask[0, :3].tolist() == [0, 0, 0]
    assert out.env_rewards == [[0.0, 0.0]] and out.turns.env_done.tolist() == [0.0]
    out = multi_turn_generate(ScriptedEngine(tok, ["22222222"]), ids, mask, _params(tok, 6), None, None, tok,
                              max_turns=3, env=_feedback(tok), rows=rows)
    assert _text(tok, out) == "222222" and bool(out.is_truncated[0])  # cut by the budget ...
    assert out.env_rewards == [[0.0]] and out.env_ends == [[5]]  # ... and judged once


def test_rows_finish_at_their_own_turn_and_only_active_rows_are_sampled():
    tok = build_char_tokenizer()
    ids = torch.tensor([tok("1+1=", add_special_tokens=False)["input_ids"]] * 2)
    engine = ScriptedEngine(tok, ["2<eos>", "2<eos>"])
    out = multi_turn_generate(engine, ids, torch.ones_like(ids), _params(tok), None, None, tok, max_turns=3,
                              env=_feedback(tok), rows=[{"prompt": "1+1=", "answer": "2"},
                                                        {"prompt": "1+1=", "answer": "3"}])
    assert engine.rows == [2, 1, 1]  # the solved row leaves; the other plays its 3 turns
    assert out.env_rewards == [[1.0], [0.0, 0.0, 0.0]]
    assert out.turns.env_done.tolist() == [1.0, 0.0]


def test_tools_and_environment_in_one_episode():
    """A turn may call a tool before it ends: the tool answers the call, the environment judges the whole turn
    (the policy's text and the tool exchange), then the next turn starts."""
    tok = build_char_tokenizer()
    seen = []

    class Recording(AnswerFeedback):
        def step(self, turn):
            seen.append(turn)
            return super().step(turn)

    tools = ToolInteraction(ToolRunner([calculator]), CharToolFormat([calculator]), tok)
    ids, mask = _prompt(tok, "12*3=")
    out = multi_turn_generate(ScriptedEngine(tok, ["[calculator: 12*4]", "48<eos>", "[calculator: 12*3]", "36<eos>"]),
                              ids, mask, _params(tok, 100), None, tools, tok, max_turns=6,
                              env=EnvironmentInteraction(Recording, tok), rows=[{"prompt": "12*3=", "answer": "36"}])
    assert seen == ["[calculator: 12*4]=48\n48", "[calculator: 12*3]=36\n36"]
    assert _text(tok, out) == "[calculator: 12*4]=48\n48<eos>\nwrong\n12*3=[calculator: 12*3]=36\n36<eos>"
    assert out.env_rewards == [[0.0, 1.0]] and out.turns.tool_calls.tolist() == [2.0]


@pytest.fixture
def qwen_like_tok():
    from test_tools import qwen_like_tok as make_tok

    return make_tok.__wrapped__() if hasattr(make_tok, "__wrapped__") else make_tok()


def test_observation_through_a_chat_template(qwen_like_tok):
    """With a chat template the observation is a user message after the assistant's turn, the assistant turn opened
    again; the turn's own EOS (<|im_end|>) is not written twice."""
    env = EnvironmentInteraction(AnswerFeedback, qwen_like_tok)
    assert env.observation_text("wrong", chat=True) == "\n<|im_start|>user\nwrong<|im_end|>\n<|im_start|>assistant\n"
    assert env.observation_text("wrong", chat=False) == "wrong"  # a plain-text prompt: the text as is
    _, chats, _ = env.start([{"prompt": [{"role": "user", "content": "1+1="}]}, {"prompt": "1+1="}])
    assert chats == [True, False]


def test_turn_boundaries_and_environment_reward_functions():
    rewards, ends = turn_boundaries([[0.0, 1.0], [0.5]], [[2, 9], [4]])
    assert ends.tolist() == [[2, 9], [4, -1]]
    assert rewards[0].tolist() == [0.0, 1.0] and rewards[1, 0] == 0.5 and torch.isnan(rewards[1, 1])
    with pytest.raises(Exception, match="1 step rewards for 2 environment turns"):
        turn_boundaries([[1.0]], [[2, 9]])
    assert environment_reward(["p", "q"], ["a", "b"], env_rewards=[[0.0, 1.0], [0.25, 0.25]]) == [1.0, 0.5]
    assert environment_turn_rewards(["p"], ["a"], env_rewards=[[0.0, 1.0]]) == [[0.0, 1.0]]


class Broken(Environment):
    def __init__(self, mode="raise"):
        self.mode = mode

    def step(self, turn):
        if self.mode == "raise":
            raise KeyError("answer")
        if self.mode == "nan":
            return EnvStep("", float("nan"), True)
        return {"reward": 1}


@pytest.mark.parametrize("mode, message", [
    ("raise", r"environment Broken.step raised on rollout row 0: KeyError: 'answer'"),
    ("nan", r"environment Broken.step returned reward nan on rollout row 0; it must be a finite number"),
    ("dict", r"environment Broken.step returned dict on rollout row 0; it must return an EnvStep"),
])
def test_a_broken_environment_is_one_line_naming_it(mode, message):
    tok = build_char_tokenizer()
    ids, mask = _prompt(tok)
    with pytest.raises(RuntimeError, match=message):
        multi_turn_generate(ScriptedEngine(tok, ["1<eos>"]), ids, mask, _params(tok), None, None, tok, max_turns=2,
                            env=EnvironmentInteraction(lambda: Broken(mode), tok), rows=[{"prompt": "p"}])


def test_load_environment_by_path_mapping_and_its_errors():
    assert load_environment("rlhf_lightning.environments.AnswerFeedback") is AnswerFeedback
    env = load_environment({"class_path": "rlhf_lightning.environments.AnswerFeedback",
                            "init_args": {"feedback": " no. "}})()
    env.reset({"prompt": "1+1=", "answer": "2"})
    assert env.step("3") == EnvStep(" no. ", 0.0, False) and env.step("x 2") == EnvStep("", 1.0, True)
    with pytest.raises(ValueError, match="environment 'rlhf_lightning.environments.Nope'"):
        load_environment("rlhf_lightning.environments.Nope")
    with pytest.raises(ValueError, match="builds a int, which has no step"):
        load_environment(int)
    with pytest.raises(ValueError, match="building it failed: TypeError"):
        load_environment({"class_path": "rlhf_lightning.environments.AnswerFeedback", "init_args": {"bad": 1}})
    with pytest.raises(ValueError, match="needs 'class_path'"):
        load_environment({"init_args": {}})
    with pytest.raises(ValueError, match="an environment needs the dataset row"):
        tok = build_char_tokenizer()
        ids, mask = _prompt(tok)
        multi_turn_generate(ScriptedEngine(tok, ["1<eos>"]), ids, mask, _params(tok), None, None, tok, max_turns=2,
                            env=_feedback(tok))


class ShortTurns(AutoEngine):
    """The policy's own samples, cut to 3 tokens and ended with EOS (a random tiny model rarely stops by itself):
    every turn ends, so the environment answers it."""

    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        from dataclasses import replace

        out = super().generate(prompt_ids, prompt_mask, replace(params, max_new_tokens=3, min_new_tokens=0),
                               generator)
        B = out.completion_ids.shape[0]
        eos = torch.full((B, 1), params.eos_token_id, device=out.completion_ids.device)
        ids = torch.where(out.completion_mask.bool(), out.completion_ids, params.pad_token_id)
        n = out.completion_mask.sum(-1)
        comp = torch.cat([ids, torch.full_like(eos, params.pad_token_id)], dim=1)
        comp[torch.arange(B), n] = eos[:, 0]  # EOS right after the last real token
        mask = torch.cat([out.completion_mask, torch.zeros_like(eos)], dim=1)
        mask[torch.arange(B), n] = 1
        logp = torch.cat([out.logprobs, torch.zeros(B, 1, device=eos.device)], dim=1)
        return RolloutBatch(prompt_ids, prompt_mask, comp, mask, logp, torch.zeros(B, dtype=torch.bool,
                                                                                  device=eos.device))


class Parity(Environment):
    """Reward 1 for a turn whose first character has an even code, `turns` turns an episode, "again:" between them."""

    def __init__(self, turns: int = 2):
        self.max_turns = turns

    def reset(self, row):
        self.turns = 0
        return ""

    def step(self, turn):
        self.turns += 1
        return EnvStep("again:", float(bool(turn) and ord(turn[0]) % 2 == 0), self.turns == self.max_turns)


@pytest.fixture
def short_turns_engine():
    from rlhf_lightning.rollout import base, register_engine

    register_engine("test_short_turns")(ShortTurns)
    yield
    base._ENGINES.pop("test_short_turns")


def _fit(module, tmp_path, steps=2):
    dm = PromptDataModule(task="addition", batch_size=2, num_train=8, num_val=4)
    per_rollout, optimizers = module.updates_per_batch()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=steps * per_rollout * optimizers, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=steps)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.parametrize("kind", ["grpo", "grpo_process", "ppo"])
def test_grpo_and_ppo_train_on_environment_episodes(tmp_path, short_turns_engine, kind):
    """A real fit on episodes: the environment's return is the default reward (reward/environment_reward), the
    observations are out of the loss mask, the weights move, env/* is logged, validation plays episodes too.
    Under supervision=process each turn's reward is that turn's step reward (the first turn's tokens see both)."""
    torch.manual_seed(0)
    common = dict(max_new_tokens=24, environment="test_environments.Parity", max_turns=3, lr=1e-3,
                  rollout_engine="test_short_turns")
    if kind == "ppo":
        module = PPOModule("tiny", **common)
    else:
        module = GRPOModule("tiny", group_size=4, supervision="process" if kind == "grpo_process" else "outcome",
                            **common)
    seen, logged = [], []
    original, log = module.compute_step_advantages, module.log_step_metrics

    def spy(step):
        original(step)
        seen.append(step)

    module.compute_step_advantages = spy
    module.log_step_metrics = lambda m: (logged.append(m), log(m))[1]
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = _fit(module, tmp_path)
    expected = environment_turn_rewards if kind == "grpo_process" else environment_reward
    assert module.reward_funcs == [expected]
    assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
    for step in seen:
        s = step.rollout.samples
        obs = s.completion_mask.bool() & ~s.action_mask.bool()
        assert bool(obs.any()) and float(step.loss_mask[obs].float().abs().sum()) == 0.0
        assert all(len(r) == 2 for r in s.env_rewards)  # Parity ends every episode at its second turn
        returns = torch.tensor([sum(r) for r in s.env_rewards])
        if kind == "grpo":  # the advantage is the group-normalised return
            g = returns.view(-1, 4)
            want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).flatten()
            got = step.advantages if step.advantages.dim() == 1 else step.advantages[:, 0]
            assert torch.allclose(got.cpu(), want, atol=1e-4)
        if kind == "grpo_process":  # a token of turn 1 gets both turns' normalised rewards, turn 2 only its own
            r = torch.tensor(s.env_rewards)  # [N, 2]
            flat = r.flatten()
            norm = ((r - flat.view(-1, 8).mean(1).repeat_interleave(4)[:, None])
                    / (flat.view(-1, 8).std(1).repeat_interleave(4)[:, None] + 1e-4))
            first_end = torch.tensor([e[0] for e in s.env_ends])
            adv = step.advantages.cpu()
            assert torch.allclose(adv[:, 0], norm.sum(1), atol=1e-4)
            assert torch.allclose(adv[torch.arange(len(adv)), first_end + 1], norm[:, 1], atol=1e-4)
    assert all(float(m["env/steps_per_completion"]) == 2.0 and float(m["env/done_frac"]) == 1.0 for m in logged)
    assert all(0.0 <= float(m["env/return"]) <= 2.0 for m in logged)
    assert "val/reward" in trainer.callback_metrics


def test_resume_with_an_environment_is_exact(tmp_path, short_turns_engine):
    """4 rollouts straight == 2, a checkpoint, 2 more from it (`ckpt_path`), with episodes; the environment given as
    {class_path, init_args} goes through the checkpoint's hyperparameters (weights_only loading)."""
    def module():
        torch.manual_seed(0)
        return GRPOModule("tiny", group_size=2, max_new_tokens=24, max_turns=3, lr=1e-3,
                          environment={"class_path": "test_environments.Parity", "init_args": {"turns": 2}},
                          rollout_engine="test_short_turns")

    straight, resumed, mid = straight_and_resumed(module, tmp_path, "addition")
    for (name, p), q in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q), name
    first = module()
    moved = any(not torch.equal(p, q) for p, q in zip(first.policy.parameters(), straight.policy.parameters()))
    assert moved  # the episodes' rewards moved the weights: the equality above is not trivial
    loaded = GRPOModule.load_from_checkpoint(mid, weights_only=True)
    assert loaded.hparams.environment == {"class_path": "test_environments.Parity", "init_args": {"turns": 2}}


def test_an_observation_without_room_for_a_reply_is_not_appended():
    """The policy's turn ended at EOS but "\\nwrong\\n1+1=" would fill the budget: the episode ends there, whole
    (no cut-off observation in the completion, not truncated: the policy's text ended)."""
    tok = build_char_tokenizer()
    ids, mask = _prompt(tok, "1+1=")
    out = multi_turn_generate(ScriptedEngine(tok, ["3<eos>"]), ids, mask, _params(tok, 10), None, None, tok,
                              max_turns=3, env=_feedback(tok), rows=[{"prompt": "1+1=", "answer": "2"}])
    assert _text(tok, out) == "3<eos>" and not bool(out.is_truncated[0]) and out.env_rewards == [[0.0]]


def test_first_message_of_a_conversation_follows_an_empty_assistant_turn(qwen_like_tok):
    env = EnvironmentInteraction(AnswerFeedback, qwen_like_tok)
    text = env.observation_text("Hint", chat=True, first=True)  # the prompt ended with the assistant's opening
    assert text == "<|im_end|>\n<|im_start|>user\nHint<|im_end|>\n<|im_start|>assistant\n"
    fb = AnswerFeedback()
    fb.reset({"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"})
    assert fb.step("3") == EnvStep("\nwrong\n1+1=", 0.0, False)  # {prompt}: the last user message


def test_module_settings_with_an_environment():
    """A class given as `environment` is saved as its import path (weights_only checkpoints hold no code); under
    supervision=process val/accuracy is the episode's return; single-turn samplers refuse episodes."""
    from rlhf_lightning.algorithms.mc_labels import module_generate

    m = GRPOModule("tiny", environment=AnswerFeedback, supervision="process")
    assert m.hparams.environment == "rlhf_lightning.environments.feedback.AnswerFeedback"
    assert m.validation_verifier() is environment_reward
    with pytest.raises(ValueError, match="Monte-Carlo step labels continue a step's prefix in one turn"):
        module_generate(m)
