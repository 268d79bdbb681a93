"""Where a run's outputs go, through the installed `rlhf-lightning` console script, shipped configs as shipped.

Lightning's contract: `--trainer.default_root_dir X` puts every output of a run under X. The CLI's logger
(`rlhf_lightning.infra.loggers.RunLogger`, which the shipped configs use to name their run) writes to
`<default_root_dir>/runs/<name>/version_<n>/`, so events, `config.yaml`, `checkpoints/` and `hf_model/` land there;
default_root_dir defaults to the current folder, which keeps the README's `runs/...` paths valid.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import cli_main
from rlhf_lightning.infra.loggers import RunLogger

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SCRIPT = Path(sys.executable).parent / "rlhf-lightning"

# one epoch of 2 batches of 4 prompts (so the epoch-end checkpoint is written), one validation batch of 4
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL_DATA = ["--data.init_args.num_train", "8", "--data.init_args.num_val", "4", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4"]
ONE_EPOCH = ["--trainer.max_epochs", "1", "--trainer.max_steps", "-1", "--trainer.limit_val_batches", "1", *QUIET]
RL = [*ONE_EPOCH, *SMALL_DATA, "--trainer.val_check_interval", "2", "--model.init_args.max_new_tokens", "4",
      "--model.init_args.val_max_new_tokens", "4"]
# per shipped config (in pipeline order: later stages start from earlier exports), the shrinking overrides
SHRUNK = {
    "sft_arithmetic": [*ONE_EPOCH, *SMALL_DATA, "--trainer.val_check_interval", "2",
                       "--model.init_args.val_max_new_tokens", "4"],
    # the RM starts from the SFT export and is trained on its mistakes (configs/rm_arithmetic.yaml)
    "rm_arithmetic": [*ONE_EPOCH, *SMALL_DATA, "--model.init_args.model_name_or_path", "{sft}",
                      "--data.init_args.negatives_model", "{sft}"],
    "grpo_arithmetic": [*RL, "--model.init_args.group_size", "2"],
    # (validation of step rewards is another issue's item: this run checks the outputs, so it skips validation;
    # check_val_every_n_epoch 1 makes ModelCheckpoint save at the epoch end instead of after a validation)
    "grpo_process": [*RL, "--model.init_args.group_size", "2", "--trainer.limit_val_batches", "0",
                     "--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval", "1.0"],
    # the process-reward-model route: SFT on chains, the PRM on built-in stepwise rows, GRPO rewarded by the PRM
    "sft_chain": [*ONE_EPOCH, *SMALL_DATA, "--trainer.val_check_interval", "2",
                  "--model.init_args.val_max_new_tokens", "4"],
    "prm_chain": [*ONE_EPOCH, *SMALL_DATA],
    "grpo_process_prm": [*RL, "--model.init_args.group_size", "2", "--model.init_args.model_name_or_path",
                         "{sft_chain}", "--model.init_args.process_reward_model", "{prm_chain}"],
    # iterative RL with the PRM: the callback labels 4 fresh samples per rollout (MC, 2 continuations a step)
    "grpo_iterative_prm": [*RL, "--model.init_args.group_size", "2", "--model.init_args.model_name_or_path",
                           "{sft_chain}", "--model.init_args.process_reward_model", "{prm_chain}",
                           "--trainer.callbacks.init_args.every_n_steps", "1",
                           "--trainer.callbacks.init_args.samples_per_iteration", "4",
                           "--trainer.callbacks.init_args.num_rollouts", "2"],
    "grpo_iterative": [*RL, "--model.init_args.group_size", "2", "--model.init_args.reward_model", "{rm}",
                       "--trainer.callbacks.init_args.every_n_steps", "1",
                       "--trainer.callbacks.init_args.samples_per_iteration", "16",
                       # a label a random policy splits ~50/50, so (right, wrong) pairs exist and the RM is retrained
                       "--trainer.callbacks.init_args.labeler", "parity_label.first_char_parity"],
    "ppo_arithmetic": [*RL, "--model.init_args.model_name_or_path", "{sft}"],
    # tools: SFT on the calculator task (validation samples with the calculator), GRPO with it from that export
    "sft_calculator": [*ONE_EPOCH, *SMALL_DATA, "--trainer.val_check_interval", "2",
                       "--model.init_args.val_max_new_tokens", "8"],
    "grpo_calculator": [*RL, "--model.init_args.group_size", "2", "--model.init_args.model_name_or_path",
                        "{sft_calculator}"],
    "ppo_rm": [*RL, "--model.init_args.model_name_or_path", "{sft}", "--model.init_args.reward_model", "{rm}"],
    # an environment: the feedback checker's two-try episodes from the SFT export (budget for both tries)
    "grpo_feedback": [*RL, "--model.init_args.group_size", "2", "--model.init_args.model_name_or_path", "{sft}",
                      "--model.init_args.max_new_tokens", "16", "--model.init_args.val_max_new_tokens", "16"],
}
HUB_CONFIGS = ["grpo_gsm8k", "ppo_hh"]  # need downloads: checked by parsing only


PARITY_LABEL = "def first_char_parity(prompts, completions, **kwargs):\n" \
               "    return [float(ord(c[0]) % 2) if c else 0.0 for c in completions]\n"


def script_env(extra_path: Path | None = None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), extra_path and str(extra_path)) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlhf-lightning"])  # in-process parses read only `args`


def test_every_config_is_listed_here():
    """A new shipped config must join the output checks below (offline run, or parse-only for hub recipes)."""
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")} - {"fsdp"}  # fsdp.yaml: a strategy layer, no logger
    assert shipped == set(SHRUNK) | set(HUB_CONFIGS)


@pytest.mark.parametrize("name", [*SHRUNK, *HUB_CONFIGS])
def test_no_shipped_config_pins_the_log_folder(name, tmp_path, capsys, monkeypatch):
    """Each config names its run with a RunLogger and no save_dir: the resolved logger follows default_root_dir."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "X"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.default_root_dir", str(root),
                  "--print_config"])
    assert not exit_.value.code
    printed = yaml.safe_load(capsys.readouterr().out)
    logger = printed["trainer"]["logger"]
    assert logger["class_path"] == "rlhf_lightning.infra.loggers.RunLogger", logger
    assert logger["init_args"]["save_dir"] is None and logger["init_args"]["name"] == name
    rooted = RunLogger(**logger["init_args"]).rooted_at(printed["trainer"]["default_root_dir"])
    assert Path(rooted.log_dir) == root / "runs" / name / "version_0"


