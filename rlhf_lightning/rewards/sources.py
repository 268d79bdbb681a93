"""Reward sources: a TRL reward function (`FunctionSource`) and a weighted combination (`WeightedSources`).

`call_reward_fns` / `call_step_reward_fns` (what the modules, evaluation and the iterative callback score with)
are the combination of one `FunctionSource` per function, so every check lives once: in `FunctionSource` (what a
function returns) and in `WeightedSources` (how the values add up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..infra.errors import RewardFunctionError
from .functions import (
    _call,
    _check_inputs,
    _n_steps,
    _to_float,
    _weights_tensor,
    check_finite_rewards,
    resolve_reward_fn,
    reward_fn_name,
)
from .interface import RewardOutput, RewardSource


class FunctionSource(RewardSource):
    """A TRL-signature reward function as a source, with the checks every function gets: one value per
    completion (per-step lists when `process`), numbers only (None/NaN = no reward), ±inf handled as `nonfinite`
    says (counted in `stats["nonfinite"]`), `**kwargs` for the columns, and its own copies of the inputs."""

    def __init__(self, fn: str | Callable, process: bool = False, nonfinite: str = "error",
                 stats: dict[str, int] | None = None):
        self.fn = resolve_reward_fn(fn)
        self.process, self.nonfinite, self.stats = process, nonfinite, stats

    @property
    def name(self) -> str:
        return reward_fn_name(self.fn)

    def score(self, prompts, completions, columns=None) -> RewardOutput:
        prompts, completions, columns = _check_inputs(prompts, completions, columns)
        out = _call(self.fn, prompts, completions, columns)
        if self.process:
            return RewardOutput(self._steps(out, len(completions)))
        rewards = self._values(out, len(completions))
        return RewardOutput(rewards, {self.name: rewards})

    def _values(self, out: Any, n: int) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            out = out.flatten().tolist()
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != n:
            got = len(out) if hasattr(out, "__len__") and not isinstance(out, (str, bytes)) else type(out).__name__
            raise RewardFunctionError(f"reward function {self.name!r} returned {got} values for {n} completions")
        return torch.tensor([_to_float(self.fn, v, f"row {j}", self.nonfinite, self.stats) for j, v in enumerate(out)],
                            dtype=torch.float32)

    def _steps(self, out: Any, n: int) -> list[list[float]]:
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != n:
            got = len(out) if hasattr(out, "__len__") and not isinstance(out, (str, bytes)) else type(out).__name__
            raise RewardFunctionError(f"step reward function {self.name!r} returned {got} step lists for "
                                      f"{n} completions")
        for j, steps in enumerate(out):
            _n_steps(self.fn, steps, j)  # a list per completion, before any value is read
        return [[_to_float(self.fn, v, f"completion {j} step {k}", self.nonfinite, self.stats)
                 for k, v in enumerate(steps)] for j, steps in enumerate(out)]


def as_source(obj: str | Callable | RewardSource, process: bool = False, nonfinite: str = "error",
              stats: dict[str, int] | None = None) -> RewardSource:
    """A `RewardSource` as is; a reward function (or its import path) as a `FunctionSource`."""
    if isinstance(obj, RewardSource):
        return obj
    return FunctionSource(obj, process, nonfinite, stats)


class WeightedSources(RewardSource):
    """The weighted sum of sources (weight 1 each by default). A source's None/NaN is "no opinion": skipped in
    the sum, and a completion (or step) is NaN only when every source abstained (TRL's semantics). Process
    sources must agree on each completion's number of steps. `per_source` holds each outcome source's values."""

    def __init__(self, sources: Sequence[str | Callable | RewardSource], weights: Sequence[float] | None = None,
                 process: bool = False, nonfinite: str = "error", stats: dict[str, int] | None = None):
        self.weights = _weights_tensor(sources, weights)  # [S]; checks the count and that each is finite
        self.sources = [as_source(s, process, nonfinite, stats) for s in sources]
        self.process, self.nonfinite, self.stats = process, nonfinite, stats

    def score(self, prompts, completions, columns=None) -> RewardOutput:
        if self.process:
            return RewardOutput(self.score_steps(prompts, completions, columns))
        total, _, per_source = self.score_each(prompts, completions, columns)
        return RewardOutput(total, per_source)

    def _checked(self, source: RewardSource, out: RewardOutput, n: int) -> RewardOutput:
        """A source's output, its rewards checked as a function's are (a custom source is not trusted more)."""
        if not isinstance(out, RewardOutput):
            raise RewardFunctionError(f"reward source {source.name!r} returned {type(out).__name__}; "
                                      "RewardSource.score must return a RewardOutput")
        if self.process:
            return out
        rewards = torch.as_tensor(out.rewards, dtype=torch.float32).flatten()
        if rewards.numel() != n:
            raise RewardFunctionError(f"reward source {source.name!r} returned {rewards.numel()} rewards for {n} "
                                      "completions")
        rewards = check_finite_rewards(rewards, f"reward source {source.name!r}", self.nonfinite, self.stats)
        return RewardOutput(rewards, out.per_source or {source.name: rewards})

    def score_each(self, prompts, completions, columns=None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(total [N], each source's rewards [S, N], per_source) of outcome sources."""
        n = len(completions)
        outs = [self._checked(s, s.score(prompts, completions, columns), n) for s in self.sources]
        each = torch.stack([o.rewards for o in outs]) if outs else torch.empty(0, n)  # [S, N]
        weighted = each * self.weights[:, None]  # [S, N]; NaN stays NaN (even at weight 0)
        total = torch.nansum(weighted, dim=0)  # [N]
        total[torch.isnan(each).all(dim=0)] = math.nan
        per_source: dict[str, torch.Tensor] = {}
        for o in outs:
            per_source.update(o.per_source)
        return total, each, per_source

    def score_steps(self, prompts, completions, columns=None) -> list[list[float]]:
        """Process sources: the weighted sum step by step."""
        w = self.weights.tolist()
        totals: list[list[float]] | None = None
        counted: list[list[int]] = []
        for si, source in enumerate(self.sources):
            out = source.score(prompts, completions, columns).rewards
            if totals is None:
                totals = [[0.0] * len(steps) for steps in out]
                counted = [[0] * len(t) for t in totals]
            for j, steps in enumerate(out):
                if len(steps) != len(totals[j]):
                    raise RewardFunctionError(f"step reward function {source.name!r} gave {len(steps)} steps for "
                                              f"completion {j} but {self.sources[0].name!r} gave {len(totals[j])}")
                for k, r in enumerate(steps):
                    if not math.isnan(r):
                        totals[j][k] += w[si] * r
                        counted[j][k] += 1
        assert totals is not None
        return [[t if c else math.nan for t, c in zip(row, cnt)] for row, cnt in zip(totals, counted)]


def call_reward_fns(
    fns: Sequence[Callable],
    weights: Sequence[float] | torch.Tensor | None,
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list] | None = None,
    nonfinite: str = "error",
    stats: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score completions with every fn; return (total [B] float32, per_fn [n_fns, B] float32).

    None/NaN from a fn means "no opinion": it is skipped in the weighted sum, and a row is NaN only when
    every fn abstained on it (TRL's semantics; the caller decides what a NaN row means, e.g. drop it).
    ±inf or a float32-overflowing value stops with a RewardFunctionError naming the function, row and value, or
    (`nonfinite="missing"`) counts as no opinion and is counted in `stats["nonfinite"]`. Each function gets its
    own copies of the inputs, so one that mutates them cannot corrupt the next one's.
    """
    combined = WeightedSources(fns, weights, False, nonfinite, stats)
    _check_inputs(prompts, completions, columns)  # a misaligned batch is named before any function runs
    total, each, _ = combined.score_each(prompts, completions, columns)
    return total, each


def call_step_reward_fns(
    fns: Sequence[Callable],
    weights: Sequence[float] | torch.Tensor | None,
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list] | None = None,
    nonfinite: str = "error",
    stats: dict[str, int] | None = None,
) -> list[list[float]]:
    """Process supervision: each fn returns one list of step rewards per completion; the weighted sum is
    taken step by step. All fns must give the same number of steps for a completion (they must agree on
    where steps end). None/NaN steps are skipped as in `call_reward_fns` (NaN only if every fn abstains);
    non-finite steps are handled as there (`nonfinite`, `stats`)."""
    combined = WeightedSources(fns, weights, True, nonfinite, stats)
    _check_inputs(prompts, completions, columns)
    return combined.score_steps(prompts, completions, columns)
