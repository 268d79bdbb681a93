"""Iterative RL with the process reward model (Algorithm 1 for process supervision): Monte-Carlo step labels of
fresh samples, the PRM GRPO scores with retrained in place, the reference reset, exact resume, the export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from test_mc_labels import ScriptedChainEngine, prefix_is_correct

from rlhf_lightning import GRPOModule, IterativeProcessRewardModelCallback, ProcessRewardModel, PromptDataModule
from rlhf_lightning.data import StepwiseDataModule
from rlhf_lightning.rewards import ProcessRewardModelSource, final_answer_match
from rlhf_lightning.rollout import base, register_engine

CHAIN = {"num_terms": 4, "max_operand": 9}  # the scripted policy's chains: 3 steps


@pytest.fixture
def scripted(monkeypatch):
    """The scripted chain policy (test_mc_labels) as `rollout_engine: scripted_chain`, right half of the time from
    a correct prefix (its draws from the module's seeded sampling stream), the registry restored after."""
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))
    monkeypatch.setattr(ScriptedChainEngine, "p_right", 0.5)
    register_engine("scripted_chain")(ScriptedChainEngine)


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    """A tiny ProcessRewardModel trained a few steps on built-in chain rows, exported to hf_model/."""
    root = tmp_path_factory.mktemp("prm")
    L.seed_everything(0)
    dm = StepwiseDataModule(task="chain", task_kwargs=CHAIN, num_train=64, num_val=8, batch_size=16)
    L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0,
              accelerator="cpu").fit(ProcessRewardModel("tiny", lr=3e-3), dm)
    return root / "hf_model"


def _module(prm_dir) -> GRPOModule:
    return GRPOModule("tiny", supervision="process", process_reward_model=str(prm_dir), group_size=2,
                      max_new_tokens=24, rollout_engine="scripted_chain", beta=0.04, lr=1e-3,
                      log_samples_every_n_steps=0)


def _callback(**kwargs) -> IterativeProcessRewardModelCallback:
    return IterativeProcessRewardModelCallback(labeler=final_answer_match, every_n_steps=1, samples_per_iteration=8,
                                               num_rollouts=2, rm_batch_size=4, rm_lr=1e-3, **kwargs)


def _data() -> PromptDataModule:
    return PromptDataModule(task="chain", task_kwargs=CHAIN, num_train=32, num_val=0, batch_size=2)


def _trainer(root, callbacks, logger=False) -> L.Trainer:
    return L.Trainer(max_steps=2, logger=logger, callbacks=callbacks, enable_checkpointing=bool(callbacks[1:]),
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     log_every_n_steps=1, default_root_dir=root)


@pytest.mark.parametrize("bad, message", [({"num_rollouts": 0}, "num_rollouts"), ({"mc_batch_size": 0},
                                          "mc_batch_size"), ({"mc_max_new_tokens": 1.5}, "mc_max_new_tokens"),
                                          ({"replay_fraction": 2.0}, "replay_fraction")])
def test_bad_arguments_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        IterativeProcessRewardModelCallback(labeler="final_answer_match", **bad)


def test_without_a_process_reward_model_it_says_so(tmp_path, scripted):
    module = GRPOModule("tiny", supervision="process", group_size=2, max_new_tokens=4, beta=0.0,
                        rollout_engine="scripted_chain")
    with pytest.raises(ValueError, match="needs a process reward model: set process_reward_model"):
        _trainer(tmp_path, [_callback()]).fit(module, _data())


def test_iterative_prm_labels_fresh_steps_and_retrains_the_prm_grpo_scores_with(tmp_path, scripted, prm_dir):
    L.seed_everything(0)
    module = _module(prm_dir)
    source = module.process_reward_source
    prm_before = {k: v.clone() for k, v in source.model.state_dict().items()}
    callback = _callback()
    logger = TensorBoardLogger(tmp_path, name="it")
    _trainer(tmp_path, [callback], logger).fit(module, _data())

    # shared, not copied: GRPO's step rewards come from the network the callback trained
    assert callback.scorer is source and module.reward_funcs[-1] is source
    assert any(not torch.equal(prm_before[k], v) for k, v in source.model.state_dict().items())
    ref, pol = module.ref_policy.state_dict(), module.policy.state_dict()
    assert all(torch.equal(ref[k], pol[k]) for k in pol)
    assert (callback.iterations, callback.rm_updates, callback.reference_resets) == (2, 2, 2)

    # the rows: TRL's stepwise format, as many labels as steps; a step labelled correct has a correct prefix (the
    # scripted policy never recovers from a wrong step), and a correct chain's last step is labelled correct
    assert len(callback.history) == 16
    for row in callback.history:
        assert set(row) == {"prompt", "completions", "labels"} and len(row["labels"]) == len(row["completions"])
        for k, (step, label) in enumerate(zip(row["completions"], row["labels"])):
            prefix = "\n".join(row["completions"][:k + 1])
            assert not (step and label) or prefix_is_correct(row["prompt"] + prefix)  # "": an end step, if any
    assert any(all(r["labels"]) for r in callback.history) and any(not r["labels"][0] for r in callback.history)

    from test_iterative import _events

    scalars = _events(logger.log_dir)
    assert [v for _, v in scalars["iterative/rows"]] == [8.0, 8.0]
    assert [v for _, v in scalars["iterative/replay_rows"]] == [0.0, 1.0]  # 10% of 8, rounded
    assert [v for _, v in scalars["iterative/rm_updates"]] == [1.0, 2.0]
    assert all(v > 0 for _, v in scalars["iterative/mc_continuations"])
    for key in ("prm_loss", "prm_step_accuracy", "prm_step_accuracy_before", "prm_step_f1_before",
                "step_label_mean", "label_mean"):
        assert len(scalars[f"iterative/{key}"]) == 2, key
    metrics_doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    assert not [k for k in scalars if k.startswith("iterative/") and f"`{k}`" not in metrics_doc]

    # the export at fit end scores as the trained source does
    out = tmp_path / "it" / "version_0" / "process_reward_model"
    exported = ProcessRewardModelSource(out)
    prompts, completions = ["1+2+3+4="], ["1+2=3\n3+3=6\n6+4=10"]
    assert exported.step_scores(prompts, completions)[0] == pytest.approx(
        source.step_scores(prompts, completions)[0], abs=1e-6)


