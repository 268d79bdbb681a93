"""Reliability: one-line user errors, atomic checkpoints, a periodic `last.ckpt`, a checkpoint on SIGTERM/SIGINT
and on any failure, and the global RNG streams in checkpoints (exact resume).

- `ConfigError`: a user mistake (bad argument, missing file). `cli_main` prints its message as one line and exits
  with status 2; any other exception is a bug and keeps its traceback.
- `TrainingFailure`: a failure once training runs that the user can act on: `RewardFunctionError` (a reward
  function raised, returned the wrong number of values or a non-finite reward) and `NonFiniteError` (a loss,
  gradient or weight that is NaN/inf); `cli_main` prints one line naming the cause (status 1).
- `CheckpointOnError`: any exception once training runs saves `error.ckpt` first (one process; not when
  the weights themselves are non-finite).
- `LastCheckpoint`: the CLI's default ModelCheckpoint: `last.ckpt` every N batches, at epoch ends and at the
  end of fit; a failed save is reported, and a failed final save does not prevent the export.
- `NonFiniteGuard`: keeps a non-finite loss or gradient out of the weights (the optimizer step is skipped and
  counted; a few in a row stop the run), and `check_finite_model` keeps NaN/inf out of an export.
- `AtomicCheckpointIO`: writes a checkpoint to a temp file in the same folder, fsyncs it and renames it over the
  target, so a crash during a save never leaves a truncated `last.ckpt` (a killed save leaves a hidden
  `.last.ckpt.*.tmp`, removed by the next save of that file).
- `GracefulShutdown`: SIGTERM/SIGINT during fit save the last completed step's state to `last.ckpt` within a
  bounded time (the unfinished step is dropped where that is exact) and stop with exit status 128 + signal.
- `collect_rng_states` / `restore_rng_states`: torch, CUDA, python and numpy generators as weights_only-safe
  values (the sampling generator of the RL modules is saved by the module itself).
"""

from __future__ import annotations

import copy
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
from lightning.pytorch.callbacks import ModelCheckpoint
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
_saves_in_progress = 0  # AtomicCheckpointIO writes under way in this process


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
        global _saves_in_progress
        _saves_in_progress += 1  # a signal now is recorded, not raised (GracefulShutdown): the save completes
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the new one, never a mix
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            _saves_in_progress -= 1
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
    """A signal stopped the run; a SystemExit, so the process exits 128 + signal (never 0: the run did not
    finish, and a scheduler must not record it as a success)."""


class StepAbandoned(TrainingInterrupted):
    """Raised by the signal handler itself where the current work may be dropped (setup, sanity check,
    validation, a step's rollout phase): `GracefulShutdown.on_exception` then saves the last step boundary."""


