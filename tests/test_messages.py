"""Mistakes that used to print a screen of usage or a traceback: through the installed console script, each ends
with exit status 2 and ONE line `rlhf-lightning: error: ...` naming the culprit (and the closest valid name)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "rlhf-lightning"
GRPO_CONFIG = str(REPO / "configs" / "grpo_arithmetic.yaml")
SUBCLASS = ["--model", "rlhf_lightning.GRPOModule", "--data", "rlhf_lightning.PromptDataModule"]
# a GRPO run of one tiny rollout, for the mistakes that are only seen once the run is set up
TINY_RUN = [*SUBCLASS, "--data.task", "addition", "--data.num_train", "16", "--data.num_val", "0",
            "--model.group_size", "2", "--model.max_new_tokens", "2", "--trainer.max_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process exited 2 with no usage screen and no traceback; -> its one error line."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("rlhf-lightning: error: "), proc.stderr[-3000:]
    return lines[0]


# (id, arguments, files to write {name: text}, the exact one-line message)
PARSE_CASES = [
    ("init_arg_typo", ["fit", "--config", GRPO_CONFIG, "--model.init_args.group_sise", "4"], {},
     "unknown key 'model.init_args.group_sise': rlhf_lightning.GRPOModule has no argument 'group_sise'; "
     "did you mean 'group_size'?"),
    ("subclass_mode_typo", ["fit", *SUBCLASS, "--model.group_sise", "4"], {},
     "unknown key 'model.init_args.group_sise': rlhf_lightning.GRPOModule has no argument 'group_sise'; "
     "did you mean 'group_size'?"),
    ("trl_name_in_yaml", ["fit", "--config", GRPO_CONFIG, "--config", "trl.yaml"],
     {"trl.yaml": "model:\n  init_args:\n    learning_rate: 1.0e-5\n"},
     "unknown key 'model.init_args.learning_rate': rlhf_lightning.GRPOModule has no argument 'learning_rate'; "
     "did you mean 'lr'? ('learning_rate' is TRL's name)"),
    ("data_key_typo_in_yaml", ["fit", "--config", GRPO_CONFIG, "--config", "data.yaml"],
     {"data.yaml": "data:\n  init_args:\n    batch_sise: 4\n"},
     "unknown key 'data.init_args.batch_sise': rlhf_lightning.PromptDataModule has no argument 'batch_sise'; "
     "did you mean 'batch_size'?"),
    ("trainer_key_typo", ["fit", "--config", GRPO_CONFIG, "--trainer.max_stepz", "3"], {},
     "unknown key 'trainer.max_stepz'; did you mean 'trainer.max_steps'?"),
    ("trainer_key_typo_in_yaml", ["fit", "--config", GRPO_CONFIG, "--config", "trainer.yaml"],
     {"trainer.yaml": "trainer:\n  max_stepz: 3\n"},
     "unknown key 'trainer.max_stepz'; did you mean 'trainer.max_steps'?"),
    ("subcommand_typo", ["fitt", "--config", GRPO_CONFIG], {},
     "unknown subcommand 'fitt'; did you mean 'fit'? (one of fit, validate, test, predict)"),
    ("class_path_typo", ["fit", "--model", "rlhf_lightning.GRPOModul"], {},
     "model: cannot use class 'rlhf_lightning.GRPOModul' (module 'rlhf_lightning' has no attribute 'GRPOModul'); "
     "did you mean 'GRPOModule'?"),
    ("class_path_moved", ["fit", "--config", GRPO_CONFIG, "--config", "old_run.yaml"],
     {"old_run.yaml": "trainer:\n  logger:\n    class_path: rlhf_lightning.loggers.RunLogger\n"},
     "trainer.logger: cannot use class 'rlhf_lightning.loggers.RunLogger' (module 'rlhf_lightning' has no attribute "
     "'loggers'); it is now rlhf_lightning.infra.loggers.RunLogger"),
    ("class_path_missing_module", ["fit", "--model", "my_pkg.MyGRPO"], {},
     "model: cannot use class 'my_pkg.MyGRPO' (No module named 'my_pkg')"),
    ("wrong_type", ["fit", "--config", GRPO_CONFIG, "--model.init_args.group_size", "eight"], {},
     "model.init_args.group_size expects a value of type int, got 'eight'"),
    ("wrong_type_trainer", ["fit", "--config", GRPO_CONFIG, "--trainer.max_steps", "many"], {},
     "trainer.max_steps expects a value of type int, got 'many'"),
    ("wrong_type_nested", ["fit", "--config", GRPO_CONFIG, "--data.init_args.task_kwargs", "3"], {},
     "data.init_args.task_kwargs expects a value of type dict, got '3'"),
    ("wrong_type_union", ["fit", "--config", GRPO_CONFIG, "--seed_everything", "abc"], {},
     "seed_everything expects a value of type bool or int, got 'abc'"),
    ("yaml_not_a_mapping", ["fit", "--config", GRPO_CONFIG, "--config", "list.yaml"], {"list.yaml": "- a\n- b\n"},
     "config file 'list.yaml' holds a list, not a mapping of sections (seed_everything:, trainer:, model:, data:)"),
    ("trainer_argument_lightning_refuses", ["fit", *TINY_RUN, "--trainer.devices", "-5"], {},
     "trainer: `devices` selected with `CPUAccelerator` should be an int > 0."),
]


FAST = {"init_arg_typo", "trl_name_in_yaml"}  # the rest: one process start each (~5-15 s on a busy machine)


@pytest.mark.parametrize("args, files, expected", [
    pytest.param(*c[1:], id=c[0], marks=() if c[0] in FAST else pytest.mark.slow) for c in PARSE_CASES])
def test_parse_mistakes_give_one_line_with_the_closest_name(tmp_path, args, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert one_error_line(run_script(args, tmp_path)) == f"rlhf-lightning: error: {expected}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of a one-epoch tiny run (2 steps)."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = run_script(["fit", *TINY_RUN, "--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
                       "--trainer.logger", "false", "--trainer.default_root_dir", str(root)], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return ckpt


# a truncated checkpoint: tests/test_resume.py::test_a_truncated_checkpoint_is_one_line


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    line = one_error_line(run_script(["fit", *TINY_RUN, "--trainer.logger", "false", "--ckpt_path", "notes.ckpt"],
                                     tmp_path))
    assert line == ("rlhf-lightning: error: checkpoint 'notes.ckpt' is not a PyTorch checkpoint (it starts with "
                    "b'not ', neither a zip archive nor a pickle)")


@pytest.mark.slow
def test_a_whole_checkpoint_still_resumes(tmp_path, checkpoint):
    shutil.copy(checkpoint, tmp_path / "whole.ckpt")
    proc = run_script(["fit", *TINY_RUN, "--trainer.logger", "false", "--trainer.max_steps", "3",
                       "--ckpt_path", "whole.ckpt", "--trainer.default_root_dir", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read_only(folder: Path) -> None:
    """Make `folder` refuse new files, also for root (who ignores permission bits): the immutable attribute."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("running as root on a filesystem without chattr +i: no way to make a folder read-only")
    else:
        folder.chmod(0o555)


