"""Reward functions: the protocol, built-in verifiers, and how several are combined.

The protocol is TRL's, so TRL reward functions port unchanged:

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the dataset's other columns (e.g. `answer`) as lists aligned with `completions`; a function
must accept `**kwargs` because it receives every column. `None` means "no opinion on this row" (e.g. a
math verifier asked about a code prompt) and is ignored when rewards are combined.

Conversational data (prompts that are lists of chat messages) gets TRL's conversational format, as TRL's
GRPOTrainer passes it: `prompts` are the message lists and each completion is `[{"role": "assistant",
"content": text}]`, so TRL's conversational reward functions (`completion[0]["content"]`) run unchanged
(`trl_inputs`). The built-in functions accept both formats.

Process-supervision functions (GRPO §4.1.3) have the same inputs and return one list of step rewards per
completion, where the steps are `completion.split(task.step_separator)`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import math
import numbers
import re
import warnings
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from .reliability import RewardFunctionError

# The largest float32: rewards are stored as float32, so a larger float (1e300) would become inf.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
NONFINITE_MODES = ("error", "missing")

# A number, optionally negative, with optional thousands commas and decimals. The sign counts only when
# the '-' does not follow a digit, so the last number of "12-3" is 3, not -3.
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")
# An arithmetic chain "7+5-3=" (the last one in the prompt, so chat-templated prompts parse too).
_CHAIN = re.compile(r"(\d+(?:[+\-*]\d+)+)=")


# The column in which `PromptDataModule` keeps chat-message prompts as given (None for a row that is a string).
CHAT_PROMPTS = "prompt_messages"


def _text(value: Any) -> str:
    """A prompt or completion as plain text: a string as is, chat messages as their contents joined by newlines."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return value


def _check_aligned(completions: Sequence, column: Sequence, name: str) -> None:
    if len(column) != len(completions):
        raise ValueError(f"column {name!r} has {len(column)} rows but there are {len(completions)} completions")


# ------------------------------------------------------------------------------------------ outcome rewards
def exact_match(prompts: list[str], completions: list[str], answer: list[Any], **kwargs) -> list[float]:
    """1.0 iff the whole completion (whitespace-stripped) is the answer: strict, for short-answer tasks."""
    _check_aligned(completions, answer, "answer")
    return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def last_number(text: str) -> Decimal | None:
    """The last number in `text` ("1,234" -> 1234, "-4" -> -4), or None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only matches valid decimals
        return None


def _answer_number(answer: Any) -> Decimal:
    """The reference number: after the last "####" (GSM8K) if present, else the last number in the answer."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    value = last_number(text)
    if value is None:
        raise ValueError(f"answer {str(answer)!r} contains no number")
    return value


def final_answer_match(prompts: list[str], completions: list[str], answer: list[Any], **kwargs) -> list[float]:
    """1.0 iff the last number in the completion equals the answer's number (so "42" == "42.0" == "#### 42");
    a completion with no number gets 0.0. Lenient about surrounding text, for reasoning-style completions."""
    _check_aligned(completions, answer, "answer")
    out = []
    for completion, ans in zip(completions, answer):
        got = last_number(_text(completion))
        out.append(float(got is not None and got == _answer_number(ans)))
    return out


# The chain task's outcome reward is the final-answer check itself: the last line "12-3=9" ends in the answer.
chain_final_correct = final_answer_match


# ------------------------------------------------------------------------------------------ process rewards
def parse_chain(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """"7+5-3=" -> (7, [("+", 5), ("-", 3)]); the last chain in the prompt counts."""
    found = _CHAIN.findall(prompt)
    if not found:
        raise ValueError(f"prompt {prompt!r} contains no arithmetic chain like '7+5-3='")
    numbers_ = re.findall(r"\d+", found[-1])
    ops = re.findall(r"[+\-*]", found[-1])
    return int(numbers_[0]), list(zip(ops, (int(n) for n in numbers_[1:])))


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}; expected one of '+-*'")


def chain_steps(prompt: str) -> list[str]:
    """The correct step lines for a chain prompt, evaluated left to right: "7+5-3=" -> ["7+5=12", "12-3=9"]."""
    value, terms = parse_chain(prompt)
    steps = []
    for op, term in terms:
        new = apply_op(value, op, term)
        steps.append(f"{value}{op}{term}={new}")
        value = new
    return steps


