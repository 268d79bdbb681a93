"""What a trained process reward model finds: step accuracy, recall of wrong steps and false alarms on held-out chains
with one kind of injected error each, and on a policy's own samples (the truth: the exact step verifier).

    .venv/bin/python benchmarks/prm_step_errors.py --prm runs/prm_chain/version_0/hf_model \
        --policy runs/sft_chain/version_0/hf_model

Prints one markdown table (docs/process_reward_model.md quotes it). A step counts as "called wrong" when its
P(correct) is <= 0.5; "first error found": the first step called wrong is the first wrong one (none = none). A PRM
trained on end steps (`scores_end`) is scored on each chain's end too, against the outcome (`chain_process_rewards`).
"""

from __future__ import annotations

import argparse


def step_stats(scores: list[list[float]], truth: list[list[bool]]) -> dict[str, float]:
    """Accuracy on the last step (the end step, when the PRM scores ends), step accuracy, share of right steps (the
    majority baseline), recall of wrong steps, false alarms on right steps, first error found, from P(correct) per
    step and the true labels."""
    pairs = [(s > 0.5, t) for ss, tt in zip(scores, truth) for s, t in zip(ss, tt)]
    wrong = [p for p, t in pairs if not t]
    right = [p for p, t in pairs if t]
    first = sum(_first(s > 0.5 for s in ss) == _first(tt) for ss, tt in zip(scores, truth))
    ends = [(ss[-1] > 0.5) == tt[-1] for ss, tt in zip(scores, truth)]
    return {"step accuracy": sum(p == t for p, t in pairs) / len(pairs), "right steps": len(right) / len(pairs),
            "recall of wrong": sum(not p for p in wrong) / max(len(wrong), 1),
            "false alarms": sum(not p for p in right) / max(len(right), 1), "first error found": first / len(truth),
            "last step accuracy": sum(ends) / len(ends)}


def _first(right) -> int:
    """Index of the first step that is not right (the number of steps when all are)."""
    right = list(right)
    return next((i for i, ok in enumerate(right) if not ok), len(right))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prm", required=True, help="a ProcessRewardModel hf_model export")
    parser.add_argument("--policy", help="a causal LM whose own samples are scored too (e.g. the SFT export)")
    parser.add_argument("--num-terms", type=int, default=4)
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=424242, help="the held-out prompts' seed (not a training seed)")
    args = parser.parse_args(argv)

    import torch

    from rlhf_lightning.data.negatives import make_stepwise_rows
    from rlhf_lightning.data.tasks import get_task
    from rlhf_lightning.evaluation import complete, load_policy
    from rlhf_lightning.rewards import ProcessRewardModelSource, chain_process_rewards, chain_step_rewards

    task = get_task("chain", num_terms=args.num_terms, max_operand=args.max_operand)
    source = ProcessRewardModelSource(args.prm, batch_size=256)
    examples = task.make_examples(args.prompts, seed=args.seed)
    prompts = [e["prompt"] for e in examples]
    rows: dict[str, dict[str, float]] = {}
    for kind in ("random", "digit", "near"):
        stepwise = make_stepwise_rows(task, examples, 0.5, {kind: 1.0}, seed=5, end_step=source.score_end)
        completions = ["\n".join(r["completions"][:-1] if source.score_end else r["completions"]) for r in stepwise]
        rows[f"{kind} errors (half the chains)"] = step_stats(source.step_scores(prompts, completions),
                                                              [r["labels"] for r in stepwise])
    if args.policy:
        model, tokenizer = load_policy(args.policy)
        budget = task.max_completion_length + 1
        for name, generator in (("policy samples, T = 1", torch.Generator().manual_seed(0)), ("policy greedy", None)):
            completions = complete(model, tokenizer, prompts, budget, generator=generator)
            verifier = chain_process_rewards if source.score_end else chain_step_rewards  # with the end step or not
            truth = [[v == 1 for v in r] for r in verifier(prompts, completions)]
            rows[name] = step_stats(source.step_scores(prompts, completions), truth)
    columns = list(next(iter(rows.values())))
    print("| chains | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for name, stats in rows.items():
        print(f"| {name} | " + " | ".join(f"{stats[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
