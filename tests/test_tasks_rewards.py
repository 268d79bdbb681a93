from __future__ import annotations

import math
import os
import sys
from decimal import Decimal

import numpy as np
import pytest
import torch

from rlhf_lightning.data.tasks import TASKS, AdditionTask, ChainArithmeticTask, Task, get_task
from rlhf_lightning.infra.errors import RewardFunctionError
from rlhf_lightning.rewards import (
    call_reward_fns,
    call_step_reward_fns,
    chain_final_correct,
    chain_process_rewards,
    chain_step_rewards,
    exact_match,
    final_answer_match,
    last_number,
    parse_chain,
    resolve_reward_fn,
)

NAN = math.nan


def _left_fold(prompt: str) -> int:
    first, terms = parse_chain(prompt)
    value = first
    for op, t in terms:
        value = value + t if op == "+" else value - t if op == "-" else value * t
    return value


# ------------------------------------------------------------------------------------------------ tasks
def test_addition_rows_are_pinned_and_deterministic():
    task = AdditionTask(digits=3)
    # random.Random(seed) is stable across Python versions, so these rows are stable too
    assert task.make_examples(2, seed=0) == [
        {"prompt": "63+4=", "completion": "67", "answer": "67"},
        {"prompt": "597+48=", "completion": "645", "answer": "645"},
    ]
    assert task.make_examples(50, seed=7) == task.make_examples(50, seed=7)
    assert task.make_examples(50, seed=7) != task.make_examples(50, seed=8)


def test_addition_answers_and_digit_ranges():
    rows = AdditionTask(digits=3).make_examples(300, seed=1)
    lengths = set()
    for row in rows:
        a, b = row["prompt"].removesuffix("=").split("+")
        lengths |= {len(a), len(b)}
        assert eval(row["prompt"][:-1]) == int(row["answer"])
        assert row["completion"] == row["answer"]
        assert not (len(a) > 1 and a.startswith("0"))
    assert lengths == {1, 2, 3}  # min_digits defaults to 1
    fixed = AdditionTask(digits=3, min_digits=3).make_examples(100, seed=1)
    assert all(len(x) == 3 for r in fixed for x in r["prompt"][:-1].split("+"))
    assert AdditionTask(digits=2).max_completion_length == 3  # 99+99=198


def test_chain_rows():
    task = ChainArithmeticTask(num_terms=3, max_operand=20)
    rows = task.make_examples(300, seed=2)
    for row in rows:
        assert eval(row["prompt"][:-1]) == int(row["answer"])
        lines = row["completion"].split("\n")
        assert len(lines) == 2 and lines[-1].endswith("=" + row["answer"])
        assert len(row["completion"]) <= task.max_completion_length
    assert any("=-" in r["completion"] for r in rows)  # negative intermediates occur and are written "-4"
    assert ChainArithmeticTask(num_terms=2).make_examples(1, seed=0)[0]["completion"].count("\n") == 0


def test_chain_hand_example_and_left_to_right_multiplication():
    task = ChainArithmeticTask(num_terms=3, ops="+-*")
    assert task.step_separator == "\n"
    for row in task.make_examples(200, seed=3):
        assert int(row["answer"]) == _left_fold(row["prompt"])
        assert len(row["completion"]) <= task.max_completion_length
    rows = ChainArithmeticTask(num_terms=4, max_operand=9, ops="*").make_examples(20, seed=0)
    assert max(len(r["completion"]) for r in rows) <= ChainArithmeticTask(4, 9, "*").max_completion_length


def test_task_completions_pass_their_own_verifiers():
    for task in (AdditionTask(2), ChainArithmeticTask(4, ops="+-*")):
        rows = task.make_examples(64, seed=4)
        prompts = [r["prompt"] for r in rows]
        completions = [r["completion"] for r in rows]
        answers = [r["answer"] for r in rows]
        for fn in task.reward_fns:
            assert fn(prompts, completions, answer=answers) == [1.0] * 64
        for fn in task.process_reward_fns:
            assert all(steps == [1.0] * 4 for steps in fn(prompts, completions, answer=answers))  # 3 steps + the end


def test_task_defaults_and_registry():
    assert set(TASKS) == {"addition", "calculator", "chain"}
    assert AdditionTask().reward_fns == [exact_match] and AdditionTask().process_reward_fns == []
    assert AdditionTask().step_separator is None
    assert ChainArithmeticTask().reward_fns == [final_answer_match]
    assert ChainArithmeticTask().process_reward_fns == [chain_process_rewards]
    task = get_task("chain", num_terms=4, ops="+")
    assert isinstance(task, ChainArithmeticTask) and (task.num_terms, task.ops) == (4, "+")
    assert repr(task) == "ChainArithmeticTask(num_terms=4, max_operand=20, ops='+')"
    assert get_task(task) is task
    assert isinstance(get_task("addition"), Task)


