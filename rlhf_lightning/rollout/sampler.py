"""The token-choice loop the built-in engines share, and `sample`, the function form of an engine call.

A decoder engine (`DecoderEngine`) only says who computes the logits: a decoder object with `prefill()` (logits
[B, V] after the prompt) and `step(token)` (logits after one more token per row). The loop below chooses the
tokens (greedy, temperature, top-k, top-p, min-new-tokens), pads finished rows, stops when every row has emitted
EOS and keeps the behaviour log-probs, so the `hf` and `fast` engines sample identically from identical logits.
A bare loop over the KV cache is much faster than `model.generate` on small models, and it is easy to read.

Compaction: a decoder with `compactable` True and `compact(keep)` (the `fast` one) drops finished rows from its
batch and KV cache once a quarter of its rows have finished, so the remaining steps compute only the rows still
writing; the tokens are chosen over the full batch either way, so a seeded run samples the same tokens with and
without it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import RolloutBatch, RolloutEngine, SamplingParams, check_prompt, get_engine


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p (nucleus) filtering of [B, V] logits; removed entries become -inf.

    Nucleus: sort probabilities in descending order and drop a token when the mass of the tokens ranked above
    it already reaches top_p. The top token has mass 0 above it, so it is always kept.
    """
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
        remove_sorted = mass_above >= top_p  # [B, V]
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # back to vocab order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _check_logits(logits: Tensor, t: int) -> None:
    """A NonFiniteError naming the rows whose logits are NaN/+inf (or all -inf), instead of torch.multinomial's
    "probability tensor contains either inf, nan or element < 0" or a silent argmax over NaN. One [B] reduction:
    the row max propagates NaN and is +inf / -inf exactly when softmax would not be a distribution."""
    row_max = logits.amax(dim=-1)  # [B]
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        from ..infra.errors import NonFiniteError

        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteError(f"sampling stopped: the policy's logits are NaN/inf at completion token {t} (rows "
                             f"{rows[:8]}{' ...' if len(rows) > 8 else ''}): its weights or activations are not "
                             "finite (an overflow in low precision, or weights corrupted outside the training "
                             "loop)")


def _choose(logits: Tensor, t: int, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """The next token per row [B] from temperature-scaled logits [B, V] (float32), after the filters."""
    filtered = logits
    if t < params.min_new_tokens:
        filtered = filtered.clone()
        filtered[:, params.eos_token_id] = float("-inf")
    _check_logits(filtered, t)
    if params.greedy:
        return filtered.argmax(dim=-1)  # [B]
    filtered = _filter_logits(filtered, params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]


def decode(decoder, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> RolloutBatch:
    """Run the shared token-choice loop over `decoder`'s logits (see the module docstring).

    Rows that emitted EOS emit `pad_token_id` from then on; the loop stops as soon as every row is done, so the
    returned T can be smaller than `max_new_tokens`. `logprobs` are log-softmax(logits / temperature) at the chosen
    token, taken BEFORE top-k / top-p / min-new-tokens filtering: those filters are sampling heuristics, while the
    policy being trained (and recomputed by `completion_logprobs` for the ratio / KL) is the plain
    temperature-scaled softmax; the filtered distribution would make old and new log-probs disagree even for
    identical weights. With temperature == 0 they are those of the unscaled (temperature 1) policy. They cost one
    [B, V] logsumexp per step (the LM head's matmul is hidden_size times that work) and keep [B] values per step.
    """
    lp_temperature = params.temperature if params.temperature > 0 else 1.0
    B = prompt_ids.size(0)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)  # [B]
    tokens: list[Tensor] = []  # T x [B]
    masks: list[Tensor] = []  # T x [B]
    logps: list[Tensor] = []  # T x [B]
    rows = None  # after a compaction: the original row of each of the decoder's rows [B'] (None = all B)
    can_compact = bool(getattr(decoder, "compactable", False))
    next_logits = decoder.prefill()  # [B or B', V]
    for t in range(params.max_new_tokens):
        logits = next_logits.float() / lp_temperature  # [B', V]
        if rows is not None:  # finished rows left the decoder: any finite logits stand in for them (never used)
            logits = logits.new_zeros(B, logits.size(-1)).index_copy_(0, rows, logits)  # [B, V]
        # the choice is made over all B rows, so a seeded run draws the same random numbers with or without
        # compaction (torch.multinomial's draw for a row does not depend on the other rows' probabilities)
        token = _choose(logits, t, params, generator)
        alive = ~done  # [B] this step's token is real (EOS included)
        token = torch.where(alive, token, torch.full_like(token, params.pad_token_id))
        tokens.append(token)
        masks.append(alive)
        # Unfiltered policy: gathered logit minus logsumexp; only [B] values are kept per step.
        lp = logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [B]
        logps.append(torch.where(alive, lp, torch.zeros_like(lp)))
        done = done | (token == params.eos_token_id)
        for stop in params.stop_token_ids:  # a tool call's end marker: the multi-turn loop takes over
            done = done | (token == stop)
        if t == params.max_new_tokens - 1 or bool(done.all()):
            break
        if can_compact:
            current = torch.arange(B, device=done.device) if rows is None else rows  # [B'] the decoder's rows
            if 4 * int(done[current].sum()) >= current.numel():
                # compaction: a quarter of the decoder's rows have finished -> they leave its batch (and KV
                # cache), so a ragged batch costs about the sum of its lengths, not rows x the longest
                keep = (~done[current]).nonzero().flatten()  # [B''] positions in the decoder's batch
                decoder.compact(keep)
                rows = current[keep]
        next_logits = decoder.step(token if rows is None else token[rows])  # [B', V]
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                        completion_ids=torch.stack(tokens, dim=1),  # [B, T]
                        completion_mask=torch.stack(masks, dim=1).long(),  # [B, T]
                        logprobs=torch.stack(logps, dim=1),  # [B, T]
                        is_truncated=~done)


