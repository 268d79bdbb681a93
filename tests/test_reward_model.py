"""Tests for the reward model: Bradley-Terry loss, preference data, training, export, scorer, config."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.data.negatives import make_preference_pairs, policy_mistakes, wrong_number
from rlhf_lightning.data.tasks import AdditionTask, ChainArithmeticTask
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.modules.reward_model import RewardModel, RewardModelScorer, bradley_terry_loss
from rlhf_lightning.modules.sft import SFTModule
from rlhf_lightning.rewards import chain_steps
from rlhf_lightning.rewards.model_inputs import reward_input_ids
from rlhf_lightning.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def nll_sigmoid(x: float) -> float:
    """-log σ(x), by hand."""
    return math.log(1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------- loss
def test_bradley_terry_loss_hand_values():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # diffs 1, -1: (0.313262 + 1.313262) / 2
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx((nll_sigmoid(1) + nll_sigmoid(-1)) / 2, abs=1e-6)
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(0.813262, abs=1e-6)
    # margin asks for r_c - r_r > m: diffs 1 - 0.5, -1 - 0
    margin = torch.tensor([0.5, 0.0])
    expected = (nll_sigmoid(0.5) + nll_sigmoid(-1)) / 2  # (0.474077 + 1.313262) / 2
    assert bradley_terry_loss(r_c, r_r, margin).item() == pytest.approx(expected, abs=1e-6)
    # centering adds c * mean((r_c + r_r)^2) = 0.1 * (9 + 1) / 2 = 0.5
    assert bradley_terry_loss(r_c, r_r, margin, 0.1).item() == pytest.approx(expected + 0.5, abs=1e-6)


def test_bradley_terry_loss_gradient_pushes_chosen_up():
    r_c = torch.tensor([0.0], requires_grad=True)
    r_r = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    # d/dx -log σ(x) at x = 0 is -σ(-0) = -0.5
    assert r_c.grad.item() == pytest.approx(-0.5) and r_r.grad.item() == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------- input format
def test_reward_input_ids_appends_eos_unless_pad_is_eos():
    tok = build_char_tokenizer()
    ids = reward_input_ids(tok, "1+2=", "3")
    assert ids == tok("1+2=3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == 6 and ids[-1] == 1
    tok.pad_token = tok.eos_token  # a hub tokenizer that pads with EOS: the EOS would be read as padding
    assert reward_input_ids(tok, "1+2=", "3") == ids[:-1]


# ------------------------------------------------------------------------------------------ built-in pairs
def test_wrong_number_kinds():
    rng = random.Random(0)
    for value in (0, 7, 58, 132, 198):
        for _ in range(50):
            r = wrong_number(value, "random", rng, 0, 198)
            assert r != value and 0 <= r <= 198
            n = wrong_number(value, "near", rng, 0, 198)
            assert n - value in (-10, -2, -1, 1, 2, 10) and n >= 0
            d = wrong_number(value, "digit", rng, 0, 198)
            a, b = str(value), str(d)
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert wrong_number(-45, "digit", random.Random(1), -100, 100) < 0
    with pytest.raises(ValueError, match="unknown negative kind 'typo'"):
        wrong_number(5, "typo", rng, 0, 10)


def test_addition_pairs_are_seeded_mixed_and_wrong():
    task = AdditionTask(digits=2)
    rows = task.make_examples(400, seed=3)
    pairs = make_preference_pairs(task, rows, {"random": 1, "digit": 3}, seed=0)
    assert pairs == make_preference_pairs(task, rows, {"random": 1, "digit": 3}, seed=0)
    assert pairs != make_preference_pairs(task, rows, {"random": 1, "digit": 3}, seed=1)
    for p, row in zip(pairs, rows):
        a, b = map(int, p["prompt"][:-1].split("+"))
        assert p["chosen"] == str(a + b) == row["completion"]
        assert int(p["rejected"]) != a + b
    share_digit = sum(p["kind"] == "digit" for p in pairs) / len(pairs)
    assert 0.68 < share_digit < 0.82  # weights 1:3 -> 0.75


def test_chain_pairs_corrupt_one_step_and_propagate():
    task = ChainArithmeticTask(num_terms=4, max_operand=9)
    rows = task.make_examples(100, seed=0)
    for p in make_preference_pairs(task, rows, {"digit": 1, "random": 1}, seed=0):
        good, bad = p["chosen"].split("\n"), p["rejected"].split("\n")
        assert good == chain_steps(p["prompt"]) and len(bad) == len(good)
        k = next(i for i, (g, b) in enumerate(zip(good, bad)) if g != b)
        assert bad[:k] == good[:k]
        assert bad[k].split("=")[0] == good[k].split("=")[0]  # same operands, wrong result
        for line in bad[k + 1:]:  # later lines compute correctly from the wrong value
            lhs, rhs = line.split("=")
            assert eval(lhs.replace("--", "+")) == int(rhs)
        assert bad[-1].split("=")[-1] != p["answer"]


# --------------------------------------------------------------------------------------------- data module
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.0, "source": "a"},
    {"prompt": "10+1=", "chosen": "11", "rejected": "1234", "margin": 0.5, "source": "b"},
    {"prompt": "3+3=", "chosen": "6", "rejected": "7", "margin": 0.0, "source": "c"},
]


def test_datamodule_jsonl_batches_chosen_then_rejected_right_padded(tmp_path):
    tok = build_char_tokenizer()
    dm = PreferenceDataModule(path=str(write_jsonl(tmp_path / "p.jsonl", PAIRS)), val_fraction=0.0,
                              margin_column="margin", batch_size=3, shuffle=False)
    dm.prepare_rows(tok)
    batch = dm.collate(dm.train_rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (6, 10)  # 2B rows; longest "10+1=1234<eos>" is 10 tokens
    assert ids[0, :6].tolist() == reward_input_ids(tok, "2+2=", "4")  # chosen rows first
    assert ids[3, :6].tolist() == reward_input_ids(tok, "2+2=", "5")  # then the rejected ones
    assert ids[4].tolist() == reward_input_ids(tok, "10+1=", "1234")
    assert mask.sum(1).tolist() == [6, 8, 6, 6, 10, 6]
    assert (ids[0, 6:] == tok.pad_token_id).all() and (mask[0, 6:] == 0).all()  # padding on the right
    assert batch["margin"].tolist() == [1.0, 0.5, 0.0]
    assert batch["source"] == ["a", "b", "c"] and batch["prompts"] == ["2+2=", "10+1=", "3+3="]
    assert batch["chosen"] == ["4", "11", "6"] and batch["rejected"] == ["5", "1234", "7"]


def test_datamodule_csv_and_chat_messages(tmp_path):
    tok = build_char_tokenizer()
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "good", "bad"])
        writer.writeheader()
        writer.writerows([{"question": "1+1=", "good": "2", "bad": "3"}] * 4)
    dm = PreferenceDataModule(path=str(path), prompt_column="question", chosen_column="good",
                              rejected_column="bad", val_fraction=0.25, batch_size=2)
    dm.prepare_rows(tok)
    assert len(dm.train_rows) == 3 and len(dm.val_rows) == 1
    assert dm.train_rows[0]["_chosen_ids"] == reward_input_ids(tok, "1+1=", "2")

    chat = [{"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "3"}]}] * 2
    dm = PreferenceDataModule(path=str(write_jsonl(tmp_path / "chat.jsonl", chat)), val_fraction=0.0)
    dm.prepare_rows(tok)
    assert dm.train_rows[0]["prompts"] == "user: 1+1=\nassistant: "  # the char tokenizer's chat template
    assert dm.train_rows[0]["_chosen_ids"] == reward_input_ids(tok, "user: 1+1=\nassistant: ", "2")


PAIR_DEFECTS = [
    ("equal", {"prompt": "1+1=", "chosen": "2", "rejected": "2"},
     "chosen and rejected are the same text ('2'): the pair teaches nothing"),
    ("empty_chosen", {"prompt": "1+1=", "chosen": "", "rejected": "3"}, "chosen (column 'chosen') is empty"),
    ("missing_rejected", {"prompt": "1+1=", "chosen": "2"}, "has no value in column 'rejected'"),
    ("user_reply", {"prompt": "1+1=", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"},
     "chosen (column 'chosen') messages must be assistant replies only"),
    ("margin_text", {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": "big"},
     "margin column 'margin' must be a finite number, got 'big'"),
    ("margin_nan", {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": float("nan")},
     "has a null (nan) value in column 'margin'"),
]


@pytest.mark.parametrize("bad, problem", [c[1:] for c in PAIR_DEFECTS], ids=[c[0] for c in PAIR_DEFECTS])
def test_a_bad_pair_near_the_end_fails_at_load_with_its_line(tmp_path, bad, problem):
    from rlhf_lightning.infra.errors import ConfigError

    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2), "margin": 1.0} for i in range(9)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows + [{"margin": 1.0, **bad}])
    with pytest.raises(ConfigError) as err:
        PreferenceDataModule(path=str(path), margin_column="margin", val_fraction=0.0)
    assert str(err.value).startswith(f"{path} line 10: {problem}"), str(err.value)


def test_an_empty_preference_prompt_is_allowed(tmp_path):
    rows = [{"prompt": "", "chosen": "good", "rejected": "bad"}] * 2  # the pair compares the bare responses
    dm = PreferenceDataModule(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), val_fraction=0.0, batch_size=2)
    dm.prepare_rows(build_char_tokenizer())
    assert dm.train_rows[0]["_chosen_ids"] == reward_input_ids(build_char_tokenizer(), "", "good")


def test_datamodule_missing_column_and_bad_arguments(tmp_path):
    rows = [{"prompt": "1+1=", "chosen": "2", "loser": "3"}] * 2
    # a local file is checked when the data module is built, before any model is loaded
    with pytest.raises(ValueError, match="has no column 'rejected'"):
        PreferenceDataModule(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), val_fraction=0.0)
    with pytest.raises(ValueError, match="has no column 'bonus'"):
        PreferenceDataModule(path=str(write_jsonl(tmp_path / "q.jsonl", PAIRS)), margin_column="bonus",
                             val_fraction=0.0)
    with pytest.raises(ValueError, match="exactly one of `path`"):
        PreferenceDataModule()
    with pytest.raises(ValueError, match="negatives must map kinds"):
        PreferenceDataModule(task="addition", negatives={"typo": 1.0})
    with pytest.raises(ValueError, match="negatives only applies"):
        PreferenceDataModule(path=str(tmp_path / "q.jsonl"), negatives={"random": 1.0})


def test_datamodule_drops_long_pairs_with_a_count(tmp_path):
    tok = build_char_tokenizer()
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},  # 6 tokens each side
            {"prompt": "1+1=", "chosen": "2", "rejected": "33"},  # rejected side: 7 tokens
            {"prompt": "12+1=", "chosen": "13", "rejected": "3"}]  # chosen side: 8 tokens
    dm = PreferenceDataModule(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), val_fraction=0.0, max_length=6)
    with pytest.warns(UserWarning, match="dropped 2 of 3 train pair"):
        dm.prepare_rows(tok)
    assert dm.dropped["train"] == 2 and [r["rejected"] for r in dm.train_rows] == ["3"]


def test_task_pairs_hold_out_validation_prompts():
    dm = PreferenceDataModule(task="addition", num_train=3000, num_val=300, seed=0)
    dm.prepare_rows(build_char_tokenizer())
    val_prompts = {r["prompts"] for r in dm.val_rows}
    assert len(dm.val_rows) == 300 and 0 < len(dm.train_rows) < 3000
    assert not val_prompts & {r["prompts"] for r in dm.train_rows}
    assert {r["kind"] for r in dm.train_rows} == {"random"}  # the default


def test_policy_negatives_are_the_models_own_wrong_samples(tmp_path):
    """`policy` negatives: the rejected side is a completion the given model sampled for that prompt and the
    verifier marked wrong (the mistakes PPO will meet), seeded; other kinds keep their draws."""
    tok = build_char_tokenizer()
    load_causal_lm("tiny", tok, seed=1).save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    task = AdditionTask(digits=2)
    rows = task.make_examples(40, seed=3)
    pairs = make_preference_pairs(task, rows, {"policy": 0.5, "near": 0.5}, seed=0,
                                  negatives_model=str(tmp_path / "sft"))
    assert pairs == make_preference_pairs(task, rows, {"policy": 0.5, "near": 0.5}, seed=0,
                                          negatives_model=str(tmp_path / "sft"))  # a pure function of its inputs
    policy_rows = [i for i, p in enumerate(pairs) if p["kind"] == "policy"]
    assert 5 < len(policy_rows) < 35  # an untrained model is wrong on every try: no random fallbacks here
    mistakes = policy_mistakes(str(tmp_path / "sft"), task, [rows[i] for i in policy_rows], seed=0)
    assert [pairs[i]["rejected"] for i in policy_rows] == mistakes
    assert all(m is not None and m.strip() != rows[i]["answer"] for i, m in zip(policy_rows, mistakes))
    near = [p for p in pairs if p["kind"] == "near"]
    assert all(abs(int(p["rejected"]) - int(p["answer"])) in (1, 2, 10) for p in near)


def test_policy_negatives_need_a_model_and_a_model_needs_policy_negatives(tmp_path):
    with pytest.raises(ValueError, match="negatives `policy` samples a model's own mistakes: set negatives_model"):
        PreferenceDataModule(task="addition", negatives={"policy": 1.0})
    with pytest.raises(ValueError, match="negatives_model 'tiny' is only used by `policy` negatives"):
        PreferenceDataModule(task="addition", negatives={"random": 1.0}, negatives_model="tiny")
    with pytest.raises(ValueError, match="negatives_model: model path '/nope/sft' does not exist"):
        PreferenceDataModule(task="addition", negatives={"policy": 1.0}, negatives_model="/nope/sft")


# -------------------------------------------------------------------------------- training, export, scorer
TRAIN_STEPS = 150


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster, and on a busy 2-core machine two spin-waiting
    threads make a step ~6x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RM trained briefly on built-in addition pairs with random wrong sums (the fastest kind to learn)."""
    root = tmp_path_factory.mktemp("rm_run")
    L.seed_everything(0)
    rm = RewardModel("tiny", lr=3e-3, warmup_steps=10)
    dm = PreferenceDataModule(task="addition", negatives={"random": 1.0}, num_train=TRAIN_STEPS * 64, num_val=256,
                              batch_size=64, val_batch_size=256, seed=0)
    trainer = L.Trainer(max_steps=TRAIN_STEPS, val_check_interval=TRAIN_STEPS, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        logger=L.pytorch.loggers.TensorBoardLogger(root, name="rm"))
    untrained_acc = trainer.validate(rm, dm, verbose=False)[0]["val/accuracy"]
    trainer.fit(rm, dm)
    return rm, dm, trainer, untrained_acc


