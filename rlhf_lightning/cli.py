"""`rlhf-lightning`: a LightningCLI with subclass mode for model and data.

    rlhf-lightning fit --config configs/grpo_arithmetic.yaml
    rlhf-lightning fit --model rlhf_lightning.GRPOModule --data rlhf_lightning.PromptDataModule --data.task addition
    python -m rlhf_lightning fit --config ... --print_config
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import Any

# Some libraries print a warning per import when the tokenizers fork pool is touched; we tokenize once in setup.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from .infra.checkpoints import CheckpointOnError, LastCheckpoint, use_atomic_checkpoints  # noqa: E402
from .infra.errors import ConfigError, TrainingFailure  # noqa: E402
from .infra.loggers import root_loggers  # noqa: E402
from .infra.messages import OneLineErrorParser, check_checkpoint_file, check_writable  # noqa: E402
from .infra.shutdown import GracefulShutdown  # noqa: E402

TRAINER_DEFAULTS: dict[str, Any] = {
    # TensorBoard is the default logger; runs land in <default_root_dir>/runs/<name>/version_<n>/ with hf_model/
    # beside the events (RunLogger: no save_dir, so the folder follows --trainer.default_root_dir)
    "logger": {"class_path": "rlhf_lightning.infra.loggers.RunLogger", "init_args": {"name": "rlhf"}},
    "log_every_n_steps": 1,
}


class RLHFLightningCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule selectable by class path.

    Reliability defaults: checkpoints are written atomically (`AtomicCheckpointIO`, unless a checkpoint plugin
    is configured), `last.ckpt` every 50 batches and at the end of fit (`LastCheckpoint`, unless a
    ModelCheckpoint is configured), SIGTERM/SIGINT save the last step boundary within a bounded time and exit
    128 + signal (`GracefulShutdown`), and any failure once training runs leaves `error.ckpt`
    (`CheckpointOnError`). `--ckpt_path` resumes with the checkpoint's model and data settings and refuses
    given ones that differ. A ValueError raised while the model, data and trainer are built or set up (before
    the first step) is a configuration error and becomes a `ConfigError`.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        # fresh callback instances per CLI: they hold per-run state (the signal received, the saved path)
        kwargs.setdefault("trainer_defaults", {**TRAINER_DEFAULTS,
                                               "callbacks": [GracefulShutdown(), CheckpointOnError(), _RunStarted(),
                                                             LastCheckpoint()]})
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
        from .infra.parallel import check_strategy

        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        check_strategy(self.model, config.get("strategy"))
        # a RunLogger without save_dir writes under default_root_dir (Lightning's own default: the cwd)
        root = config.get("default_root_dir") or os.getcwd()
        kwargs["logger"] = root_loggers(config.get("logger"), root)
        self._drop_default_checkpointing(kwargs)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (TypeError, MisconfigurationException) as err:  # Lightning's checks of the Trainer's arguments
            raise ConfigError(f"trainer: {err}") from err
        for folder in output_folders(trainer):
            check_writable(folder)
        use_atomic_checkpoints(trainer)
        return trainer

    def _drop_default_checkpointing(self, kwargs: dict[str, Any]) -> None:
        """The default `LastCheckpoint` gives way to a configured ModelCheckpoint and to
        `enable_checkpointing: false` (Lightning refuses a checkpoint callback then)."""
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        configured = trainer_config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if trainer_config.get("enable_checkpointing") is False or any(
                isinstance(cb, ModelCheckpoint) for cb in configured):
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [
                cb for cb in self.trainer_defaults.get("callbacks", []) if not isinstance(cb, LastCheckpoint)]}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        self._given_args = sys.argv[1:] if args is None else args  # re-read by _parse_ckpt_path
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Resuming: model and data settings left out come from the checkpoint; settings given (config file or
        command line) that differ from it, or another model/data class, are refused in one `ConfigError` line
        (LightningCLI would silently let the checkpoint's model hyperparameters win over the command line)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        check_checkpoint_file(ckpt_path)  # truncated, corrupt, not a checkpoint: one line
        if not ckpt_path or not os.path.exists(_checkpoint_meta(ckpt_path)):
            return
        try:
            saved = _checkpoint_hparams(ckpt_path)
        except pickle.UnpicklingError as err:
            raise _unsafe_checkpoint(err, ckpt_path) from err
        given = self._explicit_config(subcommand)
        differences = [d for key in ("model", "data") if saved.get(key)
                       for d in _resume_differences(key, saved[key], given.get(key))]
        if differences:
            raise ConfigError(f"--ckpt_path {ckpt_path} was saved with other settings than the ones given: "
                              f"{'; '.join(differences)}. Give the checkpoint's values or leave them out (settings "
                              f"left out are taken from the checkpoint), or start a new run without --ckpt_path")
        for key in ("model", "data"):  # as LightningCLI does for the model (dict_kwargs: no signature check)
            if saved.get(key):
                value = {"class_path": saved[key]["class_path"], "dict_kwargs": saved[key]["init_args"]}
                self.config = self.parser.parse_object({subcommand: {key: value}}, self.config)

    def _explicit_config(self, subcommand: str) -> dict[str, Any]:
        """The settings the user gave (config files and command line) without the defaults; everything parsed
        when the arguments cannot be re-read this way (then every setting counts as given)."""
        args = self._given_args
        try:
            parser = self.parser._subcommands_action._name_parser_map[subcommand]
            explicit = parser.parse_args(list(args[args.index(subcommand) + 1:]), defaults=False)
        except (ValueError, KeyError, AttributeError, TypeError, SystemExit):  # pragma: no cover - e.g. a dict
            explicit = self.config[subcommand]
        return explicit.as_dict()

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
            _raise_if_final_save_failed(self.trainer)
        except pickle.UnpicklingError as err:
            raise _unsafe_checkpoint(err, self.config[subcommand].get("ckpt_path")) from err
        except (ValueError, FileNotFoundError) as err:
            started = any(isinstance(cb, _RunStarted) and cb.started for cb in self.trainer.callbacks)
            if isinstance(err, ConfigError) or not started:
                raise _as_config_error(err) from err
            raise  # a ValueError in the middle of training is a bug: keep its traceback


def _checkpoint_hparams(path: str) -> dict[str, dict[str, Any]]:
    """The model's and the data module's saved init arguments as `{class_path, init_args}` (mmap: the weights
    are not read)."""
    import torch

    try:
        ckpt = torch.load(_checkpoint_meta(path), weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError) as err:  # truncated, not a torch file, or too old to mmap
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise ConfigError(f"checkpoint {path!r} could not be read: {first} (a truncated or partly copied "
                          f"file?)") from err
    out = {}
    for key, field in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hparams = {k: v for k, v in ckpt.get(field, {}).items() if k != "_instantiator"}
        if "_class_path" in hparams:  # written by LightningCLI's instantiator
            out[key] = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
    return out


def _checkpoint_meta(path: str) -> str:
    """The file holding a checkpoint's hyperparameters: the checkpoint, or a distributed (FSDP2) checkpoint
    folder's `meta.pt`."""
    return os.path.join(path, "meta.pt") if os.path.isdir(path) else path


