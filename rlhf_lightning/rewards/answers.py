"""The final answer of a completion, in one place: what `math_answer_match` verifies, what `maj@k` votes on and
what the sample tables show.

    extract_answer("... so the total is \\boxed{\\frac{3}{4}}.")  -> "\\frac{3}{4}"
    extract_answer("Natalia sold 48 + 24 = 72 clips.\\n#### 72")   -> "72"
    extract_answer("7+5=12\\n12-3=9")                              -> "9"
    canonical_answer("\\frac{3}{4}") == canonical_answer("0.75") == "3/4"

Rules: the last marker decides, a box (`\\boxed{...}`, `\\fbox{...}`: its content) or a GSM8K `####` (the first
number on the rest of its line, else that line), whichever comes later, even when a number follows it
("\\boxed{5}, or maybe 6" answers 5); without a marker, the last number in the text; else None ("no answer").
An answer longer than `MAX_ANSWER_CHARS` counts as no answer, and so does a last box whose braces do not close (a
completion cut off at `max_new_tokens` inside its box has not answered). Extraction is linear in the length of
the text, so adversarially long outputs cost little.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from .builtin import _NUMBER, _text

MAX_ANSWER_CHARS = 500  # a longer "answer" is not one: no answer (and no sympy call on megabytes of text)
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_INTEGER_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}|(-?\d+)/(\d+)")
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:,\d{3})*(?:\.\d+)?|[+-]?\.\d+")
# LaTeX spacing and sizing that does not change an answer
_LATEX_NOISE = re.compile(r"\\left|\\right|\\[!,;: ]|\\displaystyle|\s+")


def _braced(text: str, start: int) -> str | None:
    """The content of the balanced `{...}` that opens at the first non-space after `start`, or None (no brace, or
    it does not close within MAX_ANSWER_CHARS)."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, min(len(text), i + MAX_ANSWER_CHARS + 2)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _last_box(text: str) -> tuple[int, str | None]:
    """(position, content) of the last box command; content None when its braces do not close (cut off), and
    (-1, None) when there is none."""
    pos, cmd = max((text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS)
    if pos < 0:
        return -1, None
    content = _braced(text, pos + len(cmd))
    return pos, None if content is None else content.strip()


def _after_hashes(text: str) -> tuple[int, str | None]:
    """(position, answer) of the last `####` marker: the first number on the rest of its line, else the line."""
    pos = text.rfind("####")
    if pos < 0:
        return -1, None
    line = text[pos + 4:].split("\n", 1)[0].strip()
    number = _NUMBER.search(line)
    return pos, number.group(0) if number else line


def extract_answer(completion: Any) -> str | None:
    """The final answer of a completion (text or chat messages), as written, or None; see the module docstring."""
    text = _text(completion)
    if not isinstance(text, str):
        return None
    box_pos, box = _last_box(text)
    hash_pos, hashes = _after_hashes(text)
    if box_pos > hash_pos:
        answer = box  # None: the last box never closes, the completion was cut off while answering
    elif hash_pos >= 0:
        answer = hashes
    else:
        last = None
        for last in _NUMBER.finditer(text):  # noqa: B007 - the last match is the answer
            pass
        answer = last.group(0) if last else None
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def reference_answer(answer: Any) -> str | None:
    """The reference of a dataset's `answer` value: after the last `####` (a GSM8K solution), else the content of
    its last box, else the whole value stripped; None when empty."""
    text = str(answer).strip()
    if "####" in text:
        text = _after_hashes(text)[1] or ""
    else:
        box = _last_box(text)[1]
        text = text if box is None else box
    text = text.strip().strip("$").strip()
    return text or None


def as_number(answer: str) -> Fraction | None:
    """The exact value of a plain number ("1,234", "-0.50", "+3") or an integer fraction ("3/4", "\\frac{3}{4}",
    "-\\frac{3}{4}"); None for anything else (expressions, symbols, units)."""
    text = _LATEX_NOISE.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").strip("$")
    text = text.removesuffix(".")
    if _PLAIN_NUMBER.fullmatch(text):
        try:
            return Fraction(Decimal(text.replace(",", "")))
        except (InvalidOperation, ValueError):  # pragma: no cover - the regex only matches valid decimals
            return None
    found = _INTEGER_FRACTION.fullmatch(text)
    if found is None:
        return None
    sign, num, den = (found[1], found[2], found[3]) if found[2] is not None else ("", found[4], found[5])
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if sign else value


def canonical_answer(answer: str | None) -> str | None:
    """The form votes compare: a number's exact value ("0.5", "1/2", "\\frac{1}{2}" -> "1/2"; "1,234.0" ->
    "1234"), else the LaTeX with spacing, `\\left` / `\\right` and `$` removed and `\\dfrac` / `\\tfrac` read as
    `\\frac`. Equivalent expressions written differently (`2\\sqrt{2}` and `\\sqrt{8}`) stay different votes."""
    if answer is None:
        return None
    value = as_number(answer)
    if value is not None:
        return str(value)
    text = _LATEX_NOISE.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return text.strip("$").removesuffix(".") or None
