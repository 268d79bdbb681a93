"""Reliability: one-line user errors, atomic checkpoints, a checkpoint on SIGTERM/SIGINT and on reward errors,
and the global RNG streams in checkpoints (exact resume).

- `ConfigError`: a user mistake (bad argument, missing file). `cli_main` prints its message as one line and exits
  with status 2; any other exception is a bug and keeps its traceback.
- `TrainingFailure`: a failure once training runs that the user can act on: `RewardFunctionError` (a reward
  function raised, returned the wrong number of values or a non-finite reward) and `NonFiniteError` (a loss,
  gradient or weight that is NaN/inf). `CheckpointOnError` saves `error.ckpt` first (not when the weights
  themselves are non-finite); `cli_main` prints one line naming the cause (status 1).
- `NonFiniteGuard`: keeps a non-finite loss or gradient out of the weights (the optimizer step is skipped and
  counted; a few in a row stop the run), and `check_finite_model` keeps NaN/inf out of an export.
- `AtomicCheckpointIO`: writes a checkpoint to a temp file in the same folder, fsyncs it and renames it over the
  target, so a crash during a save never leaves a truncated `last.ckpt` (a killed save leaves a hidden
  `.last.ckpt.*.tmp`, removed by the next save of that file).
- `GracefulShutdown`: SIGTERM/SIGINT set a flag; at the next step boundary the callback writes `last.ckpt` and
  stops with exit status 128 + signal (a second SIGINT stops at once, as usual).
- `collect_rng_states` / `restore_rng_states`: torch, CUDA, python and numpy generators as weights_only-safe
  values (the sampling generator of the RL modules is saved by the module itself).
"""

from __future__ import annotations

import math
import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class ConfigError(ValueError):
    """A user error in the configuration or the inputs: shown as one line, without a traceback."""


class TrainingFailure(RuntimeError):
    """A failure once training runs, shown by the CLI as one line after `error.ckpt` is written (exit status 1).
    `save_checkpoint = False` for failures whose state is not worth resuming (non-finite weights)."""

    save_checkpoint = True


class RewardFunctionError(TrainingFailure):
    """A reward function failed (raised, returned the wrong number of values, a non-number or a non-finite one)."""


class NonFiniteError(TrainingFailure):
    """A loss, gradient, weight or logit is NaN/inf: the message names which and what to do."""


class NonFiniteWeightsError(NonFiniteError):
    """The weights themselves are non-finite: no `error.ckpt` (it could not be resumed usefully)."""

    save_checkpoint = False


