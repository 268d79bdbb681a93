"""One-line messages for command-line and config mistakes that jsonargparse reports as a screen of usage.

jsonargparse answers a misspelled key (`--model.init_args.group_sise`), a TRL name in a YAML (`learning_rate`),
an unknown class path, a wrong value type or a misspelled subcommand with ~60 lines: the usage of every option,
then the error nested in "Does not validate against any of the Union subtypes" blocks. `OneLineErrorParser`
prints `rlhf-lightning: error: <the culprit>[; did you mean <closest valid name>?]` instead, exit status 2.

The checks at the end run before any work for inputs that otherwise fail with a traceback once the run is set up,
or after training: a truncated or corrupt `--ckpt_path` (`check_checkpoint_file`) and an output folder that does
not accept files (`check_writable`). Both raise `ConfigError`, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import sys
import tempfile
import zipfile
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from .errors import ConfigError

# TRL config names whose rlhf_lightning name is not close in spelling (difflib would not find it)
TRL_NAMES = {
    "learning_rate": "lr", "num_generations": "group_size", "max_completion_length": "max_new_tokens",
    "epsilon": "clip_low", "epsilon_high": "clip_high", "loss_type": "loss_agg", "cliprange": "clip_low",
    "cliprange_value": "value_clip", "num_ppo_epochs": "ppo_epochs", "num_mini_batches": "minibatches",
    "lr_scheduler_type": "lr_schedule", "mask_truncated_completions": "mask_truncated",
    "model_init_kwargs": "torch_dtype", "per_device_train_batch_size": "data.init_args.batch_size",
    "num_train_epochs": "trainer.max_epochs", "max_steps": "trainer.max_steps",
}


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, with every parse error as one line naming the culprit (exit status 2)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a parser used inside jsonargparse to try an alternative: keep its protocol
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"rlhf-lightning: error: {one_line(message, parser)}", file=sys.stderr)
        self.exit(2)


def one_line(message: str, parser: argparse.ArgumentParser) -> str:
    """The innermost, user-facing part of a jsonargparse error message, with a suggestion where one exists."""
    for explain in (_unknown_init_arg, _unknown_option, _unknown_class, _wrong_type, _bad_subcommand):
        line = explain(message, parser)
        if line:
            return line
    return _innermost(message)


def did_you_mean(name: str, valid: list[str]) -> str:
    """`; did you mean 'x'?` for the closest valid name (TRL's names by table), or nothing."""
    if name in TRL_NAMES and (TRL_NAMES[name] in valid or "." in TRL_NAMES[name]):
        return f"; did you mean {TRL_NAMES[name]!r}? ({name!r} is TRL's name)"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parser_key(message: str) -> str:
    found = re.search(r'Parser key "([^"]+)"', message)
    return found.group(1) if found else ""


def _unknown_init_arg(message: str, parser: Any) -> str:
    """`Option 'group_sise' is not accepted` under `Problem with given class_path 'pkg.Class'`."""
    option = re.search(r"Option '([^']+)' is not accepted", message)
    owner = re.findall(r"Problem with given class_path '([^']+)'", message)
    if not option:
        return ""
    name, key = option.group(1), _parser_key(message)
    cls = _import_class(owner[-1]) if owner else None
    valid = init_arg_names(cls) if cls is not None else []
    where = f"{key}.init_args.{name}" if key else name
    owner_name = owner[-1] if owner else "the class"
    return f"unknown key {where!r}: {owner_name} has no argument {name!r}{did_you_mean(name, valid)}"


def _unknown_option(message: str, parser: Any) -> str:
    """`Subcommand 'fit' does not accept option 'trainer.max_stepz'` / `unrecognized arguments: --x 3`."""
    found = re.search(r"does not accept option '([^']+)'", message) or \
        re.search(r"unrecognized arguments: (--?\S+)", message) or re.search(r"Key '([^']+)' is not expected", message)
    if not found:
        return ""
    key = found.group(1).lstrip("-").split("=", 1)[0]
    valid = sorted(_option_keys(parser))
    return f"unknown key {key!r}{did_you_mean(key, valid)}"


def _unknown_class(message: str, parser: Any) -> str:
    """A class path that does not import: name the class path, the import error and a close class name."""
    found = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if not found or "Option '" in message or 'Parser key "' in found.group(2):
        return ""
    path, reason = found.group(1), found.group(2).strip()
    module_name, _, attr = path.rpartition(".")
    suggestion = ""
    try:
        module = importlib.import_module(module_name)
        classes = [n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_")]
        suggestion = did_you_mean(attr, classes)
    except Exception:  # noqa: BLE001 - the module itself does not import: the reason says why
        suggestion = _moved_class(path)
    key = _parser_key(message)
    return f"{key + ': ' if key else ''}cannot use class {path!r} ({reason}){suggestion}"


def _moved_class(path: str) -> str:
    """`; it is now rlhf_lightning.x.Y` for a class of this package named by a path that moved (a config written
    before the package's modules moved into infra/ and data/), else ""."""
    import pkgutil

    import rlhf_lightning

    module_name, _, attr = path.rpartition(".")
    if not module_name.startswith("rlhf_lightning"):
        return ""
    for info in pkgutil.walk_packages(rlhf_lightning.__path__, "rlhf_lightning."):
        try:
            found = getattr(importlib.import_module(info.name), attr, None)
        except Exception:  # noqa: BLE001 - an optional module that does not import here
            continue
        if inspect.isclass(found) and found.__module__ == info.name:
            return f"; it is now {info.name}.{attr}"
    return ""


def _wrong_type(message: str, parser: Any) -> str:
    """`Parser key "group_size": Expected a <class 'int'>. Got value: abc`: name the full key and the type."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    types = [t for t in re.findall(r"Expected a <class '([^']+)'>", message) if t != "NoneType"]
    got = re.search(r"Got value: (.*)", message) or re.search(r"Given value: (.*)", message)  # innermost first
    if not keys or not types or not got:
        return ""
    key = keys[0] if len(keys) == 1 else f"{keys[0]}.init_args.{keys[-1]}"
    return f"{key} expects a value of type {' or '.join(dict.fromkeys(types))}, got {got.group(1).strip()!r}"


def _bad_subcommand(message: str, parser: Any) -> str:
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not found:
        return ""
    choices = re.findall(r"'([^']+)'", found.group(2))
    suggestion = did_you_mean(found.group(1), choices)
    return f"unknown subcommand {found.group(1)!r}{suggestion} (one of {', '.join(choices)})"


def _innermost(message: str) -> str:
    """The deepest informative line of a nested message (the rest is jsonargparse's Union bookkeeping)."""
    noise = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>",
             "Problem with given class_path", "Parser key")
    if 'Parser key "' not in message:  # not nested: the whole message is the culprit
        return " ".join(message.split())
    lines = [line.strip(" -") for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(noise)]
    key = _parser_key(message)
    text = useful[-1] if useful else " ".join(message.split())
    return f"{key}: {text}" if key and key not in text else text


def init_arg_names(cls: type) -> list[str]:
    """The keyword arguments a class accepts, following `**kwargs` up the MRO as jsonargparse does."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _import_class(path: str) -> type | None:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except Exception:  # noqa: BLE001 - no suggestion then, the message still names the key
        return None


def _option_keys(parser: Any) -> set[str]:
    """Every dotted key a parser (and its subcommand parsers) accepts, e.g. `trainer.max_steps`."""
    keys: set[str] = set()
    for action in getattr(parser, "_actions", []):
        if action.dest not in (None, argparse.SUPPRESS, "help"):
            keys.add(action.dest)
        if isinstance(getattr(action, "choices", None), dict):  # the subcommands action: {name: parser}
            for sub in action.choices.values():
                keys |= _option_keys(sub)
    return keys


# --------------------------------------------------------------------------- inputs checked before work starts
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # `--ckpt_path` values Lightning resolves itself


def check_checkpoint_file(path: str | None) -> None:
    """`--ckpt_path` names a whole PyTorch checkpoint: a zip archive (torch.save's format) whose central directory
    is intact, a legacy pickle, or a distributed checkpoint folder (FSDP2) with its `.metadata`; else a
    ConfigError naming the file. A truncated file (a copy cut short, a full disk) has lost the zip's central
    directory at its end, which `torch.load` reports as `OSError: [Errno 22] Invalid argument`."""
    if not path or path in LIGHTNING_CKPT_NAMES or path.startswith("registry:") or "://" in path:
        return
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise ConfigError(f"checkpoint {path!r} is a folder without a distributed checkpoint's .metadata "
                              "(incomplete, or not a checkpoint folder)")
        return
    if not os.path.isfile(path):
        return  # missing: Lightning's own message names the path
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise ConfigError(f"checkpoint {path!r} is truncated or corrupt ({err}; {os.path.getsize(path)} "
                              "bytes): use a complete copy, or an earlier checkpoint") from err
    elif not head.startswith(b"\x80"):  # legacy torch.save files are pickles (protocol byte 0x80)
        raise ConfigError(f"checkpoint {path!r} is not a PyTorch checkpoint (it starts with {head!r}, neither a "
                          "zip archive nor a pickle)")


def check_writable(folder: str | os.PathLike) -> None:
    """The run's output folder exists (created if needed) and accepts a file; else a ConfigError before any
    model is trained (Lightning would first fail when it writes, after training, and lose the run)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"output folder {os.fspath(folder)!r} is not writable ({err.strerror or err}); choose "
                          "another with --trainer.default_root_dir") from err