class GracefulShutdown(L.Callback):
    """On SIGTERM or SIGINT during fit: save the state of the last completed step to `last.ckpt` within a bounded
    time and exit with 128 + signal.

    One process: until a step's first optimizer step (its rollout: decoding, reward functions, scoring passes),
    and in setup, the sanity check, validation and between steps, the handler raises at once (`StepAbandoned`,
    like Ctrl+C interrupts Python code: within one torch operation or one sleep); the unfinished step is dropped
    and the checkpoint holds the state captured at the previous step boundary (weights, optimizers, data
    position, sampling generator, RNG streams, counters), so the resume is exact. From a step's first optimizer
    step to its end, and in the final save and export, the signal is only recorded: the step (or the export)
    finishes first. Nothing is saved when no step completed in this run (the checkpoint it resumed from, if
    any, is untouched). Several processes: the ranks agree on the flag at step boundaries (any rank's signal
    stops all). A second SIGINT raises KeyboardInterrupt at once. Handlers are installed for `fit` only.
    """

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.saved_path: Path | None = None
        self._previous: dict[int, Any] = {}
        self._abandonable = False  # the handler may raise StepAbandoned now
        self._phase = "setup"  # named in the exit message
        self._boundary: dict[str, Any] | None = None  # checkpoint entries of the last completed step
        self._single = True

    def _handler(self, signum: int, frame: Any) -> None:
        if not self._previous:  # fit is over (Lightning's teardown may re-install us after a failure)
            return _default_action(signum, frame)
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl+C: the user does not want to wait for the step to end
        self.received = signum
        if self._abandonable and self._single and not _saves_in_progress:  # a save in progress completes first
            self._abandonable = False  # from here on the callback saves and exits: no second raise
            raise StepAbandoned(128 + signum)

    def _install(self, trainer: L.Trainer) -> None:
        """(Re)install the handlers: Lightning registers its own SIGTERM handler once setup is over (its flag
        ends the sanity check with exit status 0), so ours take over again when the sanity check and training
        start; a signal its handler already recorded is kept."""
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):
            connector.received_sigterm = False
            self.received = self.received or signal.SIGTERM
        try:
            for sig in self.signals:
                previous = signal.signal(sig, self._handler)
                self._previous.setdefault(sig, previous)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep the default behaviour
            self._restore(trainer)

    def _enter(self, trainer: L.Trainer, phase: str, abandonable: bool) -> None:
        self._phase, self._abandonable = phase, abandonable
        if abandonable and self.received is not None and self._single:
            self._abandonable = False
            raise StepAbandoned(128 + self.received)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.received, self.saved_path, self._boundary = None, None, None
        self._single = trainer.world_size == 1
        self._install(trainer)
        self._enter(trainer, "setup", True)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)
        self._enter(trainer, "the sanity check", True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)
        if not self._single and trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._stop_unsaved(trainer)  # a signal in setup or the sanity check, on any rank
        self._enter(trainer, "training", True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._enter(trainer, "training", True)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._abandonable = False  # the weights change from here on: this step finishes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if not self._single:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._save(trainer, live=True)
        if self._single:
            self._boundary = step_boundary_state(trainer, pl_module)
        self._enter(trainer, "training", True)  # validation and the next batch's loading may be dropped

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._phase = "validation"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._phase = "training"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._phase, self._abandonable = "the final checkpoint and export", False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._abandonable = False
        if not isinstance(exception, StepAbandoned):
            self._restore(trainer)
            return
        if self._boundary is None:
            self._stop_unsaved(trainer, raise_=False)
        else:
            self._save(trainer, live=False, raise_=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._abandonable = False
        self._restore(trainer)
        if stage == "fit" and self.received is not None and not trainer.interrupted:
            # a signal during the final checkpoint / export: both completed, but the run was asked to stop
            rank_zero_info(f"[rlhf_lightning] {signal.Signals(self.received).name} during {self._phase}: it "
                           f"completed; exiting with status {128 + self.received}")
            raise TrainingInterrupted(128 + self.received)

    def _save(self, trainer: L.Trainer, live: bool, raise_: bool = True) -> None:
        """Write last.ckpt: the live state at a step boundary, or the captured boundary of an abandoned step."""
        path = last_checkpoint_path(trainer)
        if live:
            trainer.save_checkpoint(path)
        else:
            save_step_boundary(trainer, self._boundary, path)
        self.saved_path = path
        step = self._boundary["global_step"] if not live and self._boundary else trainer.global_step
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        dropped = "" if live else f" (dropped the unfinished work of {self._phase})"
        rank_zero_info(f"[rlhf_lightning] {name}: saved {path} at step {step}{dropped}; resume with --ckpt_path "
                       f"{path}")
        self._restore(trainer)
        if raise_:
            raise TrainingInterrupted(128 + (self.received or signal.SIGTERM))

    def _stop_unsaved(self, trainer: L.Trainer, raise_: bool = True) -> None:
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"[rlhf_lightning] {name} during {self._phase}: nothing saved (no training step completed "
                       f"in this run); exiting with status {128 + (self.received or signal.SIGTERM)}")
        self._restore(trainer)
        if raise_:
            raise TrainingInterrupted(128 + (self.received or signal.SIGTERM))

    def _restore(self, trainer: L.Trainer | None = None) -> None:
        """Put the handlers from before fit back, also in Lightning's record of them: after a failure its
        teardown re-installs the handler it replaced, which was ours."""
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", {})
        for sig, previous in self._previous.items():
            previous = previous if previous is not None else signal.SIG_DFL
            signal.signal(sig, previous)
            if originals.get(sig) == self._handler:
                originals[sig] = previous
        self._previous = {}


def _default_action(signum: int, frame: Any) -> None:
    """What the signal does without a handler: SIGINT raises KeyboardInterrupt, SIGTERM ends the process."""
    if signum == signal.SIGINT:
        signal.default_int_handler(signum, frame)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def step_boundary_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The checkpoint entries that a step advances before its first optimizer step, as they are now (at a step
    boundary, where a ModelCheckpoint saves): loop progress and data position, the data module's sampler, and
    the module's own entries (counters, sampling generators, RNG streams, KL controller). Copies; the weights
    and optimizer states are not copied (an abandoned step never reached its optimizer step)."""
    # dump_checkpoint's pieces, without the state dicts of the weights (Lightning has no public call for them)
    state: dict[str, Any] = {"loops": trainer._checkpoint_connector._get_loops_state_dict(),
                             "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    datamodule = trainer.datamodule
    if datamodule is not None and (dm_state := datamodule.state_dict()):
        state[datamodule.__class__.__qualname__] = dm_state
    pl_module.on_save_checkpoint(state)
    return copy.deepcopy(state)


def save_step_boundary(trainer: L.Trainer, boundary: dict[str, Any], path: Path) -> None:
    """Save a checkpoint of the current weights and optimizers with the entries of `boundary` (one process)."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    checkpoint.update(copy.deepcopy(boundary))
    trainer.strategy.save_checkpoint(checkpoint, path)


class CheckpointOnError(L.Callback):
    """When anything fails once training runs (a reward function, a bad row, a bug, also in the validation of a
    fit), save `<checkpoint dir>/error.ckpt` before the run stops; the exception gets `checkpoint_path` (or
    `checkpoint_error` when the save failed too), which `cli_main` prints.

    The checkpoint holds the state when the failure happened: the weights and optimizer state of the last
    completed optimizer step, the failing batch counted as seen (after fixing the cause the run continues with
    `--ckpt_path .../error.ckpt`). Not written for signals (`GracefulShutdown` saves those) nor a second Ctrl+C,
    and not under several processes: an exception may be one rank's own, and a save is a collective the other
    ranks, waiting in another one, would never join (a hang instead of an exit); `last.ckpt` is the resume point.
    """

    def __init__(self) -> None:
        self.saved_path: Path | None = None
        self._running = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running, self.saved_path = True, None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        running, self._running = self._running, False
        if not running or not isinstance(exception, Exception) or trainer.world_size > 1:
            return
        if not getattr(exception, "save_checkpoint", True):  # non-finite weights: a checkpoint of them is useless
            return
        path = last_checkpoint_path(trainer).with_name("error.ckpt")
        try:
            trainer.save_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - e.g. a full disk: report it beside the original error
            exception.checkpoint_error = f"{path} could not be written: {err}"  # type: ignore[attr-defined]
            return
        self.saved_path = path
        exception.checkpoint_path = path  # type: ignore[attr-defined] - read by cli_main's message


# ---------------------------------------------------------------------------------------- periodic last.ckpt
class LastCheckpoint(ModelCheckpoint):
    """The CLI's default checkpointing: `<checkpoint dir>/last.ckpt` every `every_n_batches` training batches
    (rollouts for GRPO/PPO, optimizer steps for SFT/RewardModel), at every epoch end and when fit ends, and no
    other file. A late failure loses at most `every_n_batches` batches.

    Configuring any `ModelCheckpoint` (this one with another `every_n_batches`, e.g.
    `--trainer.callbacks+=rlhf_lightning.reliability.LastCheckpoint --trainer.callbacks.every_n_batches 20`)
    replaces the default. If the final save fails (a full disk), fit still ends and exports `hf_model/`; the
    error is kept in `final_save_error` (the CLI then exits with status 1 naming it).
    """

    def __init__(self, dirpath: str | Path | None = None, every_n_batches: int = 50):
        if not isinstance(every_n_batches, int) or every_n_batches < 0:
            raise ConfigError(f"every_n_batches must be an integer >= 0 (0: only at epoch and fit ends), got "
                              f"{every_n_batches!r}")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_batches = every_n_batches
        self.save_error: str | None = None  # why the latest save failed
        self.final_save_error: str | None = None  # why the save at the end of fit failed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if self.every_n_batches and done % self.every_n_batches == 0 and not self._should_skip_saving_checkpoint(
                trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skipped: this step's save already succeeded
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.final_save_error = self.save_error

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """Every save of last.ckpt. A failed one (a full disk) is warned about, not raised: training and the
        final export go on, `save_error` says why the file is missing, and the next save tries again."""
        error = None
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        except Exception as err:  # noqa: BLE001 - whatever the filesystem raises
            if trainer.world_size > 1:
                # the ranks whose part succeeded wait in the save's closing barrier: join it
                trainer.strategy.barrier("Trainer.save_checkpoint")
            error = f"{self.last_model_path} could not be written: {err}"
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            error = error or f"{self.last_model_path} could not be written on another rank"
        self.save_error = error
        if error is not None:
            rank_zero_warn(f"[rlhf_lightning] {error}")