# ---------------------------------------------------------------------------------------- non-finite guard
def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (an FSDP2 DTensor's shard; a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite. One float64 sum per tensor: NaN and ±inf propagate
    through a sum (inf - inf = NaN), so a non-finite total means a non-finite element; no [numel] bool copies."""
    sums = [_local(t).detach().sum(dtype=torch.float64) for t in tensors if t is not None and t.numel()]
    return not sums or bool(torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]).sum()))


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first tensor holding NaN/inf, or None."""
    return next((name for name, t in named_tensors if not all_finite([t])), None)


class NonFiniteGuard:
    """Keeps a non-finite loss or gradient out of the weights, for every module (GRPO, PPO, SFT, RewardModel).

    Fed by Lightning's hooks, which run in automatic and manual optimization alike: `see_loss` (every backward)
    and `before_step` (every optimizer step, before clipping and `step`). When the losses since the last step
    or the optimizer's gradients hold NaN/inf, the gradients are set to None, so `optimizer.step()` leaves those
    parameters (and their Adam moments) untouched, and the skip is counted (`skipped`). After `max_consecutive`
    skipped steps in a row of one optimizer the run stops with a `NonFiniteError` naming the cause. Ranks agree
    on the decision (one boolean collective), so no rank steps while another skips.
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if not isinstance(max_consecutive, int) or isinstance(max_consecutive, bool) or max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be an integer >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # optimizer steps skipped so far (all optimizers)
        self._consecutive: dict[int, int] = {}  # per optimizer
        self._loss_sum: torch.Tensor | None = None  # the losses since the last optimizer step, summed
        self._stepped = False  # an optimizer step ran since the last backward

    def see_loss(self, loss: torch.Tensor) -> None:
        """Every backward. The losses are summed as tensors (NaN/inf propagate), read once at the step: no
        device sync per micro-batch."""
        if self._stepped:  # a new step's first backward: the previous step's losses no longer matter
            self._loss_sum, self._stepped = None, False
        loss = loss.detach().float().sum()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def _bad_loss(self) -> float | None:
        value = None if self._loss_sum is None else float(self._loss_sum)
        return value if value is not None and not math.isfinite(value) else None

    def before_step(self, optimizer: torch.optim.Optimizer, trainer: L.Trainer | None, what: str) -> bool:
        """True: the step goes ahead. False: the gradients were dropped (the step changes nothing)."""
        self._stepped = True
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads_ok = all_finite([p.grad for p in params if p.grad is not None])
        bad_loss = self._bad_loss()
        ok = bad_loss is None and grads_ok
        if trainer is not None and trainer.world_size > 1:
            ok = bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
        key = id(optimizer)
        if ok:
            self._consecutive[key] = 0
            return True
        for p in params:
            p.grad = None
        self.skipped += 1
        self._consecutive[key] = self._consecutive.get(key, 0) + 1
        cause = (f"the loss is {bad_loss}" if bad_loss is not None else
                 "the gradients hold NaN/inf" if not grads_ok else "another rank saw a NaN/inf loss or gradient")
        step = f"step {trainer.global_step}" if trainer is not None else "a step"
        rank_zero_warn(f"[rlhf_lightning] skipped {what} optimizer {step}: {cause} "
                       f"({self._consecutive[key]} in a row, the run stops at {self.max_consecutive})")
        if self._consecutive[key] >= self.max_consecutive:
            raise NonFiniteError(f"{self._consecutive[key]} optimizer steps in a row of {what} were skipped because "
                                 f"{cause}; the weights are those of the last good step. Look for rewards or "
                                 "losses that overflow (a custom compute_rewards / policy_loss), or lower lr "
                                 "(raise model.max_nonfinite_steps to tolerate longer runs of bad steps)")
        return False

    def check_weights(self, named_params) -> None:
        """After a training step: weights holding NaN/inf stop the run (the guard should make it impossible)."""
        bad = first_nonfinite(named_params)
        if bad is not None:
            raise NonFiniteWeightsError(f"parameter {bad!r} holds NaN/inf after an optimizer step with finite "
                                        "gradients (an overflow: lower lr); the run stops without error.ckpt, "
                                        "resume from the last checkpoint")

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))


def check_finite_model(model: torch.nn.Module, out: Any) -> None:
    """Refuse to export a model with NaN/inf weights (a NonFiniteWeightsError naming the first parameter)."""
    bad = first_nonfinite(model.state_dict().items())
    if bad is not None:
        raise NonFiniteWeightsError(f"not exporting to {out}: parameter {bad!r} holds NaN/inf")


# ------------------------------------------------------------------------------------------------ RNG streams
def collect_rng_states() -> dict[str, Any]:
    """The global RNG states as tensors, tuples and ints only, so checkpoints load with `weights_only=True`
    (numpy's state holds an ndarray, which torch's safe unpickler refuses; it is stored as a tensor)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return states
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNG streams from `collect_rng_states()`; streams missing from `states` are left alone."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        random.setstate(_as_tuple(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        s = states["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a state that went through a list-producing serializer is turned back."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------ atomic checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic and durable: temp file in the target's folder, fsync,
    `os.replace`, fsync of the folder. Remote (fsspec URL) paths fall back to Lightning's own save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the new one, never a mix
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        # temp files of saves that a killed process never finished (SIGKILL runs no cleanup)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (the directory entry), where the OS allows opening a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give the trainer's strategy an `AtomicCheckpointIO` unless a checkpoint IO was configured explicitly
    (a user's own plugin, an async or XLA one, is kept as it is)."""
    strategy = trainer.strategy
    if getattr(strategy, "_checkpoint_io", None) is None and type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# ------------------------------------------------------------------------------------------- signal handling
def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """`<checkpoint dir>/last.ckpt`: the first ModelCheckpoint's folder, else `<default_root_dir>/checkpoints`."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None):
            return Path(cb.dirpath) / "last.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class TrainingInterrupted(SIGTERMException):
    """Raised after the shutdown checkpoint is written; a SystemExit, so the process exits 128 + signal."""


class GracefulShutdown(L.Callback):
    """On SIGTERM or SIGINT: finish the current step, write `last.ckpt`, stop with exit status 128 + signal.

    The handlers only set a flag (a checkpoint written in the middle of a step would not be a resumable state);
    `on_train_batch_end` is the step boundary, the same point where ModelCheckpoint saves. A second SIGINT
    raises KeyboardInterrupt at once. Under DDP the ranks agree on the flag (any rank's signal stops all).
    The handlers are installed for `fit` only and the previous ones are put back at teardown.
    """

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.saved_path: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl+C: the user does not want to wait for the step to end
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.saved_path = None, None
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep the default behaviour
            self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"[rlhf_lightning] {name}: saved {path} at step {trainer.global_step}; resume with "
                       f"--ckpt_path {path}")
        self._restore()
        raise TrainingInterrupted(128 + (self.received or signal.SIGTERM))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class CheckpointOnError(L.Callback):
    """When a reward function (any `TrainingFailure`) fails during fit, save `<checkpoint dir>/error.ckpt` before the
    run stops (not for non-finite weights: `save_checkpoint = False`).

    The checkpoint holds the weights and optimizer state of the last completed step, so after fixing the
    function the run continues with `--ckpt_path .../error.ckpt` (the failing batch counts as seen).
    """

    def __init__(self) -> None:
        self.saved_path: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, TrainingFailure) or not exception.save_checkpoint or not trainer.training:
            return
        path = last_checkpoint_path(trainer).with_name("error.ckpt")
        trainer.save_checkpoint(path)
        self.saved_path = path
        exception.checkpoint_path = path  # type: ignore[attr-defined] - read by cli_main's message
