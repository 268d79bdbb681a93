"""Sampled evaluation: pass@k against brute force, maj@k against hand-built votes, the module's val/ and test/
metrics by hand (a scripted engine), exact under 2-process DDP, and `rlhf-lightning test` on an exported model."""

from __future__ import annotations

import itertools
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import lightning as L
import pytest
import scripted_engine
import torch
from conftest import run_script, run_script_processes
from scripted_engine import N

from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule, SFTModule
from rlhf_lightning.evaluation import maj_at_k, majority_vote, pass_at_k
from rlhf_lightning.modules.sampled_eval import default_eval_k
from rlhf_lightning.rewards import canonical_answer

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = Fraction(sum(any(correct[i] for i in s) for s in subsets), len(subsets))
            assert pass_at_k(n, c, k) == pytest.approx(float(brute), abs=1e-12), (n, c, k)


def test_pass_at_k_stays_exact_where_the_binomials_are_huge():
    for n, c, k in [(1000, 3, 100), (1000, 1, 1), (500, 250, 64), (1000, 0, 1000), (1000, 1000, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert pass_at_k(64, 1, 1) == 1 / 64 and pass_at_k(16, 13, 4) == 1.0


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (4.0, 2, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs integers"):
        pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------------------- maj@k
MAJ_CASES = [
    # answers, correct, k, maj@k
    (["5", "5", "3"], [1, 1, 0], 3, 1.0),  # plain majority, right
    (["3", "5", "5"], [0, 1, 1], 3, 1.0),  # the majority need not be first
    (["3", "5", "5"], [0, 1, 1], 1, 0.0),  # only the first k samples vote
    (["3", "5"], [0, 1], 2, 0.0),  # a tie: the answer drawn first wins
    (["5", "3"], [1, 0], 2, 1.0),
    (["a", "b", "b", "a"], [1, 0, 0, 1], 4, 1.0),  # 2-2: "a" came first
    (["b", "a", "a", "b"], [0, 1, 1, 0], 4, 0.0),
    ([None, None, "5"], [0, 0, 1], 3, 1.0),  # "no answer" is no vote: it never wins over an answer
    ([None, None, None], [0, 0, 0], 3, 0.0),  # nobody answered: wrong
    ([None, "4", None, "4", "6"], [0, 0, 0, 0, 1], 5, 0.0),
    (["7", "7"], [0, 1], 2, 0.0),  # the winner is judged by its first sample
]


@pytest.mark.parametrize("answers, correct, k, expected", MAJ_CASES)
def test_maj_at_k_on_hand_built_votes(answers, correct, k, expected):
    assert maj_at_k(answers, [bool(c) for c in correct], k) == expected


def test_votes_compare_canonical_answers():
    """0.5, 1/2 and \\frac{1}{2} are one vote (3 of 5), beating 2 votes for 2."""
    raw = ["2", "0.5", "2", "1/2", "\\frac{1}{2}"]
    answers = [canonical_answer(a) for a in raw]
    assert answers == ["2", "1/2", "2", "1/2", "1/2"]
    assert majority_vote(answers) == 1 and maj_at_k(answers, [False, True, False, True, True], 5) == 1.0
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def test_maj_at_k_refuses_k_beyond_the_samples():
    with pytest.raises(ValueError, match="maj_at_k needs 1 <= k <= 2"):
        maj_at_k(["1", "2"], [True, False], 3)


def test_default_eval_k():
    assert default_eval_k(16) == [1, 2, 4, 8, 16] and default_eval_k(10) == [1, 2, 4, 8, 10]
    assert default_eval_k(1) == [1] and default_eval_k(0) == []


# ------------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("bad, message", [
    (dict(eval_num_samples=-1), "eval_num_samples must be an integer >= 0"),
    (dict(eval_num_samples=8, eval_k=[1, 16]), re.escape("eval_k=[1, 16] asks for k=16 but eval_num_samples=8")),
    (dict(eval_k=[4]), re.escape("eval_k=[4] asks for k=4 but eval_num_samples=0")),
    (dict(eval_num_samples=8, eval_k=[]), "eval_k must be a non-empty list"),
    (dict(eval_num_samples=8, eval_k=[0, 2]), "eval_k must be a non-empty list of integers >= 1"),
    (dict(eval_num_samples=8, eval_temperature=0.0), "eval_temperature must be > 0"),
    (dict(eval_num_samples=8, eval_top_p=1.5), "eval_top_p must be in"),
])
def test_bad_eval_arguments_fail_in_one_line_before_loading(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        SFTModule("tiny", **bad)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- the module
# by hand from scripted_engine (N = 8 samples; prompt sum s: samples j < s % 9 are right):
#   3+4: c=7       4+4: c=8       5+4: c=0, votes 10/11 tie -> 10 (wrong)      1+1: c=2, 2/3/4 tie 2-2-2 -> 2 (right)
#   2+1: c=3, 3 wins          9+9: c=0, 19 beats 20          5+5 (DDP only): c=1, maj@4 a 1-1-1 tie -> 10, maj@8 12
PROMPTS = ["3+4=", "4+4=", "5+4=", "1+1=", "2+1=", "9+9="]
BY_HAND = {"pass@1": (7 / 8 + 1 + 0 + 2 / 8 + 3 / 8 + 0) / 6, "pass@4": (1 + 1 + 0 + 11 / 14 + 13 / 14 + 0) / 6,
           "pass@8": 4 / 6, "maj@1": 4 / 6, "maj@4": 4 / 6, "maj@8": 4 / 6, "accuracy": 4 / 6}
BY_HAND_7 = {"pass@1": (2.5 + 1 / 8) / 7, "pass@4": (2 + 24 / 14 + 0.5) / 7, "pass@8": 5 / 7, "maj@1": 5 / 7,
             "maj@4": 5 / 7, "maj@8": 4 / 7}


def write_rows(folder: Path, prompts: list[str]) -> tuple[str, str]:
    """train.jsonl / val.jsonl of addition rows with `prompts` held out."""
    def rows(ps):
        return "".join(json.dumps({"prompt": p, "completion": str(eval(p[:-1])), "answer": str(eval(p[:-1]))}) + "\n"
                       for p in ps)

    (folder / "train.jsonl").write_text(rows(["1+2=", "2+2=", "3+3=", "4+1="]))
    (folder / "val.jsonl").write_text(rows(prompts))
    return str(folder / "train.jsonl"), str(folder / "val.jsonl")


@pytest.fixture
def scripted(monkeypatch):
    """The scripted engine registered for one test (the registry is restored after it)."""
    from rlhf_lightning.rollout import base

    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))
    scripted_engine.register()


