"""GRPOModule's `advantage_estimator`: the default is unchanged, each estimator gets its inputs and learns."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lightning import GRPOModule, PromptDataModule, losses
from rlhf_lightning.algorithms.advantages import ESTIMATORS, AdvantageInputs, get_estimator

REPO = Path(__file__).resolve().parents[1]


def first_char_is_digit(prompts, completions, **kwargs):
    """A reward a random tiny policy can move (~10% at init): does the completion start with a digit?"""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def _data(batch_size=4):
    return PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=400, num_val=0,
                            batch_size=batch_size)


def _fit(tmp_path, module, steps, batch_size=4, logger=False):
    L.Trainer(max_steps=steps, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              default_root_dir=tmp_path).fit(module, _data(batch_size))
    return module


def _weights(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.policy.parameters()])


def _module(cls=GRPOModule, **kw) -> GRPOModule:
    args = dict(model_name_or_path="tiny", reward_fns=[first_char_is_digit], group_size=4, max_new_tokens=4,
                lr=1e-3, log_samples_every_n_steps=0)
    return cls(**{**args, **kw})


class PreRegistryGRPO(GRPOModule):
    """compute_advantages as it read before the registry: `losses.group_advantages` called directly."""

    def compute_advantages(self, rewards, rollout):
        return losses.group_advantages(rewards, self.hparams.group_size, scale=self.hparams.scale_rewards)


# ---------------------------------------------------------------------------------------------- unchanged default
@pytest.mark.parametrize("kw", [dict(beta=0.1, num_iterations=2), dict(beta=0.0, scale_rewards="batch")],
                         ids=["kl_two_iterations", "batch_scale"])
def test_default_estimator_trains_exactly_like_before(tmp_path, kw):
    """The same seeded run gives the same weights through the registry as with the pre-registry formula."""
    L.seed_everything(0)
    new = _fit(tmp_path / "new", _module(**kw), 3 * kw.get("num_iterations", 1))
    L.seed_everything(0)
    old = _fit(tmp_path / "old", _module(PreRegistryGRPO, **kw), 3 * kw.get("num_iterations", 1))
    assert new.hparams.advantage_estimator == "grpo"
    assert torch.equal(_weights(new), _weights(old))


def test_dr_grpo_is_grpo_without_std_scaling(tmp_path):
    L.seed_everything(0)
    dr = _fit(tmp_path / "dr", _module(beta=0.0, advantage_estimator="dr_grpo"), 3)
    L.seed_everything(0)
    none = _fit(tmp_path / "none", _module(beta=0.0, scale_rewards="none"), 3)
    assert torch.equal(_weights(dr), _weights(none))


# ---------------------------------------------------------------------------------------------- the inputs each gets
def test_reinforce_pp_puts_the_kl_in_the_reward_and_not_in_the_loss(tmp_path):
    module = _module(beta=0.05, advantage_estimator="reinforce_pp")
    seen = {}
    compute, update = module.compute_advantages, module.update

    def spy_advantages(rewards, rollout):
        seen["rewards"], seen["kl"], seen["mask"] = rewards, rollout.kl, rollout.samples.completion_mask
        seen["adv"] = compute(rewards, rollout)
        return seen["adv"]

    def spy_update(step):
        seen["old_logp"], seen["ref_logp"] = step.old_logp, step.ref_logp
        return update(step)

    module.compute_advantages, module.update = spy_advantages, spy_update
    L.seed_everything(0)
    _fit(tmp_path, module, 2)  # the second rollout's: after one update the policy differs from the reference
    N, T = seen["mask"].shape
    assert seen["kl"].shape == (N, T) and seen["kl"][seen["mask"].bool()].abs().sum() > 0  # a real KL (k3 >= 0)
    assert seen["ref_logp"] is None  # no KL term in the loss
    assert seen["old_logp"] is not None  # the KL needed the policy's log-probs before the update
    expected = get_estimator("reinforce_pp").fn(AdvantageInputs(mask=seen["mask"], scores=seen["rewards"],
                                                                kl=seen["kl"], kl_coef=0.05)).advantages
    torch.testing.assert_close(seen["adv"], expected)
    assert seen["adv"].shape == (N, T)


def test_remax_baseline_is_the_reward_of_the_greedy_completion(tmp_path):
    module = _module(beta=0.0, advantage_estimator="remax")
    seen = {}
    sample = module.rollout

    def spy_rollout(batch):
        out = sample(batch)
        # the same policy, before the update: its greedy completions, scored independently
        greedy = module.greedy_completions(batch, module.hparams.max_new_tokens)
        seen["expected"] = torch.tensor(first_char_is_digit(batch["prompts"], greedy)).repeat_interleave(4)
        seen["baseline"], seen["completions"] = out.baseline_scores, out.completions
        return out

    module.rollout = spy_rollout
    L.seed_everything(0)
    _fit(tmp_path, module, 1)
    assert torch.equal(seen["baseline"], seen["expected"])
    # greedy decoding draws no random numbers: the sampled rows are those of the default estimator's run
    plain = _module(beta=0.0)
    plain_rollout, seen_plain = plain.rollout, {}
    plain.rollout = lambda batch: seen_plain.setdefault("out", plain_rollout(batch))
    L.seed_everything(0)
    _fit(tmp_path / "plain", plain, 1)
    assert seen_plain["out"].completions == seen["completions"]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, message", [
    (dict(advantage_estimator="ppo"), "advantage_estimator must be one of grpo|dr_grpo|rloo|reinforce_pp|"
     "reinforce_pp_baseline|remax|gae, got 'ppo'"),
    (dict(advantage_estimator="gae"), "advantage_estimator=gae needs a critic: use PPOModule"),
    (dict(advantage_estimator="rloo", supervision="process"), "supervision=process has its own advantages"),
    (dict(advantage_estimator="rloo", scale_rewards="batch"), "scale_rewards=batch applies to "
     "advantage_estimator=grpo only, got 'rloo'"),
])
def test_bad_estimator_settings_fail_before_loading(kw, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        GRPOModule(model_name_or_path="./not_loaded_because_it_fails_first", **kw)


def test_unknown_estimator_through_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "rlhf-lightning"
    proc = subprocess.run([str(script), "fit", "--model", "rlhf_lightning.GRPOModule", "--data",
                           "rlhf_lightning.PromptDataModule", "--data.task", "addition",
                           "--model.advantage_estimator", "rlo", "--trainer.logger", "false"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "rlhf-lightning: error: advantage_estimator must be one of grpo|dr_grpo|rloo|reinforce_pp|"
        "reinforce_pp_baseline|remax|gae, got 'rlo'")


# ---------------------------------------------------------------------------------------------- learning
LEARNING = {  # estimator -> extra settings; beta > 0 for reinforce_pp so its KL-shaped reward is exercised
    "grpo": {}, "dr_grpo": {}, "rloo": {}, "reinforce_pp": dict(beta=0.01, kl_estimator="k1"),
    "reinforce_pp_baseline": {}, "remax": {},
}


def test_every_grpo_side_estimator_has_a_learning_test():
    # gae learns in tests/test_ppo.py::test_reward_rises_on_addition_prompts (PPOModule.compute_advantages)
    assert set(LEARNING) | {"gae"} == set(ESTIMATORS)


@pytest.mark.parametrize("name", list(LEARNING))
def test_estimator_raises_the_reward(tmp_path, name):
    """The tiny policy learns to start with a digit (~10% at random init) under every estimator.

    Measured (mean reward of the first -> last 5 of 30 rollouts, sample_seed 1234 / 7 / 99): grpo .12 -> .85 /
    .92 / .90, dr_grpo and rloo .12 -> .86 / .93 / .91, reinforce_pp .11 -> .79 / .90 / .88, reinforce_pp_baseline
    .12 -> .80 / .90 / .89, remax .10 -> .59 / .66 / .70 (~4 s each).
    """
    L.seed_everything(0)
    module = _module(**{**dict(group_size=8, beta=0.0, lr=3e-3, advantage_estimator=name), **LEARNING[name]})
    logger = CSVLogger(tmp_path)
    rollouts = 30
    _fit(tmp_path, module, rollouts, batch_size=8, logger=logger)
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    rewards = [float(r["reward/mean"]) for r in rows if r.get("reward/mean")]
    assert len(rewards) == rollouts
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, (name, first, last, rewards)
