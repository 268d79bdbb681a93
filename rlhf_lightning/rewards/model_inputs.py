"""What a reward model reads, defined once: the tokens of the text `prompt + response`, then one EOS
(`reward_input_ids`), right-padded (`right_pad`), and what a process reward model reads (`stepwise_input_ids`,
below). Training (`PreferenceDataModule`), the exported `hf_model/`, the reward-model source (`RewardModelSource`,
also inside `RewardModelScorer` and iterative RL) all go through it, so a score means the same thing everywhere.

Why an EOS: the classifier reads the hidden state of the last real token. Without an end marker "47+85=13"
is scored at the same token, with the same causal context, as the prefix of "47+85=132", so the model could
not tell a truncated answer from an unfinished one; with the EOS the last position knows the response is
over. (When a tokenizer's pad token *is* its EOS, an appended EOS would be read as padding by
`AutoModelForSequenceClassification`, so none is appended and the last response token is scored.)

A process reward model (`ProcessRewardModel`) reads a prompt and its reasoning steps as TRL's PRMTrainer tokenizes
them, so exports interoperate: BOS (when the tokenizer has one), the prompt's tokens, then each step's tokens
followed by the separator's tokens; step k is scored at the last token of its separator (`label_positions[k]`),
every other position is ignored (label -100). The steps of a policy's completion are `split_steps(completion,
separator)`: a completion "7+5=12\n12-3=9" is read as "7+5=12\n" "12-3=9\n", two scored steps. Training
(`StepwiseDataModule`), the reward source (`ProcessRewardModelSource`) and readers of the export go through it.
"""

from __future__ import annotations

import torch


def appends_eos(tokenizer) -> bool:
    """True when an EOS is appended to `prompt + response` (it is, unless the tokenizer pads with its EOS)."""
    return tokenizer.eos_token_id is not None and tokenizer.eos_token_id != tokenizer.pad_token_id


def reward_input_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids the reward model scores: tokens of the text `prompt + response`, then EOS (see module doc)."""
    ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if appends_eos(tokenizer) else ids


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, L], attention_mask [N, L]) right-padded: real tokens sit at positions 0..n-1, exactly as
    when a sequence is scored alone, and the classifier's "last non-pad token" is the last real one."""
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)  # [N, L]
    mask = torch.zeros((len(seqs), L), dtype=torch.long)  # [N, L]
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def split_steps(completion: str, separator: str) -> list[str]:
    """A completion's reasoning steps: its pieces between separators (as many as `completion.count(separator) + 1`,
    the count process supervision's step boundaries expect; an empty piece is a step too)."""
    return completion.split(separator)


def stepwise_input_ids(tokenizer, prompt: str, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """(input_ids, label_positions) of a stepwise row, as TRL's PRMTrainer builds them (see module doc): BOS if the
    tokenizer has one, the prompt's tokens, then per step its tokens and the separator's; label_positions[k] is the
    index of the last token of step k's separator."""
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not sep:
        raise ValueError(f"the step separator {separator!r} tokenizes to no tokens; steps could not be scored")
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    positions = []
    for step in steps:
        ids = ids + tokenizer(step, add_special_tokens=False)["input_ids"] + sep
        positions.append(len(ids) - 1)
    return ids, positions


def step_label_row(length: int, positions: list[int], labels: list[int]) -> list[int]:
    """Token labels of one row: `labels[k]` at `positions[k]`, -100 (ignored) everywhere else."""
    out = [-100] * length
    for pos, label in zip(positions, labels):
        out[pos] = int(label)
    return out
