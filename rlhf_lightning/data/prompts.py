"""Prompt data for RL (and prompt+completion pairs for SFT).

`PromptDataModule` reads prompts from a built-in task, a local jsonl/json/parquet/csv file, a local dataset
folder or a hub id, keeps every other column (reward functions receive them by name), tokenizes the prompts
once in `setup`, and yields left-padded batches:

    {"prompt_ids": [B, P], "prompt_mask": [B, P], "prompts": list[str], <column>: list, ...}
    (+ "input_ids", "attention_mask", "labels": [B, L] right-padded, when `completion_column` is set, for SFT)

The tokenizer is the model's: when `tokenizer` is not given, `setup` takes `trainer.lightning_module.tokenizer`,
so one `model_name_or_path` in the YAML decides both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..infra.errors import ConfigError
from ..infra.paths import looks_like_path
from ..rewards import CHAT_PROMPTS
from .rows import (
    UnknownCharacters,
    check_columns,
    check_each_row,
    check_prompt,
    check_reserved_columns,
    check_response,
    load_rows,
    prompt_text,
    response_text,
    row_where,
    short_repr,
)
from .tasks import get_task


class ResumableSampler(Sampler[int]):
    """A seeded shuffle (a new permutation per epoch) that can restart mid-epoch.

    `state_dict()` records the epoch and how many indices of it were consumed, so a resumed run sees exactly the
    prompts the interrupted one would have seen next.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch = 0
        self.consumed = 0  # indices of the current epoch handed out so far (set by the data module on resume)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of every epoch
        if epoch != self.epoch:
            # a new epoch starts from its first index (a pending mid-epoch skip belonged to the old one)
            self.epoch, self.consumed, self._skip = epoch, 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_items, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        start, self._skip = self._skip, 0
        for i in range(start, len(order)):
            self.consumed = i + 1
            yield order[i]
        self.consumed = 0
        self.epoch += 1

    def __len__(self) -> int:
        return self.num_items

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = state["epoch"], state["consumed"]


class _ResumableDataLoader(DataLoader):
    """A DataLoader whose position is its sampler's: Lightning sees `state_dict`/`load_state_dict`, stores the
    position in the loop state and knows a mid-epoch resume continues exactly (no "not resumable" warning).
    Used on one process only: under DDP Lightning wraps the sampler in a DistributedSampler (see
    `train_dataloader`)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict() if isinstance(self.sampler, ResumableSampler) else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state)


class _ListDataset(Dataset):
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _refuse_task_only_arguments(cls: type, **given: Any) -> None:
    """`num_train`, `num_val`, `task_kwargs` shape a built-in task's generated examples; with `path` data they would be
    silently ignored (every row of the data is used), so a value other than the class's default is refused."""
    import inspect

    defaults = inspect.signature(cls.__init__).parameters
    for name, value in given.items():
        if name in defaults and value != defaults[name].default:
            raise ValueError(f"data.{name}={value!r} applies to built-in tasks (`task`) only; with `path` every row "
                             f"of the data is used (val_fraction / val_path / val_split choose the validation rows)")