def scripted_module(cls=SFTModule, **kwargs):
    """`cls` sampling with the scripted engine (registered), exact_match as the verifier, N samples, k 1, 4, 8."""
    return cls("tiny", reward_fns=["exact_match"], rollout_engine="scripted", val_max_new_tokens=4,
               eval_num_samples=N, eval_k=[1, 4, 8], **kwargs)


@pytest.mark.parametrize("cls", [SFTModule, GRPOModule, PPOModule])
def test_val_and_test_metrics_match_the_hand_computed_ones(tmp_path, trainer_kwargs, cls, scripted):
    """Every policy module: `validate` logs the hand-computed val/pass@k, val/maj@k (and greedy val/accuracy),
    `test` the same as test/..."""
    train, val = write_rows(tmp_path, PROMPTS)
    data = PromptDataModule(path=train, val_path=val, completion_column="completion", batch_size=2,
                            val_batch_size=4)  # batches of 4 and 2: sums over batches, not a mean of means
    trainer = L.Trainer(**trainer_kwargs)
    logged = trainer.validate(scripted_module(cls), data, verbose=False)[0]
    assert {k: v for k, v in logged.items() if k != "val/loss"} == pytest.approx(
        {f"val/{k}": v for k, v in {**BY_HAND, "reward": BY_HAND["accuracy"]}.items()}, abs=1e-6)
    tested = trainer.test(scripted_module(cls), data, verbose=False)[0]
    assert tested == pytest.approx({k.replace("val/", "test/"): v for k, v in logged.items()}, abs=1e-7)


def test_sampled_evaluation_leaves_greedy_metrics_and_training_as_they_were(tmp_path, trainer_kwargs):
    """The same seeded GRPO run with eval_num_samples 4 and 0: the same val/accuracy, val/reward and exported
    weights, bit for bit (validation samples from a generator of its own)."""
    results = []
    for n in (0, 4):
        L.seed_everything(0)
        m = GRPOModule("tiny", group_size=4, max_new_tokens=4, lr=1e-2, eval_num_samples=n,
                       eval_k=[1, 4] if n else None, reward_fns=["final_answer_match"])
        data = PromptDataModule(task="addition", num_train=32, num_val=8, batch_size=4, val_batch_size=4)
        trainer = L.Trainer(**{**trainer_kwargs, "max_steps": 4, "val_check_interval": 2,
                               "check_val_every_n_epoch": None, "limit_val_batches": 1})
        trainer.fit(m, data)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        results.append((logged, {k: v.clone() for k, v in m.policy.state_dict().items()}))
    (off, w_off), (on, w_on) = results
    assert "val/pass@4" in on and "val/pass@4" not in off
    assert on["val/accuracy"] == off["val/accuracy"] and on["val/reward"] == off["val/reward"]
    assert all(torch.equal(w_off[k], w_on[k]) for k in w_off)


