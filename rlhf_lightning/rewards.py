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

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from .reliability import RewardFunctionError

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
def _weights_tensor(fns: Sequence[Callable], weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    if len(fns) == 0:
        raise ValueError("reward_fns is empty; give at least one reward function")
    if weights is None:
        return torch.ones(len(fns), dtype=torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != len(fns):
        raise ValueError(f"reward_weights has {w.numel()} entries but there are {len(fns)} reward functions")
    return w


def _call(fn: Callable, prompts: list[str], completions: list[str], columns: dict[str, list]) -> Any:
    """Call fn with TRL keyword arguments; any error becomes a RewardFunctionError naming the function."""
    try:
        return fn(prompts=prompts, completions=completions, **columns)
    except Exception as err:
        raise RewardFunctionError(f"reward function {reward_fn_name(fn)!r} raised {type(err).__name__}: {err}") from err


def _to_float(fn: Callable, value: Any, where: str) -> float:
    """None/NaN -> NaN; a real number (or 1-element tensor) -> float; anything else is the fn's bug."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d numpy array
        value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    raise RewardFunctionError(f"reward function {reward_fn_name(fn)!r} returned a non-number {value!r} at {where}")


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score completions with every fn; return (total [B] float32, per_fn [n_fns, B] float32).

    None/NaN from a fn means "no opinion": it is skipped in the weighted sum, and a row is NaN only when
    every fn abstained on it (TRL's semantics; the caller decides what a NaN row means, e.g. drop it).
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
        per_fn[i] = torch.tensor([_to_float(fn, v, f"row {j}") for j, v in enumerate(out)], dtype=torch.float32)
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
) -> list[list[float]]:
    """Process supervision: each fn returns one list of step rewards per completion; the weighted sum is
    taken step by step. All fns must give the same number of steps for a completion (they must agree on
    where steps end). None/NaN steps are skipped as in `call_reward_fns` (NaN only if every fn abstains)."""
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
                r = _to_float(fn, v, f"completion {j} step {k}")
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