def writable_again(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    folder.chmod(0o755)


@pytest.mark.parametrize("where", ["default_root_dir", "below_it"])
def test_a_read_only_output_folder_is_refused_before_training(tmp_path, where):
    folder = tmp_path / "ro"
    folder.mkdir()
    root = folder if where == "default_root_dir" else folder / "new"
    read_only(folder)
    try:
        proc = run_script(["fit", *TINY_RUN, "--trainer.default_root_dir", str(root)], tmp_path)
    finally:
        writable_again(folder)
    line = one_error_line(proc)
    assert line.startswith(f"rlhf-lightning: error: output folder '{root}' is not writable ("), line
    assert line.endswith("); choose another with --trainer.default_root_dir"), line
    assert "exported model" not in proc.stdout + proc.stderr  # refused before any work was done


def test_an_output_folder_below_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    line = one_error_line(run_script(["fit", *TINY_RUN, "--trainer.default_root_dir", "afile/out"], tmp_path))
    assert line == ("rlhf-lightning: error: output folder 'afile/out' is not writable (Not a directory); choose "
                    "another with --trainer.default_root_dir")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from rlhf_lightning.models import load_causal_lm
    from rlhf_lightning.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    load_causal_lm("tiny", tok).save_pretrained(tmp_path / "model")  # 99 embedding rows
    tok.save_pretrained(tmp_path / "model")
    tok.add_tokens([f"<extra_{i}>" for i in range(20)])  # 119 tokens: ids 99..118 have no embedding
    tok.save_pretrained(tmp_path / "big_tokenizer")
    args = ["fit", *TINY_RUN, "--trainer.logger", "false", "--model.model_name_or_path", "model",
            "--model.tokenizer_name_or_path", "big_tokenizer"]
    assert one_error_line(run_script(args, tmp_path)) == (
        "rlhf-lightning: error: tokenizer 'big_tokenizer' has 119 tokens but model 'model' embeds only 99: token "
        "ids >= 99 have no embedding; use the model's own tokenizer or one it was trained with "
        "(tokenizer_name_or_path)")
