"""GRPOModule: argument checks, the update's invariances, process supervision, learning, CLI subclassing."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_script, tensorboard_scalars

from rlhf_lightning import GRPOModule, PromptDataModule
from rlhf_lightning.cli import cli_main


def first_char_is_digit(prompts, completions, **kwargs):
    """A reward a random tiny model can learn in a few steps: does the completion start with a digit?"""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


class FirstDigitGRPO(GRPOModule):
    """A new task by overriding compute_rewards alone (used through the CLI below)."""

    def compute_rewards(self, prompts, completions, batch):
        return torch.tensor(first_char_is_digit(prompts, completions))


def _trainer(tmp_path, steps, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kw)


def _data(batch_size=4, **kw):
    return PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=400, num_val=0,
                            batch_size=batch_size, **kw)


@pytest.mark.parametrize("bad, message", [
    (dict(group_size=1), "group_size"),
    (dict(beta=-0.1), "beta"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(clip_low=1.5), "clip_low"),
    (dict(scale_rewards="rank"), "scale_rewards"),
    (dict(loss_agg="sum"), "loss_agg"),
    (dict(importance_sampling="seq"), "importance_sampling"),
    (dict(num_iterations=0), "num_iterations"),
    (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=1), "top_k"),
    (dict(supervision="step"), "supervision"),
    (dict(lr=2.0), "lr"),
])
def test_bad_hyperparameters_fail_before_loading(bad, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule(model_name_or_path="tiny", **bad)


def test_beta_zero_loads_no_reference():
    assert GRPOModule(model_name_or_path="tiny", beta=0.0).ref_policy is None
    module = GRPOModule(model_name_or_path="tiny", beta=0.1)
    assert module.ref_policy is not None
    assert not any(p.requires_grad for p in module.ref_policy.parameters())


class _GradCapture(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()
                      if p.grad is not None}


def _one_step_grads(tmp_path, **kw) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[first_char_is_digit], group_size=4, beta=0.05,
                        max_new_tokens=6, max_grad_norm=None, **kw)
    capture = _GradCapture()
    _trainer(tmp_path, 1, callbacks=[capture]).fit(module, _data(batch_size=4))
    return capture.grads


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_gradient(tmp_path, agg):
    """The loss is normalised by the whole optimizer step's count, so gradient accumulation is exact."""
    full = _one_step_grads(tmp_path, loss_agg=agg)
    micro = _one_step_grads(tmp_path, loss_agg=agg, micro_batch_size=3)
    assert full and any(g.abs().sum() > 0 for g in full.values())
    for name in full:
        torch.testing.assert_close(micro[name], full[name], atol=1e-6, rtol=1e-4, msg=name)


def test_step_boundaries_map_steps_to_tokens():
    """Process supervision: step k of a completion ends at the token holding its last character."""
    from rlhf_lightning.rollout import Rollout, RolloutBatch

    module = GRPOModule(model_name_or_path="tiny", group_size=2, beta=0.0, supervision="process")
    module.step_separator = "\n"
    tok = module.tokenizer
    texts = ["1+2=3\n3+4=7", "12"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, ids))
    completion_ids = torch.full((2, T), tok.pad_token_id)
    completion_mask = torch.zeros((2, T), dtype=torch.long)
    for i, row in enumerate(ids):
        completion_ids[i, :len(row)] = torch.tensor(row)
        completion_mask[i, :len(row)] = 1
    samples = RolloutBatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), completion_ids,
                           completion_mask, None, torch.zeros(2, dtype=torch.bool))
    rollout = Rollout(samples, ["p", "p"], texts, {})
    rewards, ends = module.step_boundaries([[1.0, 0.0], [1.0]], rollout)
    # "1+2=3" ends at char 4 (token 4); "\n" is token 5; "3+4=7" ends at token 10; "12" ends at token 1
    assert ends.tolist() == [[4, 10], [1, -1]]
    assert rewards[0].tolist() == [1.0, 0.0] and rewards[1, 0] == 1.0 and torch.isnan(rewards[1, 1])
    # one reward more than steps: the end step's, on the last token (the EOS: token 11 and token 2)
    rewards, ends = module.step_boundaries([[1.0, 1.0, 0.5], [1.0, 0.0]], rollout)
    assert ends.tolist() == [[4, 10, 11], [1, 2, -1]]
    assert rewards[0].tolist() == [1.0, 1.0, 0.5] and rewards[1, :2].tolist() == [1.0, 0.0]


