"""No NaN reaches the weights or an export: non-finite rewards, losses, gradients, weights and logits.

Misbehaving rewards (inf, -inf, 1e300, NaN, None) and losses made non-finite on purpose (a subclass whose loss is
inf), through the functions, the modules' training loops and the installed console script.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_script, tensorboard_scalars

from rlhf_lightning import GRPOModule, PPOModule, PreferenceDataModule, PromptDataModule, RewardModel, SFTModule
from rlhf_lightning.infra.errors import NonFiniteError, NonFiniteWeightsError, RewardFunctionError
from rlhf_lightning.rewards import call_reward_fns, call_step_reward_fns
from rlhf_lightning.rollout import sample

PROMPTS, COMPLETIONS = ["1+1=", "2+2=", "3+3="], ["2", "4", "7"]


def returning(value):
    def bad_reward(prompts, completions, **kwargs):
        return [1.0, value, 0.0]

    return bad_reward


# ------------------------------------------------------------------------------------------------ rewards
@pytest.mark.parametrize("value, shown", [(math.inf, "inf"), (-math.inf, "-inf"), (1e300, "1e+300"),
                                          (torch.tensor(float("inf")), "inf")])
def test_an_infinite_or_overflowing_reward_is_named_with_row_and_value(value, shown):
    with pytest.raises(RewardFunctionError) as err:
        call_reward_fns([returning(value)], None, PROMPTS, COMPLETIONS)
    message = str(err.value)
    assert message.startswith(f"reward function 'bad_reward' returned {shown} at row 1: rewards must be finite")
    assert "\n" not in message


@pytest.mark.parametrize("value", [math.nan, None])
def test_nan_and_none_stay_no_reward(value):
    total, per_fn = call_reward_fns([returning(value)], None, PROMPTS, COMPLETIONS)
    assert math.isnan(total[1]) and total[0] == 1.0 and total[2] == 0.0


def test_missing_mode_treats_nonfinite_as_no_reward_and_counts_it():
    stats: dict[str, int] = {}
    with pytest.warns(RuntimeWarning, match="'bad_reward' returned ±inf or a float32-overflowing reward; "
                                            "nonfinite_rewards=missing treats such values as no reward"):
        total, _ = call_reward_fns([returning(1e300), returning(-math.inf)], None, PROMPTS, COMPLETIONS,
                                   nonfinite="missing", stats=stats)
    assert math.isnan(total[1]) and total.tolist()[::2] == [2.0, 0.0]
    assert stats == {"nonfinite": 2}


def test_an_infinite_step_reward_is_named_with_completion_and_step():
    def steps(prompts, completions, **kwargs):
        return [[1.0], [0.0, math.inf], [0.0]]

    with pytest.raises(RewardFunctionError, match=r"'steps' returned inf at completion 1 step 1"):
        call_step_reward_fns([steps], None, PROMPTS, COMPLETIONS)


@pytest.mark.parametrize("weights", [[float("nan")], [float("inf")], ["x"]])
def test_a_nonfinite_reward_weight_is_refused_at_construction(weights):
    with pytest.raises(ValueError, match=r"reward_weights\[0\] is .*; every reward weight must be a finite number"):
        GRPOModule(reward_fns=["exact_match"], reward_weights=weights)


def test_a_mutating_reward_function_cannot_change_the_next_ones_input():
    seen = {}

    def vandal(prompts, completions, answer, **kwargs):
        completions.clear()
        prompts[0] = "changed"
        answer.reverse()
        return [0.0] * 3

    def witness(prompts, completions, answer, **kwargs):
        seen.update(prompts=list(prompts), completions=list(completions), answer=list(answer))
        return [1.0] * 3

    completions, answer = list(COMPLETIONS), ["2", "4", "6"]
    call_reward_fns([vandal, witness], None, PROMPTS, completions, {"answer": answer})
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS, "answer": ["2", "4", "6"]}
    assert completions == COMPLETIONS and answer == ["2", "4", "6"]  # the caller's lists too


def test_a_reward_function_without_kwargs_is_told_to_add_them():
    def no_kwargs(prompts, completions):
        return [1.0] * len(completions)

    assert call_reward_fns([no_kwargs], None, PROMPTS, COMPLETIONS)[0].tolist() == [1.0] * 3  # no columns: fine
    with pytest.raises(RewardFunctionError) as err:
        call_reward_fns([no_kwargs], None, PROMPTS, COMPLETIONS, {"answer": ["2", "4", "6"]})
    assert str(err.value) == ("reward function 'no_kwargs' does not accept ['answer']: add **kwargs to its signature "
                              "(reward functions receive prompts, completions and every dataset column by name)")


class InfRewardGRPO(GRPOModule):
    """A subclass whose own reward overflows on the second completion of every rollout."""

    def compute_rewards(self, prompts, completions, batch):
        return torch.tensor([1.0 if i != 1 else 1e39 for i in range(len(completions))], dtype=torch.float64)


@pytest.mark.parametrize("mode", ["error", "missing"])
def test_a_subclass_reward_that_overflows_is_named_or_counted(mode, trainer_kwargs):
    model = InfRewardGRPO(group_size=2, max_new_tokens=4, log_samples_every_n_steps=0, nonfinite_rewards=mode)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, **trainer_kwargs)
    data = PromptDataModule(task="addition", num_train=32, num_val=0, batch_size=2)
    if mode == "error":
        with pytest.raises(RewardFunctionError, match=r"^InfRewardGRPO.compute_rewards returned 1e\+39 at row 1: "):
            trainer.fit(model, datamodule=data)
        return
    with pytest.warns(RuntimeWarning, match="InfRewardGRPO.compute_rewards returned ±inf"):
        trainer.fit(model, datamodule=data)
    assert float(trainer.callback_metrics["reward/nonfinite_count"]) == 1.0  # one row of the last rollout
    assert float(trainer.callback_metrics["reward/missing_frac"]) == 0.25
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -------------------------------------------------------------------------------------------- the CLI
BAD_REWARDS = '''
import math


def inf_on_row_1(prompts, completions, **kwargs):
    return [math.inf if i == 1 else 0.0 for i in range(len(completions))]


def no_kwargs(prompts, completions):
    return [0.0] * len(completions)
'''

TINY = ["--data", "rlhf_lightning.PromptDataModule", "--data.task", "addition", "--data.num_train", "32",
        "--data.num_val", "4", "--data.batch_size", "2",
        "--model.group_size", "2", "--model.max_new_tokens", "4", "--model.log_samples_every_n_steps", "0",
        "--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_val_batches", "0"]
TINY_GRPO = ["fit", "--model", "rlhf_lightning.GRPOModule", *TINY]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("rlhf-lightning: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def checkpoint_weights_are_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_cli_an_infinite_reward_stops_with_one_line_and_error_ckpt(tmp_path):
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    proc = run_script([*TINY_GRPO, "--model.reward_fns", "[bad_rewards.inf_on_row_1]",
                       "--trainer.default_root_dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert line.startswith("rlhf-lightning: error: reward function 'inf_on_row_1' returned inf at row 1: rewards "
                           "must be finite float32 numbers"), line
    error_ckpt = tmp_path / "checkpoints" / "error.ckpt"
    assert f"(checkpoint saved to {error_ckpt})" in line
    assert checkpoint_weights_are_finite(error_ckpt)
    assert not (tmp_path / "hf_model").exists()


def test_cli_a_reward_function_without_kwargs_is_named_at_setup(tmp_path):
    """Found from the signature and one collated row at set-up, before any step: a config error (status 2)."""
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    proc = run_script([*TINY_GRPO, "--model.reward_fns", "[bad_rewards.no_kwargs]",
                       "--trainer.default_root_dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == (
        "rlhf-lightning: error: reward function 'no_kwargs' does not accept ['completion', 'answer']: add **kwargs "
        "to its signature (reward functions receive prompts, completions and every dataset column by name)")
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_cli_a_nan_reward_weight_is_a_config_error(tmp_path):
    proc = run_script([*TINY_GRPO, "--model.reward_fns", "[exact_match]", "--model.reward_weights", "[.nan]"],
                      tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == ("rlhf-lightning: error: reward_weights[0] is nan; every reward weight "
                                           "must be a finite number")


# ---------------------------------------------------------------------------------- the non-finite guard
class InfLossGRPO(GRPOModule):
    def policy_loss(self, logp, old_logp, advantages, mask, normalizer):
        loss, stats = super().policy_loss(logp, old_logp, advantages, mask, normalizer)
        return loss + math.inf, stats


class InfLossPPO(PPOModule):
    def policy_loss(self, logp, old_logp, advantages, mask, normalizer):
        loss, stats = super().policy_loss(logp, old_logp, advantages, mask, normalizer)
        return loss * math.inf, stats


class NanLossSFT(SFTModule):
    def sft_loss(self, batch):
        return super().sft_loss(batch) * math.nan


class InfLossRM(RewardModel):
    def _step(self, batch):
        loss, r_c, r_r = super()._step(batch)
        return loss + math.inf, r_c, r_r


def _prompt_data(**kw):
    return PromptDataModule(task="addition", num_train=32, num_val=0, batch_size=2, **kw)


CASES = {
    "grpo": (lambda n: InfLossGRPO(group_size=2, max_new_tokens=4, max_nonfinite_steps=n,
                                   log_samples_every_n_steps=0), lambda: _prompt_data(), "policy/skipped_steps"),
    "ppo": (lambda n: InfLossPPO(ppo_epochs=1, max_new_tokens=4, max_nonfinite_steps=n, log_samples_every_n_steps=0),
            lambda: _prompt_data(), "policy/skipped_steps"),
    "sft": (lambda n: NanLossSFT(max_nonfinite_steps=n), lambda: _prompt_data(completion_column="completion"),
            "train/skipped_steps"),
    "rm": (lambda n: InfLossRM(max_nonfinite_steps=n),
           lambda: PreferenceDataModule(task="addition", num_train=32, num_val=0, batch_size=2),
           "train/skipped_steps"),
}


def _fit(case: str, max_nonfinite_steps: int, rollouts: int, trainer_kwargs):
    make_model, make_data, key = CASES[case]
    model = make_model(max_nonfinite_steps)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = rollouts * (2 if case == "ppo" else 1)  # PPO's max_steps counts both optimizers
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, **trainer_kwargs)
    return model, before, trainer, make_data(), key


@pytest.mark.parametrize("case", list(CASES))
def test_a_nonfinite_loss_never_reaches_the_weights(case, trainer_kwargs):
    """Two steps with an inf/NaN loss are skipped (counted), the weights and every later state stay as they were."""
    model, before, trainer, data, key = _fit(case, 3, 2, trainer_kwargs)
    with pytest.warns(UserWarning, match="skipped .* optimizer step .*: the loss is (inf|nan)"):
        trainer.fit(model, datamodule=data)
    expected_skips = 4 if case == "ppo" else 2  # PPO: the actor's and the critic's step of each update
    assert model.nonfinite_guard.skipped == expected_skips
    assert float(trainer.callback_metrics[key]) == expected_skips
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p.detach(), before[name]), f"{case}: {name} changed"


@pytest.mark.parametrize("case", list(CASES))
def test_consecutive_nonfinite_steps_stop_the_run_naming_the_cause(case, trainer_kwargs):
    model, _, trainer, data, _ = _fit(case, 2, 3, trainer_kwargs)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError) as err:
        trainer.fit(model, datamodule=data)
    assert "2 optimizer steps in a row of the " in str(err.value)
    assert "were skipped because the loss is " in str(err.value)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


INF_LOSS = '''
import math

from rlhf_lightning import GRPOModule


class InfLossGRPO(GRPOModule):
    def policy_loss(self, logp, old_logp, advantages, mask, normalizer):
        loss, stats = super().policy_loss(logp, old_logp, advantages, mask, normalizer)
        return loss + math.inf, stats
'''


def test_cli_consecutive_nonfinite_steps_exit_1_with_a_finite_error_ckpt(tmp_path):
    (tmp_path / "inf_loss.py").write_text(INF_LOSS)
    proc = run_script(["fit", "--model", "inf_loss.InfLossGRPO", *TINY, "--model.max_nonfinite_steps", "2",
                       "--trainer.default_root_dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert line.startswith("rlhf-lightning: error: 2 optimizer steps in a row of the policy were skipped because "
                           "the loss is inf; the weights are those of the last good step."), line
    assert checkpoint_weights_are_finite(tmp_path / "checkpoints" / "error.ckpt")
    assert not (tmp_path / "hf_model").exists()


class CorruptsWeightsGRPO(GRPOModule):
    """Weights that turn NaN outside the guarded optimizer step (the check after each step must notice)."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        with torch.no_grad():
            next(self.policy.parameters()).fill_(math.nan)


