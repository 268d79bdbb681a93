"""Built-in reward functions (TRL signature): verifiers for the built-in tasks and the chain task's step rewards."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

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


def chain_process_rewards(prompts: list[str], completions: list[str], **kwargs) -> list[list[float]]:
    """The chain task's process supervision: `chain_step_rewards` for every line, then the **end step** (see
    `algorithms.process`): 1.0 iff the completion's last number is the chain's value, what the task's outcome
    verifier says (`chain_final_correct`). So `len(out[i]) == completions[i].count("\\n") + 2`, and a chain that
    stops after some right steps is blamed where it stopped."""
    steps = chain_step_rewards(prompts, completions)
    out = []
    for prompt, completion, row in zip(prompts, completions, steps):
        value = int(chain_steps(_text(prompt))[-1].rsplit("=", 1)[1])  # the last right step's result
        got = last_number(_text(completion))
        out.append(row + [float(got is not None and got == value)])
    return out


# ------------------------------------------------------------------------------------------ environments
def environment_reward(prompts: list[str], completions: list[str], env_rewards: list[list[float]],
                       **kwargs) -> list[float]:
    """An environment's episode return: the sum of its step rewards (`env_rewards`, one list per completion,
    filled by the rollout loop when the module has an `environment`). The default reward with an environment."""
    _check_aligned(completions, env_rewards, "env_rewards")
    return [float(sum(r)) for r in env_rewards]


def environment_turn_rewards(prompts: list[str], completions: list[str], env_rewards: list[list[float]],
                             **kwargs) -> list[list[float]]:
    """Process supervision by turn: each environment step's reward as the step reward of the turn it answered
    (GRPO's `supervision: process` with an environment, where the steps are the policy's turns)."""
    _check_aligned(completions, env_rewards, "env_rewards")
    return [[float(v) for v in r] for r in env_rewards]


# Short names accepted by `resolve_reward_fn` (e.g. `reward_fns: [exact_match]` in a YAML config).
REWARD_FNS: dict[str, Callable] = {
    "exact_match": exact_match,
    "final_answer_match": final_answer_match,
    "chain_final_correct": chain_final_correct,
    "chain_step_rewards": chain_step_rewards,
    "chain_process_rewards": chain_process_rewards,
    "environment_reward": environment_reward,
    "environment_turn_rewards": environment_turn_rewards,
}


