"""One rule for what names a local path and what names a hub id (models, tokenizers and data alike).

A name that exists on disk is loaded from disk before this rule is asked. For one that does not, the rule
decides between "this path does not exist" (a one-line error at once) and a hub lookup (the HF cache, then the
network), so a mistyped local path never costs a hub round-trip nor reads as a missing hub repo.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# the local data files `load_rows` reads, by suffix -> the `datasets` builder that reads them
DATA_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def looks_like_path(name: str) -> bool:
    """True when `name` can only be a local path; False when it may be a hub id (`name` or `org/name`).

    A hub id has at most one `/`, no backslash, and is no file name; so `name` is a local path when it
    - starts with `.`, `/` or `~` (`./x`, `../x`, `/abs/x`, `~/x`),
    - holds a backslash or starts with a drive letter (`C:\\x`, `C:/x`: a Windows path),
    - has more than one `/` (`runs/sft/version_0/hf_model`),
    - ends in a data-file suffix (`train.jsonl`, `x.json`, `x.parquet`, `x.csv`), or
    - has a folder part that exists here (`runs/x` where `./runs` exists: an org name on the hub is not a local
      folder, a local folder is what the user meant).
    Everything else (`gpt2`, `Qwen/Qwen2.5-0.5B`, `openai/gsm8k`) may be a hub id.
    """
    if name.startswith((".", "/", "~")) or "\\" in name or _WINDOWS_DRIVE.match(name) or name.count("/") > 1:
        return True
    if Path(name).suffix.lower() in DATA_FILE_FORMATS:
        return True
    parent = os.path.dirname(os.path.expanduser(name))
    return bool(parent) and os.path.isdir(parent)
