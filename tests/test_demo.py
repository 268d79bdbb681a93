"""`make demo` wiring: SFT -> GRPO through the CLI, accuracy lines, TensorBoard runs and the reward-curve PNG."""

from __future__ import annotations

from rlhf_lightning.demo import main


def test_demo_pipeline_runs_end_to_end(tmp_path, capsys):
    result = main(["--out", str(tmp_path), "--sft-steps", "30", "--grpo-steps", "3", "--eval-examples", "50"])
    out = capsys.readouterr().out
    assert "accuracy after SFT" in out and "accuracy after GRPO" in out
    assert 0.0 <= result["accuracy_sft"] <= 1.0 and 0.0 <= result["accuracy_grpo"] <= 1.0
    assert (tmp_path / "grpo_reward_curve.png").stat().st_size > 1000
    assert list((tmp_path / "grpo").glob("version_0/events.out.tfevents.*"))
    assert (tmp_path / "grpo" / "version_0" / "hf_model" / "config.json").exists()
