"""`RunLogger`: the CLI's TensorBoard logger, whose folder follows `--trainer.default_root_dir`.

Lightning's contract is that `default_root_dir` is where a run's outputs go, but a `TensorBoardLogger` needs its
`save_dir` at construction, before any Trainer exists; a config that names its run therefore used to pin the
folder too (`save_dir: runs`, i.e. the current folder, whatever `default_root_dir` said). A config names its run
with `RunLogger` and leaves `save_dir` out:

    trainer:
      logger:
        class_path: rlhf_lightning.infra.loggers.RunLogger
        init_args: {name: grpo_arithmetic}

and the CLI roots it at `<default_root_dir>/runs` when it builds the Trainer, so events, `config.yaml`,
`checkpoints/` and `hf_model/` all land in `<default_root_dir>/runs/<name>/version_<n>/` (default_root_dir
defaults to the current folder: `runs/<name>/version_<n>/`). A `save_dir` given explicitly is used as it is.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

RUNS_FOLDER = "runs"  # the runs' parent folder inside default_root_dir (`tensorboard --logdir runs`)


class RunLogger(TensorBoardLogger):
    """Lightning's `TensorBoardLogger` with `save_dir` optional.

    `save_dir` omitted: the logs go to `<default_root_dir>/runs/<name>/version_<n>/` under the CLI (which calls
    `rooted_at`), `./runs/...` elsewhere. `save_dir` given: `<save_dir>/<name>/version_<n>/`, as Lightning's.
    Every other argument is `TensorBoardLogger`'s.
    """

    def __init__(self, save_dir: str | None = None, name: str = "rlhf", version: int | str | None = None,
                 log_graph: bool = False, default_hp_metric: bool = True, prefix: str = "",
                 sub_dir: str | None = None, **kwargs: Any):
        self.follows_root_dir = save_dir is None
        self.writes_default_hp_metric = default_hp_metric  # False: the final hp_metric comes with the hparams
        # kept to build the rooted copy (`rooted_at`) with the same settings
        self._settings = dict(name=name, version=version, log_graph=log_graph, default_hp_metric=default_hp_metric,
                              prefix=prefix, sub_dir=sub_dir, **kwargs)
        super().__init__(RUNS_FOLDER if save_dir is None else save_dir, **self._settings)

    def rooted_at(self, default_root_dir: str | os.PathLike) -> RunLogger:
        """This logger with its folder under `default_root_dir` when no `save_dir` was given (a new logger:
        nothing has been written yet when the CLI calls this); itself when `save_dir` was given."""
        if not self.follows_root_dir:
            return self
        return type(self)(os.path.join(os.fspath(default_root_dir), RUNS_FOLDER), **self._settings)


def root_loggers(logger: Any, default_root_dir: str | os.PathLike) -> Any:
    """The Trainer's `logger` argument (a logger, a list of loggers, a bool or None) with every `RunLogger` that
    has no `save_dir` of its own rooted at `default_root_dir`."""
    if isinstance(logger, RunLogger):
        return logger.rooted_at(default_root_dir)
    if isinstance(logger, (list, tuple)):
        return [root_loggers(one, default_root_dir) for one in logger]
    return logger
