"""Stepwise supervision for process reward models: TRL's rows `{"prompt", "completions": [step, ...], "labels":
[bool, ...]}` from files, folders, the hub or a built-in task (correct chains and chains with an injected error).

Each row is tokenized as the process reward model reads it (`rewards.model_inputs.stepwise_input_ids`: prompt
tokens, then each step's tokens and the separator's, the step's label on the separator's last token).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..infra.errors import ConfigError
from ..rewards.model_inputs import right_pad, step_label_row, stepwise_input_ids
from .negatives import check_model_setting, make_stepwise_rows
from .prompts import PromptDataModule, with_columns, without_prompts_of
from .rows import UnknownCharacters, check_columns, check_each_row, check_prompt, row_where, short_repr


class StepwiseDataModule(PromptDataModule):
    """Stepwise-supervision rows (TRL's format) for `ProcessRewardModel`.

    Batches: {"input_ids": [B, L], "attention_mask": [B, L]} right-padded, "labels": [B, L] with step k's label
    (1 = correct, 0 = incorrect) at the last token of its separator and -100 elsewhere; the raw "prompts",
    "completions" (lists of steps), "step_labels" (lists of bools) and every other column as lists. Sources, splits,
    shuffling (seeded, resumable) and the tokenizer work as in `PromptDataModule`, whose loading this class reuses.

    Each step is followed by the model's `step_separator` (what `ProcessRewardModel` exports and the reward source
    splits completions on; "\\n" when used without a Trainer); a step that contains it is refused.

    File rows: `prompt` a string (or chat messages), `completions` a non-empty list of non-empty step strings,
    `labels` a list of booleans of the same length (csv cells hold them as JSON lists: `["7+5=12", "12-3=9"]`,
    `[true, false]`). A bad row stops the run before it starts with one line naming its file and line.

    Built-in rows (`task: chain`): each generated chain is written correctly or, with probability `error_rate`,
    with a wrong intermediate result at a uniformly drawn step k; the later steps are recomputed from the wrong
    value, as a policy that slipped writes them, and the labels are true before k and false from k on
    (`negatives.make_stepwise_rows`). With `stop_rate`, some right chains stop early; with `end_step` (default)
    every row ends with the end step "" (`algorithms.process`): true iff the chain is whole and right. Seeded by
    `seed`; validation prompts are removed from the training rows.

    The end step: a row whose last step is "" (the only step that may be empty) teaches the model to judge the
    end of a solution, scored on the separator after the last real step's. A model trained on such rows records
    `scores_end` in its export, and `ProcessRewardModelSource` then scores every completion's end too.

    Args:
        path / task / task_kwargs / num_train / num_val / subset / split / val_split / val_path / val_fraction /
        prompt_column / tokenizer / batch_size / val_batch_size / seed / shuffle / num_workers: as in
            `PromptDataModule` (num_train / num_val count rows; `completion_column` and `max_prompt_length` do not
            apply and are refused).
        error_rate: built-in rows only: the share of chains with an injected error.
        errors: built-in rows only: weights of the kinds of error, as `PreferenceDataModule`'s negatives: a wrong
            result that is `random` (a uniformly random wrong number, the default), `digit` (one digit changed) or
            `near` (±1, ±2, ±10: a policy's near misses); or `policy`: `errors_model`'s own wrong sample, its steps
            labelled by the task's step verifier (the mistakes RL will meet).
        errors_model: with `policy` errors: the causal LM (the SFT export) whose samples they are.
        end_step: built-in rows only: end every row with the end step "", labelled whole-and-right.
        stop_rate: built-in rows only: the share of error-free chains cut after a uniformly drawn number of their
            steps (their end step is false): a policy's way of failing that no step label shows.
        max_length: rows longer than this many tokens are dropped (with a count warning).
    """

    def __init__(self, path: str | None = None, task: str | None = None, task_kwargs: dict[str, Any] | None = None,
                 error_rate: float = 0.5, errors: dict[str, float] | None = None, errors_model: str | None = None,
                 end_step: bool = True, stop_rate: float = 0.25, num_train: int = 5000,
                 num_val: int = 500, batch_size: int = 32, max_length: int = 512, **kwargs: Any):
        if not (isinstance(error_rate, (int, float)) and 0 <= error_rate <= 1):
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate!r}")
        if not (isinstance(stop_rate, (int, float)) and 0 <= stop_rate <= 1):
            raise ValueError(f"stop_rate must be in [0, 1], got {stop_rate!r}")
        if not isinstance(end_step, bool):
            raise ValueError(f"end_step must be true or false, got {end_step!r}")
        for name in ("completion_column", "max_prompt_length"):  # PromptDataModule's, meaningless here
            if kwargs.get(name) is not None:
                raise ValueError(f"data.{name} does not apply to StepwiseDataModule (the steps are the `completions` "
                                 f"column; max_length bounds a whole row)")
        kwargs.pop("max_prompt_length", None)
        super().__init__(path=path, task=task, task_kwargs=task_kwargs, num_train=num_train, num_val=num_val,
                         batch_size=batch_size, max_prompt_length=max_length, max_length=max_length, **kwargs)
        if self.task is not None:  # the task has built-in rows and `errors` are known kinds: fail now
            make_stepwise_rows(self.task, [], error_rate, errors, errors_model=errors_model)
            check_model_setting("errors_model", errors_model)
        else:
            for name, value, default in (("error_rate", error_rate, 0.5), ("errors", errors, None),
                                         ("errors_model", errors_model, None), ("stop_rate", stop_rate, 0.25),
                                         ("end_step", end_step, True)):
                if value != default:
                    raise ValueError(f"data.{name} applies to built-in rows (`task`) only, not to `path` data")
        self.step_separator: str | None = None  # the model's, when the rows are tokenized (`setup`)
        self.dropped: dict[str, int] = {}  # split -> rows dropped by max_length

    # ----------------------------------------------------------------------------------------- loading
    def task_rows(self, train: list[dict], val: list[dict]) -> tuple[list[dict], list[dict]]:
        hp = self.hparams
        rows = [without_prompts_of(train, val), val]
        return tuple(make_stepwise_rows(self.task, r, hp.error_rate, hp.errors, seed=hp.seed + i,
                                        errors_model=hp.errors_model, end_step=hp.end_step, stop_rate=hp.stop_rate)
                     for i, r in enumerate(rows))

    @property
    def has_end_steps(self) -> bool:
        """Some training row ends with the end step "": the model learns to judge a solution's end."""
        return any(item["completions"][-1] == "" for item in self.train_rows)

    RESERVED_COLUMNS = frozenset({"prompts", "step_labels", "input_ids", "attention_mask"})

    def _check_rows(self, rows: list[dict], source: str) -> None:
        """Every row, before any is used: the prompt / completions / labels columns exist and are filled, the
        prompt is text or chat messages (it may be empty), the steps are non-empty strings and the labels booleans,
        as many as steps. Raises a ConfigError naming the file and line of the first bad row."""
        if not rows:
            return
        check_columns(rows, [self.hparams.prompt_column, "completions", "labels"], source,
                      "stepwise rows: prompt, completions (list of steps), labels (list of booleans)")
        clashes = sorted(self.RESERVED_COLUMNS & {k for row in rows for k in row})
        if clashes:
            raise ConfigError(f"{source} has a column named {clashes[0]!r}, a name the batches already use; rename it")
        check_each_row(rows, self._check_row, source)

    def _check_row(self, row: dict) -> None:
        check_prompt(row[self.hparams.prompt_column], allow_empty=True)
        stepwise_lists(row)

    # ----------------------------------------------------------------------------------------- tokenizing
    def setup(self, stage: str | None = None) -> None:
        if self.sampler is None:  # the separator is the model's (`ProcessRewardModel.step_separator`, exported)
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.step_separator = getattr(module, "step_separator", None)
        super().setup(stage)

    def prepare_rows(self, tokenizer, step_separator: str | None = None) -> None:
        """Load, check and tokenize the rows (callable without a Trainer, e.g. in notebooks), each step followed by
        `step_separator` (default: the model's when set up by a Trainer, else "\\n")."""
        self.step_separator = step_separator or self.step_separator or "\n"
        super().prepare_rows(tokenizer)

    def _check_separator(self, row: dict) -> None:
        for k, step in enumerate(stepwise_lists(row)[0]):
            if self.step_separator in step:
                raise ValueError(f"step {k} {short_repr(step)} contains the step separator {self.step_separator!r}: "
                                 f"it would be read as two steps when completions are split for scoring")

    def _tokenize(self, rows: list[dict], where: str) -> list[dict]:
        hp, tok, sep = self.hparams, self.tokenizer, self.step_separator
        check_each_row(rows, self._check_separator, f"the {where} data")
        out, dropped = [], 0
        unknown = UnknownCharacters(tok)
        for i, row in enumerate(rows):  # the values were checked when the rows were loaded (`_check_rows`)
            prompt = self._rendered_prompt(row, i, where)
            steps, labels = stepwise_lists(row)
            ids, positions = stepwise_input_ids(tok, prompt, steps, sep)
            unknown.add(prompt + "".join(s + sep for s in steps), ids, row_where(row, i, where))
            if len(ids) > hp.max_length:
                dropped += 1
                continue
            item = {k: v for k, v in row.items() if k not in (hp.prompt_column, "completions", "labels")}
            item.update(prompts=prompt, completions=steps, step_labels=labels, _ids=ids,
                        _labels=step_label_row(len(ids), positions, labels))
            out.append(item)
        unknown.warn(where)
        self.record_dropped(dropped, len(rows), where, "row")
        return out

    # ----------------------------------------------------------------------------------------- batches
    def collate(self, items: list[dict]) -> dict[str, Any]:
        input_ids, attention_mask = right_pad([it["_ids"] for it in items], self.tokenizer.pad_token_id)  # [B, L]
        labels = torch.full_like(input_ids, -100)  # [B, L]
        for i, it in enumerate(items):
            labels[i, :len(it["_labels"])] = torch.tensor(it["_labels"])
        return with_columns({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, items)


def stepwise_lists(row: dict) -> tuple[list[str], list[bool]]:
    """(steps, labels) of a stepwise row, checked: a non-empty list of non-empty step strings and a list of as many
    booleans (a JSON list in a string cell, as csv stores them, is read as the list). ValueError otherwise."""
    steps, labels = _as_list(row["completions"], "completions"), _as_list(row["labels"], "labels")
    if not steps:
        raise ValueError("completions is an empty list; a stepwise row needs at least one step")
    if len(steps) != len(labels):
        raise ValueError(f"completions has {len(steps)} steps but labels has {len(labels)}: one label per step")
    for k, step in enumerate(steps):
        if not isinstance(step, str):
            raise ValueError(f"step {k} must be a string, got {type(step).__name__} {short_repr(step)}")
        if not step.strip() and not (step == "" and k == len(steps) - 1 and k > 0):
            raise ValueError(f"step {k} is empty{' (whitespace only)' if step else ''}; only a last step may be empty "
                             f"(the end step), after at least one real step")
    for k, label in enumerate(labels):
        if not isinstance(label, bool) and type(label).__name__ != "bool_":  # numpy's bool from parquet readers
            raise ValueError(f"label {k} must be a boolean (true = the step is correct), got {short_repr(label)}")
    return list(steps), [bool(label) for label in labels]


def _as_list(value: Any, column: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{column} must be a list, got the string {short_repr(value)}") from None
    if hasattr(value, "tolist") and not isinstance(value, list):  # a numpy array
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{column} must be a list, got {type(value).__name__} {short_repr(value)}")
    return list(value)
