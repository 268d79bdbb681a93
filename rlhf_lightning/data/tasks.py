"""Built-in tasks: generated prompts with exact answers and verifiers, so RL runs with no dataset download.

A task makes rows `{"prompt", "completion", "answer"}`: `prompt` is what the policy sees, `completion` is
the correct continuation (the SFT target, without EOS), and `answer` is what reward functions check. Rows
are a pure function of (task arguments, n, seed) via `random.Random(seed)`, so runs are reproducible and
train/val sets are just two seeds.
"""

from __future__ import annotations

import inspect
import random
from abc import ABC, abstractmethod
from collections.abc import Callable

from rlhf_lightning.rewards import apply_op, chain_process_rewards, chain_steps, exact_match, final_answer_match


class Task(ABC):
    """A prompt generator with exact verifiers. Subclass and implement `sample` (and the reward lists)."""

    name: str = "task"
    step_separator: str | None = None  # where a completion's reasoning steps end (process supervision)

    def make_examples(self, n: int, seed: int) -> list[dict]:
        """`n` rows drawn from `random.Random(seed)`; the same (n, seed) always gives the same rows."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    @abstractmethod
    def sample(self, rng: random.Random) -> dict:
        """One row {"prompt", "completion", "answer"} drawn with `rng`."""

    @property
    def reward_fns(self) -> list[Callable]:
        """Default outcome rewards (one score per completion)."""
        return [final_answer_match]

    @property
    def process_reward_fns(self) -> list[Callable]:
        """Default process rewards (one score per step, steps split by `step_separator`); [] if none."""
        return []

    @property
    def max_completion_length(self) -> int | None:
        """An upper bound on len(completion) in characters (= tokens with the char tokenizer, EOS excluded),
        i.e. a safe `max_new_tokens`; None when a task cannot bound it."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k, '?')!r}" for k in inspect.signature(type(self).__init__).parameters
                         if k != "self")
        return f"{type(self).__name__}({args})"


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class AdditionTask(Task):
    """"47+85=" -> "132". Each operand independently gets a digit count drawn uniformly from
    min_digits..digits, then a uniform number with exactly that many digits (1 digit: 0..9).

    min_digits defaults to 1, not `digits`: mixing short and long operands is a gentler, more varied
    curriculum (a model sees carries into a new digit, like 9+95=104), and the exact-length case is still
    there with `min_digits=digits`.
    """

    name = "addition"
    step_separator = None

    def __init__(self, digits: int = 2, min_digits: int | None = None) -> None:
        _check_int("digits", digits, 1)
        min_digits = 1 if min_digits is None else min_digits
        _check_int("min_digits", min_digits, 1)
        if min_digits > digits:
            raise ValueError(f"min_digits ({min_digits}) must be <= digits ({digits})")
        self.digits, self.min_digits = digits, min_digits

    def _operand(self, rng: random.Random) -> int:
        k = rng.randint(self.min_digits, self.digits)
        return rng.randint(0 if k == 1 else 10 ** (k - 1), 10**k - 1)

    def sample(self, rng: random.Random) -> dict:
        a, b = self._operand(rng), self._operand(rng)
        answer = str(a + b)
        return {"prompt": f"{a}+{b}=", "completion": answer, "answer": answer}

    @property
    def reward_fns(self) -> list[Callable]:
        return [exact_match]  # the completion is the bare answer, so anything extra is wrong

    @property
    def max_completion_length(self) -> int:
        return self.digits + 1


