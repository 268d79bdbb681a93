"""The model's own forward as a decoder (the `hf` engine's logits), over a static or dynamic KV cache.

The cache is a preallocated `StaticCache` by default: a growing `DynamicCache` re-copies every layer's keys and
values at every token (`torch.cat`); the static cache writes one column in place, which costs less CPU time
(measured in docs/performance.md, "The `hf` engine's static KV cache").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import position_ids_from_mask


def _static_cache(model: torch.nn.Module, max_len: int):
    """A `StaticCache` of `max_len` positions for `model`, or None where the model cannot take one.

    transformers marks the models whose attention supports a static cache with `_can_compile_fullgraph`
    (a PEFT wrapper forwards the attribute lookup to its base model); anything else keeps the dynamic cache.
    So does autocast (`bf16-mixed`): the static cache takes its dtype from the first keys it stores, and under
    autocast later keys can come in another dtype, which its in-place write refuses.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_can_compile_fullgraph", False):
        return None
    device = next(iter(model.parameters()), torch.empty(0)).device
    if torch.is_autocast_enabled(device.type):
        return None
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=max_len)




class HFDecoder:
    """The model's own forward as a decoder: `prefill()` then `step(token)`, each returning logits [B, V].

    The cache is a `StaticCache` of P + max_new_tokens positions where the model takes one (`static_cache`),
    else the growing `DynamicCache`. The attention mask grows by one real column per step and each row's
    position is its previous one + 1.
    """

    def __init__(self, model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
                 static_cache: bool) -> None:
        self.model, self.prompt_ids = model, prompt_ids
        self.attn = prompt_mask.long()  # [B, P], grows by one column per step
        self.position = position_ids_from_mask(self.attn)  # [B, P]
        self.P = prompt_ids.size(1)
        self.past = _static_cache(model, self.P + max_new_tokens) if static_cache else None
        self.uses_slots = self.past is not None
        self.t = 0

    def prefill(self) -> Tensor:
        """The whole left-padded prompt, logits only for the last (real) position. [B, V]"""
        # a static cache is written at explicit slots (`cache_position`); the dynamic one just appends
        cache_kwargs = {} if self.past is None else {
            "past_key_values": self.past, "cache_position": torch.arange(self.P, device=self.prompt_ids.device)}
        out = self.model(input_ids=self.prompt_ids, attention_mask=self.attn, position_ids=self.position,
                         use_cache=True, logits_to_keep=1, **cache_kwargs)
        self.past = out.past_key_values
        self.next_pos = self.position[:, -1:] + 1  # [B, 1]
        return out.logits[:, -1, :]

    def step(self, token: Tensor) -> Tensor:
        """One token per row [B]: mask grows by one real column, position = previous + 1. Logits [B, V]"""
        B = token.size(0)
        self.attn = torch.cat([self.attn, self.attn.new_ones(B, 1)], dim=-1)  # [B, P + t + 1]
        step_kwargs = {}
        if self.uses_slots:  # the static cache's slot for this token: column P + t
            step_kwargs["cache_position"] = torch.tensor([self.P + self.t], device=token.device)
        out = self.model(input_ids=token[:, None], attention_mask=self.attn, position_ids=self.next_pos,
                         past_key_values=self.past, use_cache=True, logits_to_keep=1, **step_kwargs)
        self.past = out.past_key_values
        self.next_pos = self.next_pos + 1
        self.t += 1
        return out.logits[:, -1, :]


