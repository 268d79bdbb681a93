"""Process supervision's bookkeeping (DeepSeekMath §4.1.3): where each reasoning step ends, in tokens.

A step is a piece of the completion split by the step separator; it ends at its last character (the separator
belongs to the next step's start). Character offsets map to tokens through the cumulative length of the
decoded tokens, so any tokenizer whose tokens decode to the text's characters works.

The end of a solution may be scored too: a reward list one longer than the completion's steps ends with the
**end step**'s reward ("the solution is finished and right": the task's outcome verifier, or a process reward
model trained on end steps), placed on the completion's last token (its EOS, when it stopped by itself). Without
it a step-wise reward never blames stopping early: a chain that writes one right step and stops scores as well
as a whole right one, and GRPO learns to stop (measured: docs/process_reward_model.md).
"""

from __future__ import annotations

import torch
from torch import Tensor


def step_boundaries(tokenizer, completions: list[str], completion_ids: Tensor, completion_mask: Tensor,
                    step_rewards: list[list[float | None]], separator: str) -> tuple[Tensor, Tensor]:
    """(rewards [N, S] padded with NaN, ends [N, S]: the completion-token index where step s ends, -1 = none).

    S is the most steps any completion has (at least 1); a None step reward is NaN ("no reward"). A list with one
    reward more than the completion's `split(separator)` pieces ends with the end step's (on the last token).
    """
    N = len(step_rewards)
    S = max(1, max(len(r) for r in step_rewards))
    rewards = torch.full((N, S), float("nan"))
    ends = torch.full((N, S), -1, dtype=torch.long)
    for i, (text, r) in enumerate(zip(completions, step_rewards)):
        n_tok = int(completion_mask[i].sum())
        if n_tok == 0 or not r:
            continue
        token_texts = tokenizer.batch_decode(completion_ids[i, :n_tok].unsqueeze(-1).tolist(),
                                             skip_special_tokens=True)
        char_end = torch.tensor([len(t) for t in token_texts]).cumsum(0)  # [n_tok] chars decoded so far
        pieces = text.split(separator)
        if len(r) == len(pieces) + 1:  # the end step: on the last token
            ends[i, len(pieces)] = n_tok - 1
            rewards[i, len(pieces)] = float("nan") if r[-1] is None else float(r[-1])
        pos = 0
        for s, piece in enumerate(pieces[:len(r)]):
            pos += len(piece)
            last_char = max(pos - 1, 0)
            # first token whose decoded text reaches past the step's last character
            tok = int(torch.searchsorted(char_end, torch.tensor(last_char), right=True))
            ends[i, s] = min(tok, n_tok - 1)
            rewards[i, s] = float("nan") if r[s] is None else float(r[s])
            pos += len(separator)
    return rewards, ends


def turn_boundaries(step_rewards: list[list[float | None]], turn_ends: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Steps that are the policy's turns in an environment's episode: (rewards [N, S] padded with NaN, ends [N, S]
    the completion index of each turn's last token, -1 = none), S the most turns any row has. A reward function
    must give one reward per environment step of the row (`RolloutBatch.env_ends`)."""
    from ..infra.errors import RewardFunctionError

    N = len(step_rewards)
    S = max(1, max((len(e) for e in turn_ends), default=1))
    rewards = torch.full((N, S), float("nan"))
    ends = torch.full((N, S), -1, dtype=torch.long)
    for i, (r, e) in enumerate(zip(step_rewards, turn_ends)):
        if len(r) != len(e):
            raise RewardFunctionError(f"completion {i}: {len(r)} step rewards for {len(e)} environment turns; with "
                                      "an environment, process supervision's steps are the turns (one reward each)")
        for s_, (v, t) in enumerate(zip(r, e)):
            rewards[i, s_] = float("nan") if v is None else float(v)
            ends[i, s_] = t
    return rewards, ends
