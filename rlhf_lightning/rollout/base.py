"""The rollout interface: `SamplingParams` in, `RolloutBatch` out, engines looked up by name.

Layout conventions (shared with the rest of the package):
    prompt_ids / prompt_mask          [B, P]  LEFT-padded, so the last column is the last prompt token
    completion_ids / completion_mask  [B, T]  RIGHT-padded: mask is 1 up to and including EOS, 0 after
Positions are `cumsum(mask) - 1`, so a left-padded prompt gets the same rotary positions as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """What an engine's `generate` returns: prompts, completions, masks and behaviour-policy log-probs."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] 1 = real token
    completion_ids: Tensor  # [B, T] sampled tokens; pad_token_id after EOS
    completion_mask: Tensor  # [B, T] 1 up to and including the EOS token, 0 after
    logprobs: Tensor  # [B, T] float32 log π(token) under the temperature-scaled policy; 0 where mask is 0
    is_truncated: Tensor  # [B] bool: no EOS within max_new_tokens
    action_mask: Tensor | None = None  # [B, T] 1 = a token the policy sampled (trained); None = completion_mask.
    # Multi-turn rollouts (`rollout.multi_turn`) put tool / environment replies in the completion: the policy
    # attends to them (completion_mask 1) but they get no loss, KL or entropy (action_mask 0, logprobs 0).
    turns: TurnStats | None = None  # per-row counts of a multi-turn rollout (turns, tool calls, errors)
    env_rewards: list[list[float]] | None = None  # [B] lists: an environment's reward for each step of the row
    env_ends: list[list[int]] | None = None  # [B] lists: the completion index of the last token of each step's turn

    def completion_lengths(self) -> Tensor:
        """Number of real completion tokens per row (EOS included). [B]"""
        return self.completion_mask.sum(dim=-1)


    @property
    def trained_mask(self) -> Tensor:
        """[B, T] the tokens that get a loss, a KL and an entropy: the policy's own (`action_mask`), which is the
        whole completion unless a multi-turn rollout put tool output in it."""
        return self.completion_mask if self.action_mask is None else self.action_mask

    def model_inputs(self) -> dict[str, Tensor]:
        """The four id/mask tensors a log-prob pass reads (`completion_logprobs(model, **inputs)`)."""
        return {"prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask,
                "completion_ids": self.completion_ids, "completion_mask": self.completion_mask}


@dataclass
class TurnStats:
    """Per-row counts of a multi-turn rollout [B] (float32, for logging as means)."""

    turns: Tensor  # policy turns (generate calls that produced tokens for the row)
    tool_calls: Tensor  # tool calls answered (results and error replies)
    tool_errors: Tensor  # replies that were errors (unknown tool, bad arguments, a raising tool)
    tool_timeouts: Tensor  # calls that ran past the timeout (also counted in tool_errors)
    env_done: Tensor | None = None  # 1 = the environment ended the episode (else the turn or token budget did)


@dataclass
class Rollout:
    """One rollout, as the rewards and the losses see it. Row i of a grouped rollout belongs to prompt i // G."""

    samples: RolloutBatch  # prompt/completion ids and masks, behaviour log-probs
    prompts: list[str]  # [N] prompt text per row
    completions: list[str]  # [N] decoded completions (no EOS/pad)
    columns: dict[str, list]  # dataset columns, aligned with rows
    baseline_scores: Tensor | None = None  # [N] reward of the prompt's greedy completion (remax)
    kl: Tensor | None = None  # [N, T] KL to the reference, set before the advantages when it shapes the reward
    per_source: dict[str, Tensor] = field(default_factory=dict)  # reward/<name>: each source's rewards, once scored


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the same for every engine. A bad value is a ValueError naming the field.

    Greedy when `do_sample=False` or `temperature == 0`. `top_k` 0 and `top_p` 1 are off; `min_new_tokens` forbids
    EOS before that many tokens. The log-probs an engine returns are those of the plain temperature-scaled policy
    (temperature 1 when greedy), before top-k / top-p / min-new-tokens filtering.
    """

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    stop_token_ids: tuple[int, ...] = ()  # besides EOS, tokens that end a row (kept, like EOS): a tool call's end

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return (not self.do_sample) or self.temperature == 0


class RolloutEngine:
    """Generates completions for the policy. A new engine is one subclass + `@register_engine("name")`.

    What a new engine must do:
    - `__init__(model)`: keep what it needs of the policy (`model`, the live nn.Module the modules train).
    - `generate(prompt_ids, prompt_mask, params, generator)`: sample under `params` (a `SamplingParams`) for a
      left-padded [B, P] batch and return a `RolloutBatch`: completion ids padded with `pad_token_id` after EOS,
      the mask (1 up to and including EOS), `is_truncated`, and the float32 log-probs of the sampled tokens under
      the temperature-scaled, unfiltered policy (the modules compare them with `completion_logprobs`). Draw
      random numbers from `generator` (the module's seeded, checkpointed stream) so that runs are reproducible.
      The modules call it under no_grad and `parallel.sampling_context` (FSDP2 ranks stop at different steps).
    - `sync_weights(policy)`: called after every optimizer step with the updated policy. Engines that read the
      live policy (the default here) only keep the reference; an engine with its own copy of the weights (a
      serving engine such as vLLM) copies them, or marks them stale and copies before its next `generate`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None) -> RolloutBatch:
        raise NotImplementedError(f"{type(self).__name__} does not implement generate")

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """The policy after an optimizer step: this engine reads it live, so keeping the reference is enough
        (the modules may also replace the policy object, e.g. by wrapping it in a LoRA adapter)."""
        self.model = policy


