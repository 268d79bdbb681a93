"""Atomic checkpoints, RNG streams in checkpoints, a failing reward function, NaN-free training on degenerate
rewards and completions, safe loading."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import rlhf_lightning.infra.checkpoints as checkpoints
from rlhf_lightning import GRPOModule, PromptDataModule
from rlhf_lightning.cli import cli_main
from rlhf_lightning.infra.checkpoints import AtomicCheckpointIO
from rlhf_lightning.infra.shutdown import GracefulShutdown


def _trainer(tmp_path, steps, **kw):
    kw.setdefault("callbacks", [])
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, default_root_dir=tmp_path, **kw)


def _data(batch_size=4):
    return PromptDataModule(task="addition", num_train=64, num_val=0, batch_size=batch_size)


# ------------------------------------------------------------------------------------------ atomic checkpoints
def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.arange(1000.0)}, last)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")  # what a torch.save cut short leaves behind
        raise KeyboardInterrupt  # the process is interrupted in the middle of the write

    monkeypatch.setattr(checkpoints.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(1000)}, last)
    monkeypatch.undo()
    loaded = torch.load(last, weights_only=True)
    assert loaded["global_step"] == 4 and torch.equal(loaded["w"], torch.arange(1000.0))
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # the temp file is gone too


def test_cli_uses_atomic_checkpoints_but_keeps_a_users_plugin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])
    base = ["--model", "rlhf_lightning.GRPOModule", "--data", "rlhf_lightning.PromptDataModule",
            "--data.task", "addition", "--trainer.logger", "false"]
    cli = cli_main(base, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert any(isinstance(cb, GracefulShutdown) for cb in cli.trainer.callbacks)
    cli = cli_main([*base, "--trainer.plugins", "lightning.fabric.plugins.io.torch_io.TorchCheckpointIO"],
                   run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO


# ------------------------------------------------------------------------------------------------ RNG streams
def test_global_rng_streams_survive_a_weights_only_checkpoint(tmp_path):
    module = GRPOModule("tiny", group_size=2, beta=0.0)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.save(checkpoint, tmp_path / "c.ckpt")

    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # a new process with another global seed
    fresh = GRPOModule("tiny", group_size=2, beta=0.0)
    fresh.on_load_checkpoint(torch.load(tmp_path / "c.ckpt", weights_only=True))
    torch.rand(5)  # loading, data loader set-up etc. draw numbers before the first step...
    fresh.on_train_batch_start({}, 0)  # ...so the states are put back right before it
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ------------------------------------------------------------------------------------- failing reward functions
CALLS = {"n": 0}


def fails_on_third_call(prompts, completions, **kwargs):
    CALLS["n"] += 1
    if CALLS["n"] == 3:
        raise KeyError("answer")
    return [1.0] * len(completions)


def returns_too_few(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


@pytest.mark.parametrize("fn, message, step", [
    ("fails_on_third_call", "reward function 'fails_on_third_call' raised KeyError: 'answer'", 2),
    ("returns_too_few", "reward function 'returns_too_few' returned 7 values for 8 completions", 0),
])
def test_a_failing_reward_function_stops_the_run_after_a_checkpoint(tmp_path, monkeypatch, capsys, fn, message,
                                                                     step):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])
    CALLS["n"] = 0
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--model", "rlhf_lightning.GRPOModule", "--data", "rlhf_lightning.PromptDataModule",
                  "--model.reward_fns", f"[test_reliability.{fn}]", "--model.group_size", "2",
                  "--model.max_new_tokens", "2", "--data.task", "addition", "--data.num_train", "32",
                  "--data.num_val", "0", "--data.batch_size", "4", "--trainer.max_steps", "5",
                  "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoints" / "error.ckpt"
    assert f"rlhf-lightning: error: {message} (checkpoint saved to {ckpt})" in err.splitlines()
    assert "Traceback" not in err
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == step and saved["rlhf_counters"]["rollouts"] == step


# ------------------------------------------------------------------------------------- no NaN on degenerate data
class Recorder(L.Callback):
    """Every logged metric of every step."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def all_none(prompts, completions, **kwargs):
    return [None] * len(completions)


def nan_or_one(prompts, completions, **kwargs):
    return [math.nan if i % 3 else 1.0 for i in range(len(completions))]


def constant(prompts, completions, **kwargs):
    return [0.5] * len(completions)