class PromptDataModule(L.LightningDataModule):
    """Prompts (+ every other column) for RL, or prompt/completion pairs for SFT.

    Args:
        path: a local .jsonl/.json/.parquet/.csv file, a local dataset folder, or a hub dataset id.
            Mutually exclusive with `task`.
        task: a built-in task name (`addition`, `chain`); examples are generated, seeded, offline.
        task_kwargs: arguments of the task (e.g. `{digits: 3}`).
        num_train / num_val: how many task examples to generate for train / validation.
        subset: the hub dataset's configuration name (e.g. `main` for gsm8k).
        split / val_split: split names for hub datasets and dataset folders.
        val_path: a separate validation file; else `val_split` (hub/folder) or `val_fraction` of the train rows.
        val_fraction: share of rows held out for validation when no other validation source is given.
        prompt_column: the column holding the prompt (a string, or a list of chat messages).
        completion_column: for SFT: the column holding the target completion (an EOS is appended).
        tokenizer: a tokenizer name/path; None = the LightningModule's own tokenizer.
        batch_size: prompts per step (GRPO repeats each `group_size` times inside the step).
        val_batch_size: prompts per validation batch (default: batch_size).
        max_prompt_length: longer prompts are left-truncated (keeping their end) with one warning.
        max_length: SFT only: prompt+completion tokens kept (longer pairs are dropped with a count).
        seed: shuffling seed (and the task's example seed).
        num_workers: DataLoader workers (0 is right for the small tokenized tensors here).
    """

    def __init__(
        self,
        path: str | None = None,
        task: str | None = None,
        task_kwargs: dict[str, Any] | None = None,
        num_train: int = 2000,
        num_val: int = 200,
        subset: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        prompt_column: str = "prompt",
        completion_column: str | None = None,
        tokenizer: str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_prompt_length: int = 256,
        max_length: int = 512,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        if (path is None) == (task is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of `path` (file, folder or hub id) or `task` "
                             "(built-in: addition, chain)")
        for name, value in (("batch_size", batch_size), ("num_train", num_train), ("max_prompt_length",
                            max_prompt_length), ("max_length", max_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be a positive integer, got {val_batch_size!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if path is not None:
            _refuse_task_only_arguments(type(self), num_train=num_train, num_val=num_val, task_kwargs=task_kwargs)
        if path is not None and looks_like_path(path) and not Path(os.path.expanduser(path)).exists():
            raise ValueError(f"data path {path!r} does not exist")
        if val_path is not None and not Path(os.path.expanduser(val_path)).exists():
            raise ValueError(f"val_path {val_path!r} does not exist")
        if task is not None:
            self.task = get_task(task, **(task_kwargs or {}))  # validates name and kwargs now, not after loading
        else:
            self.task = None
        self.save_hyperparameters()
        self._file_rows = self._read_local_file()
        self.tokenizer = None
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self.sampler: ResumableSampler | None = None
        self._pending_sampler_state: dict[str, int] | None = None

    # ----------------------------------------------------------------------------------------- loading
    def _read_local_file(self) -> list[dict] | None:
        """A local data file is read and every row checked (parse errors, emptiness, columns, values) here, in
        __init__, so a bad file fails before any model is loaded; folders and hub ids are read in `setup`."""
        hp = self.hparams
        if hp.path is None or not Path(os.path.expanduser(hp.path)).is_file():
            return None
        rows = load_rows(hp.path)
        if not rows:
            raise ValueError(f"data {hp.path!r} is empty")
        self._check_rows(rows, f"data {hp.path!r}")
        if hp.val_path is not None and Path(os.path.expanduser(hp.val_path)).is_file():
            self._check_rows(load_rows(hp.val_path), f"val_path {hp.val_path!r}")
        return rows

    def _load_all_rows(self) -> tuple[list[dict], list[dict]]:
        hp = self.hparams
        if self.task is not None:
            train = self.task.make_examples(hp.num_train, seed=hp.seed)
            val = self.task.make_examples(hp.num_val, seed=hp.seed + 1_000_003) if hp.num_val else []
            return self.task_rows(train, val)
        rows = self._file_rows
        if rows is None:  # a folder or hub id: read (and checked) now
            rows = load_rows(hp.path, split=hp.split, subset=hp.subset)
            if not rows:
                raise ValueError(f"data {hp.path!r} is empty")
            self._check_rows(rows, f"data {hp.path!r}")
        if hp.val_path is not None:
            val = load_rows(hp.val_path)
            self._check_rows(val, f"val_path {hp.val_path!r}")
        elif hp.val_split is not None:
            val = load_rows(hp.path, split=hp.val_split, subset=hp.subset)
            self._check_rows(val, f"data {hp.path!r} split {hp.val_split!r}")
        elif hp.val_fraction > 0 and len(rows) > 1:
            n_val = max(1, int(round(len(rows) * hp.val_fraction)))
            if n_val >= len(rows):
                raise ConfigError(f"data.val_fraction={hp.val_fraction} holds out {n_val} of the {len(rows)} rows of "
                                  f"{hp.path!r}, leaving none to train on; lower val_fraction or add rows")
            gen = torch.Generator().manual_seed(hp.seed)
            order = torch.randperm(len(rows), generator=gen).tolist()
            val = [rows[i] for i in order[:n_val]]
            rows = [rows[i] for i in order[n_val:]]
        else:
            val = []
        return rows, val

    def task_rows(self, train: list[dict], val: list[dict]) -> tuple[list[dict], list[dict]]:
        """A built-in task's generated (train, val) examples as this data module's rows: as they are here; the
        preference and stepwise data modules build their rows from them."""
        return train, val

    def record_dropped(self, dropped: int, total: int, where: str, unit: str) -> None:
        """Keep the count of `where`'s rows dropped for `max_length` (`self.dropped`) and warn when there are any."""
        self.dropped[where] = dropped
        if dropped:
            warnings.warn(f"dropped {dropped} of {total} {where} {unit}(s) longer than max_length="
                          f"{self.hparams.max_length} tokens", stacklevel=3)

    # keys of a batch (collate), of the reward batch (GRPO/PPO add `columns`, `samples`) and the reward functions'
    # own arguments: a data column with one of these names would replace it or collide with it
    RESERVED_COLUMNS = frozenset({"prompts", "completions", "prompt_ids", "prompt_mask", "input_ids", "attention_mask",
                                  "labels", "columns", "samples"})

    def _check_rows(self, rows: list[dict], source: str) -> None:
        """Every row of a data source, before any is used: the prompt (and SFT completion) columns exist, no row
        lacks a column the others fill, each prompt is non-empty text or chat messages, each completion non-empty.
        Raises a ConfigError naming the file and line of the first bad row."""
        if not rows:
            return
        hp = self.hparams
        needed = [hp.prompt_column] + ([hp.completion_column] if hp.completion_column else [])
        check_columns(rows, needed, source, "set prompt_column/completion_column")
        check_reserved_columns(rows, self.RESERVED_COLUMNS - {hp.prompt_column}, source)
        check_each_row(rows, self._check_row, source)

    def _check_row(self, row: dict) -> None:
        """One row's values (ValueError with the problem; the caller adds where the row is)."""
        hp = self.hparams
        check_prompt(row[hp.prompt_column])
        if hp.completion_column:
            check_response(row[hp.completion_column], f"the completion (column {hp.completion_column!r})")

    def _resolve_tokenizer(self):
        if self.hparams.tokenizer is not None:
            from ..tokenizer import load_tokenizer

            return load_tokenizer(self.hparams.tokenizer)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or getattr(module, "tokenizer", None) is None:
            raise ValueError("PromptDataModule has no tokenizer: pass `tokenizer` or use it with a module that has "
                             "a `tokenizer` attribute")
        return module.tokenizer

    def prepare_rows(self, tokenizer) -> None:
        """Load, validate and tokenize train/val rows (callable without a Trainer, e.g. in notebooks)."""
        self.tokenizer = tokenizer
        train, val = self._load_all_rows()
        if self.task is not None:  # generated rows: only the configured columns can be wrong
            self._check_rows(train, "the training data")
            self._check_rows(val, "the validation data")
        self.train_rows = self._tokenize(train, "train")
        self.val_rows = self._tokenize(val, "validation")
        if not self.train_rows:
            raise ValueError("no training examples left after filtering (check max_length / the data)")
        self.sampler = ResumableSampler(len(self.train_rows), seed=self.hparams.seed, shuffle=self.hparams.shuffle)
        if self._pending_sampler_state is not None:
            self.sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tool_schemas = getattr(module, "chat_tool_schemas", None)
            self.prepare_rows(self._resolve_tokenizer())

    tool_schemas: list[dict] | None = None  # the module's tools, for chat templates that describe them (`setup`)

    def _prompt_text(self, prompt: Any) -> str:
        return prompt_text(self.tokenizer, prompt, self.tool_schemas)

    def _rendered_prompt(self, row: dict, index: int, split: str) -> str:
        """The row's prompt as text (chat messages through the chat template); errors name the row."""
        try:
            return self._prompt_text(row[self.hparams.prompt_column])
        except Exception as err:  # noqa: BLE001 - e.g. a tokenizer without a chat template: one line naming the row
            raise ConfigError(f"{row_where(row, index, split)}: could not render the prompt: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err

    def _tokenize(self, rows: list[dict], where: str) -> list[dict]:

        hp, tok = self.hparams, self.tokenizer
        out, truncated, dropped = [], [], 0
        unknown = UnknownCharacters(tok)
        chat = any(isinstance(row[hp.prompt_column], list) for row in rows)
        for i, row in enumerate(rows):
            text = self._rendered_prompt(row, i, where)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"{row_where(row, i, where)}: the prompt {short_repr(text)} has no tokens")
            unknown.add(text, ids, row_where(row, i, where))
            if len(ids) > hp.max_prompt_length:
                truncated.append((len(ids), row_where(row, i, where)))
                ids = ids[-hp.max_prompt_length:]
            item = {k: v for k, v in row.items() if k != hp.prompt_column}
            item["prompts"], item["_prompt_ids"] = text, ids
            if chat:  # the messages themselves: reward functions get them as TRL passes them (rewards.trl_inputs)
                item[CHAT_PROMPTS] = row[hp.prompt_column] if isinstance(row[hp.prompt_column], list) else None
            if hp.completion_column:
                completion = response_text(row[hp.completion_column])
                target = tok(completion, add_special_tokens=False)["input_ids"]
                unknown.add(completion, target, row_where(row, i, where))
                target = target + [tok.eos_token_id]
                if len(ids) + len(target) > hp.max_length:
                    dropped += 1
                    continue
                item["_target_ids"] = target
            out.append(item)
        unknown.warn(where)
        if truncated:
            longest, at = max(truncated)
            warnings.warn(f"{len(truncated)} {where} prompt(s) longer than max_prompt_length={hp.max_prompt_length} "
                          f"tokens were left-truncated (the longest, {at}, has {longest}); raise "
                          f"data.max_prompt_length to keep them whole", stacklevel=2)
        if dropped:
            warnings.warn(f"dropped {dropped} {where} pair(s) longer than max_length={hp.max_length} tokens",
                          stacklevel=2)
        return out

    # ----------------------------------------------------------------------------------------- batches
    def collate(self, items: list[dict]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        P = max(len(it["_prompt_ids"]) for it in items)
        prompt_ids = torch.full((len(items), P), pad, dtype=torch.long)  # [B, P] left-padded
        prompt_mask = torch.zeros((len(items), P), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["_prompt_ids"])
            prompt_ids[i, P - n:] = torch.tensor(it["_prompt_ids"])
            prompt_mask[i, P - n:] = 1
        batch = with_columns({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}, items)
        if "_target_ids" in items[0]:
            seqs = [it["_prompt_ids"] + it["_target_ids"] for it in items]
            L_ = max(map(len, seqs))
            input_ids = torch.full((len(items), L_), pad, dtype=torch.long)  # [B, L] right-padded
            attention_mask = torch.zeros((len(items), L_), dtype=torch.long)
            labels = torch.full((len(items), L_), -100, dtype=torch.long)  # loss on completion tokens only
            for i, (it, seq) in enumerate(zip(items, seqs)):
                input_ids[i, :len(seq)] = torch.tensor(seq)
                attention_mask[i, :len(seq)] = 1
                labels[i, len(it["_prompt_ids"]):len(seq)] = torch.tensor(it["_target_ids"])
            batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return batch

    def train_dataloader(self) -> DataLoader:
        ranks = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_rows) < self.hparams.batch_size * ranks:  # drop_last: not one batch, nothing would train
            raise ConfigError(f"data: {len(self.train_rows)} training rows make no full batch of batch_size="
                              f"{self.hparams.batch_size} x {ranks} rank(s); lower data.batch_size or add rows")
        # its own generator: creating the iterator (every epoch, and again on resume) draws the workers' base
        # seed from it instead of the global torch RNG, so a resumed run's global RNG matches the straight one
        distributed = self.trainer is not None and self.trainer.world_size > 1
        # under DDP Lightning replaces the sampler by a distributed one whose position is not saved: a plain
        # DataLoader keeps Lightning's warning that a mid-epoch resume is then not exact
        loader_class = DataLoader if distributed else _ResumableDataLoader
        return loader_class(_ListDataset(self.train_rows), batch_size=self.hparams.batch_size, sampler=self.sampler,
                            collate_fn=self.collate, num_workers=self.hparams.num_workers, drop_last=True,
                            generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        return DataLoader(_ListDataset(self.val_rows), batch_size=self.hparams.val_batch_size or
                          self.hparams.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    # ----------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" in state:
            if self.sampler is not None:
                self.sampler.load_state_dict(state["sampler"])
            else:
                self._pending_sampler_state = state["sampler"]


def with_columns(batch: dict[str, Any], items: list[dict]) -> dict[str, Any]:
    """`batch` plus every column of the items that is not internal (`_`-prefixed), as lists."""
    for key in items[0]:
        if not key.startswith("_"):
            batch[key] = [it[key] for it in items]
    return batch


def without_prompts_of(rows: list[dict], held_out: list[dict]) -> list[dict]:
    """`rows` without those whose prompt is one of `held_out`'s (held-out means never trained on)."""
    prompts = {row["prompt"] for row in held_out}
    return [row for row in rows if row["prompt"] not in prompts]
