"""Held-out greedy accuracy of a saved policy on a built-in task (what the demo and the benchmarks report), the
sampler it uses (also what `PreferenceDataModule`'s `policy` negatives sample with), and the sampled metrics of
one prompt: `pass_at_k` (Chen et al. 2021's unbiased estimator) and `maj_at_k` (majority vote over answers), the
per-prompt values behind `val/pass@k` / `val/maj@k` (docs/evaluation.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .models import load_causal_lm
from .rewards import call_reward_fns
from .rollout import decode_completions, left_pad, sample
from .tokenizer import load_tokenizer


def load_policy(model_or_path, tokenizer=None):
    """(model in eval mode, tokenizer) from a `save_pretrained` directory / preset / hub id, or a model as is."""
    if isinstance(model_or_path, str):
        tokenizer = load_tokenizer(model_or_path)
        model_or_path = load_causal_lm(model_or_path, tokenizer)
    return model_or_path.eval(), tokenizer


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256,
             generator: torch.Generator | None = None) -> list[str]:
    """Completions of `prompts`, `batch_size` at a time: greedy without `generator`, else sampled at temperature 1
    with it (the plain policy, as PPO's and GRPO's rollouts sample it)."""
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        ids, mask = left_pad(enc, tokenizer.pad_token_id)  # [B, P]
        s = sample(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   do_sample=generator is not None, generator=generator)
        out += decode_completions(tokenizer, s.completion_ids, s.completion_mask)
    return out


def verify(task, examples: list[dict], completions: list[str]) -> list[bool]:
    """Whether the task's first verifier scores each completion of `examples` 1.0."""
    columns = {k: [ex[k] for ex in examples] for k in examples[0] if k != "prompt"} if examples else {}
    _, per_fn = call_reward_fns(task.reward_fns[:1], None, [ex["prompt"] for ex in examples], completions, columns)
    return [bool(v == 1) for v in per_fn[0]]


def greedy_accuracy(model_or_path, task, examples: list[dict], max_new_tokens: int = 16, batch_size: int = 256,
                    tokenizer=None) -> float:
    """Fraction of `examples` whose greedy completion the task's first verifier scores 1.0."""
    model, tokenizer = load_policy(model_or_path, tokenizer)
    completions = complete(model, tokenizer, [ex["prompt"] for ex in examples], max_new_tokens, batch_size)
    return sum(verify(task, examples, completions)) / max(len(examples), 1) if examples else 0.0


# ------------------------------------------------------------------------------------------ pass@k, maj@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold a correct one.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (their numerically stable form: no binomial of n = 1000 is ever
    formed); exactly 1.0 when n - c < k (every k-subset holds a correct sample)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs integers 0 <= c <= n and 1 <= k <= n, got n={n!r}, c={c!r}, k={k!r}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """The index of the sample whose answer wins the vote, or None when no sample gave an answer.

    Each answer (compare them in canonical form: `rewards.canonical_answer`) is one vote; None ("no answer")
    is no vote, so it never wins over an answer, however many samples abstained. A tie goes to the answer that
    appeared first in draw order, and the winner is represented by its first sample."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
            first.setdefault(answer, i)
    if not counts:
        return None
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 when the majority answer of the first k samples is correct: the first sample that gave the winning
    answer (`majority_vote`) is scored correct. 0.0 when it is wrong or none of the k answered."""
    if not 1 <= k <= len(answers) or len(correct) != len(answers):
        raise ValueError(f"maj_at_k needs 1 <= k <= {len(answers)} samples and one correctness per answer, got "
                         f"k={k}, {len(correct)} correctness values")
    winner = majority_vote(answers[:k])
    return float(winner is not None and bool(correct[winner]))
