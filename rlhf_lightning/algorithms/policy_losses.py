"""Policy losses: pure functions with one signature, registered by name (as `advantages` registers estimators).

Every loss is `loss(inputs: PolicyLossInputs) -> (loss scalar, stats dict of detached scalars)`. GRPOModule
picks one with `importance_sampling: <name>` (PPOModule uses `token`); the setting is validated against
`POLICY_LOSSES`.

    name      ratio                                              clipping              paper
    token     ρ_t = π_θ(y_t) / π_old(y_t), per token             [1-ε_low, 1+ε_high]   PPO eq. 7, GRPO eq. 3,
                                                                                       DAPO clip-higher eq. 10
    sequence  s_i = exp(mean_t log ρ_t), one per completion,     [1-ε_low, 1+ε_high]   GSPO (Zheng et al. 2025)
              with the GSPO-token gradient                                             eq. 7 / eq. 13

Adding a loss = one function + one registration + one test:

    @register_policy_loss("my_loss")
    def my_loss(inputs: PolicyLossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        per_token = ...                                              # [B, T]
        return losses.aggregate(per_token, inputs.mask, inputs.agg, inputs.normalizer, inputs.max_len), {}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .. import losses


@dataclass(frozen=True)
class PolicyLossInputs:
    """logp, old_logp, mask: [B, T] (logp carries the gradient; old_logp is a constant). advantages: [B] or
    [B, T]. clip_low / clip_high: ε below / above 1. agg, normalizer, max_len: `losses.aggregate`'s (the
    normaliser is the whole optimizer step's, so micro-batches add up to the step's loss)."""

    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "token-mean"
    normalizer: float | Tensor | None = None
    max_len: int | None = None


PolicyLossFn = Callable[[PolicyLossInputs], tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: `@register_policy_loss("name")` makes `importance_sampling: name` select the function."""
    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered ({POLICY_LOSSES[name].__qualname__})")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str, setting: str = "importance_sampling") -> PolicyLossFn:
    """The registered loss `name`, or a one-line error naming `setting` and the names there are."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"{setting} must be {'|'.join(POLICY_LOSSES)}, got {name!r}")
    return POLICY_LOSSES[name]


@register_policy_loss("token")
def clipped_token_ratio(inputs: PolicyLossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """-min(ρ_t·A, clip(ρ_t, 1-ε_low, 1+ε_high)·A) per token (`losses.policy_loss`, level=token)."""
    return _clipped(inputs, "token")


@register_policy_loss("sequence")
def clipped_sequence_ratio(inputs: PolicyLossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: the same clipped surrogate with the length-normalised sequence ratio (`losses.policy_loss`,
    level=sequence). GSPO clips far tighter than PPO (the paper uses ε ≈ 3e-4 / 4e-4)."""
    return _clipped(inputs, "sequence")


def _clipped(inputs: PolicyLossInputs, level: str) -> tuple[Tensor, dict[str, Tensor]]:
    return losses.policy_loss(inputs.logp, inputs.old_logp, inputs.advantages, inputs.mask,
                              clip_low=inputs.clip_low, clip_high=inputs.clip_high, level=level, agg=inputs.agg,
                              normalizer=inputs.normalizer, max_len=inputs.max_len)
