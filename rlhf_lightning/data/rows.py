"""Data rows: loading them from files, dataset folders and hub ids (`load_rows`, each `Row` remembering its file
and line), checking every one, and rendering prompts and responses as text."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from ..infra.errors import ConfigError
from ..infra.paths import DATA_FILE_FORMATS, looks_like_path


def load_rows(path: str, split: str = "train", subset: str | None = None) -> list[dict[str, Any]]:
    """Rows (dicts) from a local file, a local dataset folder or a hub id; one-line ValueError on failure."""
    import datasets

    local = Path(os.path.expanduser(path))
    name = f"{path} (split {split!r})"  # how its rows are named in messages: "<name> row <index>"
    try:
        if local.is_file():
            name = path
            fmt = DATA_FILE_FORMATS.get(local.suffix.lower())
            if fmt is None:
                raise ValueError(f"data file {path!r} has unsupported extension {local.suffix!r}; "
                                 f"use one of {sorted(DATA_FILE_FORMATS)}")
            if fmt == "json":
                return _read_json_rows(local, path)
            ds = datasets.load_dataset(fmt, data_files=str(local), split="train")
            if fmt == "csv":
                return _label_rows(ds, path, _csv_record_lines(local), "line")
        elif local.is_dir():
            if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(local))
                name = path if isinstance(ds, datasets.Dataset) else name  # one saved Dataset: no split to name
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise ValueError(f"dataset folder {path!r} has splits {list(ds)}, not {split!r}")
                    ds = ds[split]
            else:
                ds = datasets.load_dataset(str(local), subset, split=split)
        elif looks_like_path(path):
            raise ValueError(f"data path {path!r} does not exist")
        else:
            ds = datasets.load_dataset(path, subset, split=split)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - one clear line instead of a library traceback
        msg = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"could not load data {path!r} (split {split!r}): {type(err).__name__}: {msg}") from err
    return _label_rows(ds, name, range(len(ds)), "row")


class Row(dict):
    """One data row: a plain dict of its columns that also remembers where it came from (`where`, e.g.
    "data.jsonl line 7"), so a bad value found at load time is reported with its file and line."""

    def __init__(self, values: dict[str, Any], where: str):
        super().__init__(values)
        self.where = where


def _label_rows(records, name: str, positions, unit: str) -> list[Row]:
    """Rows labelled "<name> <unit> <position>"; when the positions do not match the records (a file the line
    scan reads differently), "<name> row <index>" (0-based, as `dataset[index]`)."""
    records, positions = list(records), list(positions)
    if len(positions) != len(records):
        positions, unit = range(len(records)), "row"
    return [Row(dict(r), f"{name} {unit} {n}") for r, n in zip(records, positions)]


def _csv_record_lines(path: Path) -> list[int]:
    """The line each csv record starts on (the header is line 1; blank lines are skipped, as the loader does)."""
    import csv

    starts: list[int] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        previous = reader.line_num
        for record in reader:
            if record:
                starts.append(previous + 1)
            previous = reader.line_num
    return starts


def _read_json_rows(path: Path, name: str) -> list[Row]:
    """jsonl (one object per line) or a json list; errors name the line, rows remember it."""
    import json

    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
        positions, unit = range(len(rows)), "record"
    else:
        rows, positions, unit = [], [], "line"
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from err
            positions.append(lineno)
    for row, n in zip(rows, positions):
        if not isinstance(row, dict):
            raise ValueError(f"{name} {unit} {n}: every record must be a JSON object, got {type(row).__name__}")
    return _label_rows(rows, name, positions, unit)


# --------------------------------------------------------------------------------------- row validation
# Every row is checked when the data is loaded, so a bad row deep in a file stops the run before it starts,
# with its file and line, instead of crashing a late batch (an empty prompt in sampling, a missing column in
# collate, a None in a reward function).
def is_missing(value: Any) -> bool:
    """None, or a float NaN (how parquet/csv readers mark an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def row_where(row: dict, index: int, source: str) -> str:
    """Where a row came from: its file and line when loaded from one, else "<source> row <index>"."""
    return getattr(row, "where", None) or f"{source} row {index}"


def check_columns(rows: list[dict], required: list[str], source: str, hint: str) -> None:
    """Each `required` column, and each column any row has a value in, is present and not null in every row
    (reward functions read columns by name; a row without one would fail in a late batch). Raises ConfigError."""

    first: dict[str, int] = {}  # column -> index of the first row with a value in it
    for i, row in enumerate(rows):
        for key, value in row.items():
            if key not in first and not is_missing(value):
                first[key] = i
    for col in required:
        if col not in first:
            columns = sorted({k for row in rows for k in row})
            detail = " (it is empty in every row)" if col in columns else f"; columns are {columns}"
            raise ConfigError(f"{source} has no column {col!r}{detail} ({hint})")
    for i, row in enumerate(rows):
        for col, j in first.items():
            if col not in row or is_missing(row[col]):
                state = "has no" if col not in row else f"has a null ({row[col]!r})"
                raise ConfigError(f"{row_where(row, i, source)}: {state} value in column {col!r}, which other rows "
                                  f"fill (e.g. {row_where(rows[j], j, source)}); reward functions read columns by "
                                  f"name: fill it in or drop the column")


def check_reserved_columns(rows: list[dict], reserved: set[str], source: str) -> None:
    """No data column may be named like a key the batches (or the reward functions' arguments) already use: it
    would silently replace that key, or collide with it in the reward call. Raises ConfigError."""

    clashes = sorted(reserved & {k for row in rows for k in row})
    if clashes:
        raise ConfigError(f"{source} has a column named {clashes[0]!r}, a name the batches and reward functions "
                          f"already use ({', '.join(sorted(reserved))}); rename that column")


def check_each_row(rows: list[dict], check: Any, source: str) -> None:
    """`check(row)` on every row; its ValueError becomes a ConfigError naming the row's file and line."""

    for i, row in enumerate(rows):
        try:
            check(row)
        except ValueError as err:
            raise ConfigError(f"{row_where(row, i, source)}: {err}") from err


def check_prompt(prompt: Any, allow_empty: bool = False) -> None:
    """A prompt is a non-empty string or a non-empty list of chat messages `{role: str, content: str}`."""
    if isinstance(prompt, str):
        if not allow_empty and not prompt.strip():
            raise ValueError(f"the prompt is empty{' (whitespace only)' if prompt else ''}; every prompt needs text")
        return
    if not isinstance(prompt, list):
        raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("the prompt is an empty list of chat messages")
    for k, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), (str, list))):
            raise ValueError(f"prompt message {k} is not a chat message {{role: str, content: str}}: "
                             f"{short_repr(message)}")
    if not allow_empty and not any(str(m["content"]).strip() for m in prompt):
        raise ValueError("every message of the prompt has empty content")