class ChainArithmeticTask(Task):
    """"7+5-3=" -> "7+5=12\\n12-3=9" (answer "9"): one line per partial result, so each line is a step that
    process supervision can score. Operands are drawn from 1..max_operand, operators from `ops`.

    The chain is evaluated left to right, as its steps show. With only "+" and "-" (the default) that is
    also ordinary precedence; with "*" it is not ("2+3*4=" is 20 here), which the step lines make explicit.
    Intermediate values may be negative and are written "-4" ("3-7=-4\\n-4+2=-2").
    """

    name = "chain"
    step_separator = "\n"

    def __init__(self, num_terms: int = 3, max_operand: int = 20, ops: str = "+-") -> None:
        _check_int("num_terms", num_terms, 2)
        _check_int("max_operand", max_operand, 1)
        if not isinstance(ops, str) or not ops or any(op not in "+-*" for op in ops):
            raise ValueError(f"ops must be a non-empty string of operators from '+-*', got {ops!r}")
        self.num_terms, self.max_operand, self.ops = num_terms, max_operand, ops

    def sample(self, rng: random.Random) -> dict:
        terms = [rng.randint(1, self.max_operand) for _ in range(self.num_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
        prompt = str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(ops, terms[1:])) + "="
        value = terms[0]
        for op, t in zip(ops, terms[1:]):
            value = apply_op(value, op, t)
        steps = chain_steps(prompt)  # the same parser the process reward uses, so they cannot disagree
        return {"prompt": prompt, "completion": self.step_separator.join(steps), "answer": str(value)}

    @property
    def process_reward_fns(self) -> list[Callable]:
        return [chain_process_rewards]

    @property
    def max_completion_length(self) -> int:
        m = self.max_operand
        bound, total = m, 0  # bound >= |running value|
        for _ in range(self.num_terms - 1):
            new = max(bound + m, bound * m) if "*" in self.ops else bound + m
            # "-<prev><op><term>=-<value>": signs, operator and "=" take at most 4 characters
            total += len(str(bound)) + len(str(m)) + len(str(new)) + 4
            bound = new
        return total + (self.num_terms - 2)  # newlines between lines


class CalculatorTask(Task):
    """"123*456=" -> "56088": products of two `digits`-digit numbers, which the tiny preset cannot compute
    unaided but can hand to `rlhf_lightning.tools.calculator` (GRPO/PPO with `tools:`, docs/tools.md).

    The SFT target shows the call on `tool_rate` of the rows, in the built-in char format:
    "[calculator: 123*456]=56088\n56088" (policy text, the tool's reply "=56088\n", the policy's answer); the
    other rows are the bare answer. The reward is the last number of the completion (`final_answer_match`).
    """

    name = "calculator"

    def __init__(self, digits: int = 3, tool_rate: float = 0.5) -> None:
        _check_int("digits", digits, 1)
        if not 0 <= tool_rate <= 1:
            raise ValueError(f"tool_rate must be in [0, 1], got {tool_rate!r}")
        self.digits, self.tool_rate = digits, tool_rate

    def sample(self, rng: random.Random) -> dict:
        low = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        a, b = rng.randint(low, 10**self.digits - 1), rng.randint(low, 10**self.digits - 1)
        answer = str(a * b)
        shows_call = rng.random() < self.tool_rate
        completion = f"[calculator: {a}*{b}]={answer}\n{answer}" if shows_call else answer
        return {"prompt": f"{a}*{b}=", "completion": completion, "answer": answer}

    @property
    def max_completion_length(self) -> int:
        d = self.digits
        return len("[calculator: *]=\n") + 2 * d + 2 * (2 * d)


TASKS: dict[str, type[Task]] = {"addition": AdditionTask, "chain": ChainArithmeticTask, "calculator": CalculatorTask}


def get_task(name: str | Task, **kwargs) -> Task:
    """`get_task("chain", num_terms=4)` -> a task instance; a Task instance passes through unchanged."""
    if isinstance(name, Task):
        if kwargs:
            raise ValueError(f"task arguments {sorted(kwargs)} given with an already built task {name!r}")
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    cls = TASKS[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        allowed = [p for p in inspect.signature(cls).parameters]
        raise ValueError(f"bad arguments for task {name!r}: {err}; it takes {allowed}") from err
    return cls(**kwargs)
