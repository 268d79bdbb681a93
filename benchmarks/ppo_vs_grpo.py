"""The seed paper's claim, measured: GRPO (no critic) vs PPO (actor + critic) at equal policy size and equal
completions per step. Prints peak memory (max RSS of a fresh process per run) and steady-state seconds per rollout.

    .venv/bin/python benchmarks/ppo_vs_grpo.py --preset small --completions 64 --tokens 64 --steps 6

Fairness: same preset, same prompts (built-in addition), the same number of completions per rollout
(GRPO: completions / group_size prompts x group_size; PPO: `completions` prompts x 1), the same forced completion
length (min_new_tokens = max_new_tokens), one optimizer pass per rollout (num_iterations / ppo_epochs = 1,
minibatches = 1), fp32, beta > 0 for both (so both run a reference model). PPO's critic is `separate` (its own
backbone, the InstructGPT set-up the seed paper compares against). The first `--warmup` rollouts are excluded.
Each run is its own process, so the peak RSS is that run's alone. Timings on a shared machine are noisy: quote ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

# benchmarks/ is on sys.path when run as a script
from _common import add_rollout_args, addition_prompt_data, parse_rollout_args, run_child, step_timer


def run_one(algo: str, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from rlhf_lightning import GRPOModule, PPOModule

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    common = dict(model_name_or_path=args.preset, reward_fns=["rlhf_lightning.rewards.exact_match"],
                  max_new_tokens=args.tokens, min_new_tokens=args.tokens, lr=1e-5)
    if algo == "grpo":
        module = GRPOModule(group_size=args.group_size, beta=0.04, num_iterations=1, minibatches=1,
                            log_samples_every_n_steps=0, **common)
        prompts = args.completions // args.group_size
        steps_per_rollout = 1
    else:
        module = PPOModule(critic="separate", kl_coef=0.05, ppo_epochs=1, minibatches=1, **common)
        prompts = args.completions
        steps_per_rollout = 2  # both optimizers count in trainer.global_step
    timer = step_timer()
    trainer = L.Trainer(max_steps=args.steps * steps_per_rollout, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer], default_root_dir="/tmp/ppo_vs_grpo")
    trainer.fit(module, addition_prompt_data(prompts, args.steps))
    steady = [row["s"] for row in timer.rows[args.warmup:]]
    params = sum(p.numel() for p in module.parameters())
    return {"algo": algo, "s_per_rollout": sum(steady) / len(steady), "rollouts_timed": len(steady),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "parameters": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_args(parser, steps=6, warmup=2, threads=2)  # --completions: per rollout, for both
    parser.add_argument("--one", choices=["grpo", "ppo"], help=argparse.SUPPRESS)  # internal: child process
    args = parse_rollout_args(parser)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    rows = []
    for algo in ("grpo", "ppo"):
        rows.append(run_child(__file__, sys.argv[1:], algo))
    grpo, ppo = rows
    print(f"preset {args.preset}, {args.completions} completions x {args.tokens} tokens per rollout, fp32, "
          f"{args.threads} threads\n")
    print("| algorithm | parameters held | s / rollout | peak RSS (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['algo']} | {r['parameters'] / 1e6:.2f} M | {r['s_per_rollout']:.2f} | {r['peak_rss_mib']:.0f} |")
    print(f"\nPPO / GRPO: time {ppo['s_per_rollout'] / grpo['s_per_rollout']:.2f}x, "
          f"peak memory {ppo['peak_rss_mib'] / grpo['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