@pytest.mark.parametrize("reward", [all_none, nan_or_one])
def test_nan_and_none_rewards_are_excluded_and_counted_without_nan(tmp_path, reward):
    module = GRPOModule("tiny", reward_fns=[reward], group_size=3, beta=0.1, max_new_tokens=4, lr=1e-3)
    rec = Recorder()
    _trainer(tmp_path, 3, callbacks=[rec]).fit(module, _data())
    expected_missing = 1.0 if reward is all_none else 2 / 3
    for step in rec.steps:
        assert all(math.isfinite(v) for v in step.values()), step
        assert step["reward/missing_frac"] == pytest.approx(expected_missing)
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_zero_variance_groups_give_zero_advantage_and_leave_the_weights_alone(tmp_path):
    """Every group's rewards are equal: advantages are 0 (not 0/0), and with beta=0 nothing moves."""
    module = GRPOModule("tiny", reward_fns=[constant], group_size=4, beta=0.0, max_new_tokens=4, lr=1e-2)
    before = [p.detach().clone() for p in module.policy.parameters()]
    rec = Recorder()
    _trainer(tmp_path, 3, callbacks=[rec]).fit(module, _data())
    for step in rec.steps:
        assert all(math.isfinite(v) for v in step.values()), step
        assert step["rollout/zero_std_group_frac"] == 1.0 and step["policy/advantage_abs_mean"] == 0.0
    for p, q in zip(before, module.policy.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_fully_masked_and_empty_completions_never_give_nan(tmp_path, agg):
    """max_new_tokens=1 + mask_truncated: every completion without an immediate EOS is masked out, and the
    EOS-only ones are empty; with drop_uninformative_groups every row is masked (zero normaliser)."""
    module = GRPOModule("tiny", reward_fns=[constant], group_size=2, beta=0.1, max_new_tokens=1, lr=1e-3,
                        mask_truncated=True, drop_uninformative_groups=True, loss_agg=agg)
    rec = Recorder()
    _trainer(tmp_path, 2, callbacks=[rec]).fit(module, _data())
    for step in rec.steps:
        assert all(math.isfinite(v) for v in step.values()), step
        assert step["rollout/zero_std_group_frac"] == 1.0  # every group dropped: the loss mask is all zero
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


# ------------------------------------------------------------------------------------------------ safe loading
def test_remote_code_in_a_model_directory_is_not_run_by_default(tmp_path):
    """A model folder whose config points at custom code: without trust_remote_code the code never runs."""
    from rlhf_lightning.models import load_causal_lm

    policy = GRPOModule("tiny", group_size=2, beta=0.0).policy
    policy.save_pretrained(tmp_path / "m")
    GRPOModule("tiny", group_size=2, beta=0.0).tokenizer.save_pretrained(tmp_path / "m")
    marker = tmp_path / "code_ran"
    (tmp_path / "m" / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\nclass EvilModel(LlamaForCausalLM):\n    pass\n")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))

    model = load_causal_lm(str(tmp_path / "m"))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    assert not any(Path(tmp_path / "m").glob("*.bin"))  # the weights went through safetensors


# ---------------------------------------------------------------------------------------- in-process resume
def noisy_reward(prompts, completions, **kwargs):
    """Draws from the torch, python and numpy global RNGs (like a sampled judge or a dropout layer would)."""
    return [float(c[:1].isdigit()) + 0.1 * float(torch.rand(())) + 0.1 * random.random() + 0.1 * np.random.rand()
            for c in completions]


@pytest.mark.parametrize("resume_step", [2, 4], ids=["mid_epoch", "epoch_end"])
def test_grpo_resume_is_exact_mid_epoch_and_at_an_epoch_end(tmp_path, resume_step, recwarn):
    """4 batches per epoch: a checkpoint after batch 2 resumes mid-epoch, one after batch 4 at the boundary."""
    def run(root, ckpt_path=None, callbacks=()):
        module = GRPOModule("tiny", reward_fns=[noisy_reward], group_size=2, beta=0.04, max_new_tokens=4, lr=3e-3)
        data = PromptDataModule(task="addition", num_train=16, num_val=0, batch_size=4)
        _trainer(root, 7, callbacks=list(callbacks), enable_checkpointing=bool(callbacks)).fit(
            module, data, ckpt_path=ckpt_path)
        return module

    L.seed_everything(0)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_step,
                                                save_top_k=-1)
    straight = run(tmp_path / "a", callbacks=[every])
    L.seed_everything(1)  # another global seed: only the checkpointed RNG states can make the runs agree
    resumed = run(tmp_path / "b", ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={resume_step}.ckpt")
    assert resumed.rollouts == 7
    for p, q in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_ppo_resume_is_exact_with_another_global_seed(tmp_path):
    """Two optimizers, two schedulers, the adaptive KL controller, and a reward that draws from the global RNGs."""
    from rlhf_lightning import PPOModule

    def run(root, ckpt_path=None, callbacks=()):
        module = PPOModule("tiny", reward_fns=[noisy_reward], adaptive_kl=True, kl_coef=0.2, kl_target=0.05,
                           ppo_epochs=1, minibatches=2, lr=1e-3, critic_lr=2e-3, warmup_steps=4, lr_schedule="cosine",
                           max_new_tokens=4)
        data = PromptDataModule(task="addition", num_train=16, num_val=0, batch_size=4)
        _trainer(root, 5 * 4, callbacks=list(callbacks), enable_checkpointing=bool(callbacks)).fit(
            module, data, ckpt_path=ckpt_path)
        return module

    L.seed_everything(0)
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2 * 4, save_top_k=-1)
    straight = run(tmp_path / "a", callbacks=[every])
    L.seed_everything(1)
    resumed = run(tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "epoch=0-step=8.ckpt")
    assert (resumed.rollouts, resumed.optimizer_steps) == (5, 10)
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------ CPU allocator
_FAULTS_SCRIPT = """
import resource, sys, torch
from rlhf_lightning.infra.cpu_allocator import keep_freed_memory
print(keep_freed_memory(), flush=True)
x = torch.ones(64 * 2**20 // 4); del x  # 64 MiB, above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.ones(64 * 2**20 // 4); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc options")
def test_cpu_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    """Five 64 MiB tensors allocated and freed in turn: glibc's default maps (and page-faults) each one afresh;
    with `keep_freed_memory` the heap block of the first is reused. RLHF_LIGHTNING_CPU_ALLOCATOR=system opts out."""
    def run(setting: str) -> tuple[str, int]:
        env = {**os.environ, "RLHF_LIGHTNING_CPU_ALLOCATOR": setting}
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    applied, cached_faults = run("cache")
    kept, system_faults = run("system")
    assert (applied, kept) == ("True", "False")
    pages = 5 * 64 * 2**20 // resource.getpagesize()
    assert system_faults > pages // 2  # every 64 MiB block touched afresh
    assert cached_faults < system_faults // 4  # measured: one block's pages once (heap growth), then none


def test_cpu_allocator_bad_setting_is_one_line(monkeypatch):
    from rlhf_lightning.infra.cpu_allocator import allocator_setting

    monkeypatch.setenv("RLHF_LIGHTNING_CPU_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="RLHF_LIGHTNING_CPU_ALLOCATOR must be 'cache'.*got 'jemalloc'"):
        allocator_setting()


# --------------------------------------------------------------------------- checkpoints that survive late failures
from test_resume import GRPO, TINY_RUN, script  # noqa: E402 - the console-script runner of the resume tests


def test_the_cli_writes_last_ckpt_every_50_batches_and_at_the_end_of_fit(tmp_path, monkeypatch):
    """Checkpoints were written at epoch ends only (none at all when max_steps stops a run mid-epoch before
    validation): the CLI's default is a LastCheckpoint every 50 batches and at the end of fit."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])
    cli = cli_main(["--model", "rlhf_lightning.GRPOModule", "--data", "rlhf_lightning.PromptDataModule",
                    "--data.task", "addition", "--trainer.logger", "false"], run=False)
    assert [cb.every_n_batches for cb in cli.trainer.checkpoint_callbacks] == [50]
    done = script(tmp_path, *GRPO, *TINY_RUN, "--trainer.max_steps", "3")  # 4 batches per epoch: ends mid-epoch
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


class FailsAtThirdRollout(GRPOModule):
    """A module with a bug that shows at the third rollout (not a reward function: any failure counts)."""

    def training_step(self, batch, batch_idx):
        if self.rollouts == 2:
            raise RuntimeError("something broke in rollout 3")
        return super().training_step(batch, batch_idx)


def test_any_failure_once_training_runs_leaves_error_ckpt_and_the_periodic_last_ckpt(tmp_path):
    """error.ckpt was written for RewardFunctionError only; now for any exception, the CLI naming it last, and
    the periodic last.ckpt (every_n_batches configured to 2) is there too."""
    done = script(tmp_path, "--model", "test_reliability.FailsAtThirdRollout", *GRPO[2:], *TINY_RUN,
                  "--trainer.max_steps", "8", "--trainer.callbacks+=rlhf_lightning.infra.checkpoints.LastCheckpoint",
                  "--trainer.callbacks.every_n_batches", "2")
    assert done.returncode == 1, done.stderr[-3000:]
    ckpt = Path("checkpoints") / "error.ckpt"
    assert done.stderr.strip().splitlines()[-1] == (
        f"rlhf-lightning: error: training stopped by RuntimeError: something broke in rollout 3 (checkpoint saved "
        f"to {ckpt})")
    assert torch.load(tmp_path / ckpt, weights_only=True)["global_step"] == 2
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


class FullDiskIO(AtomicCheckpointIO):
    """A checkpoint IO on a full disk: every save fails as a real one would (ENOSPC)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_at_the_final_save_still_exports_hf_model_and_exits_1(tmp_path):
    done = script(tmp_path, *GRPO, *TINY_RUN, "--trainer.max_steps", "2",
                  "--trainer.plugins", "test_reliability.FullDiskIO")
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("rlhf-lightning:")]
    last = os.path.join(".", "checkpoints", "last.ckpt")  # under --trainer.default_root_dir .
    assert errors == [f"rlhf-lightning: error: training finished but the final checkpoint {last} could not be "
                      f"written: [Errno 28] No space left on device: '{last}'; the model was exported to hf_model"]
    assert "Traceback" not in done.stderr
    assert (tmp_path / "hf_model" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------ signals at each phase
class SignalAt(L.Callback):
    """Sends this process SIGTERM from inside one hook, as a scheduler would at that moment."""

    def __init__(self, hook: str):
        self.hook = hook
        setattr(self, hook, self._send)

    def _send(self, trainer, *args, **kwargs):
        if self.hook != "on_validation_batch_start" or not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def _signalled_fit(tmp_path, hook: str):
    module = GRPOModule("tiny", reward_fns=[constant], group_size=2, beta=0.0, max_new_tokens=2)
    data = PromptDataModule(task="addition", num_train=16, num_val=4, batch_size=4)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=False,
                        callbacks=[GracefulShutdown(), SignalAt(hook)])
    with pytest.raises(SystemExit) as exit_:
        trainer.fit(module, data)
    return exit_.value.code, module


def test_sigterm_during_validation_saves_the_last_step_and_exits_143(tmp_path):
    """Validation after step 2 is dropped at once; last.ckpt holds step 2 (it used to wait for the end)."""
    code, module = _signalled_fit(tmp_path, "on_validation_batch_start")
    assert code == 143
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["global_step"], ckpt["rlhf_counters"]["rollouts"]) == (2, 2)


def test_sigterm_during_the_final_export_lets_it_finish_then_exits_143(tmp_path):
    """The run's last work completes (hf_model/ is whole), but the exit status says a signal stopped it."""
    code, module = _signalled_fit(tmp_path, "on_train_end")
    assert code == 143
    assert (tmp_path / "hf_model" / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were put back


@pytest.mark.slow
def test_a_full_disk_at_the_final_save_under_ddp_exports_and_every_rank_exits_1(tmp_path):
    """Under DDP only rank 0 writes, so only rank 0 fails while rank 1 waits in the save's closing barrier: the
    failing rank joins it, the ranks agree the save failed, the export still runs, and nothing hangs."""
    done = script(tmp_path, *GRPO, *TINY_RUN, "--trainer.max_steps", "2", "--trainer.strategy", "ddp",
                  "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                  "--trainer.plugins", "test_reliability.FullDiskIO")
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("rlhf-lightning:")]
    last = os.path.join(".", "checkpoints", "last.ckpt")
    assert errors == [f"rlhf-lightning: error: training finished but the final checkpoint {last} could not be "
                      f"written: [Errno 28] No space left on device: '{last}'; the model was exported to hf_model"]
    assert (tmp_path / "hf_model" / "model.safetensors").exists()


class Unhandled(Exception):
    pass


def test_sigterm_during_setup_exits_143_and_saves_nothing(tmp_path):
    """The handlers used to be installed when training started: a signal in setup met whatever handler the
    process had (here one raising `Unhandled`; by default the process died without a word)."""
    def outside_fit(signum, frame):
        raise Unhandled

    before = signal.signal(signal.SIGTERM, outside_fit)
    try:
        code, module = _signalled_fit(tmp_path, "setup")
        assert signal.getsignal(signal.SIGTERM) is outside_fit  # put back after fit
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143
    assert not (tmp_path / "checkpoints").exists() and module.rollouts == 0