def test_process_supervision_trains_on_chain_task(tmp_path):
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", group_size=4, beta=0.0, supervision="process",
                        max_new_tokens=12, lr=1e-3)
    data = PromptDataModule(task="chain", task_kwargs={"num_terms": 3}, num_train=64, num_val=0, batch_size=2)
    seen = {}
    original = module.compute_advantages

    def spy(rewards, rollout):
        adv = original(rewards, rollout)
        seen["adv"], seen["rewards"] = adv, rewards
        return adv

    module.compute_advantages = spy
    _trainer(tmp_path, 2).fit(module, data)
    assert isinstance(seen["rewards"], list) and len(seen["rewards"]) == 8  # step rewards per completion
    assert seen["adv"].dim() == 2 and seen["adv"].shape[0] == 8  # [N, T] token advantages
    assert torch.isfinite(seen["adv"]).all()
    assert module.optimizer_steps == 2


def mixed_groups(prompts, completions, **kw):
    """Groups of 4 alternate: constant-or-missing rewards (zero std: uninformative) and a spread with a NaN."""
    pattern = [[1.0, None, 1.0, 1.0], [0.0, 1.0, None, 1.0]]
    return [pattern[(i // 4) % 2][i % 4] for i in range(len(completions))]


@pytest.mark.parametrize("mask_truncated, drop", [(False, False), (True, False), (False, True), (True, True)])
def test_mask_truncated_and_drop_uninformative_groups_mask_the_right_rows(tmp_path, mask_truncated, drop):
    """The loss mask is the completion mask, minus truncated rows (mask_truncated) and minus every row of a group
    whose rewards are all equal or missing (drop_uninformative_groups); NaN rewards never give NaN weights."""
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[mixed_groups], group_size=4, beta=0.1,
                        max_new_tokens=4, mask_truncated=mask_truncated, drop_uninformative_groups=drop)
    seen, rollout, update = [], module.rollout, module.update

    def recording_rollout(batch):
        seen.append({"rollout": rollout(batch)})
        return seen[-1]["rollout"]

    def recording_update(step):
        seen[-1].update(loss_mask=step.loss_mask.clone(), advantages=step.advantages.clone())
        return update(step)

    module.rollout, module.update = recording_rollout, recording_update
    _trainer(tmp_path, 2).fit(module, _data())
    assert len(seen) == 2
    for step in seen:
        s = step["rollout"].samples
        keep = torch.tensor([(i // 4) % 2 == 1 for i in range(s.completion_mask.shape[0])])  # the spread groups
        expected = s.completion_mask.float()
        if mask_truncated:
            expected = expected * (~s.is_truncated).float().unsqueeze(-1)
        if drop:
            expected = expected * keep.float().unsqueeze(-1)
        torch.testing.assert_close(step["loss_mask"], expected)
        assert (step["advantages"][~keep] == 0).all() and (step["advantages"][keep] != 0).any()
        if mask_truncated or drop:  # the option changes the loss: some real tokens lose their weight
            assert (step["loss_mask"] < s.completion_mask.float()).any()
    assert any(step["rollout"].samples.is_truncated.any() for step in seen)
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


@pytest.mark.slow
def test_reward_rises(tmp_path):
    """A random tiny policy learns to start its completion with a digit (~10% at random init)."""
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[first_char_is_digit], group_size=8, beta=0.0,
                        max_new_tokens=4, lr=3e-3, log_samples_every_n_steps=0)
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(max_steps=40, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, _data(batch_size=8))
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    rewards = [float(r["reward/mean"]) for r in rows if r.get("reward/mean")]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_subclass_overriding_compute_rewards_trains_from_cli(tmp_path):
    cli = cli_main(["fit", "--model", "test_grpo.FirstDigitGRPO", "--data", "rlhf_lightning.PromptDataModule",
                    "--model.model_name_or_path", "tiny", "--model.group_size", "4", "--model.beta", "0",
                    "--model.max_new_tokens", "4", "--data.task", "addition", "--data.num_train", "64",
                    "--data.num_val", "8", "--data.batch_size", "4", "--trainer.max_steps", "3",
                    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                    str(tmp_path)])
    assert isinstance(cli.model, FirstDigitGRPO)
    assert cli.model.optimizer_steps == 3 and cli.trainer.global_step == 3
    assert (cli.model.export_dir() / "config.json").exists()


def test_sampling_generator_state_survives_checkpoint(tmp_path):
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_fns=[first_char_is_digit], group_size=2, beta=0.0,
                        max_new_tokens=3)
    _trainer(tmp_path, 1).fit(module, _data(batch_size=2))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    expected = torch.rand(4, generator=module.sample_generator)
    fresh = GRPOModule(model_name_or_path="tiny", group_size=2, beta=0.0)
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.optimizer_steps == 1 and fresh.rollouts == 1
    torch.testing.assert_close(torch.rand(4, generator=fresh._generator()), expected)


def test_grpo_trains_from_a_reward_model_export(tmp_path):
    """A RewardModel export is a reward source: GRPO scores completions with it (offline, end to end)."""
    from rlhf_lightning import PreferenceDataModule, RewardModel

    L.seed_everything(0)
    rm = RewardModel(model_name_or_path="tiny")
    prefs = PreferenceDataModule(task="addition", task_kwargs={"digits": 1}, num_train=64, num_val=16,
                                 batch_size=16)
    _trainer(tmp_path / "rm", 4).fit(rm, prefs)
    rm_dir = tmp_path / "rm" / "hf_model"
    assert (rm_dir / "config.json").exists()
    module = GRPOModule(model_name_or_path="tiny", reward_model=str(rm_dir), group_size=4, beta=0.0,
                        max_new_tokens=4)
    assert [f.__name__ for f in module.reward_funcs] == ["reward_model"]
    seen = {}
    original = module.compute_rewards

    def spy(prompts, completions, batch):
        seen["rewards"] = original(prompts, completions, batch)
        return seen["rewards"]

    module.compute_rewards = spy
    _trainer(tmp_path / "grpo", 2).fit(module, _data())
    assert seen["rewards"].shape == (16,) and torch.isfinite(seen["rewards"]).all()
    assert seen["rewards"].std() > 0  # real scores, not a constant
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOModule(model_name_or_path="tiny", reward_model=str(rm_dir), reward_weights=[1.0, 1.0])


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", False)])
def test_adamw_is_fused_except_under_amp(tmp_path, precision, fused):
    """Fused AdamW where Lightning can still clip gradients (no AMP plugin); the clipped step runs either way."""
    m = GRPOModule("tiny", group_size=2, max_new_tokens=3, lr=1e-2, max_grad_norm=1e-3,
                   log_samples_every_n_steps=0)
    _trainer(tmp_path, 1, precision=precision).fit(m, _data(batch_size=2))
    opt = m.optimizers().optimizer
    assert opt.defaults["fused"] is fused
    assert all(float(opt.state[p]["step"]) == 1 for p in m.trainable_parameters())


def test_can_fuse_adamw_only_plain_float_tensors_without_amp():
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from rlhf_lightning.modules.base import _can_fuse_adamw

    w = torch.nn.Parameter(torch.zeros(2))
    assert _can_fuse_adamw([w], Precision()) and _can_fuse_adamw([w], None)
    assert not _can_fuse_adamw([w], MixedPrecision("bf16-mixed", "cpu"))
    assert not _can_fuse_adamw([{"params": [w]}], None)  # parameter groups: left to the default
    assert not _can_fuse_adamw([], None)


# ------------------------------------------------------------------------------------------------ rollout engine
@pytest.mark.parametrize("engine, fast_steps", [("auto", True), ("hf", False)])
def test_rollout_engine_picks_who_computes_the_logits(tmp_path, monkeypatch, engine, fast_steps):
    """`auto` samples the plain Llama preset with the lean fast_decode engine; `hf` with the model's forward."""
    from rlhf_lightning.rollout import fast as fast_decode

    calls = []
    real_step = fast_decode.FastDecoder.step
    monkeypatch.setattr(fast_decode.FastDecoder, "step", lambda self, token: calls.append(1) or real_step(self, token))
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=4, max_new_tokens=4, rollout_engine=engine)
    _trainer(tmp_path, 1).fit(m, _data())
    assert m.rollouts == 1 and bool(calls) is fast_steps


def test_rollout_engine_fast_names_why_it_cannot_apply(tmp_path):
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=4, max_new_tokens=4, rollout_engine="fast",
                   lora={"r": 4})
    with pytest.raises(ValueError, match="engine='fast' cannot decode this model: .*peft"):
        _trainer(tmp_path, 1).fit(m, _data())


DDP_BATCH_SCALE = """
import json, sys, torch, lightning as L
from rlhf_lightning import GRPOModule, PromptDataModule
torch.set_num_threads(1)

def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]  # spread differs from rank to rank

class Recording(GRPOModule):
    def compute_advantages(self, rewards, rollout):
        adv = super().compute_advantages(rewards, rollout)
        with open(f"{sys.argv[1]}/adv_{self.global_rank}.jsonl", "a") as f:  # one file per rank: no interleaving
            f.write(json.dumps([self.global_rank, self.rollouts, rewards.tolist(), adv.tolist()]) + "\\n")
        return adv

m = Recording("tiny", reward_fns=[length_reward], group_size=4, beta=0.0, max_new_tokens=6, scale_rewards="batch")
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=sys.argv[1], limit_val_batches=0)
trainer.fit(m, PromptDataModule(task="addition", num_train=64, num_val=0, batch_size=4))
"""


@pytest.mark.slow
def test_batch_scaled_advantages_under_ddp_are_those_of_one_process_on_the_whole_batch(tmp_path):
    """scale_rewards=batch on 2 gloo processes: each rank divides by the std of both ranks' rewards together."""
    import json

    from conftest import run_script_processes

    from rlhf_lightning.losses import group_advantages

    run_script_processes(tmp_path, DDP_BATCH_SCALE, str(tmp_path))
    steps: dict[int, dict[int, tuple]] = {}
    lines = [line for rank in (0, 1) for line in (tmp_path / f"adv_{rank}.jsonl").read_text().splitlines()]
    for line in lines:
        rank, step, rewards, adv = json.loads(line)
        steps.setdefault(step, {})[rank] = (torch.tensor(rewards), torch.tensor(adv))
    assert sorted(steps) == [0, 1] and all(sorted(ranks) == [0, 1] for ranks in steps.values())
    for ranks in steps.values():
        (r0, a0), (r1, a1) = ranks[0], ranks[1]
        whole = group_advantages(torch.cat([r0, r1]), 4, scale="batch")
        torch.testing.assert_close(torch.cat([a0, a1]), whole, atol=1e-5, rtol=1e-5)
    (r0, a0), (r1, _) = steps[0][0], steps[0][1]
    assert r0.std() != r1.std() and not torch.allclose(group_advantages(r0, 4, scale="batch"), a0)


CALLS: list = []


def trl_conversational_reward(completions, **kwargs):
    """A TRL-style conversational reward function, as TRL's docs write them: `completion[0]["content"]`."""
    CALLS.append((kwargs["prompts"], completions))
    return [float(completion[0]["content"][:1].isdigit()) for completion in completions]


@pytest.mark.parametrize("module_class", ["GRPOModule", "PPOModule"])
def test_trl_conversational_reward_function_trains_and_validates_on_chat_prompts(tmp_path, module_class):
    """Chat-message prompts: training and validation pass TRL's conversational format (messages as `prompts`,
    `[{"role": "assistant", "content": ...}]` per completion), so a TRL reward function ports unchanged."""
    import json

    import rlhf_lightning

    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i % 7}="}], "answer": str(i + i % 7)} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    CALLS.clear()
    grpo = module_class == "GRPOModule"
    kw = dict(group_size=4, beta=0.0) if grpo else dict(kl_coef=0.0, ppo_epochs=1, minibatches=1)
    module = getattr(rlhf_lightning, module_class)("tiny", reward_fns=[trl_conversational_reward], max_new_tokens=4,
                                                  val_max_new_tokens=4, **kw)
    data = PromptDataModule(path=str(tmp_path / "chat.jsonl"), val_split=0.2, batch_size=4, val_batch_size=4)
    steps = 2 if grpo else 4  # PPO: actor + critic steps, 2 rollouts
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                        val_check_interval=2, check_val_every_n_epoch=None, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert len(CALLS) == 3  # two rollouts, one validation batch
    for prompts, completions in CALLS:
        assert all(p[-1]["role"] == "user" and p[-1]["content"].endswith("=") for p in prompts)
        assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in completions)
    assert "val/reward" in trainer.callback_metrics


