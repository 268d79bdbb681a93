"""Synthetic negatives for the built-in preference pairs: chosen = the task's correct completion, rejected = a
wrong one of a `negatives` kind (`random`, `digit`, `near`, or `policy`: a model's own mistakes); and the built-in
stepwise rows of the process reward model: chains that are right, or wrong from a step on (`make_stepwise_rows`).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..rewards import apply_op, parse_chain
from .tasks import AdditionTask, ChainArithmeticTask, Task

NEGATIVE_KINDS = ("random", "digit", "near", "policy")

# `policy` negatives: samples per prompt drawn from `negatives_model`; the first one the verifier marks wrong is
# the rejected side (a model right on every try gets a `random` negative for that prompt instead).
POLICY_TRIES = 4

# Uniformly random wrong answers: what a small model learns best, and the best teacher for the other kinds too
# (measured: docs/reward_model.md, "Which negatives teach").
DEFAULT_NEGATIVES: dict[str, float] = {"random": 1.0}


def wrong_number(value: int, kind: str, rng: random.Random, low: int, high: int) -> int:
    """A wrong value for `value` (never equal to it):
    - random: uniform in [low, high] (a plausible-size but unrelated number);
    - digit:  one digit of |value| replaced by a different digit (no new leading zero), sign kept;
    - near:   value ± 1, 2 or 10 (the near misses a policy makes; hardest to learn, see the module docs).
    """
    if kind == "random":
        if high - low < 1:
            raise ValueError(f"random negatives need high > low, got [{low}, {high}]")
        while True:
            v = rng.randint(low, high)
            if v != value:
                return v
    if kind == "digit":
        digits = list(str(abs(value)))
        pos = rng.randrange(len(digits))
        choices = [d for d in "0123456789" if d != digits[pos] and not (d == "0" and pos == 0 and len(digits) > 1)]
        digits[pos] = rng.choice(choices)
        return int("".join(digits)) * (-1 if value < 0 else 1)
    if kind == "near":
        options = [value + d for d in (-10, -2, -1, 1, 2, 10) if value + d >= low]
        return rng.choice(options)
    raise ValueError(f"unknown negative kind {kind!r}; choose from {list(NEGATIVE_KINDS)}")


def _wrong_completion(task: Task, row: dict, kind: str, rng: random.Random) -> str:
    if isinstance(task, AdditionTask):
        return str(wrong_number(int(row["answer"]), kind, rng, low=0, high=2 * (10**task.digits - 1)))
    if isinstance(task, ChainArithmeticTask):
        k = rng.randrange(len(parse_chain(row["prompt"])[1]))
        return task.step_separator.join(chain_lines(task, row["prompt"], k, kind, rng))
    raise ValueError(f"no built-in preference pairs for task {task.name!r}; give a preference file with `path`")


def chain_lines(task: ChainArithmeticTask, prompt: str, error_at: int | None, kind: str | None,
                rng: random.Random) -> list[str]:
    """The chain's step lines "a+b=c", step `error_at`'s result a wrong number of `kind` (None: every step right).
    Later steps carry on from the wrong value, as a policy that slipped writes them: every later line is
    internally consistent and only the arithmetic of step k (and the final answer) betrays the error."""
    value, terms = parse_chain(prompt)
    bound = task.max_operand * task.num_terms
    lines = []
    for j, (op, term) in enumerate(terms):
        new = apply_op(value, op, term)
        if j == error_at:
            new = wrong_number(new, kind, rng, low=min(-bound, new - 10), high=max(bound, 2 * abs(new)))
        lines.append(f"{value}{op}{term}={new}")
        value = new
    return lines


def make_stepwise_rows(task: Task, rows: list[dict], error_rate: float = 0.5, errors: dict[str, float] | None = None,
                       seed: int = 0, errors_model: Any = None, end_step: bool = True,
                       stop_rate: float = 0.0) -> list[dict]:
    """TRL stepwise rows {prompt, completions: [step, ...], labels: [bool, ...], answer} of the task's rows: with
    probability `error_rate` a row has an error of a kind drawn from `errors` (default `DEFAULT_NEGATIVES`).

    `random` / `digit` / `near`: the result of a uniformly drawn step k is a `wrong_number` of that kind and the
    later steps carry on from it (`chain_lines`); labels are true before k and false from k on: from the slip on
    the chain cannot reach the answer, which is also what `chain_step_rewards` says of every such step.
    `policy`: `errors_model`'s own wrong sample (`policy_mistakes`: the first wrong one of `POLICY_TRIES`), its
    steps labelled by the task's step verifier; a `random` error where every try was right.
    `stop_rate`: the share of the error-free chains (of 2+ steps) that stop after a uniformly drawn number of
    right steps. `end_step`: every row ends with the end step "" (`algorithms.process`), true iff the chain is
    whole and right (what the outcome verifier says): how a process reward model learns that stopping early is
    wrong. A pure function of its arguments."""
    if not isinstance(task, ChainArithmeticTask):
        raise ValueError(f"task {task.name!r} has no built-in stepwise rows (its completions are not chains of "
                         f"steps); use task: chain, or give stepwise rows with `path`")
    errors = check_negatives(errors, errors_model, ("errors", "errors_model"))
    rng = random.Random(seed)
    kinds, weights = list(errors), list(errors.values())
    out: list[dict | None] = []
    for row in rows:
        n = len(parse_chain(row["prompt"])[1])
        error_at = rng.randrange(n) if rng.random() < error_rate else None
        kind = rng.choices(kinds, weights)[0] if error_at is not None else None
        stop_at = rng.randrange(1, n) if error_at is None and n > 1 and rng.random() < stop_rate else None
        out.append(None if kind == "policy" else _stepwise_row(task, row, error_at, kind, rng, stop_at, end_step))
    todo = [i for i, r in enumerate(out) if r is None]
    if todo:
        mistakes = policy_mistakes(errors_model, task, [rows[i] for i in todo], seed=seed)
        for i, mistake in zip(todo, mistakes):
            steps = mistake.split(task.step_separator) if mistake is not None else []
            if not steps or not all(step.strip() for step in steps):  # right every try (or an empty line)
                k = rng.randrange(len(parse_chain(rows[i]["prompt"])[1]))
                out[i] = _stepwise_row(task, rows[i], k, "random", rng, None, end_step)
                continue
            labels = task.process_reward_fns[0]([rows[i]["prompt"]], [mistake])[0]  # the steps', then the end's
            steps = steps + [""] if end_step else steps
            out[i] = {"prompt": rows[i]["prompt"], "completions": steps,
                      "labels": [v == 1 for v in labels[:len(steps)]], "answer": rows[i]["answer"]}
    return out


def _stepwise_row(task: ChainArithmeticTask, row: dict, error_at: int | None, kind: str | None,
                  rng: random.Random, stop_at: int | None, end_step: bool) -> dict:
    steps = chain_lines(task, row["prompt"], error_at, kind, rng)[:stop_at]
    labels = [error_at is None or k < error_at for k in range(len(steps))]
    if end_step:  # the outcome verifier's verdict: a chain stopped early may still end on the answer's value
        steps, labels = steps + [""], labels + [int(steps[-1].rsplit("=", 1)[1]) == int(row["answer"])]
    return {"prompt": row["prompt"], "completions": steps, "labels": labels, "answer": row["answer"]}


def policy_mistakes(model_or_path: Any, task: Task, rows: list[dict], seed: int = 0,
                    tries: int = POLICY_TRIES) -> list[str | None]:
    """For each row, the first of `tries` completions the model samples (temperature 1, the plain policy) that
    the task's verifier marks wrong, or None when every try was right. A pure function of its arguments."""
    from ..evaluation import complete, load_policy, verify

    model, tokenizer = load_policy(model_or_path)
    budget = (task.max_completion_length or 32) + 1  # room for the EOS after the longest right answer
    repeated = [row for row in rows for _ in range(tries)]
    completions = complete(model, tokenizer, [row["prompt"] for row in repeated], budget, batch_size=1024,
                           generator=torch.Generator().manual_seed(seed))
    right = verify(task, repeated, completions)
    out: list[str | None] = []
    for i in range(len(rows)):
        block = range(i * tries, (i + 1) * tries)
        # an empty sample (EOS at once) is wrong but no answer: a pair needs a rejected text (checked at load)
        out.append(next((completions[j] for j in block if not right[j] and completions[j].strip()), None))
    return out