def _resume_differences(key: str, saved: dict[str, Any], given: dict[str, Any] | None) -> list[str]:
    """`key.name: <checkpoint value> (checkpoint) vs <given value> (given)` for each setting of `key` (model or
    data) given with another value than the checkpoint's; the class alone when the class differs."""
    given = given or {}
    if given.get("class_path") and _import(given["class_path"]) is not _import(saved["class_path"]):
        return [f"{key}: {saved['class_path']} (checkpoint) vs {given['class_path']} (given)"]
    return [f"{key}.{name}: {_show(saved['init_args'][name])} (checkpoint) vs {_show(value)} (given)"
            for name, value in (given.get("init_args") or {}).items()
            if name in saved["init_args"] and _plain(value) != _plain(saved["init_args"][name])]


def _import(class_path: str) -> Any:
    """The class named by `class_path` (`rlhf_lightning.GRPOModule` and `rlhf_lightning.modules.grpo.GRPOModule`
    are the same class); the path itself when it does not import."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def _plain(value: Any) -> Any:
    """Tuples as lists and paths as strings: a setting parsed from YAML and one read back from a checkpoint."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, os.PathLike) else value


def _show(value: Any) -> str:
    return "null" if value is None else str(_plain(value))


class FinalCheckpointError(RuntimeError):
    """Fit finished and exported the model, but the final last.ckpt could not be written."""


def _raise_if_final_save_failed(trainer: L.Trainer) -> None:
    """Exit status 1 on every rank when `LastCheckpoint`'s final save failed (the ranks agreed on it); rank 0
    says why."""
    for cb in trainer.callbacks:
        if isinstance(cb, LastCheckpoint) and cb.final_save_error:
            export = getattr(trainer.lightning_module, "export_dir", None)  # a collective: on every rank
            exported = f"; the model was exported to {export()}" if callable(export) else ""
            if trainer.global_rank != 0:
                raise SystemExit(1)
            raise FinalCheckpointError(f"training finished but the final checkpoint {cb.final_save_error}"
                                       f"{exported}")


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
    written before stopping). Any other failure once training ran keeps its traceback, followed by one line
    naming its `error.ckpt` (status 1); a final checkpoint that could not be written is one line (status 1,
    after the export). SIGTERM/SIGINT exit with 128 + the signal (`GracefulShutdown`).
    """
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        return RLHFLightningCLI(args=args, run=run)
    except ConfigError as err:
        _fail(f"error: {err}", 2)
    except TrainingFailure as err:  # a reward function, a non-finite loss / gradient / weight: one line
        _fail(f"error: {err}{_checkpoint_note(err)}", 1)
    except FinalCheckpointError as err:
        _fail(f"error: {err}", 1)
    except Exception as err:
        if not hasattr(err, "checkpoint_path") and not hasattr(err, "checkpoint_error"):
            raise  # before training ran: nothing to resume from; a bug keeps its traceback
        traceback.print_exc()
        _fail(f"error: training stopped by {type(err).__name__}: {err}{_checkpoint_note(err)}", 1)


def _checkpoint_note(err: BaseException) -> str:
    """Where the failure's `error.ckpt` is, or why there is none (`CheckpointOnError`)."""
    if getattr(err, "checkpoint_path", None):
        return f" (checkpoint saved to {err.checkpoint_path})"
    if getattr(err, "checkpoint_error", None):
        return f" (error checkpoint {err.checkpoint_error})"
    return ""


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
