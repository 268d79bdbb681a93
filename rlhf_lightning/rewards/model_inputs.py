"""What a reward model reads, defined once: the tokens of the text `prompt + response`, then one EOS
(`reward_input_ids`), right-padded (`right_pad`). Training (`PreferenceDataModule`), the exported `hf_model/`,
the reward-model source (`RewardModelSource`, also inside `RewardModelScorer` and iterative RL) all go through it,
so a score means the same thing everywhere.

Why an EOS: the classifier reads the hidden state of the last real token. Without an end marker "47+85=13"
is scored at the same token, with the same causal context, as the prefix of "47+85=132", so the model could
not tell a truncated answer from an unfinished one; with the EOS the last position knows the response is
over. (When a tokenizer's pad token *is* its EOS, an appended EOS would be read as padding by
`AutoModelForSequenceClassification`, so none is appended and the last response token is scored.)
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