def make_preference_pairs(task: Task, rows: list[dict], negatives: dict[str, float] | None = None,
                          seed: int = 0, negatives_model: Any = None) -> list[dict]:
    """One pair per task row: {prompt, chosen (correct completion), rejected (a wrong one), answer, kind}.

    The negative's kind is drawn per row with probability proportional to `negatives` (default
    `DEFAULT_NEGATIVES`); `policy` rows get `negatives_model`'s own mistake (`policy_mistakes`), or a `random`
    negative where it made none. The result is a pure function of (rows, negatives, seed, negatives_model).
    """
    negatives = check_negatives(negatives, negatives_model)
    rng = random.Random(seed)
    kinds, weights = list(negatives), list(negatives.values())
    pairs = []
    for row in rows:
        kind = rng.choices(kinds, weights)[0]
        rejected = None if kind == "policy" else _wrong_completion(task, row, kind, rng)
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected,
                      "answer": row["answer"], "kind": kind})
    todo = [i for i, pair in enumerate(pairs) if pair["rejected"] is None]
    if todo:
        mistakes = policy_mistakes(negatives_model, task, [rows[i] for i in todo], seed=seed)
        for i, mistake in zip(todo, mistakes):
            if mistake is None:  # right on every try: a random wrong sum instead
                pairs[i].update(kind="random", rejected=_wrong_completion(task, rows[i], "random", rng))
            else:
                pairs[i]["rejected"] = mistake
    return pairs