def test_an_explicit_save_dir_wins(tmp_path):
    assert RunLogger(save_dir=str(tmp_path / "mine"), name="a").rooted_at(tmp_path / "X").log_dir == \
        str(tmp_path / "mine" / "a" / "version_0")


def run_script(args: list[str], cwd: Path, extra_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=script_env(extra_path), capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
def test_every_offline_config_writes_everything_under_default_root_dir(tmp_path):
    """Each shipped config, shrunk, run from an empty cwd with `--trainer.default_root_dir X`: the cwd stays empty
    and X/runs/<name>/version_0/ holds the events, config.yaml, the epoch-end checkpoint and hf_model/ (the
    iterative runs also their retrained reward_model/, process_reward_model/). ~2 minutes on 2 busy cores."""
    cwd, root, modules = tmp_path / "cwd", tmp_path / "X", tmp_path / "modules"
    cwd.mkdir()
    modules.mkdir()
    (modules / "parity_label.py").write_text(PARITY_LABEL)
    exports = {stage: root / "runs" / f"{stage}_arithmetic" / "version_0" / "hf_model" for stage in ("sft", "rm")}
    exports.update({name: root / "runs" / name / "version_0" / "hf_model" for name in ("sft_chain", "prm_chain",
                                                                                     "sft_calculator")})
    for name, overrides in SHRUNK.items():
        args = ["fit", "--config", str(CONFIGS / f"{name}.yaml"), *[a.format(**exports) for a in overrides],
                "--trainer.default_root_dir", str(root)]
        proc = run_script(args, cwd, modules)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        run = root / "runs" / name / "version_0"
        assert list(run.glob("events.out.tfevents.*")), name
        assert (run / "config.yaml").exists() and (run / "hf_model" / "config.json").exists(), name
        assert list((run / "checkpoints").glob("*.ckpt")), name
        assert sorted(os.listdir(cwd)) == [], f"{name} wrote into the cwd: {sorted(os.listdir(cwd))}"
    assert (root / "runs/grpo_iterative/version_0/reward_model/config.json").exists()
    assert (root / "runs/grpo_iterative_prm/version_0/process_reward_model/config.json").exists()
    assert sorted(os.listdir(root)) == ["runs"]


@pytest.mark.slow
def test_readme_staged_pipeline_runs_in_a_shell(tmp_path):
    """The README's `sft && grpo` as a shell runs it (each stage's exit status gates the next), from the SFT export
    at the README's path `runs/sft_arithmetic/version_0/hf_model` (default_root_dir = the cwd)."""
    sft = [str(SCRIPT), "fit", "--config", str(CONFIGS / "sft_arithmetic.yaml"), *SHRUNK["sft_arithmetic"]]
    grpo = [str(SCRIPT), "fit", "--config", str(CONFIGS / "grpo_arithmetic.yaml"),
            "--model.init_args.model_name_or_path", "runs/sft_arithmetic/version_0/hf_model",
            *SHRUNK["grpo_arithmetic"]]
    line = f"{shlex.join(sft)} && {shlex.join(grpo)} && echo PIPELINE-OK"
    proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("PIPELINE-OK")
    export = tmp_path / "runs/grpo_arithmetic/version_0/hf_model"
    assert (export / "model.safetensors").exists()
    used = yaml.safe_load((export.parent / "config.yaml").read_text())
    assert used["model"]["init_args"]["model_name_or_path"] == "runs/sft_arithmetic/version_0/hf_model"
