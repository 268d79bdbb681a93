"""`rlhf-lightning`: help, `--print_config` on every shipped YAML, subclass mode, TensorBoard by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))

# a subclass-mode SFT run small enough for a test: 64 generated pairs, batches of 8, 8 validation prompts
SFT_ARGS = ["--model", "rlhf_lightning.SFTModule", "--data", "rlhf_lightning.PromptDataModule",
            "--data.task", "addition", "--data.completion_column", "completion", "--data.num_train", "64",
            "--data.num_val", "8", "--data.batch_size", "8", "--model.val_max_new_tokens", "4",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """In-process runs pass `args`; pytest's own sys.argv must not look like extra command-line arguments."""
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])


def run_cli(args: list[str]) -> int:
    """cli_main(args) -> the exit code it would give on the command line."""
    try:
        cli_main(args)
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def test_help_lists_the_subcommands(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_fit_help_shows_subclass_mode(capsys):
    assert run_cli(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--data" in out and "--trainer.max_steps" in out


def test_there_are_configs():
    assert {"sft_arithmetic.yaml", "grpo_arithmetic.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_print_config_parses_every_yaml(config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in a config must not touch the repository
    source = yaml.safe_load(config.read_text())
    # a layer (configs/fsdp.yaml: trainer settings only) is parsed on top of a task config, as it is used
    base = [] if "model" in source else ["--config", str(config.parent / "grpo_arithmetic.yaml")]
    assert run_cli(["fit", *base, "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # every value the YAML sets survives parsing unchanged (jsonargparse fills in the rest with defaults)
    for part in ("model", "data"):
        if part in source:
            assert printed[part]["class_path"].rsplit(".", 1)[-1] == source[part]["class_path"].rsplit(".", 1)[-1]
            for key, value in (source[part].get("init_args") or {}).items():
                assert printed[part]["init_args"][key] == value, f"{config.name}: {part}.{key}"
    for key, value in (source.get("trainer") or {}).items():
        if isinstance(value, dict) and "class_path" in value:  # a class (strategy): the keys the YAML sets
            assert printed["trainer"][key]["class_path"] == value["class_path"], f"{config.name}: trainer.{key}"
            for arg, v in (value.get("init_args") or {}).items():
                assert printed["trainer"][key]["init_args"][arg] == v, f"{config.name}: trainer.{key}.{arg}"
        elif key not in ("logger", "callbacks"):
            assert printed["trainer"][key] == value, f"{config.name}: trainer.{key}"


def test_python_dash_m_help_runs_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "{fit,validate,test,predict}" in proc.stdout
    assert "args parameter is intended" not in proc.stderr  # cli_main must not pass sys.argv twice


SCRIPT = Path(sys.executable).parent / "rlhf-lightning"  # the console script users run (pip install -e .)


def test_console_script_is_installed(tmp_path):
    assert SCRIPT.exists(), "rlhf-lightning console script not installed in this environment (pip install -e .)"
    proc = subprocess.run([str(SCRIPT), "fit", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--trainer.max_steps" in proc.stdout


def test_console_script_exits_zero_after_fit_and_validate(tmp_path):
    """The script passes cli's return value to sys.exit: a returned CLI object printed its repr and exited 1."""
    common = [*SFT_ARGS, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    runs = [["fit", *common, "--trainer.max_steps", "2"], ["validate", *common]]
    for args in runs:
        proc = subprocess.run([str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, f"{args[0]}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert "RLHFLightningCLI object" not in proc.stdout + proc.stderr


def test_subclass_mode_fit_runs_and_exports(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", *SFT_ARGS, "--trainer.max_steps", "2", "--trainer.logger", "false",
                    "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0"])
    assert type(cli.model).__name__ == "SFTModule" and type(cli.datamodule).__name__ == "PromptDataModule"
    assert cli.trainer.global_step == 2 and cli.model.optimizer_steps == 2
    export = tmp_path / "hf_model"  # no logger: the export lands in default_root_dir (here the cwd)
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(export).config.vocab_size == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "hf_model"]  # nothing else written


def test_tensorboard_is_the_default_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", *SFT_ARGS, "--trainer.max_steps", "3", "--trainer.enable_checkpointing", "false",
                    "--trainer.limit_val_batches", "0"])
    from lightning.pytorch.loggers import TensorBoardLogger

    assert isinstance(cli.trainer.logger, TensorBoardLogger)  # RunLogger: TensorBoard rooted at default_root_dir
    run_dir = tmp_path / "runs" / "rlhf" / "version_0"
    assert Path(cli.trainer.log_dir).resolve() == run_dir.resolve()
    assert list(run_dir.glob("events.out.tfevents.*")), sorted(p.name for p in run_dir.iterdir())
    assert (run_dir / "config.yaml").exists()  # the full resolved config, for reproducing the run
    assert (run_dir / "hf_model" / "model.safetensors").exists()  # the export sits beside the events

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [0, 1, 2]  # log_every_n_steps=1: one point per optimizer step


def test_validate_subcommand_reports_loss_and_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["validate", *SFT_ARGS, "--trainer.logger", "false"])
    metrics = cli.trainer.callback_metrics
    assert {"val/loss", "val/reward", "val/accuracy"} <= set(metrics)
    assert 3.0 < float(metrics["val/loss"]) < 6.0  # an untrained model: about ln(99) = 4.6 nats per token
    assert float(metrics["val/accuracy"]) == 0.0  # and it cannot add yet
    assert not (tmp_path / "hf_model").exists()  # only fit exports


def test_config_file_run_with_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(REPO / "configs" / "sft_arithmetic.yaml"), "--trainer.max_steps", "2",
                    "--data.init_args.num_train", "128", "--data.init_args.batch_size", "8",
                    "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
                    "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.lr == 3.0e-3 and cli.datamodule.hparams.batch_size == 8
    assert (tmp_path / "runs" / "sft_arithmetic" / "version_0" / "hf_model" / "config.json").exists()


def test_user_errors_surface_as_one_line_exit_2(tmp_path, monkeypatch, capsys):
    # (tests/test_errors.py drives many more bad inputs through the CLI)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["fit", *SFT_ARGS, "--data.task", "subtraction", "--trainer.logger", "false"]) == 2
    assert "rlhf-lightning: error: unknown task 'subtraction'" in capsys.readouterr().err
    assert run_cli(["fit", "--model", "rlhf_lightning.SFTModule", "--data", "rlhf_lightning.PromptDataModule",
                    "--data.path", "./missing.jsonl", "--trainer.logger", "false"]) == 2
    assert "rlhf-lightning: error: data path './missing.jsonl' does not exist" in capsys.readouterr().err
