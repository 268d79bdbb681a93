"""Preference pairs (prompt, chosen, rejected) for reward-model training, from files, the hub or a built-in task.

Each side is tokenized as the reward model reads it (`reward_input_ids`, rlhf_lightning/rewards/model_inputs.py:
the tokens of `prompt + response`, then one EOS). Built-in pairs (`task: addition | chain`): chosen = the task's
correct completion, rejected = a wrong one of a `negatives` kind (data/negatives.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..rewards.model_inputs import reward_input_ids, right_pad
from .negatives import check_model_setting, check_negatives, make_preference_pairs
from .prompts import PromptDataModule, with_columns, without_prompts_of
from .rows import (
    UnknownCharacters,
    check_columns,
    check_each_row,
    check_prompt,
    check_response,
    response_text,
    row_where,
)


class PreferenceDataModule(PromptDataModule):
    """(prompt, chosen, rejected) pairs for Bradley-Terry reward-model training.

    Batches: {"input_ids": [2B, L], "attention_mask": [2B, L]} right-padded, rows 0..B-1 are `prompt + chosen`
    and rows B..2B-1 `prompt + rejected` (one forward pass scores both), each as `reward_input_ids` builds it;
    "margin": [B] float when `margin_column` is set; and the raw strings "prompts", "chosen", "rejected" plus
    every other column as lists. Shuffling is seeded and resumable (`ResumableSampler`); sources, splits and
    the tokenizer work as in `PromptDataModule` (this class reuses its loading, splitting and loaders).

    Built-in pairs (`task`): the reward model must *verify* a sum, which a small model learns only for some
    kinds of wrong answer. The default is `negatives: {random: 1.0}`, uniformly random wrong sums: a random wrong
    sum is usually off in magnitude or length, so the model first learns roughly how big a+b is and then sharpens
    it, which makes it the best synthetic teacher for *every* kind, near misses included. One-digit corruptions
    (`digit`) keep length and magnitude and give no gradient toward that easier sub-skill; near misses (`near`:
    ±1, ±2, ±10) demand exact addition from the first step and stay near chance. Validation prompts are removed
    from the training pairs (small operands repeat), so held-out accuracy measures generalisation, not memorised
    sums.

    For RL the pairs that matter are the *policy's* mistakes, and a policy's mistakes are near misses
    (96+1=98). `policy` negatives are exactly those: `negatives_model` (the SFT export) samples each prompt up to
    `POLICY_TRIES` times at temperature 1 and its first wrong completion is the rejected side; an RM trained on
    them from the SFT export ranks the policy's own mistakes best (configs/rm_arithmetic.yaml). The accuracies
    behind both choices are in docs/reward_model.md ("Which negatives teach").

    Args:
        path / task / task_kwargs / num_train / num_val / subset / split / val_split / val_path / val_fraction /
        tokenizer / batch_size / val_batch_size / seed / shuffle / num_workers: as in `PromptDataModule`
            (num_train / num_val count pairs; the seed also draws the negatives).
        negatives: built-in pairs only: weights of the negative kinds `random`, `digit`, `near`, `policy`.
        negatives_model: built-in pairs with `policy` negatives: the causal LM (a `save_pretrained` directory such
            as the SFT export, a preset or a hub id) whose own wrong samples are the rejected side.
        prompt_column / chosen_column / rejected_column: strings, or chat messages (prompt: the conversation,
            rendered with the tokenizer's chat template; chosen/rejected: the assistant reply).
        margin_column: optional column of floats m, the loss then asks for r_chosen - r_rejected > m.
        max_length: pairs whose longer side exceeds this many tokens are dropped (with a count warning).
    """

    def __init__(
        self,
        path: str | None = None,
        task: str | None = None,
        task_kwargs: dict[str, Any] | None = None,
        negatives: dict[str, float] | None = None,
        negatives_model: str | None = None,
        num_train: int = 60000,
        num_val: int = 500,
        subset: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        margin_column: str | None = None,
        tokenizer: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        max_length: int = 512,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ):
        super().__init__(path=path, task=task, task_kwargs=task_kwargs, num_train=num_train, num_val=num_val,
                         subset=subset, split=split, val_split=val_split, val_path=val_path,
                         val_fraction=val_fraction, prompt_column=prompt_column, tokenizer=tokenizer,
                         batch_size=batch_size, val_batch_size=val_batch_size, max_prompt_length=max_length,
                         max_length=max_length, seed=seed, shuffle=shuffle, num_workers=num_workers)
        if self.task is not None:
            # validate the task and `negatives` now, not after loading
            check_negatives(negatives, negatives_model)
            make_preference_pairs(self.task, self.task.make_examples(1, seed=0))  # the task has built-in pairs
            check_model_setting("negatives_model", negatives_model)
        else:
            for name, value in (("negatives", negatives), ("negatives_model", negatives_model)):
                if value is not None:
                    raise ValueError(f"{name} only applies to built-in pairs (`task`), not to `path` data")
        self.dropped: dict[str, int] = {}  # split -> pairs dropped by max_length

    # ----------------------------------------------------------------------------------------- loading
    def task_rows(self, train: list[dict], val: list[dict]) -> tuple[list[dict], list[dict]]:
        hp = self.hparams
        train = without_prompts_of(train, val)
        return (make_preference_pairs(self.task, train, hp.negatives, seed=hp.seed, negatives_model=hp.negatives_model),
                make_preference_pairs(self.task, val, hp.negatives, seed=hp.seed + 1,
                                      negatives_model=hp.negatives_model))

    def _check_rows(self, rows: list[dict], source: str) -> None:
        """Every pair, before any is used: the columns exist and are filled, the prompt is text or chat messages
        (it may be empty: the pair then compares the bare responses), chosen and rejected are non-empty and
        differ, the margin is a finite number. Raises a ConfigError naming the file and line of the first bad row."""
        if not rows:
            return
        hp = self.hparams
        needed = [hp.prompt_column, hp.chosen_column, hp.rejected_column] + ([hp.margin_column] if hp.margin_column
                                                                              else [])
        check_columns(rows, needed, source, "set prompt_column/chosen_column/rejected_column/margin_column")
        check_each_row(rows, self._check_row, source)

    def _check_row(self, row: dict) -> None:
        hp = self.hparams
        check_prompt(row[hp.prompt_column], allow_empty=True)
        chosen = check_response(row[hp.chosen_column], f"chosen (column {hp.chosen_column!r})")
        rejected = check_response(row[hp.rejected_column], f"rejected (column {hp.rejected_column!r})")
        if chosen == rejected:
            raise ValueError(f"chosen and rejected are the same text ({chosen[:40]!r}): the pair teaches nothing")
        if hp.margin_column:
            m = row[hp.margin_column]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise ValueError(f"margin column {hp.margin_column!r} must be a finite number, got {m!r}")

    def _tokenize(self, rows: list[dict], where: str) -> list[dict]:
        hp, tok = self.hparams, self.tokenizer
        own = {hp.prompt_column, hp.chosen_column, hp.rejected_column, hp.margin_column}
        out, dropped = [], 0
        unknown = UnknownCharacters(tok)
        for i, row in enumerate(rows):  # the values were checked when the rows were loaded (`_check_rows`)
            prompt = self._rendered_prompt(row, i, where)
            chosen, rejected = response_text(row[hp.chosen_column]), response_text(row[hp.rejected_column])
            chosen_ids, rejected_ids = reward_input_ids(tok, prompt, chosen), reward_input_ids(tok, prompt, rejected)
            for text, ids in ((prompt + chosen, chosen_ids), (prompt + rejected, rejected_ids)):
                unknown.add(text, ids, row_where(row, i, where))
            if max(len(chosen_ids), len(rejected_ids)) > hp.max_length:
                dropped += 1
                continue
            item = {k: v for k, v in row.items() if k not in own}
            item.update(prompts=prompt, chosen=chosen, rejected=rejected, _chosen_ids=chosen_ids,
                        _rejected_ids=rejected_ids)
            if hp.margin_column:
                item["_margin"] = float(row[hp.margin_column])
            out.append(item)
        unknown.warn(where)
        self.record_dropped(dropped, len(rows), where, "pair")
        return out

    # ----------------------------------------------------------------------------------------- batches
    def collate(self, items: list[dict]) -> dict[str, Any]:
        seqs = [it["_chosen_ids"] for it in items] + [it["_rejected_ids"] for it in items]
        input_ids, attention_mask = right_pad(seqs, self.tokenizer.pad_token_id)  # [2B, L]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "_margin" in items[0]:
            batch["margin"] = torch.tensor([it["_margin"] for it in items], dtype=torch.float32)  # [B]
        return with_columns(batch, items)