@pytest.mark.parametrize("call, message", [
    (lambda: get_task("multiply"), r"unknown task 'multiply'; known tasks: \['addition', 'calculator', 'chain'\]"),
    (lambda: get_task("addition", digitz=3), r"bad arguments for task 'addition'.*digitz"),
    (lambda: get_task(ChainArithmeticTask(), num_terms=3), "already built task"),
    (lambda: AdditionTask(digits=0), "digits must be an integer >= 1"),
    (lambda: AdditionTask(digits=2, min_digits=3), r"min_digits \(3\) must be <= digits \(2\)"),
    (lambda: ChainArithmeticTask(num_terms=1), "num_terms must be an integer >= 2"),
    (lambda: ChainArithmeticTask(ops="+/"), "ops must be"),
    (lambda: AdditionTask().make_examples(-1, seed=0), "n must be a non-negative integer"),
])
def test_task_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------- rewards
def test_exact_match():
    out = exact_match(["1+1="] * 4, ["2", " 2\n", "3", "22"], answer=["2", "2", 2, "2"], extra=[0] * 4)
    assert out == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="column 'answer' has 1 rows but there are 2 completions"):
        exact_match(["a", "b"], ["1", "2"], answer=["1"])


def test_last_number():
    assert last_number("12-3") == Decimal(3)  # a '-' after a digit is an operator, not a sign
    assert last_number("x=-4") == Decimal(-4)
    assert last_number("total 1,234.5 units.") == Decimal("1234.5")
    assert last_number("no digits") is None


