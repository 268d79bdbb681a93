"""Iterative RL (DeepSeekMath Algorithm 1): pairs, the 10% replay mix, reference reset, RM retraining end to end."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from rlhf_lightning import GRPOModule, PreferenceDataModule, PromptDataModule, RewardModel
from rlhf_lightning.iterative import IterativeRewardModelCallback, group_preference_pairs, mix_with_replay, replay_count
from rlhf_lightning.modules.reward_model import RewardModelScorer
from rlhf_lightning.rewards import exact_match


def even_first_char(prompts, completions, **kwargs):
    """A labeler a random tiny policy satisfies about half the time, so most groups have right and wrong rows."""
    return [1.0 if c and ord(c[0]) % 2 == 0 else 0.0 for c in completions]


def _pairs(n, tag):
    return [{"prompt": f"{tag}{i}", "chosen": "a", "rejected": "b"} for i in range(n)]


def test_group_pairs_are_distinct_correct_vs_wrong_within_a_group():
    prompts = ["1+1="] * 4 + ["2+2="] * 4
    completions = ["2", "3", "4", "2", "4", "4", "4", "4"]
    labels = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, None, 1.0]  # group 2: all correct -> no pair
    pairs = group_preference_pairs(prompts, completions, labels, group_size=4)
    # group 1: distinct correct {"2"} x distinct wrong {"3", "4"} = 2 pairs
    assert pairs == [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                     {"prompt": "1+1=", "chosen": "2", "rejected": "4"}]
    with pytest.raises(ValueError, match="group_size"):
        group_preference_pairs(prompts[:3], completions[:3], labels[:3], group_size=2)


def test_replay_mix_is_ten_percent_of_the_new_pairs():
    new, history = _pairs(50, "new"), _pairs(200, "old")
    mixed, n = mix_with_replay(new, history, 0.1, random.Random(0))
    assert n == 5 and len(mixed) == 55
    assert mixed[:50] == new  # every new pair, in order
    replay = mixed[50:]
    assert all(p["prompt"].startswith("old") for p in replay)
    assert len({p["prompt"] for p in replay}) == 5  # without replacement
    # rounding half up, capped by the history, none on the first iteration, none at fraction 0
    assert [replay_count(k, 0.1) for k in (0, 4, 5, 14, 15, 30, 100)] == [0, 0, 1, 1, 2, 3, 10]
    assert mix_with_replay(new, _pairs(3, "old"), 0.1, random.Random(0))[1] == 3
    assert mix_with_replay(new, [], 0.1, random.Random(0)) == (new, 0)
    assert mix_with_replay(new, history, 0.0, random.Random(0)) == (new, 0)


@pytest.mark.parametrize("bad, message", [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"replay_fraction": 1.5}, "replay_fraction"),
    ({"rm_epochs": 0}, "rm_epochs"),
    ({"rm_lr": 0.0}, "rm_lr"),
    ({"labeler": "no_such_labeler"}, "no_such_labeler"),
])
def test_bad_arguments_raise(bad, message):
    kwargs = {"labeler": "exact_match", **bad}
    with pytest.raises(ValueError, match=message):
        IterativeRewardModelCallback(**kwargs)


def test_labeler_resolves_by_name_and_import_path():
    assert IterativeRewardModelCallback("exact_match").labeler is exact_match
    assert IterativeRewardModelCallback("rlhf_lightning.rewards.exact_match").labeler is exact_match


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny RewardModel trained for a few steps through the API, exported to hf_model/."""
    root = tmp_path_factory.mktemp("rm")
    L.seed_everything(0)
    rm = RewardModel(model_name_or_path="tiny")
    prefs = PreferenceDataModule(task="addition", task_kwargs={"digits": 1}, num_train=64, num_val=16,
                                 batch_size=16)
    L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=root).fit(rm, prefs)
    assert (root / "hf_model" / "config.json").exists()
    return root / "hf_model"


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_iterative_grpo_retrains_the_rm_and_resets_the_reference(tmp_path, rm_dir):
    L.seed_everything(0)
    module = GRPOModule(model_name_or_path="tiny", reward_model=str(rm_dir), group_size=4, beta=0.1,
                        max_new_tokens=4, lr=1e-3, log_samples_every_n_steps=0)
    scorer = module.reward_funcs[0]
    rm_before = {k: v.clone() for k, v in scorer.model.state_dict().items()}
    ref_before = {k: v.clone() for k, v in module.ref_policy.state_dict().items()}
    callback = IterativeRewardModelCallback(labeler=even_first_char, every_n_steps=2, samples_per_iteration=32,
                                            rm_batch_size=16, rm_lr=1e-3)
    logger = TensorBoardLogger(tmp_path, name="it")
    trainer = L.Trainer(max_steps=4, logger=logger, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1, default_root_dir=tmp_path)
    data = PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=400, num_val=0, batch_size=4)
    trainer.fit(module, data)

    # the module kept rewarding with the same scorer object, whose weights are the ones the callback trained
    assert module.reward_funcs == [scorer] and callback.scorer is scorer
    assert any(not torch.equal(rm_before[k], v) for k, v in scorer.model.state_dict().items())
    # reference reset: after the last iteration (rollout 4) the reference IS the policy, not the initial weights
    ref, pol = module.ref_policy.state_dict(), module.policy.state_dict()
    assert all(torch.equal(ref[k], pol[k]) for k in pol)
    assert any(not torch.equal(ref_before[k], ref[k]) for k in ref)
    assert callback.iterations == 2 and callback.reference_resets == 2 and callback.rm_updates == 2

    # the logs: one point per iteration, at rollouts 2 and 4 (logger steps 1 and 3)
    scalars = _events(logger.log_dir)
    assert [v for _, v in scalars["iterative/reference_resets"]] == [1.0, 2.0]
    assert [s for s, _ in scalars["iterative/reference_resets"]] == [1, 3]
    assert [v for _, v in scalars["iterative/rm_updates"]] == [1.0, 2.0]
    acc = [v for _, v in scalars["iterative/rm_accuracy"]]
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
    pairs = [int(v) for _, v in scalars["iterative/pairs"]]
    assert all(p > 0 for p in pairs) and len(callback.history) == sum(pairs)
    # second iteration replays 10% of its new pairs from the first iteration's
    replays = [int(v) for _, v in scalars["iterative/replay_pairs"]]
    assert replays == [0, min(replay_count(pairs[1], 0.1), pairs[0])]
    assert "iterative/rm_loss" in scalars and "iterative/rm_accuracy_before" in scalars
    assert (tmp_path / "it" / "version_0" / "reward_model" / "config.json").exists()

    # checkpoint state: counters, history and the RM's weights round-trip into a fresh callback
    state = callback.state_dict()
    fresh = IterativeRewardModelCallback(labeler=even_first_char, every_n_steps=2)
    fresh.load_state_dict(state)
    assert (fresh.iterations, fresh.rm_updates, fresh.reference_resets, fresh.last_rollout) == (2, 2, 2, 4)
    assert fresh.history == callback.history
    assert all(torch.equal(fresh._pending["rm_state"][k], v) for k, v in scorer.model.state_dict().items())


