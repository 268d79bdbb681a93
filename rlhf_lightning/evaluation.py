"""Held-out greedy accuracy of a saved policy on a built-in task (what the demo and the benchmarks report)."""

from __future__ import annotations

import torch

from .models import load_causal_lm
from .rewards import call_reward_fns
from .rollout import decode_completions, sample
from .tokenizer import load_tokenizer


@torch.no_grad()
def greedy_accuracy(model_or_path, task, examples: list[dict], max_new_tokens: int = 16, batch_size: int = 256,
                    tokenizer=None) -> float:
    """Fraction of `examples` whose greedy completion the task's first verifier scores 1.0."""
    if isinstance(model_or_path, str):
        tokenizer = load_tokenizer(model_or_path)
        model = load_causal_lm(model_or_path, tokenizer)
    else:
        model = model_or_path
    model.eval()
    verifier = task.reward_fns[:1]
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        enc = [tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"] for ex in chunk]
        P = max(map(len, enc))
        ids = torch.full((len(enc), P), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, P - len(e):] = torch.tensor(e)
            mask[i, P - len(e):] = 1
        device = next(model.parameters()).device
        out = sample(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
        completions = decode_completions(tokenizer, out.completion_ids, out.completion_mask)
        columns = {k: [ex[k] for ex in chunk] for k in chunk[0] if k not in ("prompt",)}
        _, per_fn = call_reward_fns(verifier, None, [ex["prompt"] for ex in chunk], completions, columns)
        correct += int((per_fn[0] == 1).sum())
    return correct / max(len(examples), 1)
