"""The trained process reward model: its input format, stepwise data, the module, its export, the reward source,
and GRPO / PPO with `process_reward_model`."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import char_ids, run_script, tensorboard_scalars
from transformers import AutoModelForTokenClassification, AutoTokenizer

from rlhf_lightning import GRPOModule, PPOModule, ProcessRewardModel, PromptDataModule, StepwiseDataModule
from rlhf_lightning.data.negatives import make_stepwise_rows
from rlhf_lightning.data.tasks import get_task
from rlhf_lightning.infra.errors import ConfigError
from rlhf_lightning.rewards import ProcessRewardModelSource, chain_process_rewards, chain_step_rewards, chain_steps
from rlhf_lightning.rewards.model_inputs import split_steps, stepwise_input_ids


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"prompt": "7+5-3=", "completions": ["7+5=12", "12-3=9"], "labels": [True, True]}


# ------------------------------------------------------------------------------------------- input format
def test_stepwise_input_ids_by_hand(char_tok):
    """TRL's layout: prompt tokens, then each step's tokens and the separator's; the label on the separator's last
    token (a two-token separator: its second token), BOS first when the tokenizer has one."""
    ids, positions = stepwise_input_ids(char_tok, "7+5-3=", ["7+5=12", "12-3=9"], "\n")
    assert ids == char_ids("7+5-3=7+5=12\n12-3=9\n")
    assert positions == [12, 19] and ids[12] == ids[19] == 98  # the newline after each step
    ids, positions = stepwise_input_ids(char_tok, "", ["a", "bc"], " |")
    assert ids == char_ids("a |bc |") and positions == [2, 6]  # "|", the separator's last token
    with_bos = copy.deepcopy(char_tok)
    with_bos.bos_token = with_bos.eos_token  # a tokenizer with a BOS (id 1 here)
    ids, positions = stepwise_input_ids(with_bos, "1=", ["1"], "\n")
    assert ids == [1, *char_ids("1=1\n")] and positions == [4]
    assert split_steps("7+5=12\n12-3=9", "\n") == ["7+5=12", "12-3=9"] and split_steps("", "\n") == [""]


def test_datamodule_batches_put_labels_on_the_separators(char_tok, tmp_path):
    rows = [ROW, {"prompt": "1+2=", "completions": ["1+2=4"], "labels": [False]}]
    dm = StepwiseDataModule(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), val_fraction=0.0, batch_size=2,
                            shuffle=False)
    dm.prepare_rows(char_tok)
    batch = dm.collate(dm.train_rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 20)
    assert batch["input_ids"][1].tolist() == char_ids("1+2=1+2=4\n") + [0] * 10  # right-padded
    assert (batch["labels"] != -100).nonzero().tolist() == [[0, 12], [0, 19], [1, 9]]
    assert batch["labels"][0, [12, 19]].tolist() == [1, 1] and batch["labels"][1, 9].item() == 0
    assert batch["completions"][0] == ["7+5=12", "12-3=9"] and batch["step_labels"][1] == [False]


# ------------------------------------------------------------------------------------------- row errors
@pytest.mark.parametrize("bad, problem", [
    ({"prompt": "1=", "completions": ["1", "2"], "labels": [True]}, "completions has 2 steps but labels has 1"),
    ({"prompt": "1=", "completions": ["1", " "], "labels": [True, True]}, "step 1 is empty (whitespace only)"),
    ({"prompt": "1=", "completions": ["1"], "labels": [1]}, "label 0 must be a boolean"),
    ({"prompt": "1=", "completions": "1", "labels": [True]}, "completions must be a list"),
    ({"prompt": "1=", "completions": [], "labels": []}, "completions is an empty list"),
    ({"prompt": "1=", "completions": [3], "labels": [True]}, "step 0 must be a string"),
])
def test_a_bad_row_fails_at_load_with_its_file_and_line(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "steps.jsonl", [ROW, ROW, bad])
    with pytest.raises(ConfigError) as err:
        StepwiseDataModule(path=str(path))
    assert f"steps.jsonl line 3: {problem}" in str(err.value)


def test_missing_column_csv_lists_and_separator_inside_a_step(tmp_path, char_tok):
    with pytest.raises(ConfigError, match="has no column 'labels'"):
        StepwiseDataModule(path=str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1=", "completions": ["1"]}])))
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,completions,labels\n1=,"[""1"", ""2""]","[true, false]"\n2=,"[""2""]",[true]\n')
    dm = StepwiseDataModule(path=str(csv), val_fraction=0.0, batch_size=1)
    dm.prepare_rows(char_tok)
    assert [r["completions"] for r in dm.train_rows] == [["1", "2"], ["2"]]
    assert dm.train_rows[0]["step_labels"] == [True, False]
    dm = StepwiseDataModule(path=str(write_jsonl(tmp_path / "b.jsonl", [ROW, {**ROW, "completions": ["1 | 2", "3"]}])),
                            val_fraction=0.0)
    with pytest.raises(ConfigError, match=r"b.jsonl line 2: step 0 '1 \| 2' contains the step separator ' \| '"):
        dm.prepare_rows(char_tok, step_separator=" | ")
    with pytest.raises(ValueError, match="error_rate applies to built-in rows"):
        StepwiseDataModule(path=str(tmp_path / "b.jsonl"), error_rate=0.2)
    with pytest.raises(ValueError, match="task 'addition' has no built-in stepwise rows"):
        StepwiseDataModule(task="addition")


# ------------------------------------------------------------------------------------------- built-in data
def test_injected_errors_are_labelled_from_their_step_on():
    """A wrong result at step k: the steps before k are the correct ones, step k's result is wrong, the later
    steps carry on from the wrong value (right arithmetic on it), and the labels (true before k, false from k)
    are exactly what the chain verifier says of each step."""
    task = get_task("chain", num_terms=5)
    examples = task.make_examples(300, seed=3)
    rows = make_stepwise_rows(task, examples, error_rate=1.0, seed=0, end_step=False)
    first_wrong = []
    for ex, row in zip(examples, rows):
        right, steps, labels = chain_steps(ex["prompt"]), row["completions"], row["labels"]
        k = labels.index(False)
        assert labels == [i < k for i in range(len(steps))] and steps[:k] == right[:k] and steps[k] != right[k]
        assert [bool(v) for v in chain_step_rewards([ex["prompt"]], ["\n".join(steps)])[0]] == labels
        for prev, step in zip(steps[k:], steps[k + 1:]):  # carried on from the wrong value, arithmetically right
            lhs, value = step.split("=")
            assert lhs.startswith(prev.split("=")[1]) and eval(lhs) == int(value)  # noqa: S307 - digits and +-
        first_wrong.append(k)
    assert set(first_wrong) == {0, 1, 2, 3}  # uniform over the 4 steps
    clean = make_stepwise_rows(task, examples, error_rate=0.0, end_step=False)
    assert all(r["completions"] == chain_steps(e["prompt"]) and all(r["labels"]) for r, e in zip(clean, examples))
    mixed = make_stepwise_rows(task, examples, error_rate=0.5, seed=1, end_step=False)
    assert mixed == make_stepwise_rows(task, examples, error_rate=0.5, seed=1, end_step=False)  # seeded
    assert 0.4 < sum(not all(r["labels"]) for r in mixed) / len(mixed) < 0.6
    near = make_stepwise_rows(task, examples, error_rate=1.0, errors={"near": 1.0}, end_step=False)
    for ex, row in zip(examples, near):
        k = row["labels"].index(False)
        off = int(row["completions"][k].split("=")[1]) - int(chain_steps(ex["prompt"])[k].split("=")[1])
        assert off in (-10, -2, -1, 1, 2, 10)


def test_policy_errors_are_the_models_own_samples_labelled_by_the_verifier(tmp_path, char_tok):
    """`errors: {policy: 1}`: the model's first wrong sample (`policy_mistakes`), its lines the steps and the chain
    verifier's judgement of each the labels; a `random` error where it made none with non-empty lines."""
    from rlhf_lightning.data.negatives import policy_mistakes
    from rlhf_lightning.models import load_causal_lm

    sft = tmp_path / "sft"
    load_causal_lm("tiny", char_tok, seed=1).save_pretrained(sft)
    char_tok.save_pretrained(sft)
    task = get_task("chain", num_terms=3)
    examples = task.make_examples(24, seed=0)
    rows = make_stepwise_rows(task, examples, 1.0, {"policy": 1.0}, seed=0, errors_model=str(sft), end_step=False)
    own = 0
    for ex, row, mistake in zip(examples, rows, policy_mistakes(str(sft), task, examples, seed=0)):
        steps = mistake.split("\n") if mistake is not None else []
        if steps and all(s.strip() for s in steps):
            own += 1
            labels = [v == 1 for v in chain_step_rewards([ex["prompt"]], [mistake])[0]]
            assert row["completions"] == steps and row["labels"] == labels
        else:
            assert not all(row["labels"]) and len(row["completions"]) == 2
    assert own > 0
    ended = make_stepwise_rows(task, examples, 1.0, {"policy": 1.0}, seed=0, errors_model=str(sft), end_step=True)
    for ex, row, plain in zip(examples, ended, rows):  # the end step: "", labelled by the outcome verifier
        assert row["completions"] == plain["completions"] + [""] and row["labels"][:-1] == plain["labels"]
        outcome = chain_process_rewards([ex["prompt"]], ["\n".join(plain["completions"])])[0][-1]
        assert row["labels"][-1] == (outcome == 1)
    with pytest.raises(ValueError, match="errors `policy` samples a model's own mistakes: set errors_model"):
        StepwiseDataModule(task="chain", errors={"policy": 1.0})