def test_training_raises_accuracy_above_chance(trained):
    rm, _, trainer, untrained_acc = trained
    acc = trainer.callback_metrics["val/accuracy"].item()
    assert acc > 0.65 and acc > untrained_acc + 0.1, (untrained_acc, acc)  # measured: ~0.5 -> ~0.7
    assert trainer.callback_metrics["val/margin"].item() > 0
    assert rm.reward_std is not None and rm.reward_std > 0  # recorded for normalisation


def test_hf_export_scores_like_the_module(trained):
    rm, dm, trainer, _ = trained
    out = Path(trainer.log_dir) / "hf_model"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.pad_token_id == tok.pad_token_id == 0 and model.config.reward_append_eos is True
    rm.eval()
    batch = dm.collate(dm.val_rows[:8])
    with torch.no_grad():
        expected = rm(batch["input_ids"], batch["attention_mask"])  # [16] the module's own batched scores
        # the documented recipe, one sequence at a time: prompt + response, then EOS
        texts = batch["prompts"] * 2
        responses = batch["chosen"] + batch["rejected"]
        alone = torch.stack([model(torch.tensor([tok(p + r, add_special_tokens=False).input_ids + [tok.eos_token_id]]))
                             .logits[0, 0] for p, r in zip(texts, responses)])
        # and batched with the tokenizer's own (left) padding: pad_token_id finds the last real token
        enc = tok([p + r + tok.eos_token for p, r in zip(texts, responses)], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        left = model(**enc).logits[:, 0]
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, expected, atol=1e-4, rtol=1e-4)  # RoPE is shift-invariant up to rounding
    scorer = RewardModelScorer(out, batch_size=5)  # from the directory, in uneven batches
    torch.testing.assert_close(torch.tensor(scorer(texts, responses)), expected, atol=1e-5, rtol=1e-5)


