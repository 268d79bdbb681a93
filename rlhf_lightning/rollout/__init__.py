"""Rollouts: engines that sample completions from the policy, and the log-probs the losses differentiate.

    base.py      the interface: `SamplingParams`, `RolloutBatch`, `RolloutEngine`, `register_engine` / `get_engine`,
                 and `Rollout` (a batch with its texts, dataset columns and rewards by source)
    sampler.py   the token-choice loop the built-in engines share (`decode`), and `sample`, its function form
    engines.py   the registered engines: `auto` (fast where exact, else hf), `hf`, `fast`
    hf.py        the model's own forward as a decoder, over a static or dynamic KV cache
    fast.py      a lean forward for plain HF Llama/Qwen2/Mistral (packed weights, in-place KV cache)
    logprobs.py  `completion_logprobs`: log π(completion | prompt) in one forward pass, with grad when enabled

A new engine is one `RolloutEngine` subclass + `@register_engine("name")` (docs/extending.md).
"""

from .base import (
                   Rollout,
                   RolloutBatch,
                   RolloutEngine,
                   SamplingParams,
                   decode_completions,
                   engine_names,
                   get_engine,
                   join_prompt_completion,
                   left_pad,
                   position_ids_from_mask,
                   register_engine,
)
from .engines import AutoEngine, FastEngine, HFEngine
from .logprobs import completion_logprobs, token_logprobs
from .sampler import DecoderEngine, sample

__all__ = ["AutoEngine", "DecoderEngine", "FastEngine", "HFEngine", "Rollout", "RolloutBatch", "RolloutEngine",
           "SamplingParams", "completion_logprobs", "decode_completions", "engine_names", "get_engine",
           "join_prompt_completion", "left_pad", "position_ids_from_mask", "register_engine", "sample",
           "token_logprobs"]
