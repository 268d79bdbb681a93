"""Bad inputs through the CLI: each ends with exit status 2 and ONE line naming the culprit, no traceback.

The inputs are checked before any model is loaded where possible (module/datamodule __init__); the few that
can only be seen in `setup` (no reward source, a missing checkpoint) still fail before the first step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_lightning.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
GRPO = ["--model", "rlhf_lightning.GRPOModule", "--data", "rlhf_lightning.PromptDataModule",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.max_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TASK = ["--data.task", "addition", "--data.num_train", "16", "--data.num_val", "0"]


class RunsCodeWhenUnpickled:
    """A checkpoint entry that would create a folder if unpickled with weights_only=False."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def write_files(root: Path) -> None:
    """Data files with one defect each (named after it) and one good file."""
    (root / "good.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                             for i in range(8)))
    (root / "empty.jsonl").write_text("\n")
    (root / "bad_line.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n{"prompt": "3+3=",}\n')
    (root / "no_prompt.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    (root / "prompts.txt").write_text("1+1=\n")
    torch.save({"state_dict": {}, "payload": RunsCodeWhenUnpickled(str(root / "code_ran"))}, root / "unsafe.ckpt")
    from rlhf_lightning.models import load_causal_lm
    from rlhf_lightning.tokenizer import build_char_tokenizer

    load_causal_lm("tiny", build_char_tokenizer()).save_pretrained(root / "sft_export")  # a policy, not an RM
    build_char_tokenizer().save_pretrained(root / "sft_export")
    (root / "broken.yaml").write_text("model:\n  class_path: rlhf_lightning.GRPOModule\n  init_args: {beta: 0.1\n")


# (id, extra CLI arguments, the text the one-line message must contain)
CASES = [
    ("missing_data_file", ["--data.path", "./missing.jsonl"], "data path './missing.jsonl' does not exist"),
    ("unsupported_extension", ["--data.path", "prompts.txt"], "unsupported extension '.txt'"),
    ("empty_data", ["--data.path", "empty.jsonl"], "data 'empty.jsonl' is empty"),
    ("unparseable_line", ["--data.path", "bad_line.jsonl"], "bad_line.jsonl: line 3 is not valid JSON"),
    ("missing_prompt_column", ["--data.path", "no_prompt.jsonl"],
     "has no column 'prompt'; columns are ['answer', 'question']"),
    ("missing_val_path", ["--data.path", "good.jsonl", "--data.val_path", "nope.jsonl"],
     "val_path 'nope.jsonl' does not exist"),
    ("unknown_task", ["--data.task", "subtraction"], "unknown task 'subtraction'"),
    ("group_size", [*TASK, "--model.group_size", "1"], "group_size must be an integer >= 2"),
    ("beta", [*TASK, "--model.beta", "-0.1"], "beta must be >= 0, got -0.1"),
    ("clip_low", [*TASK, "--model.clip_low", "1.5"], "clip_low must be in [0, 1), got 1.5"),
    ("clip_high", [*TASK, "--model.clip_high", "-0.2"], "clip_high must be >= 0, got -0.2"),
    ("lr", [*TASK, "--model.lr", "0"], "lr must be in (0, 1), got 0"),
    ("rollout_engine", [*TASK, "--model.rollout_engine", "vllm"], "rollout_engine must be auto|hf|fast, got 'vllm'"),
    ("batch_size", [*TASK, "--data.batch_size", "0"], "batch_size must be a positive integer, got 0"),
    ("batch_larger_than_data", [*TASK, "--data.batch_size", "64", "--data.num_train", "10"],
     "10 training rows make no full batch of batch_size=64"),
    ("max_new_tokens", [*TASK, "--model.max_new_tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    ("max_prompt_length", [*TASK, "--data.max_prompt_length", "0"], "max_prompt_length must be a positive integer"),
    ("min_new_tokens", [*TASK, "--model.max_new_tokens", "4", "--model.min_new_tokens", "5"],
     "min_new_tokens must be in [0, max_new_tokens=4], got 5"),
    ("temperature_degenerate", [*TASK, "--model.temperature", "0"], "temperature must be > 0 for GRPO"),
    ("top_k_greedy", [*TASK, "--model.top_k", "1"], "top_k=1 is greedy"),
    ("model_path", [*TASK, "--model.model_name_or_path", "./no_such_model"], "model path './no_such_model' does "
     "not exist"),
    ("reward_fn_import", [*TASK, "--model.reward_fns", "[no_such_pkg.rewards.score]"],
     "reward function 'no_such_pkg.rewards.score': cannot import module"),
    ("reward_fn_attribute", [*TASK, "--model.reward_fns", "[rlhf_lightning.rewards.no_such_fn]"],
     "has no attribute 'no_such_fn'"),
    ("no_reward_source", ["--data.path", "good.jsonl"], "GRPOModule has no reward"),
    ("missing_checkpoint", [*TASK, "--ckpt_path", "missing.ckpt"], "missing.ckpt"),
    ("unsafe_checkpoint", [*TASK, "--ckpt_path", "unsafe.ckpt"], "checkpoint 'unsafe.ckpt' was not loaded: it "
     "holds pickled objects that weights_only loading refuses (Trying to load unsupported GLOBAL os.makedirs"),
    ("ppo_gamma", ["--model", "rlhf_lightning.PPOModule", *TASK, "--model.gamma", "1.5"],
     "gamma must be in [0, 1], got 1.5"),
    ("causal_lm_as_reward_model", [*TASK, "--model.reward_model", "sft_export"],
     "reward model 'sft_export' is not a reward model: it has no trained score head"),
    ("ppo_causal_lm_as_reward_model", ["--model", "rlhf_lightning.PPOModule", *TASK, "--model.reward_model",
                                       "sft_export"], "reward model 'sft_export' is not a reward model"),
    ("rm_with_prompt_data", ["--model", "rlhf_lightning.RewardModel", *TASK, "--data.completion_column", "completion"],
     "RewardModel trains on preference pairs, but the data is a PromptDataModule"),
    ("grpo_with_preference_data", ["--data", "rlhf_lightning.PreferenceDataModule", *TASK],
     "GRPOModule trains on prompts, but the data is a PreferenceDataModule"),
    ("grpo_minibatches", [*TASK, "--data.batch_size", "4", "--model.minibatches", "8"],
     "minibatches=8 is more than the 4 groups of a rollout (data.batch_size=4 per rank)"),
    ("accumulate_grad_batches", [*TASK, "--trainer.accumulate_grad_batches", "4"],
     "trainer.accumulate_grad_batches=4 does not apply to GRPOModule, which optimizes manually"),
    ("ppo_gradient_clip_val", ["--model", "rlhf_lightning.PPOModule", *TASK, "--trainer.gradient_clip_val", "1.0"],
     "trainer.gradient_clip_val=1.0 does not apply to PPOModule, which optimizes manually (its own optimizer steps "
     "per rollout); set model.max_grad_norm=1.0 instead"),
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])
    write_files(tmp_path)
    return tmp_path


def run(args: list[str]) -> int:
    try:
        cli_main(args)
    except SystemExit as exit_:
        return exit_.code
    return 0


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_status_2(in_tmp, capsys, args, expected):
    assert run(["fit", *GRPO, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("rlhf-lightning: error: "), err
    assert expected in lines[0], lines[0]
    assert not (in_tmp / "code_ran").exists()


def test_malformed_yaml_names_the_file_and_line(in_tmp, capsys):
    assert run(["fit", "--config", "broken.yaml"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["rlhf-lightning: error: config file 'broken.yaml' is not valid YAML at line 4, column 1: "
                     "expected ',' or '}', but got '<stream end>'"]
    assert run(["fit", "--config", "absent.yaml"]) == 2
    assert "config file 'absent.yaml' does not exist" in capsys.readouterr().err


def test_the_real_process_prints_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning", "fit", *GRPO, *TASK, "--model.group_size", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("rlhf-lightning: error: group_size must be an integer >= 2 "
                                                    "(advantages are relative within a group), got 1")


def test_a_bug_keeps_its_traceback(in_tmp, capsys):
    """Only configuration errors are shortened: an error raised inside a training step keeps its traceback,
    followed by one line saying where its error.ckpt is (exit status 1)."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--model", "test_errors.BuggyGRPO", "--data", "rlhf_lightning.PromptDataModule",
                  *GRPO[4:], *TASK, "--model.group_size", "2", "--model.max_new_tokens", "2",
                  "--data.batch_size", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "Traceback" in err and "return 1 / 0" in err
    assert err.strip().splitlines()[-1].startswith(
        "rlhf-lightning: error: training stopped by ZeroDivisionError: division by zero (checkpoint saved to ")


from rlhf_lightning import GRPOModule  # noqa: E402


class BuggyGRPO(GRPOModule):
    def compute_rewards(self, prompts, completions, batch):
        return 1 / 0


# ------------------------------------------------------------------------------- bad rows, through the script
SCRIPT = Path(sys.executable).parent / "rlhf-lightning"  # the console script users run
RM = ["--model", "rlhf_lightning.RewardModel", "--data", "rlhf_lightning.PreferenceDataModule", *GRPO[4:]]
SFT = ["--model", "rlhf_lightning.SFTModule", *GRPO[2:], "--data.completion_column", "completion"]


def rows_then(bad: str, good: str, n: int = 40) -> str:
    """n - 1 good jsonl lines then one bad one: the bad row is in the last batch of an epoch."""
    return "".join(good.format(i=i) + "\n" for i in range(n - 1)) + bad + "\n"


# (id, file name, file text, extra CLI arguments, the one line after "rlhf-lightning: error: ")
SCRIPT_CASES = [
    ("grpo_empty_prompt", "d.jsonl", rows_then('{"prompt": "", "answer": "1"}', '{{"prompt": "{i}+1=", "answer": '
                                               '"{i}"}}'), GRPO, "d.jsonl line 40: the prompt is empty; every "
     "prompt needs text"),
    ("grpo_empty_reward_cell", "d.csv", "prompt,answer\n" + "".join(f"{i}+1=,{i + 1}\n" for i in range(39)) +
     "39+1=,\n", GRPO, "d.csv line 41: has a null (None) value in column 'answer', which other rows fill (e.g. "
     "d.csv line 2); reward functions read columns by name: fill it in or drop the column"),
    ("sft_empty_completion", "s.jsonl", rows_then('{"prompt": "1+1=", "completion": ""}', '{{"prompt": "{i}+1=", '
                                                  '"completion": "{i}"}}'), SFT, "s.jsonl line 40: the completion "
     "(column 'completion') is empty"),
    ("rm_equal_pair", "p.jsonl", rows_then('{"prompt": "1+1=", "chosen": "2", "rejected": "2"}', '{{"prompt": '
                                           '"{i}+1=", "chosen": "{i}", "rejected": "x"}}'), RM, "p.jsonl line 40: "
     "chosen and rejected are the same text ('2'): the pair teaches nothing"),
]


@pytest.mark.slow  # four process starts
@pytest.mark.parametrize("name, text, args, expected", [c[1:] for c in SCRIPT_CASES], ids=[c[0] for c in SCRIPT_CASES])
def test_a_bad_row_stops_the_script_before_training_with_its_line(tmp_path, name, text, args, expected):
    (tmp_path / name).write_text(text)
    proc = subprocess.run([str(SCRIPT), "fit", *args, "--data.path", name, "--model.model_name_or_path", "tiny"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"rlhf-lightning: error: {expected}"