class DecoderEngine(RolloutEngine):
    """An engine that computes logits with a decoder (`prefill` / `step`) over the live policy and shares `decode`.

    Subclasses implement `decoder(prompt_ids, prompt_mask, max_new_tokens)`. `static_cache` is the HF decoder's
    option (see `hf.HFDecoder`); engines that never build one ignore it.
    """

    def __init__(self, model: torch.nn.Module, static_cache: bool = True) -> None:
        super().__init__(model)
        self.static_cache = static_cache

    def decoder(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int):
        raise NotImplementedError(f"{type(self).__name__} does not implement decoder")

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None) -> RolloutBatch:
        """Sample in eval mode (dropout off), restoring the policy's train/eval mode afterwards."""
        check_prompt(prompt_ids, prompt_mask)
        was_training = self.model.training
        self.model.eval()
        try:
            decoder = self.decoder(prompt_ids, prompt_mask, params.max_new_tokens)
            return decode(decoder, prompt_ids, prompt_mask, params, generator)
        finally:
            self.model.train(was_training)


def sample(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    static_cache: bool = True,
    engine: str = "auto",
) -> RolloutBatch:
    """Generate completions for a left-padded prompt batch: `SamplingParams` of these arguments, given to the
    registered engine `engine` built on `model` (see `decode` for the loop and the log-probs).

    `engine`: "fast" is `fast.FastDecoder` (packed weights, in-place KV cache, a few fused ops per layer; exact HF
    Llama/Qwen2/Mistral layouts only, else a ValueError saying why), "hf" the model's own forward, "auto" (default)
    fast where eligible, else hf. Both give the same tokens and log-probs up to float rounding (tested).

    `static_cache` (hf engine) preallocates the KV cache for P + max_new_tokens positions (transformers'
    `StaticCache`, written in place at `cache_position`); models that cannot take one fall back to the growing
    `DynamicCache`, as does `static_cache=False`. Both give the same tokens and log-probs (tested).
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            min_new_tokens=min_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            do_sample=do_sample)
    return get_engine(engine)(model, static_cache=static_cache).generate(prompt_ids, prompt_mask, params, generator)
