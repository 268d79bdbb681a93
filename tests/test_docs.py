"""The docs stay true: every `rlhf-lightning` command in the README and docs/ parses, every argument is documented."""

from __future__ import annotations

import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import run_script, tensorboard_scalars

import rlhf_lightning
from rlhf_lightning.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_commands(page: Path) -> list[str]:
    """`rlhf-lightning ...` commands of the page's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line)  # environment prefixes (OMP_NUM_THREADS=1 ...)
            if line.startswith("rlhf-lightning "):
                commands.append(line)
    return commands


COMMANDS = [(page.name, cmd) for page in PAGES for cmd in shell_commands(page)
            if "..." not in cmd and "<" not in cmd and "--help" not in cmd]  # placeholders: not runnable as is


def test_the_pages_have_commands():
    assert len(COMMANDS) >= 10, COMMANDS
    assert {"README.md", "grpo.md", "ppo.md", "reward_model.md"} <= {page for page, _ in COMMANDS}


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:70]}" for p, c in COMMANDS])
def test_documented_command_parses(page, command, tmp_path, monkeypatch, capsys):
    """The command as written, with --print_config: LightningCLI resolves every class, key and value, runs nothing."""
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])
    monkeypatch.chdir(tmp_path)
    args = [str(REPO / a) if a.startswith("configs/") else a for a in shlex.split(command)[1:]]
    if "--print_config" not in args:
        args.append("--print_config")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["PromptDataModule", "PreferenceDataModule", "SFTModule", "RewardModel",
                                  "GRPOModule", "PPOModule", "IterativeRewardModelCallback"])
def test_config_reference_lists_every_argument(name):
    reference = (REPO / "docs" / "configs.md").read_text()
    params = [p for p in inspect.signature(getattr(rlhf_lightning, name).__init__).parameters if p != "self"]
    missing = [p for p in params if f"`{p}`" not in reference]
    assert not missing, f"docs/configs.md does not document {name}'s {missing}"


# ----------------------------------------------------------------------------------- the README's subclass snippet
def readme_python_block(containing: str) -> str:
    """The README's ```python block that contains `containing`, verbatim."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
              if containing in b]
    assert len(blocks) == 1, f"expected one README python block with {containing!r}, found {len(blocks)}"
    return blocks[0]


@pytest.mark.parametrize("cls", ["LengthGRPO", "LengthPPO"])
def test_readme_subclass_snippet_trains_and_validates_through_its_hook(cls, tmp_path):
    """The snippet pasted verbatim into my_pkg.py trains two rollouts from the console script, and validation
    scores through its `compute_rewards`: val/reward is the length reward (≤ 0), not a verifier's 0/1 (the data is
    plain prompts: no task, no reward functions, so before the fix there was no val/* at all)."""
    (tmp_path / "my_pkg.py").write_text(readme_python_block("class LengthGRPO"))
    rows = "".join(f'{{"prompt": "{i}+{i}="}}\n' for i in range(16))
    (tmp_path / "prompts.jsonl").write_text(rows)
    small = ["--model.max_new_tokens", "6", "--model.log_samples_every_n_steps", "0"]
    small += ["--model.group_size", "2"] if cls == "LengthGRPO" else ["--model.ppo_epochs", "1"]
    proc = run_script(["fit", "--model", f"my_pkg.{cls}", "--data", "rlhf_lightning.PromptDataModule",
                       "--data.path", "prompts.jsonl", "--data.val_path", "prompts.jsonl", "--data.batch_size", "2",
                       "--data.val_batch_size", "4", *small, "--trainer.max_steps", "2" if cls == "LengthGRPO"
                       else "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                       "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
                       "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.logger.init_args.save_dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = tensorboard_scalars(tmp_path)
    assert "val/reward" in scalars, sorted(scalars)
    assert all(-1 <= v <= -0.4 for v in scalars["val/reward"]), scalars["val/reward"]  # ≤ 6 characters
    assert len(scalars["reward/mean"]) == 2  # two rollouts were trained
