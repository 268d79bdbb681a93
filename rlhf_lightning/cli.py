"""`rlhf-lightning`: a LightningCLI with subclass mode for model and data.

    rlhf-lightning fit --config configs/grpo_arithmetic.yaml
    rlhf-lightning fit --model rlhf_lightning.GRPOModule --data rlhf_lightning.PromptDataModule --data.task addition
    python -m rlhf_lightning fit --config ... --print_config
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

# Some libraries print a warning per import when the tokenizers fork pool is touched; we tokenize once in setup.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from .loggers import root_loggers  # noqa: E402
from .messages import OneLineErrorParser, check_checkpoint_file, check_writable  # noqa: E402
from .reliability import (  # noqa: E402
    CheckpointOnError,
    ConfigError,
    GracefulShutdown,
    RewardFunctionError,
    use_atomic_checkpoints,
)

TRAINER_DEFAULTS: dict[str, Any] = {
    # TensorBoard is the default logger; runs land in <default_root_dir>/runs/<name>/version_<n>/ with hf_model/
    # beside the events (RunLogger: no save_dir, so the folder follows --trainer.default_root_dir)
    "logger": {"class_path": "rlhf_lightning.loggers.RunLogger", "init_args": {"name": "rlhf"}},
    "log_every_n_steps": 1,
}


class RLHFLightningCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule selectable by class path.

    Reliability defaults: checkpoints are written atomically (`AtomicCheckpointIO`, unless a checkpoint plugin
    is configured), SIGTERM/SIGINT save `last.ckpt` at the next step boundary (`GracefulShutdown`), and a failing
    reward function leaves `error.ckpt` (`CheckpointOnError`). A ValueError raised while the model, data and
    trainer are built or set up (before the first step) is a configuration error and becomes a `ConfigError`.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        # fresh callback instances per CLI: they hold per-run state (the signal received, the saved path)
        kwargs.setdefault("trainer_defaults", {**TRAINER_DEFAULTS,
                                               "callbacks": [GracefulShutdown(), CheckpointOnError(), _RunStarted()]})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", OneLineErrorParser)  # parse errors: one line, not a screen of usage
        super().__init__(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                         subclass_mode_data=True, args=args, run=run, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            raise _as_config_error(err) from err

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Refuse Lightning's FSDPStrategy for manually optimized modules before the Trainer exists (on a CPU
        machine Lightning would otherwise stop first with an unrelated "requires a GPU" message), root a
        `RunLogger` without `save_dir` at `default_root_dir`, check that the output folders accept files (before
        any work is done), then make checkpoint writes atomic."""
        from .parallel import check_strategy

        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        check_strategy(self.model, config.get("strategy"))
        # a RunLogger without save_dir writes under default_root_dir (Lightning's own default: the cwd)
        root = config.get("default_root_dir") or os.getcwd()
        kwargs["logger"] = root_loggers(config.get("logger"), root)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (TypeError, MisconfigurationException) as err:  # Lightning's checks of the Trainer's arguments
            raise ConfigError(f"trainer: {err}") from err
        for folder in output_folders(trainer):
            check_writable(folder)
        use_atomic_checkpoints(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters before building anything
        subcommand = self.config.get("subcommand")
        check_checkpoint_file((self.config.get(subcommand) or {}).get("ckpt_path") if subcommand else None)
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            subcommand = self.config.get("subcommand")
            raise _unsafe_checkpoint(err, self.config.get(subcommand, {}).get("ckpt_path")) from err

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except pickle.UnpicklingError as err:
            raise _unsafe_checkpoint(err, self.config[subcommand].get("ckpt_path")) from err
        except (ValueError, FileNotFoundError) as err:
            started = any(isinstance(cb, _RunStarted) and cb.started for cb in self.trainer.callbacks)
            if isinstance(err, ConfigError) or not started:
                raise _as_config_error(err) from err
            raise  # a ValueError in the middle of training is a bug: keep its traceback


def output_folders(trainer: L.Trainer) -> list[str]:
    """Where the run will write: default_root_dir, each logger's save_dir, each ModelCheckpoint's dirpath."""
    folders = [trainer.default_root_dir]
    folders += [lg.save_dir for lg in trainer.loggers if isinstance(getattr(lg, "save_dir", None), str)]
    folders += [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return [f for f in dict.fromkeys(folders) if "://" not in f]  # remote filesystems: left to fsspec


def _unsafe_checkpoint(err: Exception, path: str | None) -> ConfigError:
    """torch.load(weights_only=True) refused a checkpoint holding pickled objects (possibly code): one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
    return ConfigError(f"checkpoint {path!r} was not loaded: it holds pickled objects that weights_only loading "
                       f"refuses ({detail}); pass --weights_only false only for a checkpoint you trust")


class _RunStarted(L.Callback):
    """Marks the moment setup and checkpoint restoring are over: errors after it are not configuration errors."""

    started = False

    def _mark(self, *args: Any) -> None:
        self.started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = on_predict_start = _mark


def _as_config_error(err: Exception) -> ConfigError:
    """The class's own message: jsonargparse wraps an error raised in `__init__` ("group_size must be ...") in
    "Does not validate against any of the Union subtypes ..." errors, so the chain is followed down past every
    exception raised inside jsonargparse (but not further: our errors chain their own causes, e.g. a JSON
    decoding error, whose text is less clear than ours)."""
    root, depth = err, 0
    while _raised_in_jsonargparse(root) and (root.__cause__ or root.__context__) is not None and depth < 20:
        root, depth = root.__cause__ or root.__context__, depth + 1
    return root if isinstance(root, ConfigError) else ConfigError(str(root) or type(root).__name__)


def _raised_in_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def cli_main(args: list[str] | None = None, run: bool = True) -> RLHFLightningCLI:
    """Entry point of `rlhf-lightning` / `python -m rlhf_lightning`; `args` lets tests drive it in-process.

    `args=None` lets LightningCLI read sys.argv itself (passing sys.argv[1:] explicitly makes it warn about
    "both args and command line arguments" on every command-line run).
    User errors end the process with one line on stderr instead of a traceback: a `ConfigError` (exit status 2,
    like argparse's own errors) or a failing reward function (status 1, naming the function and the checkpoint
    written before stopping). SIGTERM/SIGINT exit with 128 + the signal after saving `last.ckpt`.
    """
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        return RLHFLightningCLI(args=args, run=run)
    except ConfigError as err:
        _fail(f"error: {err}", 2)
    except RewardFunctionError as err:
        saved = getattr(err, "checkpoint_path", None)
        _fail(f"error: {err}" + (f" (checkpoint saved to {saved})" if saved else ""), 1)


def main() -> None:
    """The `rlhf-lightning` console script: exit status 0 on success (the script passes our return value to
    `sys.exit`, which would print a returned CLI object and exit 1), 2 for user errors, 1 for reward failures."""
    cli_main()


def check_config_files(args: list[str]) -> None:
    """Every `--config`/`-c` file exists and is valid YAML, else a ConfigError naming the file, line and column
    (jsonargparse's own message names neither the file nor the line of the file, after a screen of usage)."""
    import yaml

    paths = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    paths += [nxt for flag, nxt in zip(args, args[1:]) if flag in ("--config", "-c")]
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {path!r} is not valid YAML{where}: {problem}") from err
        if not isinstance(loaded, (dict, type(None))):  # jsonargparse would say only "Unexpected config"
            raise ConfigError(f"config file {path!r} holds a {type(loaded).__name__}, not a mapping of sections "
                              "(seed_everything:, trainer:, model:, data:)")


def _fail(message: str, status: int) -> None:
    print(f"rlhf-lightning: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(status)