def test_scorer_ranks_correct_above_wrong_and_normalises(trained):
    rm, dm, _, _ = trained
    scorer = RewardModelScorer(rm)
    prompts = [r["prompts"] for r in dm.val_rows]
    correct = scorer(prompts, [r["chosen"] for r in dm.val_rows])
    wrong = scorer(prompts, [r["rejected"] for r in dm.val_rows])
    assert sum(c > w for c, w in zip(correct, wrong)) / len(prompts) > 0.65
    assert scorer(["7+5="], ["12"])[0] > scorer(["7+5="], ["170"])[0]
    # normalisation: (s - mean) / std with the recorded statistics, or explicit ones
    raw = scorer(["7+5="], ["12"])[0]
    norm = RewardModelScorer(rm, normalize=True)
    assert norm.mean == rm.reward_mean and norm.std == rm.reward_std
    assert norm(["7+5="], ["12"])[0] == pytest.approx((raw - rm.reward_mean) / rm.reward_std, rel=1e-5)
    explicit = RewardModelScorer(rm, normalize=True, mean=1.0, std=2.0)
    assert explicit(["7+5="], ["12"])[0] == pytest.approx((raw - 1.0) / 2.0, rel=1e-5)
    rm.model.train()
    scorer(["7+5="], ["12"])
    assert rm.model.training  # scoring runs in eval mode and restores the mode it found
    bare = RewardModelScorer(rm.model, tokenizer=rm.tokenizer)
    with pytest.raises(ValueError, match="normalize=True but the reward model has no recorded"):
        RewardModelScorer(RewardModel("tiny"), normalize=True)
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        RewardModelScorer(rm.model)
    assert bare(["7+5="], ["12"]) == scorer(["7+5="], ["12"]) and bare([], []) == []


