"""Checkpoints that survive crashes: atomic saves, a periodic `last.ckpt`, `error.ckpt` on any failure, the
global RNG streams (exact resume) and the step-boundary state a signal saves.

- `AtomicCheckpointIO`: writes a checkpoint to a temp file in the same folder, fsyncs it and renames it over the
  target, so a crash during a save never leaves a truncated `last.ckpt` (a killed save leaves a hidden
  `.last.ckpt.*.tmp`, removed by the next save of that file).
- `LastCheckpoint`: the CLI's default ModelCheckpoint: `last.ckpt` every N batches, at epoch ends and at the
  end of fit; a failed save is reported, and a failed final save does not prevent the export.
- `CheckpointOnError`: any exception once training runs saves `error.ckpt` first (one process; not when
  the weights themselves are non-finite).
- `collect_rng_states` / `restore_rng_states`: torch, CUDA, python and numpy generators as weights_only-safe
  values (the sampling generator of the RL modules is saved by the module itself).
- `step_boundary_state` / `save_step_boundary`: what `GracefulShutdown` (infra/shutdown.py) saves when a signal
  drops an unfinished step.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from .errors import ConfigError


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



def saves_in_progress() -> int:
    """How many `AtomicCheckpointIO` writes are under way in this process (a signal then waits for them)."""
    return _saves_in_progress


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """`<checkpoint dir>/last.ckpt`: the first ModelCheckpoint's folder, else `<default_root_dir>/checkpoints`."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None):
            return Path(cb.dirpath) / "last.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"



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
        self._running = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running = True

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
        exception.checkpoint_path = path  # type: ignore[attr-defined] - read by cli_main's message


# ---------------------------------------------------------------------------------------- periodic last.ckpt
class LastCheckpoint(ModelCheckpoint):
    """The CLI's default checkpointing: `<checkpoint dir>/last.ckpt` every `every_n_batches` training batches
    (rollouts for GRPO/PPO, optimizer steps for SFT/RewardModel), at every epoch end and when fit ends, and no
    other file. A late failure loses at most `every_n_batches` batches.

    Configuring any `ModelCheckpoint` (this one with another `every_n_batches`, e.g.
    `--trainer.callbacks+=rlhf_lightning.infra.checkpoints.LastCheckpoint
    --trainer.callbacks.every_n_batches 20`) replaces the default. If the final save fails (a full disk), fit
    still ends and exports `hf_model/`; the error is kept in `final_save_error` (the CLI then exits with status 1
    naming it).
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
