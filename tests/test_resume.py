"""Exact resume of a real `python -m rlhf_lightning fit` process: killed with SIGKILL, or stopped by SIGTERM /
SIGINT, then resumed from `last.ckpt`, it ends with the same weights as a run that was never interrupted.

The reward function sleeps a little per call so that the test reliably catches the process mid-run (the
weights do not depend on it). CPU, fp32; the resumed run's global seed is deliberately different, so only the
restored RNG states can make the runs agree.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MAX_STEPS = 16  # optimizer steps = 8 rollouts x num_iterations 2; 4 batches per epoch, so 2 epochs

CONFIG = """\
seed_everything: 0
model:
  class_path: rlhf_lightning.GRPOModule
  init_args:
    model_name_or_path: tiny
    reward_fns: [test_resume.slow_first_digit]
    group_size: 4
    max_new_tokens: 4
    beta: 0.04
    lr: 0.003
    num_iterations: 2
    warmup_steps: 4
    lr_schedule: cosine
    log_samples_every_n_steps: 0
data:
  class_path: rlhf_lightning.PromptDataModule
  init_args:
    task: addition
    num_train: 16
    num_val: 0
    batch_size: 4
trainer:
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: ckpt
        every_n_train_steps: 2
        save_top_k: -1
        save_last: true
"""


CALLS = {"n": 0}


def slow_first_digit(prompts, completions, **kwargs):
    """1.0 when the completion starts with a digit (a random tiny policy: ~10%), after a short sleep, plus noise
    from the global torch / python / numpy RNGs (so their states must be resumed too).

    With RLHF_TEST_STALL=<file>, from the RLHF_TEST_STALL_AT-th call on (default 1) it touches <file> and
    sleeps a minute first: a deliberately slow step (reward model, judge, sandbox) to signal in the middle of."""
    CALLS["n"] += 1
    stall = os.environ.get("RLHF_TEST_STALL")
    if stall and CALLS["n"] >= int(os.environ.get("RLHF_TEST_STALL_AT", "1")):
        Path(stall).touch()
        time.sleep(60)
    time.sleep(0.1)
    return [float(c[:1].isdigit()) + 0.1 * (float(torch.rand(())) + random.random() + float(np.random.rand()))
            for c in completions]


def start(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(CONFIG.format(max_steps=MAX_STEPS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "rlhf_lightning", "fit", "--config", "config.yaml",
                             "--trainer.default_root_dir", ".", *extra], cwd=run_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, step: int, timeout: float = 180) -> None:
    """Poll until a checkpoint of global step >= `step` exists (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.stem.rsplit("step=", 1)[1]) for p in ckpt_dir.glob("epoch=*-step=*.ckpt")]
        if steps and max(steps) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step >= {step} after {timeout} s")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "hf_model" / "model.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run's final weights."""
    run_dir = tmp_path_factory.mktemp("straight")
    finish(start(run_dir))
    return final_weights(run_dir)


def resume(run_dir: Path) -> str:
    """Resume from last.ckpt with another global seed: only the checkpointed RNG states can make it exact."""
    last = run_dir / "ckpt" / "last.ckpt"
    assert last.exists()
    out = finish(start(run_dir, "--ckpt_path", str(last), "--seed_everything", "123"))
    assert "Restoring states from the checkpoint" in out
    assert "not resumable" not in out  # Lightning knows the data loader continues mid-epoch
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, straight):
    proc = start(tmp_path)
    wait_for_checkpoint(proc, tmp_path / "ckpt", step=6)  # three checkpoints, mid-epoch 1 of 2
    proc.kill()  # SIGKILL: no handler runs, no checkpoint is written on the way out
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "hf_model").exists()  # it really died before the end
    # last.ckpt is whole even when the kill landed in the middle of writing it (then a hidden temp file remains)
    saved_step = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert saved_step in (4, 6)  # the step-6 save, or the one before when the kill cut the step-6 last.ckpt
    resume(tmp_path)
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))  # the resumed run's saves removed any leftover
    diff = max_abs_diff(final_weights(tmp_path), straight)
    assert diff <= 1e-6, diff


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_last_ckpt_at_a_step_boundary_and_resume_is_exact(tmp_path, straight, sig):
    proc = start(tmp_path)
    wait_for_checkpoint(proc, tmp_path / "ckpt", step=4)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert f"{signal.Signals(sig).name}: saved" in out and "Traceback" not in out
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    # a step boundary: the rollout completed both of its optimizer steps
    assert ckpt["global_step"] % 2 == 0 and 4 <= ckpt["global_step"] < MAX_STEPS
    assert ckpt["rlhf_counters"]["rollouts"] * 2 == ckpt["global_step"]
    if sig == signal.SIGINT:
        return  # the same code path as SIGTERM from here on; one resume is enough for the suite's time
    resume(tmp_path)
    diff = max_abs_diff(final_weights(tmp_path), straight)
    assert diff <= 1e-6, diff


# ------------------------------------------------------------------------------ resuming with other settings
SCRIPT = Path(sys.executable).parent / "rlhf-lightning"
TINY_RUN = ["--data", "rlhf_lightning.PromptDataModule", "--data.task", "addition", "--data.num_train", "16",
            "--data.num_val", "0", "--data.batch_size", "4", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "."]
