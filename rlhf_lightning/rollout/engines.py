"""The built-in engines: `auto`, `hf` and `fast`, each a `DecoderEngine` over the live policy (registered in this
order, which is the order error messages list them in)."""

from __future__ import annotations

from torch import Tensor

from .base import register_engine
from .hf import HFDecoder
from .sampler import DecoderEngine


@register_engine("auto")
class AutoEngine(DecoderEngine):
    """The fast decoder where it is exact for this model and batch (checked at every `generate`: autocast, LoRA
    or a longer sequence can change it), else the model's own forward."""

    def decoder(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int):
        from .fast import FastDecoder, ineligibility_reason

        if ineligibility_reason(self.model, prompt_ids.size(1) + max_new_tokens) is None:
            return FastDecoder(self.model, prompt_ids, prompt_mask, max_new_tokens)
        return HFDecoder(self.model, prompt_ids, prompt_mask, max_new_tokens, self.static_cache)


@register_engine("hf")
class HFEngine(DecoderEngine):
    """The model's own forward (any causal LM transformers can run), over a static or dynamic KV cache."""

    def decoder(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int):
        return HFDecoder(self.model, prompt_ids, prompt_mask, max_new_tokens, self.static_cache)


@register_engine("fast")
class FastEngine(DecoderEngine):
    """`fast.FastDecoder` only: a ValueError saying why where it cannot decode the model exactly."""

    def decoder(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int):
        from .fast import FastDecoder, ineligibility_reason

        reason = ineligibility_reason(self.model, prompt_ids.size(1) + max_new_tokens)
        if reason is not None:
            raise ValueError(f"engine='fast' cannot decode this model: {reason}")
        return FastDecoder(self.model, prompt_ids, prompt_mask, max_new_tokens)

