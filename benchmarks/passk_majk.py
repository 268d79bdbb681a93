"""DeepSeekMath's reading of RL (§5.2.2, Fig. 7), measured here: RL raises Maj@K but not Pass@K ("it makes the
output distribution more robust" rather than adding capability). From one SFT warm start, GRPO on a built-in
task; pass@k and maj@k for k = 1..n (n samples per held-out prompt) before and after RL.

    .venv/bin/python benchmarks/passk_majk.py --out bench_out/passk_majk        # docs/evaluation.md's figure
    .venv/bin/python benchmarks/passk_majk.py --out bench_out/passk_majk_sft500 --sft-steps 500 --grpo-steps 2000
    .venv/bin/python benchmarks/passk_majk.py --warm-start runs/sft_arithmetic/version_0/hf_model --grpo-steps 5000

Without `--warm-start` it first trains one with `SFTModule` through the Python API (`--sft-steps` with
configs/sft_arithmetic.yaml's hyperparameters: 1000 is the demo's warm start, fewer leave more room for RL). GRPO
then takes configs/grpo_arithmetic.yaml's hyperparameters for `--grpo-steps` rollouts. Both policies are evaluated
by the library's own sampled evaluation (`SFTModule(eval_num_samples=n, eval_k=[1..n])` under `trainer.validate`,
temperature `--temperature`, the task's verifier), on the same `--eval-prompts` held-out prompts with the same
evaluation seed. Writes to `--out`: results.json (arguments, timings, every metric), results.md (the table) and
passk_majk.png (the plot). It asserts nothing: it measures and reports.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TABLE_KS = (1, 2, 4, 8, 16, 32, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/passk_majk"))
    p.add_argument("--warm-start", type=Path, default=None, help="an SFT hf_model/ export (default: train one)")
    p.add_argument("--sft-steps", type=int, default=1000)
    p.add_argument("--grpo-steps", type=int, default=3000, help="GRPO rollouts (one optimizer step each)")
    p.add_argument("--samples", type=int, default=64, help="n: completions per held-out prompt")
    p.add_argument("--eval-prompts", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def config(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / name).read_text())


def trainer(root: Path, **kw):
    import lightning as L

    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", devices=1, default_root_dir=str(root), **kw)


def sft_warm_start(args: argparse.Namespace) -> Path:
    import lightning as L

    from rlhf_lightning import PromptDataModule, SFTModule

    cfg = config("sft_arithmetic.yaml")
    L.seed_everything(args.seed)
    model = SFTModule(**cfg["model"]["init_args"])
    trainer(args.out / "sft", max_steps=args.sft_steps, limit_val_batches=0).fit(
        model, PromptDataModule(**cfg["data"]["init_args"]))
    return args.out / "sft" / "hf_model"


def grpo(args: argparse.Namespace, warm: Path) -> Path:
    import lightning as L

    from rlhf_lightning import GRPOModule, PromptDataModule

    cfg = config("grpo_arithmetic.yaml")
    L.seed_everything(args.seed)
    model = GRPOModule(**{**cfg["model"]["init_args"], "model_name_or_path": str(warm),
                          "log_samples_every_n_steps": 0})
    trainer(args.out / "grpo", max_steps=args.grpo_steps, limit_val_batches=0).fit(
        model, PromptDataModule(**cfg["data"]["init_args"]))
    return args.out / "grpo" / "hf_model"


def sampled_metrics(args: argparse.Namespace, policy: Path) -> dict[str, float]:
    """val/pass@k and val/maj@k for k = 1..n of `policy` on the held-out prompts (the library's evaluation)."""
    from rlhf_lightning import PromptDataModule, SFTModule

    data = dict(config("grpo_arithmetic.yaml")["data"]["init_args"])
    data.update(num_train=1, num_val=args.eval_prompts, val_batch_size=min(50, args.eval_prompts))
    model = SFTModule(str(policy), val_max_new_tokens=8, eval_num_samples=args.samples,
                      eval_k=list(range(1, args.samples + 1)), eval_temperature=args.temperature,
                      eval_seed=args.seed)
    out = trainer(args.out / "eval").validate(model, PromptDataModule(**data), verbose=False)[0]
    return {k.removeprefix("val/"): float(v) for k, v in out.items()}


def table(results: dict[str, dict[str, float]], ks: list[int]) -> str:
    before, after = results["sft"], results["grpo"]
    lines = [f"greedy accuracy: SFT {before['accuracy']:.3f}, SFT + GRPO {after['accuracy']:.3f}", "",
             "| k | pass@k SFT | pass@k SFT+GRPO | Δ pass@k | maj@k SFT | maj@k SFT+GRPO | Δ maj@k |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in ks:
        p0, p1, m0, m1 = before[f"pass@{k}"], after[f"pass@{k}"], before[f"maj@{k}"], after[f"maj@{k}"]
        lines.append(f"| {k} | {p0:.3f} | {p1:.3f} | {p1 - p0:+.3f} | {m0:.3f} | {m1:.3f} | {m1 - m0:+.3f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, n + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("maj", "pass")):
        for name, label, style in (("sft", "SFT", "--"), ("grpo", "SFT + GRPO", "-")):
            ax.plot(ks, [results[name][f"{metric}@{k}"] for k in ks], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (samples)")
        ax.set_title(f"{metric.capitalize()}@K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on held-out prompts")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    warm = args.warm_start or sft_warm_start(args)
    times["sft_s"] = time.perf_counter() - t0
    results = {}
    t0 = time.perf_counter()
    results["sft"] = sampled_metrics(args, warm)
    times["eval_sft_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = grpo(args, warm)
    times["grpo_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["grpo"] = sampled_metrics(args, tuned)
    times["eval_grpo_s"] = time.perf_counter() - t0
    ks = [k for k in TABLE_KS if k <= args.samples]
    md = table(results, ks)
    (args.out / "results.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "times": times, "results": results}, indent=1))
    plot(results, args.samples, args.out / "passk_majk.png")
    print(md)
    print(f"[bench] times: {json.dumps({k: round(v, 1) for k, v in times.items()})}; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
