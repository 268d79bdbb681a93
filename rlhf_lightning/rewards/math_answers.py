"""`math_answer_match`: a math verifier on Hugging Face's math-verify (the library TRL, open-r1 and verl use).

    reward_fns: [rlhf_lightning.rewards.math_answer_match]      # or the short name math_answer_match

1.0 when the completion's final answer (`answers.extract_answer`: the last `\\boxed{}`, a GSM8K `#### n`, else the
last number) is equivalent to the `answer` column's reference (`answers.reference_answer`: after `####` for GSM8K
solutions, the boxed part of a worked solution, else the value itself). Equal numbers match (`1,234` = `1234.0`,
`0.5` = `\\frac{1}{2}`); the numeric tolerance is math-verify's: where a decimal meets a non-integer value, both
are rounded to `rounding` decimals (`0.333333` = `1/3`, `0.33` != `1/3`, `3.0` = `3.0000001`), while an integer is
matched exactly (`3` != `3.0000001`, `42` = `42.0`), and so are two fractions. Everything else is math-verify's
symbolic comparison of the two read as LaTeX (`(x+1)^2` = `x^2+2x+1`, `\\frac{\\sqrt{2}}{2}` = `\\sqrt{2}/2`,
`50\\%` = `0.5`, sets, intervals, `x=5` = `5`). 0.0 for a wrong or missing answer and for one math-verify cannot
settle within `timeout_s`; None ("no reward") where the reference itself cannot be parsed.

Timeout: math-verify's own uses `signal.alarm`, which only works on the main thread (it raises elsewhere) and
cannot stop sympy inside C code. Here math-verify runs in a worker process of its own (`math_worker`, started at
the first comparison, one per process: each DDP rank has its own) and the caller waits for each answer with
`select` on the worker's pipe, so the limit holds on any thread, under DDP, with no signal handler installed in
the training process; a worker that overruns is killed and replaced. Plain numbers on both sides are compared
in-process where that settles them (equal values; two unequal integers or fractions), with no round trip.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .answers import as_number, extract_answer, reference_answer
from .builtin import _check_aligned

INSTALL_HINT = "math_answer_match needs the math-verify package: pip install math-verify"
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine


def require_math_verify() -> None:
    """An ImportError of one line naming the package when math-verify is not installed."""
    try:
        missing = sys.modules.get("math_verify", ...) is None or importlib.util.find_spec("math_verify") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        raise ImportError(INSTALL_HINT)


class _Worker:
    """One `math_worker` process, talked to one request at a time (a lock serialises threads)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.pid = os.getpid()  # a forked child must not share its parent's pipes
        self.buffer = b""
        self.lock = threading.Lock()

    def _start(self) -> None:
        # the file, not `-m rlhf_lightning...`: the package's __init__ would import torch and Lightning
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("math_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buffer, self.pid = b"", os.getpid()
        if self._read_line(_STARTUP_TIMEOUT_S) != "ready":
            self.stop()
            raise RuntimeError("math_answer_match: the math-verify worker did not start (see its error above)")

    def stop(self) -> None:
        if self.proc is not None and self.pid == os.getpid():
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _read_line(self, timeout: float) -> str | None:
        """The worker's next line, or None when none comes within `timeout` or the worker died."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # it exited (a crash on this input: out of memory, recursion)
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def ask(self, request: dict[str, Any], timeout: float) -> Any:
        """The worker's answer to `request`, or False when it takes longer than `timeout` (the worker is killed;
        the next request starts a fresh one)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None or self.pid != os.getpid():
                self._start()
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            line = self._read_line(timeout)
            if line is None:
                self.stop()
                return False
            return json.loads(line)


_WORKER = _Worker()
atexit.register(_WORKER.stop)


class MathVerifier:
    """`math_answer_match` with other settings: `MathVerifier(timeout_s=2.0, rounding=4)` is a reward function
    (TRL signature) named `math_answer_match` in the logs.

    Args:
        timeout_s: seconds math-verify may spend on one comparison (parsing both sides and comparing them).
        rounding: decimals numbers are compared to (math-verify's `float_rounding`).
    """

    __name__ = "math_answer_match"

    def __init__(self, timeout_s: float = 5.0, rounding: int = 6) -> None:
        if not timeout_s > 0 or not math.isfinite(timeout_s):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s, self.rounding = float(timeout_s), int(rounding)

    def equivalent(self, gold: str, pred: str) -> float | None:
        """1.0 / 0.0 for the extracted `pred` against the reference `gold`; None when `gold` cannot be parsed."""
        gold_value, pred_value = as_number(gold), as_number(pred)
        if gold_value is not None and pred_value is not None:
            if gold_value == pred_value:
                return 1.0
            if "." not in gold + pred:  # two exact values (integers, fractions): math-verify's verdict is this one
                return 0.0
        request = {"gold": gold, "pred": pred, "rounding": self.rounding, "timeout": math.ceil(self.timeout_s)}
        result = _WORKER.ask(request, self.timeout_s)
        return None if result is None else float(result)

    def __call__(self, prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float | None]:
        require_math_verify()
        _check_aligned(completions, answer, "answer")
        out: list[float | None] = []
        for completion, ref in zip(completions, answer):
            gold, pred = reference_answer(ref), extract_answer(completion)
            out.append(None if gold is None else 0.0 if pred is None else self.equivalent(gold, pred))
        return out


_DEFAULT = MathVerifier()


def math_answer_match(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float | None]:
    """1.0 iff the completion's final answer is mathematically equivalent to `answer` (math-verify; 5 s per
    comparison, numbers to 6 decimals); see the module docstring. `MathVerifier(...)` for other settings."""
    return _DEFAULT(prompts, completions, answer, **kwargs)
