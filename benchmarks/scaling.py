"""What precision, gradient checkpointing and LoRA buy end to end: GRPO steps on one process, one setting per run.

    .venv/bin/python benchmarks/scaling.py --preset small --completions 64 --tokens 64 --steps 5 --threads 1
    .venv/bin/python benchmarks/scaling.py --settings fp32 fp32+gc          # only some rows

Every setting is the same GRPO run (built-in addition prompts, group 8, forced completion length
min_new_tokens = max_new_tokens = --tokens, beta > 0 so a reference pass runs, one optimizer step per rollout),
changing only the Trainer precision (`32-true`, `bf16-true`, `bf16-mixed`), `gradient_checkpointing` or `lora`.
Each runs in a fresh process, so its peak RSS (resource.getrusage max RSS: weights + optimizer + activations +
the Python / torch runtime) is its own. The first `--warmup` rollouts are excluded from the timings. On a shared
machine timings are noisy: quote ratios, and rerun at a quiet moment.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

# benchmarks/ is on sys.path when run as a script
from _common import add_rollout_args, addition_prompt_data, parse_rollout_args, run_child, step_timer

SETTINGS = {
    "fp32": {"precision": "32-true"},
    "bf16-true": {"precision": "bf16-true"},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "fp32+gc": {"precision": "32-true", "gradient_checkpointing": True},
    "fp32+lora": {"precision": "32-true", "lora": {"r": 8, "alpha": 16}},
}


def run_one(name: str, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from rlhf_lightning import GRPOModule

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    setting = SETTINGS[name]
    module = GRPOModule(args.preset, reward_fns=["rlhf_lightning.rewards.exact_match"], group_size=args.group_size,
                        beta=0.04, max_new_tokens=args.tokens, min_new_tokens=args.tokens, lr=1e-5,
                        log_samples_every_n_steps=0, lora=setting.get("lora"),
                        gradient_checkpointing=setting.get("gradient_checkpointing", False))
    prompts = args.completions // args.group_size
    timer = step_timer(("perf/generation_s", "perf/training_s"))
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        precision=setting["precision"], default_root_dir="/tmp/rlhf_scaling_bench")
    trainer.fit(module, addition_prompt_data(prompts, args.steps))
    steady = timer.rows[args.warmup:]

    def mean(key: str) -> float:
        return sum(r[key] for r in steady) / len(steady)

    return {"setting": name, "s_per_step": mean("s"), "generation_s": mean("perf/generation_s"),
            "training_s": mean("perf/training_s"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_args(parser, steps=5, warmup=1, threads=1)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--one", choices=sorted(SETTINGS), help=argparse.SUPPRESS)  # internal: child process
    args = parse_rollout_args(parser)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    child_args = list(sys.argv[1:])
    if "--settings" in child_args:  # the child runs one setting; drop the list
        i = child_args.index("--settings")
        child_args = child_args[:i] + child_args[i + 1 + len(args.settings):]
    rows = []
    for name in args.settings:
        rows.append(run_child(__file__, child_args, name))
    print(f"GRPO, preset {args.preset}, {args.completions} completions x {args.tokens} tokens per step, "
          f"{args.threads} thread(s), mean of {args.steps - args.warmup} steps\n")
    print("| setting | s / step | generation s | training s | peak RSS (MiB) | trainable params |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['setting']} | {r['s_per_step']:.2f} | {r['generation_s']:.2f} | {r['training_s']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {r['trainable'] / 1e6:.2f} M |")


if __name__ == "__main__":
    main()