def response_text(response: Any, where: str = "response") -> str:
    """A response as text: a string as is (a number as its str), or the content of chat messages that are all the
    assistant's (TRL's conversational format puts the conversation in `prompt` and only the reply in `chosen`)."""
    if isinstance(response, str):
        return response
    if isinstance(response, (int, float)) and not isinstance(response, bool):
        return str(response)  # csv/json loaders turn "42" into 42
    if isinstance(response, list) and all(isinstance(m, dict) and "content" in m for m in response):
        roles = {m.get("role", "assistant") for m in response}
        if roles != {"assistant"}:
            raise ValueError(f"{where} messages must be assistant replies only (got roles {sorted(roles)}); "
                             f"put the conversation in the prompt column")
        return "".join(str(m["content"]) for m in response)
    raise ValueError(f"{where} must be a string or a list of chat messages, got {type(response).__name__}")


def check_response(response: Any, where: str) -> str:
    """`response_text` of a response that must not be empty (an empty target teaches nothing); returns it."""
    text = response_text(response, where)
    if not text.strip():
        raise ValueError(f"{where} is empty{' (whitespace only)' if text else ''}")
    return text


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class UnknownCharacters:
    """Collects the characters a tokenizer maps to its unknown token while rows are tokenized, to warn once.

    Only the tokenizer's `unk_token_id` is looked for (byte-level tokenizers have none and know every
    character); the characters are found through the fast tokenizer's offsets.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        self.chars: set[str] = set()
        self.rows = 0
        self.first: str | None = None

    def add(self, text: str, ids: list[int], where: str) -> None:
        if self.unk_id is None or self.unk_id not in ids:
            return
        found = self._characters(text)
        if not found:  # the text spells the unknown token itself (e.g. "<unk>"): nothing was lost
            return
        self.chars |= found
        self.rows += 1
        self.first = self.first or where

    def _characters(self, text: str) -> set[str]:
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
            return {"?"}
        unk_text = self.tokenizer.unk_token
        spans = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == self.unk_id]
        return {c for span in spans if span != unk_text for c in (span or "?")}

    def warn(self, split: str) -> None:
        if not self.rows:
            return
        shown = ", ".join(repr(c) for c in sorted(self.chars)[:20]) + (", ..." if len(self.chars) > 20 else "")
        warnings.warn(f"{self.rows} {split} row(s) contain characters the tokenizer does not know, which become "
                      f"{self.tokenizer.unk_token!r} (the model cannot read or write them): {shown} (first: "
                      f"{self.first}); use a tokenizer that covers them or clean the data", stacklevel=3)


def prompt_text(tokenizer, prompt: Any, tools: list[dict] | None = None) -> str:
    """A prompt as text: strings pass through, chat messages go through the tokenizer's chat template (with the
    JSON schemas of `tools`, which a tools-capable template describes to the model, e.g. in its system message)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **extra)
    raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
