"""Keeping NaN/inf out of the weights and out of an export.

- `NonFiniteGuard`: keeps a non-finite loss or gradient out of the weights (the optimizer step is skipped and
  counted; a few in a row stop the run), and `check_finite_model` keeps NaN/inf out of an export.
- `all_finite` / `first_nonfinite`: the checks themselves, one float64 sum per tensor.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .errors import NonFiniteError, NonFiniteWeightsError


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
