"""The docs stay true: every `rlhf-lightning` command in the README and docs/ parses, every argument is documented."""

from __future__ import annotations

import os
import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_script, tensorboard_scalars

import rlhf_lightning
from rlhf_lightning.cli import cli_main
from rlhf_lightning.infra.messages import init_arg_names

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


@pytest.mark.parametrize("name", ["PromptDataModule", "PreferenceDataModule", "StepwiseDataModule", "SFTModule",
                                  "RewardModel", "ProcessRewardModel", "GRPOModule", "PPOModule",
                                  "IterativeRewardModelCallback", "IterativeProcessRewardModelCallback"])
def test_config_reference_lists_every_argument(name):
    reference = (REPO / "docs" / "configs.md").read_text()
    params = init_arg_names(getattr(rlhf_lightning, name))  # every argument, **kwargs followed up the classes
    missing = [p for p in params if f"`{p}`" not in reference]
    assert not missing, f"docs/configs.md does not document {name}'s {missing}"


def test_ppo_rollout_count_matches_the_config():
    """docs/ppo.md's worked example of the step count is the shipped config's: max_steps counts the actor's and the
    critic's optimizer steps, so rollouts = max_steps / (2 x ppo_epochs x minibatches)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "ppo_arithmetic.yaml").read_text())
    max_steps, hp = config["trainer"]["max_steps"], config["model"]["init_args"]
    rollouts = max_steps // (2 * hp["ppo_epochs"] * hp["minibatches"])
    text = re.sub(r"\s+", " ", (REPO / "docs" / "ppo.md").read_text())
    found = re.search(r"`configs/ppo_arithmetic.yaml`: max_steps (\d+) = 2 × (\d+) rollouts × (\d+) epochs? × "
                      r"(\d+) minibatches", text)
    assert found, "docs/ppo.md lost its worked step count for configs/ppo_arithmetic.yaml"
    assert tuple(map(int, found.groups())) == (max_steps, rollouts, hp["ppo_epochs"], hp["minibatches"])
    readme = re.sub(r"\s+", " ", (REPO / "README.md").read_text())
    said = re.search(r"`configs/ppo_arithmetic.yaml`:[^)]*?([\d,]+) rollouts of (\d+) prompts", readme)
    batch_size = config["data"]["init_args"]["batch_size"]
    assert said and (int(said[1].replace(",", "")), int(said[2])) == (rollouts, batch_size)


def _export_dir(config_paths: list[Path]) -> str:
    """Where `fit` with these configs writes hf_model/: <logger save_dir or default_root_dir>/<name>/version_0/."""
    import yaml

    trainer: dict = {}
    for path in config_paths:
        trainer.update((yaml.safe_load(path.read_text()) or {}).get("trainer", {}))
    logger = trainer.get("logger") or {}
    init = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    # a RunLogger without save_dir writes under <default_root_dir>/runs (rlhf_lightning.infra.loggers)
    root = init.get("save_dir") or os.path.join(trainer.get("default_root_dir") or ".", "runs")
    return os.path.normpath(f"{root}/{init.get('name', 'lightning_logs')}/version_0/hf_model")


def test_readme_commands_run_in_order_from_a_fresh_clone():
    """After `make venv` the README's commands work as written: it says to activate the venv before the first one,
    and every `runs/.../hf_model` a command (or its config) loads is the export of an earlier command."""
    import yaml

    readme = (REPO / "README.md").read_text()
    first = readme.index("\nrlhf-lightning ")
    assert "source .venv/bin/activate" in readme[:first], "say how to get rlhf-lightning on the PATH before using it"
    produced: list[str] = []
    for command in shell_commands(REPO / "README.md"):
        args = shlex.split(command)[1:]
        configs = [REPO / args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
        loads = [a for a in args if re.fullmatch(r"runs/[^/]+/version_0/hf_model", a)]
        for path in configs:
            loads += re.findall(r"runs/[^/\s]+/version_0/hf_model", yaml.safe_dump(yaml.safe_load(path.read_text())))
        missing = [path for path in loads if path not in produced]
        assert not missing, f"README: `{command}` loads {missing}, which no earlier command writes"
        if args[0] == "fit" and configs:
            produced.append(_export_dir(configs))


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


# ------------------------------------------------------------------------------ docs/extending.md's code, executed
EXTENDING = REPO / "docs" / "extending.md"


def extending_section(title: str) -> str:
    """The text of docs/extending.md's `## <title>` section, up to the next `## ` heading."""
    page = EXTENDING.read_text()
    start = page.index(f"\n## {title}\n")
    end = page.find("\n## ", start + 1)
    return page[start:] if end == -1 else page[start:end]