@pytest.mark.parametrize("normalize", [False, True])
def test_grpo_normalize_reward_model_standardises_with_the_exported_statistics(trained, tmp_path, normalize):
    """GRPO's rewards from `reward_model` are the RM's raw scores, or with normalize_reward_model
    (score - reward_mean) / reward_std with the statistics in the export's config; scored here by hand with the
    documented recipe (prompt + completion, then EOS, through AutoModelForSequenceClassification)."""
    from rlhf_lightning import GRPOModule, PromptDataModule

    _, _, trainer, _ = trained
    out = Path(trainer.log_dir) / "hf_model"
    module = GRPOModule("tiny", reward_model=str(out), normalize_reward_model=normalize, group_size=2, beta=0.0,
                        max_new_tokens=4, log_samples_every_n_steps=0)
    seen, advantages = [], module.compute_advantages

    def recording(rewards, rollout):
        seen.append((rewards.clone(), rollout.prompts, rollout.completions))
        return advantages(rewards, rollout)

    module.compute_advantages = recording
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(
        module, PromptDataModule(task="addition", num_train=16, num_val=0, batch_size=4))
    (rewards, prompts, completions), = seen
    config = json.loads((out / "config.json").read_text())
    model, tok = AutoModelForSequenceClassification.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        raw = [float(model(torch.tensor([tok(p + c, add_special_tokens=False).input_ids + [tok.eos_token_id]]))
                     .logits[0, 0]) for p, c in zip(prompts, completions)]
    mean, std = config["reward_mean"], config["reward_std"]
    assert std > 0 and mean is not None
    expected = [(r - mean) / std for r in raw] if normalize else raw
    torch.testing.assert_close(rewards, torch.tensor(expected), atol=1e-4, rtol=1e-4)


