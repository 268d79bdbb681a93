"""`completion_logprobs`: log π(completion | prompt) recomputed with ONE forward pass, with grad when grad is
enabled: the term the policy loss differentiates through (and the check of an engine's behaviour log-probs)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import check_prompt, join_prompt_completion, pad_columns, trim_padding


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log π(completion token | prefix) for every completion position, from ONE forward pass. [B, T] float32

    The model is asked only for the last T+1 positions' logits (`logits_to_keep`), the first T of which predict
    the completion tokens; prompt positions never reach the LM head. Masked positions are 0. Columns that are
    padding in every row are left out of the forward (`trim_padding`) and come back as 0. With
    `return_entropy`, also returns the per-token entropy [B, T] of the same distribution (0 where masked).
    Differentiable when called with grad enabled.
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
    input_ids, attn, position_ids = join_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask)
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
