"""`completion_logprobs`: log π(completion | prompt) recomputed with ONE forward pass, with grad when grad is
enabled: the term the policy loss differentiates through (and the check of an engine's behaviour log-probs).

Shared prompts: where rows repeat a prompt (GRPO's G samples of each), each distinct prompt runs through the model
once and the rows that repeat it read its KV cache (`shared_prompt_logits`). On the `ragged` benchmark's 130-token
prompts x 8 samples that is a third of the policy's forward + backward time (docs/performance.md).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .base import (check_prompt, distinct_prompts, join_prompt_completion, pad_columns, position_ids_from_mask,
                   trim_padding)


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    share_prompts: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """log π(completion token | prefix) for every completion position, from ONE forward pass. [B, T] float32

    The model is asked only for the last T+1 positions' logits (`logits_to_keep`), the first T of which predict
    the completion tokens; prompt positions never reach the LM head. Masked positions are 0. Columns that are
    padding in every row are left out of the forward (`trim_padding`) and come back as 0. With
    `return_entropy`, also returns the per-token entropy [B, T] of the same distribution (0 where masked).
    Differentiable when called with grad enabled. `share_prompts`: rows with the same prompt share one forward of
    it (`shared_prompt_logits`; the same log-probs and gradients to float rounding); False = one forward per row.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for completion_logprobs, got {temperature}")
    check_prompt(prompt_ids, prompt_mask)
    if completion_ids.dim() != 2 or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} and completion_mask {tuple(completion_mask.shape)} "
            "must both be [B, T]"
        )
    if completion_ids.size(0) != prompt_ids.size(0):
        raise ValueError(f"completion batch {completion_ids.size(0)} != prompt batch {prompt_ids.size(0)}")
    B, width = completion_ids.shape
    prompt_ids, prompt_mask, completion_ids, completion_mask = trim_padding(prompt_ids, prompt_mask, completion_ids,
                                                                            completion_mask)
    T = completion_ids.size(1)
    if T == 0:
        empty = torch.zeros(B, width, device=completion_ids.device)
        return (empty, empty.clone()) if return_entropy else empty
    logits = shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) \
        if share_prompts else None
    if logits is None:
        input_ids, attn, position_ids = join_prompt_completion(prompt_ids, prompt_mask, completion_ids,
                                                               completion_mask)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                    logits_to_keep=T + 1)
        logits = out.logits[:, :-1, :]  # [B, T, V]: position P-1+t predicts completion token t
    logprobs, entropy = token_logprobs(logits, completion_ids, completion_mask, temperature, return_entropy)
    logprobs = pad_columns(logprobs, width)  # [B, width]
    return (logprobs, pad_columns(entropy, width)) if return_entropy else logprobs


def token_logprobs(logits: Tensor, completion_ids: Tensor, completion_mask: Tensor, temperature: float = 1.0,
                   return_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """(log π(token) [B, T], entropy [B, T] or None) of logits [B, T, V] at `temperature`; 0 where masked.

    gathered logit - logsumexp(logits / temperature) in float32, so no [B, T, V] log_softmax is kept. The one
    implementation behind `completion_logprobs` and PPO's shared critic (whose forward also yields the hidden
    states its value head reads).
    """
    z = logits.float()  # [B, T, V]
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # [B, T]
    mask = completion_mask.bool()  # [B, T]
    logprobs = torch.where(mask, z.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - lse, 0.0)  # [B, T]
    if not return_entropy:
        return logprobs, None
    # H = logsumexp(z) - sum_v softmax(z)_v * z_v
    entropy = torch.where(mask, lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1), 0.0)  # [B, T]
    return logprobs, entropy


def shared_prompt_logits(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                         completion_mask: Tensor) -> Tensor | None:
    """The logits [B, T, V] that predict the completion tokens, each distinct prompt row run through the model once.

        1. the U distinct (prompt ids, mask) rows [U, P] -> one forward with a KV cache (and the last position's
           logits, which predict completion token 0)
        2. the cache's rows indexed back to the batch [U] -> [B] (`reorder_cache`: an index_select, so gradients
           from every completion flow back into their prompt's one forward)
        3. the completions [B, T] as a continuation of that cache, at positions after their prompt's

    Exact: each completion token attends to the same keys and values, at the same positions, as in the one-pass
    forward (float rounding aside). None where it does not apply, and the caller runs the one-pass forward: every
    prompt distinct, gradient checkpointing on (HF turns the cache off in training), a model whose forward takes
    no cache.
    """
    T = completion_ids.size(1)
    cache_arg = _cache_argument(model)
    if cache_arg is None or (torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False)):
        return None
    shared = distinct_prompts(prompt_ids, prompt_mask)
    if shared is None:
        return None
    first, inverse = shared  # [U] a row holding each distinct prompt, [B] each row's
    mask_u = prompt_mask[first]
    prompt = model(input_ids=prompt_ids[first], attention_mask=mask_u, position_ids=position_ids_from_mask(mask_u),
                   use_cache=True, logits_to_keep=1)
    cache = getattr(prompt, cache_arg, None)
    if cache is None or not hasattr(cache, "reorder_cache"):
        return None
    cache.reorder_cache(inverse)  # [U, ...] -> [B, ...] per layer
    attn = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # [B, P + T]
    out = model(input_ids=completion_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)[:, -T:],
                use_cache=True, logits_to_keep=T, **{cache_arg: cache})
    return torch.cat([prompt.logits[inverse], out.logits[:, :-1]], dim=1)  # [B, T, V]


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The name of the KV-cache argument (and output) of the model's forward: `cache` (transformers >= 5.2x),
    `past_key_values` (earlier), or None. A PEFT wrapper forwards **kwargs: its base model's forward decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)
