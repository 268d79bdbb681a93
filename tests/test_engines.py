"""The RolloutEngine interface: the registry, a new engine as one class + one registration, sync_weights."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from conftest import run_script

from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule
from rlhf_lightning.rollout import (
    HFEngine,
    RolloutEngine,
    SamplingParams,
    base,
    completion_logprobs,
    engine_names,
    get_engine,
    register_engine,
)


def first_char_is_digit(prompts, completions, **kwargs):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def _fit(tmp_path, module, steps: int, batch_size: int = 4) -> None:
    data = PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=64, num_val=0,
                            batch_size=batch_size)
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(module, data)


@pytest.fixture
def registry(monkeypatch):
    """Engines registered in a test are gone after it (the built-in names stay what error messages list)."""
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))


def test_unknown_engine_is_one_line_naming_the_registered_engines():
    with pytest.raises(ValueError) as err:
        get_engine("vllm")
    assert str(err.value) == "engine must be auto|hf|fast, got 'vllm'"
    with pytest.raises(ValueError) as err:
        GRPOModule("tiny", reward_fns=[first_char_is_digit], rollout_engine="vlm")
    assert str(err.value) == "rollout_engine must be auto|hf|fast, got 'vlm'"


def test_registration_adds_the_name_everywhere_it_is_checked(registry):
    @register_engine("greedy")
    class Greedy(HFEngine):
        pass

    assert engine_names() == ["auto", "hf", "fast", "greedy"] and get_engine("greedy") is Greedy
    with pytest.raises(ValueError, match=r"rollout_engine must be auto\|hf\|fast\|greedy, got 'gredy'"):
        GRPOModule("tiny", reward_fns=[first_char_is_digit], rollout_engine="gredy")
    with pytest.raises(TypeError, match=r"register_engine\('bad'\) needs a RolloutEngine subclass"):
        register_engine("bad")(object)


def test_sampling_params_name_the_bad_field():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(max_new_tokens=4, eos_token_id=1, pad_token_id=0, top_p=0)
    assert SamplingParams(max_new_tokens=4, eos_token_id=1, pad_token_id=0, temperature=0).greedy


def test_a_registered_engine_is_what_grpo_samples_with(tmp_path, registry):
    """A new engine is one class + one registration: this one decodes greedily whatever the hyperparameters say,
    so all G completions of a prompt are the same (with the default engine at temperature 1 they are not)."""

    @register_engine("always_greedy")
    class AlwaysGreedy(HFEngine):
        def generate(self, prompt_ids, prompt_mask, params, generator=None):
            return super().generate(prompt_ids, prompt_mask, dataclasses.replace(params, do_sample=False), generator)

    groups = {}

    def recording(prompts, completions, **kwargs):
        for p, c in zip(prompts, completions):
            groups.setdefault(p, []).append(c)
        return first_char_is_digit(prompts, completions)

    m = GRPOModule("tiny", reward_fns=[recording], group_size=4, max_new_tokens=6, rollout_engine="always_greedy")
    _fit(tmp_path, m, 1)
    assert isinstance(m.engine, AlwaysGreedy) and m.rollouts == 1
    assert len(groups) == 4 and all(len(set(g)) == 1 and len(g) == 4 for g in groups.values())

    groups.clear()
    _fit(tmp_path, GRPOModule("tiny", reward_fns=[recording], group_size=4, max_new_tokens=6), 1)
    assert any(len(set(g)) > 1 for g in groups.values())


class CountingSync(HFEngine):
    """The HF engine, recording every sync_weights: the policy it got and a snapshot of one of its weights."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.synced = []

    def sync_weights(self, policy):
        weight = next(p for p in policy.parameters() if p.requires_grad)
        self.synced.append((policy, weight.detach().clone()))
        super().sync_weights(policy)


@pytest.mark.parametrize("algo, kwargs, steps, updates", [
    ("grpo", dict(group_size=2, num_iterations=2, minibatches=2), 8, 8),  # 4 optimizer steps per rollout, 2 rollouts
    ("ppo", dict(ppo_epochs=1, minibatches=2), 8, 4),  # Lightning counts actor + critic steps: 2 updates a rollout
])
def test_sync_weights_is_called_once_per_optimizer_step(tmp_path, registry, algo, kwargs, steps, updates):
    register_engine("counting")(CountingSync)
    cls = GRPOModule if algo == "grpo" else PPOModule
    m = cls("tiny", reward_fns=[first_char_is_digit], max_new_tokens=4, lr=1e-2, rollout_engine="counting", **kwargs)
    _fit(tmp_path, m, steps)
    assert m.optimizer_steps == updates and len(m.engine.synced) == updates
    assert all(policy is m.policy for policy, _ in m.engine.synced)
    snapshots = [w for _, w in m.engine.synced]
    # called after the step: every sync sees weights the previous one had not seen
    assert all(not torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:]))


def test_the_rollout_carries_the_samplers_logprobs(tmp_path):
    """Every engine returns the behaviour log-probs: those of GRPO's rollout are the policy's at `temperature`."""
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=4, max_new_tokens=6, temperature=0.7)
    seen, rollout = [], m.rollout

    def recording(batch):
        out = rollout(batch)
        s = out.samples
        with torch.no_grad():
            seen.append((s.logprobs, completion_logprobs(m.policy, s.prompt_ids, s.prompt_mask, s.completion_ids,
                                                         s.completion_mask, temperature=0.7)))
        return out

    m.rollout = recording
    _fit(tmp_path, m, 1)
    (sampled, recomputed), = seen
    torch.testing.assert_close(sampled, recomputed, atol=1e-4, rtol=0)


def test_the_base_class_names_what_is_missing():
    with pytest.raises(NotImplementedError, match="RolloutEngine does not implement generate"):
        RolloutEngine(torch.nn.Linear(1, 1)).generate(torch.ones(1, 1), torch.ones(1, 1),
                                                      SamplingParams(max_new_tokens=1, eos_token_id=1, pad_token_id=0))


ENGINE_PKG = '''
import dataclasses
from pathlib import Path

from rlhf_lightning import GRPOModule
from rlhf_lightning.rollout import HFEngine, register_engine


@register_engine("always_greedy")
class AlwaysGreedy(HFEngine):
    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        with Path("generate_calls.txt").open("a") as f:
            f.write(f"{params.do_sample}\\n")
        return super().generate(prompt_ids, prompt_mask, dataclasses.replace(params, do_sample=False), generator)


class MyGRPO(GRPOModule):
    """Only here so that `--model my_engine_pkg.MyGRPO` imports this module, and with it the registration."""
'''


@pytest.mark.slow
def test_a_registered_engine_is_selected_from_the_cli(tmp_path):
    (tmp_path / "my_engine_pkg.py").write_text(ENGINE_PKG)
    args = ["fit", "--model", "my_engine_pkg.MyGRPO", "--data", "rlhf_lightning.PromptDataModule",
            "--model.reward_fns", "[rlhf_lightning.rewards.exact_match]", "--model.group_size", "2",
            "--model.max_new_tokens", "3", "--data.task", "addition", "--data.num_train", "8", "--data.num_val", "0",
            "--data.batch_size", "2", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    bad = run_script([*args, "--model.rollout_engine", "always_gredy"], tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("rlhf-lightning: error: rollout_engine must be "
                                                   "auto|hf|fast|always_greedy, got 'always_gredy'")
    assert not (tmp_path / "generate_calls.txt").exists()
    ok = run_script([*args, "--model.rollout_engine", "always_greedy"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "generate_calls.txt").read_text() == "True\n"  # the one rollout, with the hparams' params
