"""`make demo`: SFT warm start on built-in addition, then GRPO; prints held-out greedy accuracy after each stage.

Everything runs offline on CPU through the same CLI a user runs:

    rlhf-lightning fit --config configs/sft_arithmetic.yaml
    rlhf-lightning fit --config configs/grpo_arithmetic.yaml --model.init_args.model_name_or_path <sft export>

Outputs land in `demo_out/`: TensorBoard runs (`tensorboard --logdir demo_out`), the two `hf_model/` exports and
`grpo_reward_curve.png`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import cli_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_stage(config: Path, out: Path, name: str, extra: list[str]) -> Path:
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(out),
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", name,
            "--trainer.enable_progress_bar", "false", *extra]
    import sys

    argv, sys.argv = sys.argv, sys.argv[:1]  # the demo's own flags are not LightningCLI's
    try:
        cli = cli_main(args)
    finally:
        sys.argv = argv
    return cli.model.export_dir()


def reward_curve_png(event_dir: Path, png: Path, tag: str = "reward/mean") -> list[tuple[int, float]]:
    """Read a scalar series from TensorBoard event files and plot it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional; the numbers are still printed
        return points
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, alpha=0.35, label="per rollout")
        k = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - k):i + 1]) / len(values[max(0, i - k):i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, label=f"moving mean ({k + 1})")
    ax.set_xlabel("rollout step")
    ax.set_ylabel("mean reward (exact match)")
    ax.set_title("GRPO on built-in addition")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return points


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--sft-steps", type=int, default=None, help="override the SFT config's max_steps")
    parser.add_argument("--grpo-steps", type=int, default=None, help="override the GRPO config's max_steps")
    parser.add_argument("--eval-examples", type=int, default=1000, help="held-out prompts for the accuracy")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for the tiny demo model on a 2-core machine)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from .data.tasks import get_task
    from .evaluation import greedy_accuracy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task("addition", digits=2)
    held_out = task.make_examples(args.eval_examples, seed=424242)  # a seed neither config trains on
    t0 = time.perf_counter()

    sft_extra = ["--trainer.max_steps", str(args.sft_steps)] if args.sft_steps else []
    sft_dir = run_stage(CONFIGS / "sft_arithmetic.yaml", out, "sft", sft_extra)
    acc_sft = greedy_accuracy(str(sft_dir), task, held_out, max_new_tokens=task.max_completion_length + 1)
    t_sft = time.perf_counter() - t0
    print(f"[demo] held-out greedy accuracy after SFT:  {acc_sft:.3f}  ({t_sft:.0f} s)", flush=True)

    grpo_extra = ["--model.init_args.model_name_or_path", str(sft_dir)]
    if args.grpo_steps:
        grpo_extra += ["--trainer.max_steps", str(args.grpo_steps)]
    grpo_dir = run_stage(CONFIGS / "grpo_arithmetic.yaml", out, "grpo", grpo_extra)
    acc_grpo = greedy_accuracy(str(grpo_dir), task, held_out, max_new_tokens=task.max_completion_length + 1)
    t_all = time.perf_counter() - t0
    print(f"[demo] held-out greedy accuracy after GRPO: {acc_grpo:.3f}  ({t_all:.0f} s total)", flush=True)

    png = out / "grpo_reward_curve.png"
    points = reward_curve_png(grpo_dir.parent, png)
    if points:
        print(f"[demo] GRPO train reward: first {points[0][1]:.3f} -> last {points[-1][1]:.3f}; curve: {png}")
    print(f"[demo] TensorBoard: tensorboard --logdir {out}")
    return {"accuracy_sft": acc_sft, "accuracy_grpo": acc_grpo, "seconds": t_all}


if __name__ == "__main__":
    main()