# ------------------------------------------------------------------------------------------ lr schedule horizon
@pytest.mark.parametrize("max_epochs, max_steps, num_iterations, rollouts", [
    (2, 100, 1, 4),  # the epochs end the run first: 2 epochs x 2 batches (was: a 100-step horizon, lr undecayed)
    (10, 3, 1, 3),  # max_steps ends it first
    (10, 5, 2, 3),  # 2 optimizer steps a rollout: the fit loop stops after the rollout that passes step 5
])
def test_lr_reaches_its_floor_when_the_run_ends(tmp_path, max_epochs, max_steps, num_iterations, rollouts):
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=2, max_new_tokens=2, beta=0.0, lr=1e-3,
                   lr_schedule="cosine", min_lr_ratio=0.1, num_iterations=num_iterations, log_samples_every_n_steps=0)
    trainer = _trainer(tmp_path, max_steps, max_epochs=max_epochs)
    trainer.fit(m, PromptDataModule(task="addition", num_train=8, num_val=0, batch_size=4))
    assert m.rollouts == rollouts
    assert m.schedule_horizon() == m.optimizer_steps == rollouts * num_iterations
    assert m.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)  # the floor, reached at the last step


def test_minibatches_that_do_not_divide_the_groups_take_as_many_steps_as_asked(tmp_path):
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=2, max_new_tokens=2, beta=0.0, minibatches=3,
                   log_samples_every_n_steps=0)
    _trainer(tmp_path, 3).fit(m, _data(batch_size=4))  # 4 groups in 3 minibatches (2+1+1): 3 steps, not chunk()'s 2
    assert (m.rollouts, m.optimizer_steps) == (1, 3)