def test_rm_from_sft_export_directory(tmp_path):
    """An SFT (causal-LM) export loads as the backbone; the scalar head starts fresh."""
    from rlhf_lightning.models import load_causal_lm

    tok = build_char_tokenizer()
    policy = load_causal_lm("tiny", tok, seed=3)
    policy.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    rm = RewardModel(str(tmp_path / "sft"))
    torch.testing.assert_close(rm.model.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert rm.model.config.pad_token_id == 0 and rm.model.score.out_features == 1


# ------------------------------------------------------------------------------ LoRA, gradient checkpointing
LORA_STEPS = 100


@pytest.fixture(scope="module")
def lora_trained(tmp_path_factory):
    """A tiny RM trained with a LoRA adapter (r 16): only the adapter and the score head may change."""
    root = tmp_path_factory.mktemp("rm_lora")
    L.seed_everything(0)
    # lr 3e-3: at 1e-2 (and 5e-3) the run collapsed to a constant score on an Intel Xeon with AMX (margin 0.04)
    rm = RewardModel("tiny", lr=3e-3, warmup_steps=10, lr_schedule="constant", lora={"r": 16, "alpha": 32})
    frozen = {n: p.detach().clone() for n, p in rm.named_parameters() if not p.requires_grad}
    dm = PreferenceDataModule(task="addition", negatives={"random": 1.0}, num_train=LORA_STEPS * 64, num_val=256,
                              batch_size=64, val_batch_size=256, seed=0)
    trainer = L.Trainer(max_steps=LORA_STEPS, val_check_interval=LORA_STEPS, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, logger=False)
    before = trainer.validate(rm, dm, verbose=False)[0]
    trainer.fit(rm, dm)
    return rm, dm, trainer, before, frozen, root


def test_lora_reward_model_trains_only_the_adapter_and_the_head(lora_trained):
    rm, _, trainer, before, frozen, _ = lora_trained
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)  # the fresh head trains in full (modules_to_save)
    assert all(torch.equal(p, frozen[n]) for n, p in rm.named_parameters() if n in frozen)  # the backbone did not move
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # measured on 256 held-out pairs (Intel Xeon, 2026-12-03): loss 0.687 -> 0.461, margin 0.01 -> 1.72, accuracy
    # 0.598 -> 0.730
    assert after["val/loss"] < before["val/loss"] - 0.1, (before, after)
    assert after["val/margin"] > before["val/margin"] + 0.3, (before, after)
    assert after["val/accuracy"] > before["val/accuracy"], (before, after)