def test_missing_reward_model_is_a_clear_error(tmp_path):
    module = GRPOModule(model_name_or_path="tiny", reward_fns=["exact_match"], group_size=2, beta=0.0,
                        max_new_tokens=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[IterativeRewardModelCallback(labeler="exact_match")])
    data = PromptDataModule(task="addition", task_kwargs={"digits": 1}, num_train=16, num_val=0, batch_size=2)
    with pytest.raises(ValueError, match="needs a reward model"):
        trainer.fit(module, data)


def test_normalize_reward_model_uses_the_retrained_rms_statistics(tmp_path):
    """normalize_reward_model standardises with the statistics of the RM that scores: after the callback retrains
    it, the scorer's mean / std are the new RM's (over both sides of its training pairs), not the exported ones;
    they reach the logs, the checkpoint state and the reward_model/ export."""
    import json
    import math

    L.seed_everything(0)
    rm = RewardModel(model_name_or_path="tiny")
    prefs = PreferenceDataModule(task="addition", task_kwargs={"digits": 1}, num_train=64, num_val=16, batch_size=16)
    L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "rm").fit(rm, prefs)
    exported = json.loads((tmp_path / "rm" / "hf_model" / "config.json").read_text())
    module = GRPOModule(model_name_or_path="tiny", reward_model=str(tmp_path / "rm" / "hf_model"),
                        normalize_reward_model=True, group_size=4, beta=0.0, max_new_tokens=4, lr=1e-3,
                        log_samples_every_n_steps=0)
    scorer = module.reward_funcs[0]
    assert (scorer.mean, scorer.std) == (exported["reward_mean"], exported["reward_std"])
    callback = IterativeRewardModelCallback(labeler=even_first_char, every_n_steps=2, samples_per_iteration=32,
                                            rm_batch_size=16, rm_lr=1e-2, reset_reference=False)
    logger = TensorBoardLogger(tmp_path, name="it")
    L.Trainer(max_steps=2, logger=logger, callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(
        module, PromptDataModule(task="addition", task_kwargs={"digits": 2}, num_train=400, num_val=0, batch_size=4))
    assert callback.rm_updates == 1 and callback.history  # one retrain, on the first iteration's pairs (no replay)

    # the new RM's statistics, computed independently: its raw scores of both sides of the pairs it trained on
    raw = RewardModelScorer(scorer.model, tokenizer=scorer.tokenizer)
    prompts = [p["prompt"] for p in callback.history]
    scores = torch.tensor(raw(prompts, [p["chosen"] for p in callback.history]) +
                          raw(prompts, [p["rejected"] for p in callback.history]))
    mean, std = float(scores.mean()), float(scores.std(unbiased=False))
    assert scorer.mean == pytest.approx(mean, abs=1e-5) and scorer.std == pytest.approx(std, abs=1e-5)
    assert not math.isclose(scorer.mean, exported["reward_mean"], abs_tol=1e-3)  # the stale ones are gone
    got = scorer(["7+5="], ["12"])[0]
    assert got == pytest.approx((raw(["7+5="], ["12"])[0] - mean) / std, abs=1e-4)
    assert callback.state_dict()["rm_statistics"] == (scorer.mean, scorer.std)
    scalars = _events(logger.log_dir)
    assert scalars["iterative/rm_reward_mean"][0][1] == pytest.approx(mean, abs=1e-5)
    saved = json.loads((tmp_path / "it" / "version_0" / "reward_model" / "config.json").read_text())
    assert saved["reward_mean"] == pytest.approx(mean, abs=1e-5)

    # a resumed callback puts the statistics back into its scorer
    fresh = IterativeRewardModelCallback(labeler=even_first_char, every_n_steps=2)
    fresh.scorer = RewardModelScorer(str(tmp_path / "rm" / "hf_model"), normalize=True)
    fresh.load_state_dict(callback.state_dict())
    assert fresh.scorer.statistics() == scorer.statistics()
