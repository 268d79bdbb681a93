"""What a user sees in TensorBoard: short GRPO and PPO runs of the README's configs, read back from the event files.

Each run is the README command (`rlhf-lightning fit --config configs/<algo>_arithmetic.yaml`) shortened to three
rollouts of four prompts, with one validation at the end, so the test covers the shipped configs too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from rlhf_lightning.cli import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METRICS_DOC = CONFIGS.parent / "docs" / "metrics.md"
ROLLOUTS = 3
NAMESPACES = ("rollout/", "reward/", "policy/", "value/", "perf/", "val/")

COMMON = ["rollout/completion_len_mean", "rollout/completion_len_max", "rollout/truncated_frac",
          "reward/mean", "reward/std", "reward/exact_match", "reward/exact_match_std", "reward/missing_frac",
          "policy/kl", "policy/entropy", "policy/clip_frac_low", "policy/clip_frac_high", "policy/approx_kl",
          "policy/loss", "policy/grad_norm", "policy/lr", "policy/advantage_abs_mean",
          "perf/tokens_per_s", "perf/generation_s", "perf/training_s", "perf/rollouts", "perf/optimizer_steps"]
GRPO_ONLY = ["rollout/zero_std_group_frac"]
PPO_ONLY = ["value/loss", "value/explained_variance", "value/clip_frac", "value/grad_norm", "value/lr",
            "policy/kl_coef", "policy/kl_seq", "reward/score", "reward/non_score", "policy/total_loss"]


def _run(config: str, tmp_path: Path, monkeypatch, *extra: str) -> tuple[EventAccumulator, object]:
    """The README command for `config`, three rollouts long, logging under tmp_path; its events, reloaded."""
    monkeypatch.chdir(tmp_path)  # the configs log to ./runs
    monkeypatch.setattr("sys.argv", ["rlhf-lightning"])  # only `args` reach the CLI
    cli = cli_main(["fit", "--config", str(CONFIGS / config), "--data.init_args.batch_size", "4",
                    "--data.init_args.num_val", "8", "--data.init_args.val_batch_size", "8",
                    "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", str(ROLLOUTS),
                    "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
                    "--trainer.enable_progress_bar", "false", "--model.init_args.log_samples_every_n_steps", "2",
                    *extra])
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    events.Reload()
    return events, cli


def _check_common(events: EventAccumulator, required: list[str]) -> None:
    scalars = set(events.Tags()["scalars"])
    assert len(scalars) >= 10, sorted(scalars)
    for tag in required:
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
        # once per rollout; the x-axis is the rollout index
        assert [e.step for e in events.Scalars(tag)] == list(range(ROLLOUTS)), tag
    # every key sits in one of the documented namespaces (hp_metric / epoch are Lightning's own)
    stray = [t for t in scalars if not t.startswith(NAMESPACES) and t not in ("hp_metric", "epoch")]
    assert not stray, stray
    assert "val/reward" in scalars and "val/accuracy" in scalars
    # ... and docs/metrics.md explains every one (per-function keys as `reward/<function>`)
    metrics_doc = METRICS_DOC.read_text()
    generic = {t.replace("exact_match", "<function>") for t in scalars}
    undocumented = sorted(t for t in generic if f"`{t}`" not in metrics_doc and t != "epoch")
    assert not undocumented, f"docs/metrics.md does not explain {undocumented}"

    # the sample table: the 1st and 3rd rollout with log_samples_every_n_steps=2
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [0, 2]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | completion | answer | reward | advantage |") and "+" in table  # "a+b="
    assert table.count("\n") >= 5  # header, separator and the rows of 4 prompts

    # histograms of rewards (exact_match: 0/1) and advantages on the same rollouts
    for tag in ("reward/histogram", "policy/advantage_histogram"):
        hist = events.Histograms(tag)
        assert [h.step for h in hist] == [0, 2], tag
        assert hist[0].histogram_value.num > 0
    rewards = events.Histograms("reward/histogram")[0].histogram_value
    assert -1.0 <= rewards.min <= rewards.max <= 1.0  # exact_match, minus PPO's missing-EOS penalty of 1

    # HParams tab: the hyperparameters and a final metric = the last rollout's reward/mean
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams  # the module's and the datamodule's, merged
    assert hparams["lr"].number_value > 0 and hparams["task"].string_value == "addition"
    final = events.Scalars("hp_metric")[-1]
    assert final.value == pytest.approx(events.Scalars("reward/mean")[-1].value)


def test_grpo_run_writes_scalars_samples_histograms_hparams(tmp_path, monkeypatch):
    # beta > 0 (the paper's 0.04; the demo config uses 0) so the KL series are written too
    events, cli = _run("grpo_arithmetic.yaml", tmp_path, monkeypatch, "--trainer.max_steps", str(ROLLOUTS),
                       "--model.init_args.beta", "0.04")
    _check_common(events, COMMON + GRPO_ONLY)
    assert cli.model.rollouts == ROLLOUTS
    assert "reward" in cli.trainer.progress_bar_metrics and "kl" in cli.trainer.progress_bar_metrics


def test_ppo_run_writes_scalars_samples_histograms_hparams(tmp_path, monkeypatch):
    # max_steps counts actor + critic steps: 2 optimizers x 2 minibatches per rollout in ppo_arithmetic.yaml
    events, cli = _run("ppo_arithmetic.yaml", tmp_path, monkeypatch, "--trainer.max_steps", str(4 * ROLLOUTS))
    _check_common(events, COMMON + PPO_ONLY)
    assert cli.model.rollouts == ROLLOUTS
    assert "reward" in cli.trainer.progress_bar_metrics and "kl" in cli.trainer.progress_bar_metrics



SAME_KEYS = [["reward/mean", "rollout/completion_len_max"]] * 2
OTHER_KEYS = [["reward/mean", "reward/a"], ["reward/mean", "reward/b"]]


def _reduce_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: reduce values rank+1 for SAME_KEYS, then for OTHER_KEYS; results (or errors) to <rank>.json."""
    import json

    import torch
    import torch.distributed as dist

    from rlhf_lightning.modules.step_logging import reduce_step_metrics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results: list[object] = []
    try:
        for keys_by_rank in (SAME_KEYS, OTHER_KEYS):
            keys = keys_by_rank[rank]
            try:
                results.append(reduce_step_metrics(keys, torch.full((len(keys),), float(rank + 1))).tolist())
            except ValueError as error:
                results.append(str(error))
        Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch + lightning: ~15 s idle, ~40 s on a busy 2-core machine
def test_step_metrics_reduce_over_two_processes(tmp_path):
    """Two gloo processes: means, `_max` keys max-reduced, and a one-line error when ranks log different keys."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # every rank gets the same answer, and the same error
        same, other = json.loads((tmp_path / f"{rank}.json").read_text())
        assert same == pytest.approx([1.5, 2.0])
        assert "ranks logged different metric keys" in other and "reward/" in other
