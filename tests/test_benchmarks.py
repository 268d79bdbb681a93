"""The throughput benchmark's arithmetic and argument checks (its timings are not tested: no timed assertions), and
the pass@k / maj@k benchmark end to end at a toy budget."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import passk_majk  # noqa: E402  (benchmarks/ is a script directory, not a package)
import throughput  # noqa: E402


def test_step_flops_hand_computed() -> None:
    """hidden 2, 1 layer, MLP 3, 1 head (kv 1), vocab 5; 1 row, prompt 1 token, 2 new tokens.

    per token: linear 2 * (q 4 + k,v 8 + o 4 + MLP 18) = 68, LM head 2*2*5 = 20, attention 4*1*2*ctx = 8 ctx.
    sampling: prefill 68 + 8*0.5 + head 20 = 92; decode token 1 (ctx 2): 68 + 16 + 20 = 104.  -> 196
    full forward (length 3, mean ctx 1.5, 3 logit positions): 3 * (68 + 12) + 3 * 20 = 300.
    GRPO-like step (1 no-grad pass, 1 trained pass = 3 forwards): 196 + 300 * (1 + 3) = 1396.
    """
    config = SimpleNamespace(hidden_size=2, num_hidden_layers=1, intermediate_size=3, num_attention_heads=1,
                             num_key_value_heads=1, vocab_size=5, head_dim=None)
    assert throughput.step_flops(config, rows=1, prompt_len=1, tokens=2, no_grad_passes=1, train_passes=1) == 1396
    # rows scale everything linearly; a second trained pass adds 3 forwards
    assert throughput.step_flops(config, 4, 1, 2, 1, 1) == 4 * 1396
    assert throughput.step_flops(config, 1, 1, 2, 1, 2) == 1396 + 3 * 300


@pytest.mark.parametrize("argv, culprit", [
    (["--algos", "dpo"], "--algos"), (["--sizes", "large"], "--sizes"), (["--precisions", "fp16"], "--precisions"),
    (["--systems", "vllm"], "--systems"), (["--rounds", "0"], "--rounds"), (["--measure", "0"], "--measure"),
])
def test_bad_arguments_name_the_flag(argv: list[str], culprit: str, capsys) -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(argv)
    assert culprit in capsys.readouterr().err.strip().splitlines()[-1]


def test_phase_means_use_only_measured_steps() -> None:
    """Cumulative phase seconds at each step's end -> mean per measured step (warm-up steps excluded)."""
    snapshots = [{"generation": 10.0}, {"generation": 11.0}, {"generation": 13.0}]
    assert throughput._phase_means(snapshots, first=1) == {"generation": 1.5}
    assert throughput._phase_means(snapshots, first=0) == {"generation": 13.0 / 3}
    assert throughput._phase_means(snapshots, first=3) == {}


@pytest.mark.slow
def test_passk_majk_writes_its_table_and_plot(tmp_path) -> None:
    """SFT warm start, GRPO, both evaluated for k = 1..4: the files exist, and pass@k never falls with k."""
    results = passk_majk.main(["--out", str(tmp_path), "--sft-steps", "10", "--grpo-steps", "2", "--samples", "4",
                               "--eval-prompts", "8"])
    assert {p.name for p in tmp_path.iterdir()} >= {"results.md", "results.json", "passk_majk.png"}
    assert "| 4 |" in (tmp_path / "results.md").read_text()
    for name in ("sft", "grpo"):
        passes = [results[name][f"pass@{k}"] for k in range(1, 5)]
        assert passes == sorted(passes) and set(results[name]) >= {"accuracy", "maj@1", "maj@4"}
