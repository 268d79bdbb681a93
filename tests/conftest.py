"""Shared fixtures: the char tokenizer (built once) and quiet, tmp-rooted Trainer settings.

Every test that trains or exports roots its run in `tmp_path`, so the suite leaves nothing in the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one intra-op thread is as fast as two on an idle 2-core machine and 5-15x faster
# on a busy one (OpenMP threads spin against each other).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def char_tok():
    """The built-in char tokenizer (pad=0, eos=1, unk=2, ' '=3 ... '~'=97, newline=98)."""
    from rlhf_lightning.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def char_ids(text: str) -> list[int]:
    """Hand-computed char-tokenizer ids: printable ASCII c -> ord(c) - 29, newline -> 98."""
    return [98 if c == "\n" else ord(c) - 29 for c in text]


@pytest.fixture
def trainer_kwargs(tmp_path: Path) -> dict[str, Any]:
    """A silent CPU Trainer rooted in tmp_path (no logger, no checkpoints); override per test."""
    return {"default_root_dir": str(tmp_path), "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu", "devices": 1}


SCRIPT = Path(sys.executable).parent / "rlhf-lightning"  # the console script users run (pip install -e .)


def run_script(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed console script in `cwd`, with `cwd` first on PYTHONPATH (where a user's `my_pkg.py` lives)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def tensorboard_scalars(root: Path) -> dict[str, list[float]]:
    """Every scalar tag written under `root` (all event files), with its values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for folder in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in events.Scalars(tag))
    return out
