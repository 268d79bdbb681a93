"""DeepSeekMath Fig. 5, measured here: GRPO with process supervision vs outcome supervision on the chain task.

From ONE SFT warm start and the same rollout budget and seeds, four GRPO runs of the shipped configs through the
console script (`rlhf-lightning fit`, as a user runs them):

    outcome            configs/grpo_process_prm.yaml with `supervision: outcome`, `reward_fns: [chain_final_correct]`
                       (1 if the completion's last number is the chain's value)
    process_verifier   the same with `supervision: process`, `reward_fns: [chain_process_rewards]` (the exact step
                       verifier on every line, then the end step: the outcome)
    process_verifier_no_end   the ablation: `reward_fns: [chain_step_rewards]`, the lines only, no end step
    process_prm        configs/grpo_process_prm.yaml as shipped: every step's reward is the trained PRM's
                       P(correct) (and its end step's), no verifier in the reward
    iterative_prm      configs/grpo_iterative_prm.yaml: the same, and the PRM is retrained on Monte-Carlo labels of
                       fresh policy samples during RL (DeepSeekMath Algorithm 1); it samples more than the others

Held-out accuracy: greedy completions of `--eval-prompts` chains drawn with their own seed (424242; the training
prompts are drawn from 1.28M possible chains, so an overlap is negligible), graded by the task's verifier, before
(the warm start) and after each run. Wall time: each `fit` as a whole (sampling, scoring, training; validation is
off). Without `--warm-start` / `--prm` it first trains them with configs/sft_chain.yaml / configs/prm_chain.yaml.

    .venv/bin/python benchmarks/process_vs_outcome.py --warm-start runs/sft_chain/version_0/hf_model \\
        --prm runs/prm_chain/version_0/hf_model --rollouts 600 --seeds 0 1

Writes results.json and results.md to `--out`, prints the table. It asserts nothing: it measures and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "outcome": ("grpo_process_prm.yaml", ["--model.init_args.supervision", "outcome",
                                          "--model.init_args.reward_fns", "[chain_final_correct]",
                                          "--model.init_args.process_reward_model", "null",
                                          "--model.init_args.process_reward_aggregation", "null"]),
    "process_verifier": ("grpo_process_prm.yaml", ["--model.init_args.reward_fns", "[chain_process_rewards]",
                                                   "--model.init_args.process_reward_model", "null",
                                                   "--model.init_args.process_reward_aggregation", "null"]),
    "process_verifier_no_end": ("grpo_process_prm.yaml", ["--model.init_args.reward_fns", "[chain_step_rewards]",
                                                          "--model.init_args.process_reward_model", "null",
                                                          "--model.init_args.process_reward_aggregation", "null"]),
    "process_prm": ("grpo_process_prm.yaml", ["--model.init_args.process_reward_model", "{prm}"]),
    "iterative_prm": ("grpo_iterative_prm.yaml", ["--model.init_args.process_reward_model", "{prm}"]),
}
TERMS, MAX_OPERAND, EVAL_SEED, MAX_NEW_TOKENS = 4, 20, 424242, 33


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/process_vs_outcome"))
    p.add_argument("--warm-start", type=Path, default=None, help="SFT hf_model/ export (default: train one)")
    p.add_argument("--prm", type=Path, default=None, help="ProcessRewardModel hf_model/ export (default: train one)")
    p.add_argument("--rollouts", type=int, default=600, help="GRPO rollouts (optimizer steps) per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=[a for a in ARMS if a != "process_verifier_no_end"], choices=list(ARMS))
    p.add_argument("--eval-prompts", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def fit(config: str, overrides: list[str], root: Path, threads: int) -> tuple[Path, float]:
    """`rlhf-lightning fit --config configs/<config> <overrides>` under `root`: (its hf_model export, wall s)."""
    shutil.rmtree(root, ignore_errors=True)
    script = Path(sys.executable).with_name("rlhf-lightning")
    cmd = [str(script), "fit", "--config", str(REPO / "configs" / config), *overrides,
           "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    exports = sorted(root.glob("runs/*/version_*/hf_model"))
    if not exports:
        raise SystemExit(f"{' '.join(cmd)} wrote no hf_model export under {root}")
    return exports[-1], wall


def held_out_accuracy(model_dir: Path, n: int) -> float:
    from rlhf_lightning.data.tasks import get_task
    from rlhf_lightning.evaluation import greedy_accuracy

    task = get_task("chain", num_terms=TERMS, max_operand=MAX_OPERAND)
    return greedy_accuracy(str(model_dir), task, task.make_examples(n, seed=EVAL_SEED), max_new_tokens=MAX_NEW_TOKENS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    warm, prm, setup = args.warm_start, args.prm, {}
    if warm is None:
        warm, setup["sft_wall_s"] = fit("sft_chain.yaml", [], args.out / "sft", args.threads)
    if prm is None:
        prm, setup["prm_wall_s"] = fit("prm_chain.yaml", [], args.out / "prm", args.threads)
    before = held_out_accuracy(warm, args.eval_prompts)
    runs = []
    for arm in args.arms:
        config, overrides = ARMS[arm]
        for seed in args.seeds:
            extra = [o.format(prm=prm.resolve()) for o in overrides] + [
                "--model.init_args.model_name_or_path", str(warm.resolve()), "--seed_everything", str(seed),
                "--trainer.max_steps", str(args.rollouts), "--trainer.limit_val_batches", "0"]
            export, wall = fit(config, extra, args.out / f"{arm}_seed{seed}", args.threads)
            runs.append({"arm": arm, "seed": seed, "after": held_out_accuracy(export, args.eval_prompts),
                         "wall_s": wall})
            print(f"{arm} seed {seed}: {runs[-1]['after']:.3f} in {wall:.0f} s", flush=True)
    table = markdown(args, before, runs)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "warm_start": str(warm), "prm": str(prm), "before": before,
                                                       "setup": setup, "runs": runs}, indent=2))
    (args.out / "results.md").write_text(table)
    print(table)


def markdown(args: argparse.Namespace, before: float, runs: list[dict]) -> str:
    lines = [f"Chain task ({TERMS} terms, operands 1..{MAX_OPERAND}); {args.rollouts} rollouts of 16 prompts x 8 per "
             f"run; held-out greedy accuracy on {args.eval_prompts} prompts; warm start {before:.3f}.", "",
             "| GRPO reward | held-out accuracy after (mean) | per seed | change | wall time per run |",
             "| --- | --- | --- | --- | --- |"]
    for arm in args.arms:
        got = [r for r in runs if r["arm"] == arm]
        accs = [r["after"] for r in got]
        mean = statistics.mean(accs)
        spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        per_seed = " / ".join(f"{a:.3f}" for a in accs)
        wall = statistics.mean(r["wall_s"] for r in got)
        lines.append(f"| {arm} | {mean:.3f}{spread} | {per_seed} | {mean - before:+.3f} | {wall / 60:.1f} min |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