def test_end_steps_mark_whole_right_chains_and_stops_are_blamed_only_there():
    """`end_step`: every row ends with "" labelled true iff the chain is whole and right; `stop_rate`: right chains
    cut after 1..n-1 steps, every real step true and the end false (what `chain_process_rewards` says of them)."""
    task = get_task("chain", num_terms=5)
    examples = task.make_examples(400, seed=4)
    rows = make_stepwise_rows(task, examples, error_rate=0.5, seed=2, stop_rate=0.5)
    kinds = {"whole": 0, "stopped": 0, "wrong": 0}
    for ex, row in zip(examples, rows):
        steps, labels, right = row["completions"][:-1], row["labels"], chain_steps(ex["prompt"])
        assert row["completions"][-1] == "" and len(labels) == len(steps) + 1
        verdict = [v == 1 for v in chain_process_rewards([ex["prompt"]], ["\n".join(steps)])[0]]
        assert labels == verdict  # the steps' labels and the end's are the verifier's
        if all(labels):  # whole and right, or stopped on a value that happens to be the answer
            kinds["whole"] += 1
            assert steps == right[:len(steps)] and steps[-1].endswith("=" + ex["answer"])
        elif all(labels[:-1]):
            kinds["stopped"] += 1
            assert steps == right[:len(steps)] and 1 <= len(steps) < len(right)
        else:
            kinds["wrong"] += 1
            assert not labels[-1]
    assert kinds["wrong"] > 150 and kinds["stopped"] > 60 and kinds["whole"] > 60, kinds


