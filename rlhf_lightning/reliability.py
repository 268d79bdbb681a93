"""Reliability: one-line user errors, atomic checkpoints, a checkpoint on SIGTERM/SIGINT and on reward errors,
and the global RNG streams in checkpoints (exact resume).

- `ConfigError`: a user mistake (bad argument, missing file). `cli_main` prints its message as one line and exits
  with status 2; any other exception is a bug and keeps its traceback.
- `RewardFunctionError`: a reward function raised or returned the wrong number of values during training.
  `CheckpointOnError` saves `error.ckpt` first; `cli_main` prints one line naming the function (status 1).
- `AtomicCheckpointIO`: writes a checkpoint to a temp file in the same folder, fsyncs it and renames it over the
  target, so a crash during a save never leaves a truncated `last.ckpt` (a killed save leaves a hidden
  `.last.ckpt.*.tmp`, removed by the next save of that file).
- `GracefulShutdown`: SIGTERM/SIGINT set a flag; at the next step boundary the callback writes `last.ckpt` and
  stops with exit status 128 + signal (a second SIGINT stops at once, as usual).
- `collect_rng_states` / `restore_rng_states`: torch, CUDA, python and numpy generators as weights_only-safe
  values (the sampling generator of the RL modules is saved by the module itself).
"""

from __future__ import annotations

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


class RewardFunctionError(RuntimeError):
    """A reward function failed during training (raised, or returned the wrong number of values)."""


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