def chain_step_rewards(prompts: list[str], completions: list[str], **kwargs) -> list[list[float]]:
    """Process supervision for the chain task: step k (line k of the completion) gets 1.0 iff it is exactly
    the k-th correct step "<correct running value><op><term>=<correct value>", else 0.0.

    A step is judged against the correct running value, not the model's own, so a wrong step is not
    excused later. Lines beyond the needed ones get 0.0. Always `len(out[i]) == completions[i].count("\\n") + 1`
    (an empty completion gives [0.0]), so step i ends at the i-th separator or the end of the completion.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    out = []
    for prompt, completion in zip(prompts, completions):
        wanted = chain_steps(_text(prompt))
        lines = _text(completion).split("\n")
        out.append([float(k < len(wanted) and line.strip() == wanted[k]) for k, line in enumerate(lines)])
    return out


# Short names accepted by `resolve_reward_fn` (e.g. `reward_fns: [exact_match]` in a YAML config).
REWARD_FNS: dict[str, Callable] = {
    "exact_match": exact_match,
    "final_answer_match": final_answer_match,
    "chain_final_correct": chain_final_correct,
    "chain_step_rewards": chain_step_rewards,
}


# ---------------------------------------------------------------------------------------------- resolving
def resolve_reward_fn(spec: str | Callable) -> Callable:
    """A callable passes through; a string is a built-in name (`REWARD_FNS`), "package.module.function"
    or "package.module:function" (the colon form allows nested attributes: "pkg.mod:Class.method")."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward function spec must be a callable or an import path string, got {spec!r}")
    spec = spec.strip()
    if spec in REWARD_FNS:
        return REWARD_FNS[spec]
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
        candidates = [(module_name, attr_path.split("."))]
    elif "." in spec:
        parts = spec.split(".")
        # Longest importable module prefix first: "a.b.c" -> ("a.b", ["c"]), then ("a", ["b", "c"]).
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    else:
        raise ValueError(f"reward function {spec!r} is neither a built-in {sorted(REWARD_FNS)} "
                         "nor an import path like 'package.module.function'")
    for module_name, attrs in candidates:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                continue  # this prefix is not a module; try a shorter one
            raise ValueError(f"reward function {spec!r}: importing {module_name!r} failed: "
                             f"{type(err).__name__}: {err}") from err
        except Exception as err:
            raise ValueError(f"reward function {spec!r}: importing {module_name!r} failed: "
                             f"{type(err).__name__}: {err}") from err
        for attr in attrs:
            if not hasattr(obj, attr):
                raise ValueError(f"reward function {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute "
                                 f"{attr!r}")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ValueError(f"reward function {spec!r} is not callable (it is a {type(obj).__name__})")
        return obj
    raise ValueError(f"reward function {spec!r}: cannot import module {candidates[0][0]!r}")


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
    w = _weights_tensor(fns, weights)  # [n_fns]
    prompts, completions, columns = _check_inputs(prompts, completions, columns)
    B = len(completions)
    per_fn = torch.empty(len(fns), B, dtype=torch.float32)  # [n_fns, B]
    for i, fn in enumerate(fns):
        out = _call(fn, prompts, completions, columns)
        if isinstance(out, torch.Tensor):
            out = out.flatten().tolist()
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != B:
            got = len(out) if hasattr(out, "__len__") and not isinstance(out, (str, bytes)) else type(out).__name__
            raise RewardFunctionError(f"reward function {reward_fn_name(fn)!r} returned {got} values for {B} "
                                      f"completions")
        per_fn[i] = torch.tensor([_to_float(fn, v, f"row {j}", nonfinite, stats) for j, v in enumerate(out)],
                                 dtype=torch.float32)
    weighted = per_fn * w[:, None]  # [n_fns, B]; NaN stays NaN (even at weight 0)
    total = torch.nansum(weighted, dim=0)  # [B]
    total[torch.isnan(per_fn).all(dim=0)] = math.nan
    return total, per_fn


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
    w = _weights_tensor(fns, weights).tolist()
    prompts, completions, columns = _check_inputs(prompts, completions, columns)
    B = len(completions)
    totals: list[list[float]] | None = None
    counted: list[list[int]] = []
    for fi, fn in enumerate(fns):
        out = _call(fn, prompts, completions, columns)
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != B:
            got = len(out) if hasattr(out, "__len__") and not isinstance(out, (str, bytes)) else type(out).__name__
            raise RewardFunctionError(f"step reward function {reward_fn_name(fn)!r} returned {got} step lists for "
                               f"{B} completions")
        if totals is None:
            totals = [[0.0] * _n_steps(fn, steps, j) for j, steps in enumerate(out)]
            counted = [[0] * len(t) for t in totals]
        for j, steps in enumerate(out):
            if _n_steps(fn, steps, j) != len(totals[j]):
                raise RewardFunctionError(f"step reward function {reward_fn_name(fn)!r} gave {len(steps)} steps for "
                                   f"completion {j} but {reward_fn_name(fns[0])!r} gave {len(totals[j])}")
            for k, v in enumerate(steps):
                r = _to_float(fn, v, f"completion {j} step {k}", nonfinite, stats)
                if not math.isnan(r):
                    totals[j][k] += w[fi] * r
                    counted[j][k] += 1
    assert totals is not None
    return [[t if c else math.nan for t, c in zip(row, cnt)] for row, cnt in zip(totals, counted)]


def _n_steps(fn: Callable, steps: Any, j: int) -> int:
    if isinstance(steps, torch.Tensor):
        return steps.numel()
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__"):
        raise RewardFunctionError(f"step reward function {reward_fn_name(fn)!r} returned {type(steps).__name__} for "
                           f"completion {j}; expected a list of step rewards")
    return len(steps)
