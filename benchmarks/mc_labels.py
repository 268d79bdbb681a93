"""What Monte-Carlo step labelling costs: wall time of `mc_step_labels` on a policy module, per batch size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mc_labels.py --model tiny --completions 32 --rollouts 8

The completions are the chain task's correct chains and chains with an injected error (every step index in turn),
so every completion has exactly `--terms - 1` steps; `final_step=verify`, so each completion costs
`--rollouts x (steps - 1)` sampled continuations (fewer with dedupe: completions of one prompt share prefixes).
Continuations are sampled by the module's own engine (`module_generate`), at most `--max-new-tokens` each (default:
the task's bound on a whole completion). A random `tiny` policy rarely emits EOS early, so its continuations run
to the budget: the worst case of tokens per continuation. One line per batch size: generate calls, continuations,
sampled tokens, seconds, continuations per second. Timings on a shared machine are noisy: quote ratios.
"""

from __future__ import annotations

import argparse
import time


def injected_error(prompt: str, error_at: int) -> str:
    """The chain's completion with step `error_at`'s result off by one (later steps follow the wrong value)."""
    from rlhf_lightning.rewards import apply_op, parse_chain

    value, terms = parse_chain(prompt)
    lines = []
    for j, (op, term) in enumerate(terms):
        new = apply_op(value, op, term) + (1 if j == error_at else 0)
        lines.append(f"{value}{op}{term}={new}")
        value = new
    return "\n".join(lines)


def counting(generate, tokenizer, budget: int):
    """`generate`, counting its calls, rows and sampled tokens (EOS included where emitted) into `counts`."""
    counts = {"calls": 0, "rows": 0, "tokens": 0}

    def counted(texts: list[str]) -> list[str]:
        out = generate(texts)
        counts["calls"] += 1
        counts["rows"] += len(texts)
        counts["tokens"] += sum(min(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1, budget) for c in out)
        return out

    return counted, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset or HF export dir of the policy")
    parser.add_argument("--completions", type=int, default=32)
    parser.add_argument("--rollouts", type=int, default=8, help="continuations per step (Math-Shepherd's N)")
    parser.add_argument("--terms", type=int, default=4, help="chain terms (steps = terms - 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 64, 8])
    parser.add_argument("--no-dedupe", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from rlhf_lightning import GRPOModule
    from rlhf_lightning.algorithms.mc_labels import mc_step_labels, module_generate
    from rlhf_lightning.data.tasks import ChainArithmeticTask
    from rlhf_lightning.rewards import final_answer_match

    torch.set_num_threads(args.threads)
    task = ChainArithmeticTask(num_terms=args.terms)
    steps = args.terms - 1
    examples = task.make_examples(args.completions, seed=0)
    prompts = [ex["prompt"] for ex in examples]
    completions = [injected_error(p, i % (steps + 1)) for i, p in enumerate(prompts)]  # error at `steps` = none
    answers = [ex["answer"] for ex in examples]
    budget = args.max_new_tokens or task.max_completion_length
    print(f"model={args.model} completions={args.completions} steps={steps} rollouts={args.rollouts} "
          f"max_new_tokens={budget} threads={args.threads} dedupe={not args.no_dedupe}")
    print("| batch_size | generate calls | continuations | sampled tokens | seconds | continuations/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        module = GRPOModule(args.model, max_new_tokens=budget, sample_seed=0)
        generate, counts = counting(module_generate(module), module.tokenizer, budget)
        t0 = time.perf_counter()
        mc_step_labels(generate, prompts, completions, final_answer_match, {"answer": answers},
                       num_rollouts=args.rollouts, batch_size=batch_size, dedupe=not args.no_dedupe)
        seconds = time.perf_counter() - t0
        print(f"| {batch_size} | {counts['calls']} | {counts['rows']} | {counts['tokens']} | {seconds:.2f} | "
              f"{counts['rows'] / seconds:.0f} |")


if __name__ == "__main__":
    main()
