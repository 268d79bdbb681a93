"""`rlhf-lightning`: a LightningCLI with subclass mode for model and data.

    rlhf-lightning fit --config configs/grpo_arithmetic.yaml
    rlhf-lightning fit --model rlhf_lightning.GRPOModule --data rlhf_lightning.PromptDataModule --data.task addition
    python -m rlhf_lightning fit --config ... --print_config
"""

from __future__ import annotations

import os
from typing import Any

# Some libraries print a warning per import when the tokenizers fork pool is touched; we tokenize once in setup.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

TRAINER_DEFAULTS: dict[str, Any] = {
    # TensorBoard is the default logger; runs land in runs/<name>/version_<n>/ with hf_model/ beside the events
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": "rlhf"}},
    "log_every_n_steps": 1,
}


class RLHFLightningCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule selectable by class path."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                         subclass_mode_data=True, args=args, run=run, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Refuse Lightning's FSDPStrategy for manually optimized modules before the Trainer exists (on a CPU
        machine Lightning would otherwise stop first with an unrelated "requires a GPU" message)."""
        from .parallel import check_strategy

        strategy = {**self._get(self.config_init, "trainer", default={}), **kwargs}.get("strategy")
        check_strategy(self.model, strategy)
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> RLHFLightningCLI:
    """Entry point of `rlhf-lightning` / `python -m rlhf_lightning`; `args` lets tests drive it in-process.

    `args=None` lets LightningCLI read sys.argv itself (passing sys.argv[1:] explicitly makes it warn about
    "both args and command line arguments" on every command-line run).
    """
    return RLHFLightningCLI(args=args, run=run)
