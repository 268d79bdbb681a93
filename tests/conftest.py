"""Shared fixtures: the char tokenizer (built once), quiet, tmp-rooted Trainer settings, and the launchers of
runs in other processes (the console script; two-process DDP / FSDP2 runs).

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


REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "rlhf-lightning"  # the console script users run (pip install -e .)


def subprocess_env(*paths: Path | str) -> dict[str, str]:
    """This environment with `paths` first on PYTHONPATH and one OpenMP thread per process."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), *inherited]), "OMP_NUM_THREADS": "1"}


def run_script(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The installed console script in `cwd`, with `cwd` first on PYTHONPATH (where a user's `my_pkg.py` lives)."""
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=subprocess_env(cwd), capture_output=True, text=True,
                          timeout=timeout, check=False)


# ------------------------------------------------------------------------------------ runs on two processes
def run_processes(command: list[str], cwd: Path, *paths: Path | str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`command`: a run that Lightning spreads over several processes (`devices=2`: DDP and FSDP2 launch the other
    rank themselves, gloo on CPU), with `paths` and this checkout importable. It must exit 0; else the end of its
    stderr is the failure message."""
    out = subprocess.run(command, check=False, capture_output=True, text=True, env=subprocess_env(*paths, REPO),
                         timeout=timeout, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def run_script_processes(tmp_path: Path, source: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The Python script `source` (it trains with `devices=2`), written to `tmp_path` and run there with `args`."""
    script = tmp_path / "two_processes.py"
    script.write_text(source)
    return run_processes([sys.executable, str(script), *args], tmp_path, timeout=timeout)


# A reward that a random tiny policy can move (exact_match is 0 for every sample: zero advantages, no gradient,
# so two runs would agree trivially). Written to a file so the CLI's processes can import it by path.
DIGIT_REWARD = "def digit_reward(prompts, completions, **kwargs):\n" \
               "    return [float(c[:1].isdigit()) for c in completions]\n"


def run_cli_processes(tmp_path: Path, name: str, args: list[str]) -> Path:
    """`python -m rlhf_lightning fit ...` from the repository root, with `digit_reward.py` importable from
    `tmp_path` (Lightning launches the second rank); -> its default_root_dir, `tmp_path / name`."""
    (tmp_path / "digit_reward.py").write_text(DIGIT_REWARD)
    root = tmp_path / name
    run_processes([sys.executable, "-m", "rlhf_lightning", "fit", *args, "--trainer.default_root_dir", str(root)],
                  REPO, tmp_path)
    return root


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