def check_negatives(negatives: dict[str, float] | None, negatives_model: Any = None,
                    names: tuple[str, str] = ("negatives", "negatives_model")) -> dict[str, float]:
    """`negatives` (default `DEFAULT_NEGATIVES`) checked: known kinds, weights >= 0 with a positive sum, and a
    `negatives_model` exactly when `policy` has weight. `names`: how the messages call the two arguments."""
    what, model = names
    negatives = dict(DEFAULT_NEGATIVES if negatives is None else negatives)
    if not negatives or any(k not in NEGATIVE_KINDS for k in negatives):
        raise ValueError(f"{what} must map kinds from {list(NEGATIVE_KINDS)} to weights, got {negatives!r}")
    if any(not isinstance(w, (int, float)) or w < 0 for w in negatives.values()) or sum(negatives.values()) <= 0:
        raise ValueError(f"{what} weights must be >= 0 with a positive sum, got {negatives!r}")
    if negatives.get("policy", 0) > 0 and negatives_model is None:
        raise ValueError(f"{what} `policy` samples a model's own mistakes: set {model} (e.g. the SFT export "
                         "runs/sft_arithmetic/version_0/hf_model)")
    if negatives_model is not None and not negatives.get("policy", 0) > 0:
        raise ValueError(f"{model} {negatives_model!r} is only used by `policy` {what}, which have no "
                         f"weight in {negatives!r}")
    return negatives


def check_model_setting(setting: str, model: Any) -> None:
    """A model named in a data setting (`negatives_model`, `errors_model`) exists: a missing directory fails when
    the DataModule is built, named by its setting, not after the data is loaded."""
    if model is None:
        return
    from ..models import model_source

    try:
        model_source(model)
    except ValueError as err:
        raise ValueError(f"{setting}: {err}") from None