def test_nonfinite_weights_after_a_step_stop_the_run(trainer_kwargs):
    model = CorruptsWeightsGRPO(group_size=2, max_new_tokens=4, log_samples_every_n_steps=0)
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, **trainer_kwargs)
    with pytest.raises(NonFiniteWeightsError, match=r"parameter 'policy\..*' holds NaN/inf after an optimizer step"):
        trainer.fit(model, datamodule=_prompt_data())
    assert trainer.global_step == 1
    assert not NonFiniteWeightsError.save_checkpoint  # no error.ckpt of NaN weights


class CorruptsBeforeExport(L.Callback):
    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            next(pl_module.parameters()).fill_(math.inf)


@pytest.mark.parametrize("case", ["sft", "rm"])
def test_an_export_never_holds_nan(case, tmp_path, trainer_kwargs):
    make_data = CASES[case][1]
    model = (SFTModule if case == "sft" else RewardModel)()
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[CorruptsBeforeExport()], **trainer_kwargs)
    with pytest.raises(NonFiniteWeightsError, match=r"not exporting to .*hf_model: parameter '.*' holds NaN/inf"):
        trainer.fit(model, datamodule=make_data())
    assert not (tmp_path / "hf_model").exists()


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("do_sample", [True, False])
def test_sampling_from_nan_logits_names_the_cause(do_sample):
    model = GRPOModule(group_size=2).policy
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(NonFiniteError, match=r"sampling stopped: the policy's logits are NaN/inf at completion token "
                                             r"0 \(rows \[0\]\)"):
        sample(model, ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=0, do_sample=do_sample)


