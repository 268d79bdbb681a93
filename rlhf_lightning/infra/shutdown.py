"""`GracefulShutdown`: SIGTERM/SIGINT during fit save the last completed step's state to `last.ckpt` within a
bounded time (the unfinished step is dropped where that is exact) and stop with exit status 128 + signal."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoints import last_checkpoint_path, save_step_boundary, saves_in_progress, step_boundary_state


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
        if self._abandonable and self._single and not saves_in_progress():  # a save in progress completes first
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
        self.received, self._boundary = None, None
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