def test_more_minibatches_than_groups_is_refused_before_the_first_step(tmp_path):
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=2, max_new_tokens=2, minibatches=5)
    with pytest.raises(ValueError, match=r"minibatches=5 is more than the 4 groups of a rollout \(data.batch_size=4 "
                                         r"per rank\); raise data.batch_size or lower minibatches"):
        _trainer(tmp_path, 1).fit(m, _data(batch_size=4))
    assert m.rollouts == 0


def test_warmup_longer_than_the_run_warns(tmp_path):
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=2, max_new_tokens=2, beta=0.0,
                   warmup_steps=10, log_samples_every_n_steps=0)
    with pytest.warns(UserWarning, match=r"warmup_steps=10 is not below the 2 optimizer steps this run takes"):
        _trainer(tmp_path, 2).fit(m, _data(batch_size=4))


@pytest.mark.parametrize("flag, message", [
    (dict(accumulate_grad_batches=2), "trainer.accumulate_grad_batches=2 does not apply to GRPOModule, which optimizes "
     "manually (its own optimizer steps per rollout); set model.micro_batch_size instead"),
    (dict(gradient_clip_val=0.5), "trainer.gradient_clip_val=0.5 does not apply to GRPOModule, which optimizes "
     "manually (its own optimizer steps per rollout); set model.max_grad_norm=0.5 instead"),
    (dict(gradient_clip_algorithm="value"), "trainer.gradient_clip_algorithm='value' does not apply to GRPOModule"),
])
def test_trainer_flags_manual_optimization_cannot_honour_are_refused(tmp_path, flag, message):
    m = GRPOModule("tiny", reward_fns=[first_char_is_digit], group_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        _trainer(tmp_path, 1, **flag).fit(m, _data())
    assert m.rollouts == 0
    m.trainer = None  # detaching, and validating with the same trainer flags, are fine
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
              default_root_dir=tmp_path, **flag).validate(m, PromptDataModule(task="addition", num_train=8, num_val=4,
                                                                              batch_size=4))