_ENGINES: dict[str, type[RolloutEngine]] = {}


def register_engine(name: str):
    """Class decorator: make `name` usable as `rollout_engine: name` (and `sample(..., engine=name)`)."""
    def register(cls: type[RolloutEngine]) -> type[RolloutEngine]:
        if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
            raise TypeError(f"register_engine({name!r}) needs a RolloutEngine subclass, got {cls!r}")
        _ENGINES[name] = cls
        return cls
    return register


def engine_names() -> list[str]:
    """The registered engine names, in registration order (the built-ins: auto, hf, fast)."""
    return list(_ENGINES)


def get_engine(name: str, setting: str = "engine") -> type[RolloutEngine]:
    """The engine class registered as `name`; a ValueError naming `setting` and the registered names if none."""
    if name not in _ENGINES:
        raise ValueError(f"{setting} must be {'|'.join(_ENGINES)}, got {name!r}")
    return _ENGINES[name]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens: cumsum(mask) - 1, clamped at 0. [B, L] -> [B, L]

    With left padding the first real token gets position 0, exactly as if the prompt had no padding; the
    value at pad positions is irrelevant (they are masked) and clamped to 0 so it stays a valid index.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def join_prompt_completion(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                           completion_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """prompt (left-padded) + completion (right-padded) -> (input_ids, attention_mask, position_ids) [B, P + T]."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P + T]
    attn = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # [B, P + T]
    return input_ids, attn, position_ids_from_mask(attn)


def trim_padding(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four tensors without the columns that are padding in EVERY row: leading prompt columns (left padding)
    and trailing completion columns (right padding). A micro-batch of short rows cut from a ragged rollout then
    costs its own length, not the rollout's longest. Exact: positions count real tokens only
    (`position_ids_from_mask`), pad keys are masked, and causal attention never reads later columns."""
    real_p = prompt_mask.bool().any(dim=0)  # [P]
    first = int(real_p.long().argmax()) if bool(real_p.any()) else prompt_mask.size(1) - 1
    real_c = completion_mask.bool().any(dim=0)  # [T]
    T = int(real_c.nonzero().max()) + 1 if bool(real_c.any()) else 0
    return prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :T], completion_mask[:, :T]


def distinct_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """Rows that repeat a prompt (GRPO's G samples): (first [U], a row holding each distinct (ids, mask) prompt;
    inverse [B], each row's index into them), or None when every row's prompt is distinct. The shared-prefix
    passes run the U rows and index their outputs back with `inverse`."""
    B = prompt_ids.size(0)
    rows, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask.long()], dim=1), dim=0, return_inverse=True)
    U = rows.size(0)
    if U == B:
        return None
    first = torch.full((U,), B, dtype=torch.long, device=inverse.device).scatter_reduce(
        0, inverse, torch.arange(B, device=inverse.device), "amin")  # [U]
    return first, inverse


def pad_columns(x: Tensor, width: int) -> Tensor:
    """[B, t, ...] -> [B, width, ...] with zeros on the right (the inverse of `trim_padding` for outputs)."""
    if x.size(1) == width:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, width - x.size(1)]
    return torch.nn.functional.pad(x, pad)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id lists as a prompt batch: (prompt_ids [B, P], prompt_mask [B, P]) LEFT-padded with `pad_id`, as
    the data batches prompts (the last column is every row's last token)."""
    P = max(map(len, seqs))
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(seqs), P), dtype=torch.long)  # [B, P]
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids, mask


def check_prompt(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    """A ValueError unless the prompts are a [B, P] batch, left-padded (every row's last column real)."""
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both be [B, P]"
        )
    if prompt_ids.size(1) == 0 or not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompt_mask must be left-padded: its last column must be 1 in every row")


def decode_completions(tokenizer: Any, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
    """Completion texts without the EOS token and the padding after it.

    Keeps the tokens where the mask is 1, minus `tokenizer.eos_token_id` (the last real token of every row
    that finished); anything else the tokenizer considers special is left to `decode`.
    """
    keep = completion_mask.bool()  # [B, T]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        keep = keep & (completion_ids != eos)
    rows = [ids[k].tolist() for ids, k in zip(completion_ids.cpu(), keep.cpu())]
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode(rows))
    return [tokenizer.decode(r) for r in rows]