GRPO = ["--model", "rlhf_lightning.GRPOModule", "--model.group_size", "4", "--model.max_new_tokens", "2"]


def script(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SCRIPT), "fit", *args], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def grpo_checkpoint(tmp_path_factory) -> Path:
    """A 2-step GRPO run (group_size 4, tiny, batch_size 4) through the console script; its checkpoint."""
    run_dir = tmp_path_factory.mktemp("grpo_ckpt")
    done = script(run_dir, *GRPO, *TINY_RUN, "--trainer.max_steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    return ckpt


@pytest.mark.parametrize("changed, listed", [
    (["--model.group_size", "8"], "model.group_size: 4 (checkpoint) vs 8 (given)"),
    (["--model.model_name_or_path", "small", "--data.batch_size", "8"],
     "model.model_name_or_path: tiny (checkpoint) vs small (given); data.batch_size: 4 (checkpoint) vs 8 (given)"),
    (["--model", "rlhf_lightning.PPOModule"], "model: rlhf_lightning.GRPOModule (checkpoint) vs "
                                              "rlhf_lightning.PPOModule (given)"),
], ids=["group_size", "preset_and_batch_size", "module_class"])
def test_resuming_with_other_settings_is_refused_with_one_line_listing_them(tmp_path, grpo_checkpoint, changed,
                                                                              listed):
    """LightningCLI let the checkpoint's hyperparameters silently replace the command line's (a PPO checkpoint
    resumed as PPO under --model GRPOModule); now each differing setting is named, before anything runs."""
    done = script(tmp_path, *GRPO, *TINY_RUN, *changed, "--trainer.max_steps", "4", "--ckpt_path",
                  str(grpo_checkpoint))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-lightning: error: --ckpt_path "), done.stderr[-3000:]
    assert f"other settings than the ones given: {listed}." in lines[0]
    assert not (tmp_path / "hf_model").exists()


def test_settings_left_out_on_resume_come_from_the_checkpoint(tmp_path, grpo_checkpoint):
    """Only the module class and a longer max_steps given: group_size 4, max_new_tokens 2 and batch_size 4 are
    the checkpoint's (the defaults are 8, 32 and 8), and the run continues from step 2 to 3."""
    done = script(tmp_path, "--model", "rlhf_lightning.GRPOModule", "--data", "rlhf_lightning.PromptDataModule",
                  "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", ".", "--trainer.max_steps", "3", "--ckpt_path", str(grpo_checkpoint))
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert (ckpt["hyper_parameters"]["group_size"], ckpt["hyper_parameters"]["max_new_tokens"]) == (4, 2)
    assert ckpt["datamodule_hyper_parameters"]["batch_size"] == 4


# --------------------------------------------------------------------------------- signals at any phase
def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_in_the_middle_of_a_slow_step_saves_within_seconds_and_resumes_exactly(tmp_path, straight):
    """The third rollout's reward call stalls for a minute; SIGTERM then used to wait for the step to end (~35 s
    in the reported case, past a scheduler's grace period). Now the step is dropped at once and last.ckpt holds
    the state after rollout 2 (step 4), from which the resume ends with the uninterrupted run's weights."""
    stalled = tmp_path / "stalled"
    proc = start(tmp_path, env={"RLHF_TEST_STALL": str(stalled), "RLHF_TEST_STALL_AT": "3"})
    wait_for(stalled, proc)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.stat().st_mtime - signalled < 5, "last.ckpt was not written within 5 s of the signal"
    assert f"SIGTERM: saved {last} at step 4 (dropped the unfinished work of training)" in out
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["global_step"], ckpt["rlhf_counters"]["rollouts"]) == (4, 2)
    resume(tmp_path)
    diff = max_abs_diff(final_weights(tmp_path), straight)
    assert diff <= 1e-6, diff


SANITY = ["--data.init_args.num_val", "8", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps",
          "1"]


@pytest.mark.slow
def test_sigterm_during_the_sanity_check_exits_143_saying_nothing_was_saved(tmp_path):
    """It exited 0 with nothing saved (Lightning's own SIGTERM flag ends the sanity check "successfully"), so a
    scheduler recorded a success and did not requeue."""
    stalled = tmp_path / "stalled"
    proc = start(tmp_path, *SANITY, env={"RLHF_TEST_STALL": str(stalled)})
    wait_for(stalled, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert ("SIGTERM during the sanity check: nothing saved (no training step completed in this run); exiting "
            "with status 143") in out
    # the output folders exist (checked writable before any work), but hold no checkpoint and no export
    assert not list((tmp_path / "ckpt").glob("*.ckpt")) and not (tmp_path / "hf_model").exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path, grpo_checkpoint):
    """A checkpoint cut short (a copy interrupted, a full disk outside AtomicCheckpointIO) was a traceback."""
    (tmp_path / "cut.ckpt").write_bytes(grpo_checkpoint.read_bytes()[:4096])
    done = script(tmp_path, *GRPO, *TINY_RUN, "--ckpt_path", "cut.ckpt")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "rlhf-lightning: error: checkpoint 'cut.ckpt' is truncated or corrupt (File is not a zip file; 4096 bytes): "
        "use a complete copy, or an earlier checkpoint"]
