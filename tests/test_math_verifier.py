"""`math_answer_match` (math-verify) on a table of hand-written cases, the shared answer extractor, the timeout on
any thread, and the one-line error when math-verify is missing."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from rlhf_lightning.rewards import (
    REWARD_FNS,
    MathVerifier,
    canonical_answer,
    extract_answer,
    final_answer_match,
    math_answer_match,
    reference_answer,
    resolve_reward_fn,
)
from rlhf_lightning.rewards.math_answers import _WORKER, INSTALL_HINT

pytest.importorskip("math_verify")

GSM8K_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"

# completion, answer column, reward
CASES = [
    # equivalent forms
    ("so the answer is $\\boxed{0.5}$.", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{1/2}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("expanding, \\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{0.333333}", "\\frac{1}{3}", 1.0),  # numeric tolerance: 6 decimals
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{42.0}", "42", 1.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{\\left( 2, 3 \\right)}", "(2,3)", 1.0),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0),
    ("\\boxed{[1, 3)}", "[1,3)", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{\\pi}", "\\pi", 1.0),
    ("\\fbox{7}", "7", 1.0),
    ("She sold 72 clips in all.\n#### 72", GSM8K_SOLUTION, 1.0),  # GSM8K on both sides
    ("48 + 24 = 72, so she sold 72.", GSM8K_SOLUTION, 1.0),  # no marker: the last number
    ("#### 1,000", "1000", 1.0),
    ([{"role": "assistant", "content": "\\boxed{3}"}], "3", 1.0),  # TRL's conversational completions
    # wrong answers
    ("\\boxed{4}", "3", 0.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),  # beyond the tolerance
    ("\\boxed{3.0000001}", "3", 0.0),  # an integer reference is matched exactly
    ("\\boxed{(x+1)^3}", "x^2+2x+1", 0.0),
    ("\\boxed{[1, 3]}", "[1,3)", 0.0),
    ("\\boxed{\\sqrt{2}}", "2", 0.0),
    ("She sold 71 clips.\n#### 71", GSM8K_SOLUTION, 0.0),
    ("\\boxed{5}, or maybe 6", "6", 0.0),  # the marker decides
    ("it is 12, so \\boxed{13}", "12", 0.0),
    # malformed output
    ("", "5", 0.0),
    ("I do not know.", "5", 0.0),
    ("\\boxed{12", "12", 0.0),  # cut off inside the box: no answer, not the last number
    ("\\boxed{}", "5", 0.0),
    ("}}}{{{\\boxed{{{", "5", 0.0),
    ("\\boxed{abc}", "5", 0.0),
    ("#### ", "5", 0.0),
    # a reference math-verify cannot read: no reward
    ("\\boxed{5}", "", None),
]


@pytest.mark.parametrize("completion, answer, expected", CASES, ids=[f"{i}:{str(c)[:30]}" for i, (c, _, _) in
                                                                     enumerate(CASES)])
def test_math_answer_match_table(completion, answer, expected):
    assert math_answer_match([""], [completion], answer=[answer]) == [expected]


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and {e for _, _, e in CASES} == {1.0, 0.0, None}


def test_a_batch_is_scored_row_by_row_and_by_its_short_name():
    completions, answers, expected = zip(*CASES[:12])
    assert math_answer_match(list(completions), list(completions), answer=list(answers)) == list(expected)
    assert resolve_reward_fn("math_answer_match") is math_answer_match is REWARD_FNS["math_answer_match"]
    assert resolve_reward_fn("rlhf_lightning.rewards.math_answer_match") is math_answer_match


@pytest.mark.parametrize("gold, pred", [("1/3", "0.333333"), ("1234", "1,234"), ("42", "42.0"), ("3", "4"),
                                        ("\\frac{1}{3}", "0.33"), ("3/4", "\\frac{3}{4}"), ("-2", "-2.000")])
def test_the_in_process_number_path_agrees_with_math_verify(gold, pred):
    exact = MathVerifier().equivalent(gold, pred)
    assert exact == float(_WORKER.ask({"gold": gold, "pred": pred, "rounding": 6, "timeout": 5}, 5.0))


# ------------------------------------------------------------------------------------------ adversarial
def test_adversarially_long_outputs_are_scored_quickly():
    long_sum = "1+" * 500_000 + "1 = \\boxed{7}"  # 1 MB of reasoning before the answer
    huge_box = "\\boxed{" + "9" * 100_000 + "}"  # an "answer" of 100,000 digits: no answer
    braces = "\\boxed{" * 100_000  # 700 KB of boxes that never close
    start = time.monotonic()
    assert math_answer_match([""] * 3, [long_sum, huge_box, braces], answer=["7", "9", "7"]) == [1.0, 0.0, 0.0]
    assert time.monotonic() - start < 5


def test_an_answer_that_hangs_sympy_is_wrong_after_the_timeout_and_the_next_one_is_scored():
    """9^{9^{9^{9}}} would keep sympy busy for hours inside C code (no signal interrupts it); the worker is killed
    after timeout_s, the answer counts as wrong, and a fresh worker scores the next row."""
    verifier = MathVerifier(timeout_s=1.0)
    verifier([""], ["\\boxed{1}"], answer=["x"])  # the worker is up: its start-up is not timed below
    start = time.monotonic()
    out = verifier(["", ""], ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{x+1}"], answer=["2", "1+x"])
    elapsed = time.monotonic() - start
    assert out == [0.0, 1.0]
    assert elapsed < 1.0 + 60  # the timeout, plus starting a new worker on a loaded machine


def test_the_timeout_works_off_the_main_thread():
    """math-verify's own timeout (signal.alarm) raises off the main thread; ours is a worker process."""
    results = []
    thread = threading.Thread(target=lambda: results.append(MathVerifier(timeout_s=1.0)(
        ["", ""], ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{2}{4}}"], answer=["2", "0.5"])))
    thread.start()
    thread.join(120)
    assert results == [[0.0, 1.0]]


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        MathVerifier(timeout_s=0)


def test_without_math_verify_the_error_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install math-verify") as err:
        math_answer_match([""], ["\\boxed{1}"], answer=["1"])
    assert str(err.value) == INSTALL_HINT and "\n" not in INSTALL_HINT


def test_without_math_verify_a_module_stops_with_that_line(monkeypatch):
    from rlhf_lightning.infra.errors import RewardFunctionError
    from rlhf_lightning.rewards import call_reward_fns

    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(RewardFunctionError, match="math_answer_match.*pip install math-verify"):
        call_reward_fns([math_answer_match], None, ["q"], ["\\boxed{1}"], {"answer": ["1"]})


# ------------------------------------------------------------------------------------------ the extractor
@pytest.mark.parametrize("text, answer", [
    ("7+5=12\n12-3=9", "9"),
    ("132", "132"),
    ("the sum is 1,234.", "1,234"),
    ("\\boxed{\\frac{3}{4}} and then 7", "\\frac{3}{4}"),
    ("#### 72 dollars", "72"),
    ("#### seventy", "seventy"),
    ("\\boxed{1} then #### 2", "2"),  # the later marker wins
    ("#### 2 then \\boxed{1}", "1"),
    ("\\boxed{ \\{1, {2}\\} }", "\\{1, {2}\\}"),  # nested braces
    ("\\boxed {5}", "5"),
    ("no digits here", None),
    ("\\boxed{3} ... \\boxed{4", None),  # the last box is cut off
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_canonical_answers_and_references():
    assert canonical_answer("1,234.0") == canonical_answer("1234") == "1234"
    assert canonical_answer("\\frac{1}{2}") == canonical_answer("0.50") == canonical_answer("\\dfrac{1}{2}") == "1/2"
    assert canonical_answer("-\\frac{3}{4}") == "-3/4" and canonical_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert canonical_answer("1/0") == "1/0" and canonical_answer(None) is None
    assert reference_answer(GSM8K_SOLUTION) == "72" and reference_answer("$\\frac{1}{2}$") == "\\frac{1}{2}"
    assert reference_answer("The area is \\boxed{12}.") == "12" and reference_answer("  ") is None


def test_final_answer_match_keeps_reading_the_last_number():
    """The built-in tasks' verifier is unchanged: the last number, whatever a box says."""
    assert final_answer_match([""] * 3, ["7+5=12\n12-3=9", "\\boxed{5}, or 6", "#### 72"], answer=["9", "6", "72"]) \
        == [1.0, 1.0, 1.0]