def test_builtin_rows_hold_out_validation_prompts(char_tok):
    dm = StepwiseDataModule(task="chain", task_kwargs={"num_terms": 3, "max_operand": 5}, num_train=400,
                            num_val=100, error_rate=0.5)
    dm.prepare_rows(char_tok)
    assert not {r["prompts"] for r in dm.train_rows} & {r["prompts"] for r in dm.val_rows}
    assert dm.step_separator == "\n" and 0.3 < sum(not all(r["step_labels"]) for r in dm.val_rows) / 100 < 0.7


# ------------------------------------------------------------------------------------------- the module
def test_step_metrics_by_hand():
    """step accuracy over labelled positions, F1 of the incorrect class, first predicted-wrong step = first
    labelled-wrong step ("none" counts as a value)."""
    from rlhf_lightning.modules.process_reward_model import step_metrics

    metrics = step_metrics()
    x = -100
    labels = torch.tensor([[x, 1, x, 0, 0], [x, 1, x, 1, x], [x, 1, x, 0, x]])
    preds = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    ProcessRewardModel.update_step_metrics(metrics, preds, labels)
    # steps: (1,1) (0,0) (0,1) | (1,1) (1,1) | (1,0) (0,0): 5 of 7 right; incorrect class: tp 2, fp 1, fn 1
    assert metrics["step_accuracy"].compute().item() == pytest.approx(5 / 7)
    assert metrics["step_f1"].compute().item() == pytest.approx(2 / 3)
    assert metrics["first_error_found"].compute().item() == pytest.approx(2 / 3)  # rows 0 (step 1), 1 (none)


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory):
    """A tiny PRM trained 30 steps on built-in chain rows (enough to make the scores differ), exported."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prm")
    L.seed_everything(0)
    prm = ProcessRewardModel("tiny", lr=3e-3)
    dm = StepwiseDataModule(task="chain", task_kwargs={"num_terms": 3}, num_train=30 * 16, num_val=32,
                            batch_size=16)
    L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
              accelerator="cpu").fit(prm, dm)
    return prm, dm, root / "hf_model"


def test_export_loads_with_plain_transformers_and_scores_like_the_module(briefly_trained):
    prm, dm, out = briefly_trained
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.step_separator == "\n" and model.config.id2label == {0: "incorrect", 1: "correct"}
    prm.eval()
    batch = dm.collate(dm.val_rows[:6])
    with torch.no_grad():
        expected = prm(batch["input_ids"], batch["attention_mask"]).softmax(-1)[..., 1]  # [6, L] batched
    for i in range(6):  # the documented recipe, one row at a time, with the export's own tokenizer and separator
        ids, positions = stepwise_input_ids(tok, batch["prompts"][i], batch["completions"][i],
                                            model.config.step_separator)
        with torch.no_grad():
            alone = model(torch.tensor([ids])).logits[0, positions].softmax(-1)[:, 1]
        torch.testing.assert_close(alone, expected[i][batch["labels"][i] != -100], atol=1e-5, rtol=1e-5)
    source = ProcessRewardModelSource(out, batch_size=4)  # from the directory, in uneven batches
    assert model.config.scores_end and source.score_end  # trained on end steps: the source scores ends too
    assert all(c[-1] == "" for c in batch["completions"])  # ... which it appends to a policy's completion
    scores = source.step_scores(batch["prompts"], ["\n".join(c[:-1]) for c in batch["completions"]])
    for i, s in enumerate(scores):
        torch.testing.assert_close(torch.tensor(s), expected[i][batch["labels"][i] != -100], atol=1e-5, rtol=1e-5)
    assert len(set(round(v, 4) for s in scores for v in s)) > 3  # trained: the scores differ step to step


def test_module_refuses_other_data_and_lora_exports_a_plain_classifier(tmp_path, trainer_kwargs):
    prm = ProcessRewardModel("tiny", lora={"r": 4}, gradient_checkpointing=True)
    trainable = {n.split(".")[-2] if "lora" in n else n for n, p in prm.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and not any("embed_tokens" in n for n in trainable)
    out = prm.export(tmp_path / "merged")
    assert type(AutoModelForTokenClassification.from_pretrained(out)).__name__ == "LlamaForTokenClassification"
    with pytest.raises(ValueError, match="ProcessRewardModel trains on step labels.*StepwiseDataModule"):
        L.Trainer(max_steps=1, **trainer_kwargs).fit(prm, PromptDataModule(task="chain", num_train=8, num_val=0,
                                                                           batch_size=4))


# ------------------------------------------------------------------------------------------- reward source
class MarkerModel(torch.nn.Module):
    """A fixed token classifier: logit(correct) = 2 - 3 x (how many 'x' so far), logit(incorrect) = 0."""

    def __init__(self, x_id: int):
        super().__init__()
        self.x_id, self.anchor = x_id, torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(step_separator="\n")

    def forward(self, input_ids, attention_mask=None):
        correct = 2.0 - 3.0 * (input_ids == self.x_id).cumsum(-1).float()
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(correct), correct], -1) + self.anchor)


def test_source_step_lists_and_aggregations_by_hand(char_tok):
    model = MarkerModel(char_tok.convert_tokens_to_ids("x"))
    prompts, completions = ["p=", "p="], ["a\nxb\nc", "ab"]
    steps = [[sigmoid(2), sigmoid(-1), sigmoid(-1)], [sigmoid(2)]]
    source = ProcessRewardModelSource(model, tokenizer=char_tok, batch_size=1)
    out = source.score(prompts, completions)
    assert source.process and out.per_source == {}
    for got, want in zip(out.rewards, steps):
        assert got == pytest.approx(want)
    for how, want in (("min", [sigmoid(-1), sigmoid(2)]), ("last", [sigmoid(-1), sigmoid(2)]),
                      ("product", [sigmoid(2) * sigmoid(-1) ** 2, sigmoid(2)])):
        out = ProcessRewardModelSource(model, tokenizer=char_tok, aggregate=how).score(prompts, completions)
        assert out.rewards.tolist() == pytest.approx(want) and list(out.per_source) == ["process_reward_model"]
    with pytest.raises(ValueError, match="aggregate must be steps|min|last|product"):
        ProcessRewardModelSource(model, tokenizer=char_tok, aggregate="mean")
    with pytest.raises(ValueError, match="differs from the '\\\\n' the process reward model was trained with"):
        ProcessRewardModelSource(model, tokenizer=char_tok, step_separator=";")


# ------------------------------------------------------------------------------------------- GRPO / PPO
@pytest.mark.parametrize("kwargs, message", [
    (dict(process_reward_aggregation="steps"), "process_reward_aggregation=steps gives one reward per step"),
    (dict(supervision="process", process_reward_aggregation="min"), "supervision=process needs step rewards"),
    (dict(process_reward_aggregation="mean"), "process_reward_aggregation must be steps|min|last|product"),
])
def test_grpo_checks_the_aggregation_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule("tiny", process_reward_model="no/such/dir", **kwargs)
    with pytest.raises(ValueError, match="applies to model.process_reward_model, which is not set"):
        PPOModule("tiny", process_reward_aggregation="min")
    with pytest.raises(ValueError, match="only GRPO's supervision: process uses"):
        PPOModule("tiny", process_reward_model="no/such/dir", process_reward_aggregation="steps")


class RecordingGRPO(GRPOModule):
    def compute_step_advantages(self, step):
        super().compute_step_advantages(step)
        self.recorded = getattr(self, "recorded", []) + [step]


def _fit(module, trainer_kwargs, rollouts=2):
    data = PromptDataModule(task="chain", task_kwargs={"num_terms": 3}, num_train=16, num_val=4, batch_size=4)
    steps = rollouts * module.updates_per_batch()[0] * module.updates_per_batch()[1]
    trainer = L.Trainer(max_steps=steps, **{**trainer_kwargs, "limit_val_batches": 1, "val_check_interval": rollouts,
                                            "num_sanity_val_steps": 0})
    trainer.fit(module, data)
    return trainer


def test_grpo_process_supervision_from_the_prm_gets_the_process_advantages(briefly_trained, trainer_kwargs):
    """Two rollouts: each step's reward is the PRM's P(correct) of that step, the advantages are §4.1.3's
    (`losses.process_advantages` of those rewards at the steps' last tokens), and validation still measures the
    task's verifier (val/accuracy)."""
    from rlhf_lightning import losses

    _, _, out = briefly_trained
    module = RecordingGRPO("tiny", supervision="process", process_reward_model=str(out), group_size=2,
                           max_new_tokens=12, log_samples_every_n_steps=0, beta=0.0)
    trainer = _fit(module, trainer_kwargs)
    assert module.rollouts == 2 and len(module.recorded) == 2
    source = ProcessRewardModelSource(out)
    for step in module.recorded:
        r = step.rollout
        want = source.step_scores(r.prompts, r.completions)
        assert [len(s) for s in step.rewards] == [len(s) for s in want]
        assert sum(step.rewards, []) == pytest.approx(sum(want, []), abs=1e-6)
        rewards, ends = module.step_boundaries(step.rewards, r)
        pieces = torch.tensor([len(c.split("\n")) for c in r.completions])  # the end step's index
        n_tok = r.samples.completion_mask.sum(-1).cpu()
        assert [len(s) for s in want] == (pieces + 1).tolist()  # every step, then the end
        ended = ends.cpu()[torch.arange(len(pieces)), pieces]
        assert (ended[n_tok > 0] == n_tok[n_tok > 0] - 1).all()  # the end's reward on the last token
        expected = losses.process_advantages(rewards, ends, 2, num_tokens=r.samples.completion_ids.shape[1])
        torch.testing.assert_close(step.advantages, expected.float())
        assert step.advantages.dim() == 2  # per token
    assert {"val/reward", "val/accuracy"} <= set(trainer.callback_metrics)


def test_outcome_prm_in_grpo_weights_and_ppo_validation(briefly_trained, trainer_kwargs):
    """`min` gives one reward per completion (logged as reward/process_reward_model); reward_weights lists its
    weight after the reward functions'; PPO takes it as its score and still validates with the verifier."""
    _, _, out = briefly_trained
    with pytest.raises(ValueError, match="reward_weights needs 2 entries"):
        GRPOModule("tiny", process_reward_model=str(out), reward_fns=["chain_final_correct"], reward_weights=[1.0])
    grpo = GRPOModule("tiny", process_reward_model=str(out), reward_fns=["chain_final_correct"],
                      reward_weights=[1.0, 0.5], group_size=2, max_new_tokens=12, log_samples_every_n_steps=0)
    assert grpo.reward_weights == [1.0, 0.5] and grpo.process_reward_aggregation == "min"
    ppo = PPOModule("tiny", process_reward_model=str(out), ppo_epochs=1, max_new_tokens=12,
                    log_samples_every_n_steps=0)
    metrics = _fit(ppo, trainer_kwargs).callback_metrics
    assert "reward/process_reward_model" in metrics and {"val/reward", "val/accuracy"} <= set(metrics)
    assert 0 <= metrics["reward/score"].item() <= 1


# ------------------------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_trains_on_a_stepwise_jsonl_to_090_held_out_step_accuracy(tmp_path):
    """The issue's target: from the console script, on stepwise jsonl files (built-in chain rows with injected
    errors written out in TRL's format), the tiny preset reaches >= 0.9 step accuracy on the held-out file
    (measured 0.917 at 1250 steps, ~2 CPU minutes with one thread; majority baseline ~0.67)."""
    task = get_task("chain", num_terms=4, max_operand=20)
    val = task.make_examples(500, seed=1)
    held_out = {r["prompt"] for r in val}
    train = [r for r in task.make_examples(16000, seed=0) if r["prompt"] not in held_out]
    # TRL's rows as they are, no end steps (with them: 0.887 after the same 5 epochs, the end being the hardest)
    write_jsonl(tmp_path / "train.jsonl", make_stepwise_rows(task, train, 0.5, seed=0, end_step=False))
    write_jsonl(tmp_path / "val.jsonl", make_stepwise_rows(task, val, 0.5, seed=1, end_step=False))
    args = ["fit", "--model", "rlhf_lightning.ProcessRewardModel", "--data", "rlhf_lightning.StepwiseDataModule",
            "--data.path", "train.jsonl", "--data.val_path", "val.jsonl", "--data.batch_size", "64",
            "--data.val_batch_size", "250", "--model.model_name_or_path", "tiny", "--model.lr", "3e-3",
            "--model.warmup_steps", "20", "--trainer.max_epochs", "5", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    proc = run_script(args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = tensorboard_scalars(tmp_path)["val/step_accuracy"]
    assert accuracy[-1] >= 0.9, accuracy
    assert list(tmp_path.rglob("hf_model/config.json"))