# ------------------------------------------------------------------------------------------------ the soak
SOAK_REWARD = '''
import math
import random

_rng = random.Random(0)


def flaky(prompts, completions, **kwargs):
    """A valid reward (length) with inf, -inf, 1e300, NaN and None mixed in at random (seeded)."""
    out = []
    for c in completions:
        draw = _rng.random()
        out.append(math.inf if draw < 0.05 else -math.inf if draw < 0.1 else 1e300 if draw < 0.15 else
                   math.nan if draw < 0.2 else None if draw < 0.25 else len(c) / 4)
    return out
'''


@pytest.mark.slow
def test_soak_a_thousand_rollouts_with_a_misbehaving_reward(tmp_path):
    """1,000 tiny-preset rollouts from the console script with rewards that are ±inf, 1e300, NaN or None a quarter
    of the time: the default stops at the first ±inf (exit 1, one line, a finite error.ckpt that resumes), and
    `nonfinite_rewards: missing` runs all 1,000 (exit 0) with finite weights, the count logged, a checkpoint that
    resumes for one more rollout, and a finite export."""
    (tmp_path / "soak_rewards.py").write_text(SOAK_REWARD)
    common = ["fit", "--model", "rlhf_lightning.GRPOModule", "--data", "rlhf_lightning.PromptDataModule",
              "--data.task", "addition", "--data.num_train", "64", "--data.num_val", "0", "--data.batch_size", "1",
         "--model.group_size", "2", "--model.max_new_tokens", "2", "--model.lr", "1e-3", "--model.beta", "0",
              "--model.log_samples_every_n_steps", "0", "--model.reward_fns", "[soak_rewards.flaky]",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.limit_val_batches", "0"]
    stop = tmp_path / "stop"
    proc = run_script([*common, "--trainer.max_steps", "1000", "--trainer.default_root_dir", str(stop),
                       "--trainer.logger", "false"], tmp_path)
    assert proc.returncode == 1
    assert re.match(r"rlhf-lightning: error: reward function 'flaky' returned (inf|-inf|1e\+300) at row [01]: ",
                    one_error_line(proc.stderr))
    assert checkpoint_weights_are_finite(stop / "checkpoints" / "error.ckpt")

    soak = tmp_path / "soak"
    proc = run_script([*common, "--model.nonfinite_rewards", "missing", "--trainer.max_steps", "1000",
                       "--trainer.default_root_dir", str(soak), "--trainer.logger.init_args.save_dir", str(soak)],
                      tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next(soak.rglob("checkpoints/*.ckpt"))  # beside the logger's events
    assert checkpoint_weights_are_finite(ckpt)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["rlhf_counters"]["rollouts"] == 1000
    scalars = tensorboard_scalars(soak)
    assert sum(scalars["reward/nonfinite_count"]) > 0 and max(scalars["reward/missing_frac"]) > 0
    from safetensors.torch import load_file

    export = load_file(next(soak.rglob("hf_model/model.safetensors")))
    assert all(bool(torch.isfinite(t).all()) for t in export.values())

    resumed = tmp_path / "resumed"
    proc = run_script([*common, "--model.nonfinite_rewards", "missing", "--trainer.max_steps", "1001",
                       "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(resumed),
                       "--trainer.logger", "false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = next((resumed / "checkpoints").glob("*.ckpt"))
    assert torch.load(again, map_location="cpu", weights_only=True)["rlhf_counters"]["rollouts"] == 1001
    assert checkpoint_weights_are_finite(again)