def test_a_resumed_run_ends_on_the_same_policy_and_prm(tmp_path, scripted, prm_dir):
    """A 2-iteration run resumed from its first checkpoint (another global seed: only the checkpointed states can
    make it agree) ends with the same policy, reference, PRM weights and labelled rows."""

    def run(name, ckpt_path=None):
        L.seed_everything(0 if ckpt_path is None else 123)
        module, callback = _module(prm_dir), _callback()
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        _trainer(tmp_path / name, [callback, saver]).fit(module, _data(), ckpt_path=ckpt_path)
        return module, callback

    straight, first = run("straight")
    resumed, second = run("resumed", tmp_path / "ckpt" / "step=1.ckpt")
    assert second.iterations == 2 and second.history == first.history
    for a, b in ((straight.policy, resumed.policy), (straight.ref_policy, resumed.ref_policy),
                 (first.scorer.model, second.scorer.model)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_shipped_config_retrains_the_prm_in_a_healthy_run(tmp_path):
    """configs/grpo_iterative_prm.yaml from the console script, from an SFT export and a PRM export built here
    (tiny budgets), shrunk to 4 rollouts of 4 prompts x 8 with an iteration after rollouts 2 and 4 (32 samples,
    2 continuations a step): the PRM is retrained on MC-labelled steps of the policy's own samples, every loss is
    finite, validation runs, and the retrained PRM is exported and differs from the one it started from. (A gain in
    held-out accuracy does not fit this budget; the measured comparison is the benchmark's.)"""
    import math

    from conftest import REPO, run_script, tensorboard_scalars
    from safetensors.torch import load_file

    from rlhf_lightning import SFTModule

    chain = {"num_terms": 4, "max_operand": 20}
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
             "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0, "accelerator": "cpu"}
    L.seed_everything(0)
    sft = PromptDataModule(task="chain", task_kwargs=chain, num_train=4000, num_val=0, batch_size=64,
                           completion_column="completion")
    L.Trainer(max_steps=150, default_root_dir=tmp_path / "sft", **quiet).fit(SFTModule("tiny", lr=3e-3), sft)
    steps = StepwiseDataModule(task="chain", task_kwargs=chain, num_train=2000, num_val=0, batch_size=64)
    L.Trainer(max_steps=30, default_root_dir=tmp_path / "prm", **quiet).fit(ProcessRewardModel("tiny", lr=3e-3), steps)
    prm = tmp_path / "prm" / "hf_model"
    args = ["fit", "--config", str(REPO / "configs" / "grpo_iterative_prm.yaml"),
            "--model.init_args.model_name_or_path", str(tmp_path / "sft" / "hf_model"),
            "--model.init_args.process_reward_model", str(prm), "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size",
            "4", "--data.init_args.num_val", "50", "--data.init_args.val_batch_size", "50",
            "--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.samples_per_iteration",
            "32", "--trainer.callbacks.init_args.num_rollouts", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "X")]
    proc = run_script(args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "X" / "runs" / "grpo_iterative_prm" / "version_0"
    scalars = tensorboard_scalars(run)
    assert scalars["iterative/rm_updates"] == [1.0, 2.0] and scalars["iterative/reference_resets"] == [1.0, 2.0]
    assert all(n > 0 for n in scalars["iterative/mc_continuations"]), scalars["iterative/mc_continuations"]
    assert all(math.isfinite(v) for key in ("iterative/prm_loss", "policy/loss") for v in scalars[key])
    assert 0 <= scalars["val/accuracy"][-1] <= 1
    before, after = load_file(prm / "model.safetensors"), load_file(run / "process_reward_model" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
