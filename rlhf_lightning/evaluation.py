"""Held-out greedy accuracy of a saved policy on a built-in task (what the demo and the benchmarks report), and
the sampler it uses (also what `PreferenceDataModule`'s `policy` negatives sample with)."""

from __future__ import annotations

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
