"""Reward functions (TRL signature): resolving them from config strings, checking what they return, and calling
several with weights (`call_reward_fns`, `call_step_reward_fns`, both through `sources.WeightedSources`)."""
from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..infra.errors import RewardFunctionError
from ..infra.imports import import_object
from .builtin import CHAT_PROMPTS, REWARD_FNS, _check_aligned
from .interface import RewardSource

# The largest float32: rewards are stored as float32, so a larger float (1e300) would become inf.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
NONFINITE_MODES = ("error", "missing")


# ---------------------------------------------------------------------------------------------- resolving
def resolve_reward_fn(spec: str | Callable) -> Callable:
    """A callable passes through; a string is a built-in name (`REWARD_FNS`), "package.module.function"
    or "package.module:function" (the colon form allows nested attributes: "pkg.mod:Class.method")."""
    if callable(spec):
        return _instance(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward function spec must be a callable or an import path string, got {spec!r}")
    spec = spec.strip()
    if spec in REWARD_FNS:
        return REWARD_FNS[spec]
    if ":" not in spec and "." not in spec:
        raise ValueError(f"reward function {spec!r} is neither a built-in {sorted(REWARD_FNS)} "
                         "nor an import path like 'package.module.function'")
    obj = import_object(spec, "reward function")
    if not callable(obj):
        raise ValueError(f"reward function {spec!r} is not callable (it is a {type(obj).__name__})")
    return _instance(obj)


def _instance(obj: Callable) -> Callable:
    """A `RewardSource` class (e.g. named in YAML by its import path) as an instance built with no arguments."""
    if isinstance(obj, type) and issubclass(obj, RewardSource):
        try:
            return obj()
        except Exception as err:
            raise ValueError(f"reward source {obj.__qualname__!r} could not be built with no arguments: "
                             f"{type(err).__name__}: {err}") from err
    return obj


def reward_fn_name(fn: Callable) -> str:
    """A readable name for logs: the function's name, else its class name (for callable objects)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


# ------------------------------------------------------------------------------------------------ combining
def check_reward_weights(weights: Sequence[float] | None, n_fns: int) -> list[float] | None:
    """The weights as floats, or a one-line ValueError: one per function, each a finite number (a NaN weight
    would silently zero its function's reward, an infinite one would make every reward inf or NaN)."""
    if weights is None:
        return None
    weights = list(weights)
    if len(weights) != n_fns:
        raise ValueError(f"reward_weights has {len(weights)} entries but there are {n_fns} reward functions")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"reward_weights[{i}] is {w!r}; every reward weight must be a finite number")
    return [float(w) for w in weights]


def _weights_tensor(fns: Sequence[Callable], weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    if len(fns) == 0:
        raise ValueError("reward_fns is empty; give at least one reward function")
    if weights is None:
        return torch.ones(len(fns), dtype=torch.float32)
    if isinstance(weights, torch.Tensor):
        weights = weights.flatten().tolist()
    return torch.tensor(check_reward_weights(weights, len(fns)), dtype=torch.float32)


@functools.lru_cache(maxsize=256)
def _accepted_keywords(fn: Callable) -> frozenset[str] | None:
    """The keyword names fn accepts, or None when it takes **kwargs (or its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no readable signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_signature(fn: Callable, columns: Sequence[str]) -> None:
    """A RewardFunctionError telling the user to add `**kwargs` when fn cannot take the dataset's columns."""
    if isinstance(fn, RewardSource):  # a source takes the columns as one dict
        return
    try:
        accepted = _accepted_keywords(fn)
    except TypeError:  # an unhashable callable: checked by the call itself
        return
    if accepted is None:
        return
    missing = [name for name in ("prompts", "completions", *columns) if name not in accepted]
    if missing:
        raise RewardFunctionError(f"reward function {reward_fn_name(fn)!r} does not accept {missing}: add **kwargs "
                                  f"to its signature (reward functions receive prompts, completions and every "
                                  f"dataset column by name)")


def _own_copy(values: Sequence) -> list:
    """A fresh list for one function: strings and numbers are shared (immutable), anything else (chat messages,
    nested lists) is deep-copied, so a function that mutates its input cannot change the next one's."""
    return [v if isinstance(v, (str, bytes, numbers.Number, type(None))) else copy.deepcopy(v) for v in values]


def _call(fn: Callable, prompts: list[str], completions: list[str], columns: dict[str, list]) -> Any:
    """Call fn with TRL keyword arguments, each a copy of its own; any error becomes a RewardFunctionError
    naming the function."""
    check_signature(fn, list(columns))
    try:
        return fn(prompts=_own_copy(prompts), completions=_own_copy(completions),
                  **{name: _own_copy(col) for name, col in columns.items()})
    except Exception as err:
        raise RewardFunctionError(f"reward function {reward_fn_name(fn)!r} raised {type(err).__name__}: {err}") from err


def _to_float(fn: Callable | str, value: Any, where: str, nonfinite: str = "error",
              stats: dict[str, int] | None = None) -> float:
    """None/NaN -> NaN; a real number (or 1-element tensor) -> float; anything else is the fn's bug.

    ±inf, or a float too large for float32 (1e300), is an error naming the function, row and value
    (`nonfinite="error"`), or a missing reward counted in `stats["nonfinite"]` (`nonfinite="missing"`)."""
    name = fn if isinstance(fn, str) else f"reward function {reward_fn_name(fn)!r}"
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d numpy array
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise RewardFunctionError(f"{name} returned a non-number {value!r} at {where}")
    value = float(value)
    if math.isinf(value) or abs(value) > _FLOAT32_MAX:
        if nonfinite == "error":
            raise RewardFunctionError(f"{name} returned {value!r} at {where}: rewards must be finite float32 "
                                      "numbers (None = no reward; model.nonfinite_rewards=missing treats such "
                                      "values as missing)")
        # once per source (Python shows a warning text once): the run goes on, but the user is told
        warnings.warn(f"{name} returned ±inf or a float32-overflowing reward; nonfinite_rewards=missing treats such "
                      "values as no reward (counted in reward/nonfinite_count)", RuntimeWarning, stacklevel=2)
        if stats is not None:
            stats["nonfinite"] = stats.get("nonfinite", 0) + 1
        return math.nan
    return value


def check_finite_rewards(rewards: Any, source: str, nonfinite: str = "error",
                         stats: dict[str, int] | None = None) -> Any:
    """What `compute_rewards` returned (Tensor [N] or per-completion step lists), with ±inf / float32-overflowing
    values handled as `_to_float` does (`source` names the hook in the error)."""
    if isinstance(rewards, torch.Tensor):
        bad = torch.isinf(rewards) | (rewards.abs() > _FLOAT32_MAX)  # a float64 1e300 is finite until .float()
        if bool(bad.any()):
            row = int(bad.flatten().nonzero()[0])
            _to_float(source, float(rewards.flatten()[row]), f"row {row}", nonfinite, stats)  # raises in error mode
            extra = int(bad.sum()) - 1  # the first one was counted by _to_float
            if stats is not None and extra:
                stats["nonfinite"] = stats.get("nonfinite", 0) + extra
            rewards = rewards.masked_fill(bad, math.nan)
        return rewards
    return [[_to_float(source, v, f"completion {j} step {k}", nonfinite, stats) for k, v in enumerate(steps)]
            for j, steps in enumerate(rewards)]


def _check_inputs(prompts: Sequence[str], completions: Sequence[str],
                  columns: dict[str, list] | None) -> tuple[list, list, dict]:
    """The checked arguments, in the format TRL would pass them (`trl_inputs`)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    columns = dict(columns or {})
    for name, col in columns.items():
        if name in ("prompts", "completions"):
            raise ValueError(f"column name {name!r} clashes with a reward function argument; rename it")
        _check_aligned(completions, col, name)
    return trl_inputs(prompts, completions, columns)


def trl_inputs(prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list]) -> tuple[list, list, dict]:
    """(prompts, completions, columns) as TRL's GRPOTrainer gives them to reward functions.

    With chat-message prompts (the `CHAT_PROMPTS` column, set by `PromptDataModule` for conversational data) TRL
    passes the message lists as `prompts` and every completion as one assistant message, `[{"role": "assistant",
    "content": text}]`; otherwise the rendered prompt strings and completion strings. A batch that mixes both
    kinds of prompt stays plain (a function cannot be handed two formats at once).
    """
    columns = dict(columns)
    messages = columns.pop(CHAT_PROMPTS, None)
    if messages is None or any(m is None for m in messages):
        return list(prompts), list(completions), columns
    conversational = [[{"role": "assistant", "content": text}] for text in completions]
    return [list(m) for m in messages], conversational, columns


def _n_steps(fn: Callable, steps: Any, j: int) -> int:
    if isinstance(steps, torch.Tensor):
        return steps.numel()
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__"):
        raise RewardFunctionError(f"step reward function {reward_fn_name(fn)!r} returned {type(steps).__name__} for "
                           f"completion {j}; expected a list of step rewards")
    return len(steps)