def _scores(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def test_lora_reward_model_exports_merged_and_adapter(lora_trained, tmp_path):
    """merged: a plain AutoModelForSequenceClassification; adapter: peft on the base classifier. Both score like
    the trained module; the adapter names its (preset) base."""
    from peft import PeftModel

    from rlhf_lightning.models import load_sequence_classifier

    rm, dm, _, _, _, root = lora_trained
    batch = dm.collate(dm.val_rows[:8])
    expected = _scores(rm.model, batch)
    merged = AutoModelForSequenceClassification.from_pretrained(root / "hf_model")  # the fit's export: merged
    assert not (root / "hf_model" / "adapter_config.json").exists()
    assert merged.config.reward_std == rm.reward_std
    torch.testing.assert_close(_scores(merged, batch), expected, atol=1e-5, rtol=1e-5)
    rm.lora_export = "adapter"
    try:
        out = rm.export(tmp_path / "adapter")
    finally:
        rm.lora_export = "merged"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    reloaded = PeftModel.from_pretrained(load_sequence_classifier("tiny", seed=0), out)
    torch.testing.assert_close(_scores(reloaded, batch), expected, atol=1e-5, rtol=1e-5)
    from_dir = RewardModelScorer(root / "hf_model")(["7+5="], ["12"])
    assert RewardModelScorer(rm)(["7+5="], ["12"]) == pytest.approx(from_dir, abs=1e-5)


def test_reward_model_gradient_checkpointing_gives_the_same_gradient():
    dm = PreferenceDataModule(task="addition", num_train=16, num_val=0, batch_size=8, seed=0, tokenizer="tiny")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    grads = []
    for ckpt in (False, True):
        rm = RewardModel("tiny", gradient_checkpointing=ckpt)
        assert rm.model.is_gradient_checkpointing == ckpt
        rm._step(batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in rm.model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def _rank_accuracy(scorer: RewardModelScorer, pairs: list[tuple[str, str, str]]) -> float:
    """Share of (prompt, right, wrong) triples where the RM scores the right answer higher."""
    good = scorer([p for p, _, _ in pairs], [c for _, c, _ in pairs])
    bad = scorer([p for p, _, _ in pairs], [w for _, _, w in pairs])
    return sum(g > b for g, b in zip(good, bad)) / len(pairs)


@pytest.mark.slow  # ~1.5 CPU minutes alone, ~3 on a loaded 2-core machine
def test_random_and_policy_negative_rms_rank_the_policys_held_out_mistakes_lower(tmp_path):
    """What the RM -> PPO route relies on, at small scale: a short SFT, then two equally short RMs from its export,
    one on random wrong sums (the former recipe) and one on the SFT model's own wrong samples (`policy`, the
    shipped rm_arithmetic.yaml). On held-out prompts both score the right answer above a fresh mistake of the
    policy well above chance. Which one ranks better does not hold across hosts at this scale: measured 0.614 vs
    0.681 (policy ahead) on 251 mistakes where the recipe was chosen, 0.665 vs 0.591 (random ahead; 0.759 vs 0.661
    with 600 RM steps) on an Intel Xeon with AMX on 2026-12-03; full size 0.744 vs 0.903, docs/ppo.md, on the
    first host. So the test holds what both hosts agree on."""
    trainer_kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                          default_root_dir=tmp_path)
    L.seed_everything(0)
    sft = SFTModule("tiny", lr=3e-3, warmup_steps=20)
    L.Trainer(max_steps=700, **trainer_kwargs).fit(sft, PromptDataModule(
        task="addition", num_train=10000, num_val=0, batch_size=64, completion_column="completion"))
    sft_dir = str(tmp_path / "sft")
    sft.policy.save_pretrained(sft_dir)
    sft.tokenizer.save_pretrained(sft_dir)
    task = AdditionTask(digits=2)
    held_out = task.make_examples(300, seed=1_000_003)  # the val prompts: never in the RM's training pairs
    mistakes = policy_mistakes(sft_dir, task, held_out, seed=99)  # fresh samples, another seed than training's
    triples = [(row["prompt"], row["completion"], m) for row, m in zip(held_out, mistakes) if m is not None]
    assert len(triples) > 150
    accuracy = {}
    for kind in ("random", "policy"):
        L.seed_everything(0)
        rm = RewardModel(sft_dir, lr=1e-3, warmup_steps=20)
        data = PreferenceDataModule(task="addition", negatives={kind: 1.0}, num_val=300, batch_size=64,
                                    num_train=19200, negatives_model=sft_dir if kind == "policy" else None)
        L.Trainer(max_steps=300, **trainer_kwargs).fit(rm, data)
        accuracy[kind] = _rank_accuracy(RewardModelScorer(rm), triples)
    assert min(accuracy.values()) > 0.55, accuracy


# ---------------------------------------------------------------------------------------------- the config
def test_rm_config_runs_two_steps_via_cli(tmp_path, monkeypatch):
    """The shipped config as shipped, from a folder holding the SFT export it starts from and samples its
    `policy` negatives with."""
    from rlhf_lightning.cli import cli_main

    tok = build_char_tokenizer()
    sft = tmp_path / "runs" / "sft_arithmetic" / "version_0" / "hf_model"
    load_causal_lm("tiny", tok, seed=1).save_pretrained(sft)
    tok.save_pretrained(sft)
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(ROOT / "configs" / "rm_arithmetic.yaml"),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.init_args.num_train", "256",
              "--data.init_args.num_val", "64"])
    exported = list(tmp_path.glob("rm_arithmetic/**/hf_model/config.json"))
    assert len(exported) == 1
    config = json.loads(exported[0].read_text())
    assert len(config["id2label"]) == 1 and config["pad_token_id"] == 0  # one scalar head
    assert config["reward_std"] is not None


@pytest.mark.slow
def test_rm_config_reaches_090_held_out_accuracy_on_random_wrong_sums(tmp_path):
    """The earlier issue's target with the shipped training settings and the former data recipe (a `tiny` RM from
    scratch, uniformly random wrong sums): >= 0.9 on held-out pairs (measured 0.933-0.952, ~2-4 CPU minutes with
    one thread). The shipped config now trains on the SFT policy's own, much harder mistakes instead."""
    from rlhf_lightning.cli import cli_main

    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "rm_arithmetic.yaml"),
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.init_args.model_name_or_path",
                    "tiny", "--data.init_args.negatives", "{random: 1.0}", "--data.init_args.negatives_model",
                    "null"])
    assert cli.trainer.callback_metrics["val/accuracy"].item() >= 0.9