def section_python_blocks(title: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", extending_section(title), flags=re.S)
    assert blocks, f"docs/extending.md's {title!r} section has no python block"
    return [textwrap.dedent(b) for b in blocks]


def run_section(title: str) -> dict:
    """Every python block of the section, in order, in one namespace: what pasting them into one file does."""
    namespace: dict = {"__name__": "extending_md"}
    for i, block in enumerate(section_python_blocks(title)):
        exec(compile(block, f"docs/extending.md ({title}, block {i + 1})", "exec"), namespace)
    return namespace


def run_section_tests(namespace: dict) -> list[str]:
    """Call the section's `test_*` functions (they take no fixtures); their names."""
    tests = [name for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    assert tests, "the section shows no test"
    for name in tests:
        namespace[name]()
    return tests


def digit_share(prompts, completions, **kwargs):
    """A dense reward a random tiny policy can move: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def train_two_rollouts(module, tmp_path):
    """Two rollouts of 8 addition prompts on the tiny preset; the policy's weights before and after."""
    import lightning as L
    import torch

    from rlhf_lightning import PromptDataModule

    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(task="addition", num_train=32, num_val=0, batch_size=8))
    moved = any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
    return trainer, moved


def test_the_training_step_shown_is_the_code():
    """The data-path section quotes `RLModule.training_step` verbatim."""
    import inspect

    from rlhf_lightning.modules.rl import RLModule

    shown = [b for b in section_python_blocks("The data path in the folders") if "def training_step" in b]
    assert shown == [textwrap.dedent(inspect.getsource(RLModule.training_step))]


def test_the_documented_estimator_registers_passes_its_test_and_trains(tmp_path):
    """One function + one registration + one test, as the page shows them; then `advantage_estimator:` selects it."""
    import lightning as L

    from rlhf_lightning import GRPOModule
    from rlhf_lightning.algorithms.advantages import ESTIMATORS

    try:
        namespace = run_section("Where a new advantage estimator goes")
        assert ESTIMATORS["max_baseline"].fn is namespace["max_baseline"]
        assert run_section_tests(namespace) == ["test_max_baseline_hand_computed"]
        L.seed_everything(0)
        module = GRPOModule("tiny", reward_fns=[digit_share], advantage_estimator="max_baseline", group_size=4,
                            max_new_tokens=4, beta=0.0, lr=1e-3, log_samples_every_n_steps=0)
        assert module.estimator.fn is namespace["max_baseline"]
        _, moved = train_two_rollouts(module, tmp_path)
        assert moved and module.rollouts == 2
    finally:
        ESTIMATORS.pop("max_baseline", None)
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        GRPOModule("tiny", advantage_estimator="max_baseline")  # gone again: nothing leaks into other tests


def test_the_documented_policy_loss_registers_passes_its_test_and_trains(tmp_path):
    import lightning as L

    from rlhf_lightning import GRPOModule
    from rlhf_lightning.algorithms.policy_losses import POLICY_LOSSES

    try:
        namespace = run_section("Where a new policy loss goes")
        assert POLICY_LOSSES["dual_clip"] is namespace["dual_clip"]
        assert run_section_tests(namespace) == ["test_dual_clip_hand_computed"]
        L.seed_everything(0)
        module = GRPOModule("tiny", reward_fns=[digit_share], importance_sampling="dual_clip", group_size=4,
                            max_new_tokens=4, beta=0.0, lr=1e-3, log_samples_every_n_steps=0)
        trainer, moved = train_two_rollouts(module, tmp_path)
        assert moved and "policy/dual_clip_frac" in trainer.callback_metrics  # its stats are logged
    finally:
        POLICY_LOSSES.pop("dual_clip", None)


def test_the_documented_task_is_a_task_the_data_module_builds():
    from rlhf_lightning import PromptDataModule
    from rlhf_lightning.data.tasks import TASKS

    try:
        namespace = run_section("Where a new task goes")
        data = PromptDataModule(task="reverse", task_kwargs={"length": 4}, num_train=8, num_val=0, batch_size=4)
        assert isinstance(data.task, namespace["ReverseTask"])
        rows = data.task.make_examples(8, seed=0)
        assert rows == data.task.make_examples(8, seed=0)  # a pure function of the seed
        verifier = data.task.reward_fns[0]
        assert verifier([r["prompt"] for r in rows], [r["completion"] for r in rows],
                        answer=[r["answer"] for r in rows]) == [1.0] * 8
        assert all(len(r["completion"]) <= data.task.max_completion_length for r in rows)
    finally:
        TASKS.pop("reverse", None)


def test_the_documented_rl_algorithm_trains(tmp_path):
    """The REINFORCE module of the page, verbatim, trains 2 rollouts on the tiny preset: the weights move, one
    optimizer step per rollout, and its own metric is logged."""
    import lightning as L

    namespace = run_section("Where a new RL algorithm goes")
    L.seed_everything(0)
    module = namespace["ReinforceModule"]("tiny", reward_fns=[digit_share], max_new_tokens=4, lr=1e-3,
                                          log_samples_every_n_steps=0)
    trainer, moved = train_two_rollouts(module, tmp_path)
    assert moved
    assert (module.rollouts, module.optimizer_steps) == (2, 2)
    assert {"reward/mean", "policy/advantage_abs_mean", "policy/loss"} <= set(trainer.callback_metrics)