def test_final_answer_match():
    completions = ["The answer is 1,234.", "x=42.0", "7+5=12\n12-3=9", "no number", "3-7=-4", "12-3=9\n9", "41"]
    answers = ["#### 1234", "42", "9", "5", "-4", "1,234", "Natalia sold 48/2 = 24.\n#### 42"]
    assert final_answer_match([""] * 7, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert chain_final_correct is final_answer_match
    with pytest.raises(ValueError, match="answer 'n/a' contains no number"):
        final_answer_match([""], ["1"], answer=["n/a"])


def test_chain_step_rewards_hand_cases():
    prompt = "7+5-3="
    completions = {
        "7+5=12\n12-3=9": [1.0, 1.0],
        "7+5=13\n13-3=10": [0.0, 0.0],  # step 2 is judged against the correct running value 12
        "7+5=12\n12-3=9\n9+1=10": [1.0, 1.0, 0.0],  # extra step
        " 7+5=12 \n12-3=9": [1.0, 1.0],  # surrounding spaces tolerated
        "7+5=12\n": [1.0, 0.0],  # one score per "\n"-separated piece
        "7+5=12": [1.0],
        "": [0.0],
        "7-5=2\n2-3=-1": [0.0, 0.0],  # wrong operator
    }
    out = chain_step_rewards([prompt] * len(completions), list(completions))
    assert out == list(completions.values())
    negative = chain_step_rewards(["user: 3-7+2=\nassistant: "] * 2, ["3-7=-4\n-4+2=-2", "3-7=4\n4+2=6"])
    assert negative == [[1.0, 1.0], [0.0, 0.0]]
    assert parse_chain("7+5-3=") == (7, [("+", 5), ("-", 3)])
    with pytest.raises(ValueError, match="contains no arithmetic chain"):
        chain_step_rewards(["hello"], ["1"])


def test_chain_process_rewards_end_with_the_outcome():
    """The steps' rewards, then the end step: 1.0 iff the last number is the chain's value, so stopping after a
    right step is blamed at the end (a chain that stops on the answer's value by chance is not)."""
    prompt = "7+5-3="
    cases = {
        "7+5=12\n12-3=9": [1.0, 1.0, 1.0],
        "7+5=12": [1.0, 0.0],  # stopped early: every written step right, the end wrong
        "7+5=12\n12-3=8": [1.0, 0.0, 0.0],
        "7+5=13\n13-3=9": [0.0, 0.0, 1.0],  # the end is the outcome verifier's: the answer is there
        "": [0.0, 0.0],
    }
    assert chain_process_rewards([prompt] * len(cases), list(cases)) == list(cases.values())
    assert chain_process_rewards(["9-9+9="], ["9-9=0"]) == [[1.0, 0.0]]
    assert chain_process_rewards(["2+3-3="], ["2+3=5"]) == [[1.0, 0.0]]
    assert chain_process_rewards(["2+3-5+2="], ["2+3=5\n5-5=0"]) == [[1.0, 1.0, 0.0]]


# ------------------------------------------------------------------------------------------- resolving
def test_resolve_reward_fn_forms(tmp_path, monkeypatch):
    def mine(prompts, completions, **kw):
        return [0.0] * len(completions)

    assert resolve_reward_fn(mine) is mine
    assert resolve_reward_fn("exact_match") is exact_match
    assert resolve_reward_fn("rlhf_lightning.rewards.final_answer_match") is final_answer_match
    assert resolve_reward_fn("rlhf_lightning.rewards:chain_step_rewards") is chain_step_rewards
    assert resolve_reward_fn("os.path.join") is os.path.join  # module prefix "os.path" found first
    (tmp_path / "user_rewards_ok.py").write_text(
        "class Scorer:\n    @staticmethod\n    def score(prompts, completions, **kw):\n"
        "        return [len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_reward_fn("user_rewards_ok:Scorer.score")
    assert fn([""], ["abc"]) == [3]
    assert resolve_reward_fn("user_rewards_ok.Scorer.score") is fn


def test_resolve_reward_fn_errors(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_pkg_xyz.fn": r"'no_such_pkg_xyz.fn': cannot import module 'no_such_pkg_xyz'",
        "rlhf_lightning.rewards.nope": r"'rlhf_lightning.rewards.nope'.*has no attribute 'nope'",
        "rlhf_lightning.rewards.builtin._NUMBER": r"'rlhf_lightning.rewards.builtin._NUMBER' is not callable",
        "math:pi": r"'math:pi' is not callable \(it is a float\)",
        "nodots": r"'nodots' is neither a built-in",
        "user_rewards_broken.fn": r"importing 'user_rewards_broken' failed: ModuleNotFoundError.*no_such_dependency",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            resolve_reward_fn(spec)
    with pytest.raises(ValueError, match="callable or an import path"):
        resolve_reward_fn(42)
    sys.modules.pop("user_rewards_broken", None)


# ------------------------------------------------------------------------------------------- combining
def _r1(prompts, completions, **kw):
    return [1.0, None, NAN, 0.5]


def _r2(prompts, completions, **kw):
    return torch.tensor([2.0, 3.0, NAN, NAN])  # tensors are accepted too


def _assert_close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), equal_nan=True)


def test_call_reward_fns_weights_and_nan():
    prompts, completions = ["p"] * 4, ["c"] * 4
    total, per_fn = call_reward_fns([_r1, _r2], [1.0, 0.5], prompts, completions, {})
    assert total.dtype == torch.float32 and per_fn.shape == (2, 4)
    _assert_close(per_fn, [[1.0, NAN, NAN, 0.5], [2.0, 3.0, NAN, NAN]])
    _assert_close(total, [1.0 + 1.0, 1.5, NAN, 0.5])  # NaN only where every fn abstained
    total, _ = call_reward_fns([_r1, _r2], None, prompts, completions)  # default weight 1 each
    _assert_close(total, [3.0, 3.0, NAN, 0.5])


def test_call_reward_fns_forwards_columns():
    def uses_kw(prompts, completions, answer, level, **kw):
        return np.array([float(a == c) * lv for a, c, lv in zip(answer, completions, level)])

    cols = {"answer": ["4", "5"], "level": [1, 2], "completion": ["4", "5"]}
    total, per_fn = call_reward_fns([exact_match, uses_kw], [1.0, 2.0], ["2+2=", "2+3="], ["4", "6"], cols)
    _assert_close(per_fn, [[1.0, 0.0], [1.0, 0.0]])
    _assert_close(total, [3.0, 0.0])


def test_call_reward_fns_errors():
    def boom(prompts, completions, **kw):
        raise ValueError("bad row")

    def short(prompts, completions, **kw):
        return [1.0] * (len(completions) - 1)

    def wordy(prompts, completions, **kw):
        return ["good"] * len(completions)

    args = (["p", "q"], ["c", "d"], {})
    with pytest.raises(RuntimeError, match="reward function 'boom' raised ValueError: bad row") as info:
        call_reward_fns([boom], None, *args)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(RuntimeError, match="reward function 'short' returned 1 values for 2 completions"):
        call_reward_fns([exact_match, short], None, ["p", "q"], ["c", "d"], {"answer": ["c", "d"]})
    with pytest.raises(RuntimeError, match="'wordy' returned a non-number 'good' at row 0"):
        call_reward_fns([wordy], None, *args)
    with pytest.raises(ValueError, match="reward_weights has 1 entries but there are 2 reward functions"):
        call_reward_fns([short, wordy], [1.0], *args)
    with pytest.raises(ValueError, match="reward_fns is empty"):
        call_reward_fns([], None, *args)
    with pytest.raises(ValueError, match="column 'answer' has 1 rows but there are 2 completions"):
        call_reward_fns([exact_match], None, ["p", "q"], ["c", "d"], {"answer": ["c"]})
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        call_reward_fns([exact_match], None, ["p", "q"], ["c"], {})


def test_call_step_reward_fns():
    def half(prompts, completions, **kw):
        return [[0.5] * (c.count("\n") + 1) for c in completions]

    prompts, completions = ["7+5-3="] * 2, ["7+5=12\n12-3=8", "7+5=12"]
    out = call_step_reward_fns([chain_step_rewards, half], [2.0, 1.0], prompts, completions, {})
    assert out == [[2.5, 0.5], [2.5]]

    def abstain(prompts, completions, **kw):
        return [[None, 1.0]]

    def partial(prompts, completions, **kw):
        return [[NAN, 2.0]]

    out = call_step_reward_fns([abstain, partial], None, ["p"], ["a\nb"], {})
    assert math.isnan(out[0][0]) and out[0][1] == 3.0

    def one_step(prompts, completions, **kw):
        return [[1.0] for _ in completions]

    with pytest.raises(RuntimeError, match="'one_step' gave 1 steps for completion 0 but 'chain_step_rewards' gave 2"):
        call_step_reward_fns([chain_step_rewards, one_step], None, prompts, completions, {})
    def two(prompts, completions, **kw):
        return [[1.0], [1.0]]

    with pytest.raises(RuntimeError, match="'two' returned 2 step lists for 1 completions"):
        call_step_reward_fns([two], None, ["p"], ["c"], {})


# ------------------------------------------------------------------------------------------- conversational
CHAT = [[{"role": "user", "content": "7+5="}], [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "3*4-2="}]]