def test_normalize_reward_model_without_a_reward_model_is_refused():
    with pytest.raises(ValueError, match="normalize_reward_model applies to model.reward_model, which is not set"):
        GRPOModule("tiny", normalize_reward_model=True)  # was: silently ignored
def test_shipped_process_config_validates_with_outcome_accuracy_and_step_reward(tmp_path):
    """configs/grpo_process.yaml as shipped, shrunk, from the console script: its validations (sanity check, then
    after each of the two rollouts) score the step rewards through compute_rewards (`val/reward` = mean step
    reward) and the task's outcome verifier (`val/accuracy`). It used to stop in the sanity check:
    "reward function 'chain_step_rewards' returned a non-number [0.0] at row 0"."""
    config = Path(__file__).resolve().parents[1] / "configs" / "grpo_process.yaml"
    proc = run_script(["fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.val_check_interval",
                       "1", "--data.init_args.num_train", "16", "--data.init_args.num_val", "4",
                       "--data.init_args.batch_size", "2", "--data.init_args.val_batch_size", "4",
                       "--model.init_args.group_size", "2", "--model.init_args.max_new_tokens", "8",
                       "--model.init_args.val_max_new_tokens", "8", "--trainer.enable_checkpointing", "false",
                       "--trainer.enable_progress_bar", "false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = tensorboard_scalars(tmp_path)
    assert len(scalars.get("val/reward", [])) == 2 and len(scalars.get("val/accuracy", [])) == 2, sorted(scalars)
    assert all(0 <= v <= 1 for v in scalars["val/reward"] + scalars["val/accuracy"])


def test_the_global_seed_decides_the_sampling_stream():
    """`seed_everything: 1` and `seed_everything: 0` on the same warm start must not be the same run: the default
    sample_seed is 1234 + the global seed (recorded as resolved); an explicit one wins."""
    L.seed_everything(0)
    zero = GRPOModule("tiny", group_size=2)
    L.seed_everything(1)
    one = GRPOModule("tiny", group_size=2)
    explicit = GRPOModule("tiny", group_size=2, sample_seed=7)
    assert (zero.hparams.sample_seed, one.hparams.sample_seed, explicit.hparams.sample_seed) == (1234, 1235, 7)
    draws = [torch.rand(4, generator=m._generator()) for m in (zero, one)]
    assert not torch.equal(*draws)
    L.seed_everything(0)