def test_a_verifier_that_is_not_right_or_wrong_logs_no_sampled_metrics(tmp_path, trainer_kwargs):
    def half(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    train, val = write_rows(tmp_path, PROMPTS)
    data = PromptDataModule(path=train, val_path=val, completion_column="completion", val_batch_size=4)
    m = SFTModule("tiny", reward_fns=[half], val_max_new_tokens=3, eval_num_samples=2)
    with pytest.warns(UserWarning, match="values other than 0/1"):
        logged = L.Trainer(**trainer_kwargs).validate(m, data, verbose=False)[0]
    assert not any("@" in k for k in logged)


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import lightning as L, torch
torch.set_num_threads(1)
import scripted_engine
from test_evaluation import scripted_module
from rlhf_lightning import PromptDataModule

scripted_engine.register()

data = PromptDataModule(path={train!r}, val_path={val!r}, completion_column="completion", val_batch_size=2)
trainer = L.Trainer(accelerator="cpu", devices=int(sys.argv[1]), strategy="ddp" if sys.argv[1] == "2" else "auto",
                    logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir={root!r})
out = trainer.validate(scripted_module(), data, verbose=False)[0]
if trainer.global_rank == 0:
    print("METRICS " + json.dumps(out))
"""


@pytest.mark.slow
def test_pass_and_maj_at_k_are_exact_under_two_process_ddp(tmp_path):
    """7 held-out prompts on 2 ranks (4 + 3, and the DistributedSampler repeats one to even them out) in batches of
    2: the logged values are the 7-prompt ones computed by hand, as on one process."""
    train, val = write_rows(tmp_path, [*PROMPTS, "5+5="])
    source = DDP_SCRIPT.format(tests=str(TESTS), train=train, val=val, root=str(tmp_path))
    metrics = {}
    for devices in ("1", "2"):
        out = run_script_processes(tmp_path, source, devices)
        metrics[devices] = json.loads(out.stdout.split("METRICS ", 1)[1].splitlines()[0])
    expected = {f"val/{k}": v for k, v in BY_HAND_7.items()}
    for devices, logged in metrics.items():
        assert {k: logged[k] for k in expected} == pytest.approx(expected, abs=1e-6), devices


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_rlhf_lightning_test_on_an_exported_model_prints_and_logs_pass_and_maj_at_k(tmp_path):
    """SFT exports a model; `rlhf-lightning test` on it with eval_num_samples 16 prints test/pass@k and
    test/maj@k for k in [1, 4, 16] and writes them to TensorBoard; its greedy accuracy is the one `test` gives
    without sampled evaluation and the one `evaluation.greedy_accuracy` computes on the same prompts."""
    from conftest import tensorboard_scalars

    from rlhf_lightning.data.tasks import AdditionTask
    from rlhf_lightning.evaluation import greedy_accuracy

    data = ["--data", "rlhf_lightning.PromptDataModule", "--data.task", "addition", "--data.task_kwargs",
            "{digits: 1}", "--data.num_val", "12", "--data.val_batch_size", "6", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false"]
    fit = run_script(["fit", "--model", "rlhf_lightning.SFTModule", "--model.lr", "3e-3", "--model.warmup_steps",
                      "10", *data, "--data.completion_column", "completion", "--data.num_train", "512",
                      "--data.batch_size", "32", "--trainer.max_steps", "120", "--trainer.limit_val_batches", "0",
                      "--trainer.default_root_dir", str(tmp_path / "sft")], tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    export = tmp_path / "sft" / "runs" / "rlhf" / "version_0" / "hf_model"
    model = ["--model", "rlhf_lightning.SFTModule", "--model.model_name_or_path", str(export),
             "--model.val_max_new_tokens", "4"]
    sampled = ["--model.eval_num_samples", "16", "--model.eval_k", "[1,4,16]"]
    runs = {}
    for name, extra in (("plain", []), ("sampled", sampled)):
        out = run_script(["test", *model, *extra, *data, "--trainer.default_root_dir", str(tmp_path / name)],
                         tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[name] = (out.stdout, tensorboard_scalars(tmp_path / name))
    printed, scalars = runs["sampled"]
    for k in (1, 4, 16):
        for metric in ("pass", "maj"):
            assert f"test/{metric}@{k}" in printed and f"test/{metric}@{k}" in scalars
    assert 0 < scalars["test/pass@1"][0] <= scalars["test/pass@4"][0] <= scalars["test/pass@16"][0] <= 1
    greedy = runs["plain"][1]["test/accuracy"][0]
    assert scalars["test/accuracy"][0] == greedy
    rows = AdditionTask(digits=1).make_examples(12, seed=1_000_003)  # PromptDataModule's held-out rows
    assert greedy == pytest.approx(greedy_accuracy(str(export), AdditionTask(digits=1), rows, max_new_tokens=4))