def test_chat_prompts_reach_reward_functions_in_trls_conversational_format():
    """With chat-message prompts (the column PromptDataModule keeps them in) a reward function gets what TRL's
    GRPOTrainer gives it: the message lists and `[{"role": "assistant", "content": text}]` per completion."""
    from rlhf_lightning.rewards import CHAT_PROMPTS

    seen = {}

    def trl_style(prompts, completions, answer, **kwargs):  # TRL's conversational reward functions read this
        seen.update(prompts=prompts, completions=completions, kwargs=kwargs)
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]

    texts = ["user: 7+5=\nassistant: ", "system: be brief\nuser: 3*4-2=\nassistant: "]
    total, _ = call_reward_fns([trl_style], None, texts, ["12", "9"],
                               {"answer": ["12", "10"], CHAT_PROMPTS: CHAT})
    _assert_close(total, [1.0, 0.0])
    assert seen["prompts"] == CHAT
    assert seen["completions"] == [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "9"}]]
    assert CHAT_PROMPTS not in seen["kwargs"]  # the messages are the prompts, not one more column

    def plain(prompts, completions, **kwargs):
        seen.update(plain=(prompts, completions, kwargs))
        return [0.0, 0.0]

    # a batch mixing plain and chat rows stays plain: strings, and no extra column
    call_reward_fns([plain], None, texts, ["12", "9"], {CHAT_PROMPTS: [CHAT[0], None]})
    assert seen["plain"] == (texts, ["12", "9"], {})
    with pytest.raises(RewardFunctionError, match="trl_style"):  # plain data: a string has no [0]["content"]
        call_reward_fns([trl_style], None, texts, ["12", "9"], {"answer": ["12", "10"]})


def test_built_in_reward_functions_accept_both_formats():
    def chat(texts):
        return [[{"role": "assistant", "content": t}] for t in texts]

    assert exact_match(CHAT, chat(["12", " 10"]), answer=["12", 10]) == exact_match(["a", "b"], ["12", " 10"],
                                                                                  answer=["12", 10]) == [1.0, 1.0]
    assert final_answer_match(CHAT, chat(["so 12", "7"]), answer=["12", "#### 10"]) == [1.0, 0.0]
    steps = chain_step_rewards(CHAT[1:], chat(["3*4=12\n12-2=10"]))
    assert steps == chain_step_rewards(["3*4-2="], ["3*4=12\n12-2=10"]) == [[1.0, 1.0]]
