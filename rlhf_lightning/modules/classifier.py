"""What the two reward-model modules share: a classifier head on a causal-LM backbone, trained supervised.

`RewardModel` (a scalar sequence head, Bradley-Terry) and `ProcessRewardModel` (a 2-class token head scored at
step separators) differ in their head, loss, metrics and export fields; loading (preset / local dir / hub id,
safetensors, `trust_remote_code` off), LoRA, gradient checkpointing, FSDP2 sharding, the non-finite guard, the
AdamW schedule and the `hf_model/` export are this class's, once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..infra import parallel
from ..infra.cpu_allocator import keep_freed_memory
from ..infra.nonfinite import NonFiniteGuard, check_finite_model
from ..models import add_lora, check_lora_export, enable_gradient_checkpointing, export_view, lora_config, save_export
from ..tokenizer import load_tokenizer
from .base import PolicyModuleBase


class ClassifierModule(L.LightningModule):
    """Base of `RewardModel` and `ProcessRewardModel`. Not used directly.

    Subclasses set `lora_task` (peft's task: `seq_cls`, `token_cls`) and `what` (how messages name the model),
    implement `load_model` (the bare classifier, pad id set), `check_data` and `export_config`, and add their own
    arguments, checks and metrics. `self.model` is the classifier (a peft model under LoRA).

    Args (shared, documented on each subclass): model_name_or_path, tokenizer_name_or_path, lr, weight_decay, betas,
        warmup_steps, lr_schedule, min_lr_ratio, torch_dtype, trust_remote_code, seed, max_nonfinite_steps, lora,
        lora_export, gradient_checkpointing.
    """

    lora_task = "seq_cls"
    what = "classifier"
    # the policy modules' AdamW + warmup/cosine builder and export location, shared rather than copied
    # (they read only `self.hparams` and `self.trainer`)
    build_optimizer = PolicyModuleBase.build_optimizer
    schedule_horizon = PolicyModuleBase.schedule_horizon
    export_dir = PolicyModuleBase.export_dir
    # the non-finite guard: a step with a NaN/inf loss or gradient is skipped (`train/skipped_steps`)
    optimizer_names = ("the model",)
    on_before_backward = PolicyModuleBase.on_before_backward
    on_before_optimizer_step = PolicyModuleBase.on_before_optimizer_step

    def __init__(
        self,
        model_name_or_path: str = "tiny",
        tokenizer_name_or_path: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        torch_dtype: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        max_nonfinite_steps: int = 3,
        *,
        lora: dict[str, Any] | None = None,
        lora_export: str = "merged",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        _check_optimizer_args(lr, weight_decay, lr_schedule, warmup_steps)
        self.lora_config = lora_config(lora, task=self.lora_task) if lora is not None else None
        self.lora_export = check_lora_export(lora_export)
        self.save_hyperparameters()  # every class's arguments (the subclass's frame included)
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps)
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                                        trust_remote_code=trust_remote_code)
        self.model = self.load_model()
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.lora_config is not None:
            self.model = add_lora(self.model, self.lora_config, seed)
        self.model.train()  # from_pretrained returns eval mode

    def load_model(self) -> nn.Module:
        """The bare classifier of `hparams.model_name_or_path` (seeded for presets), its pad id the tokenizer's."""
        raise NotImplementedError

    def check_data(self, data: Any) -> None:
        """Refuse a datamodule whose batches this module cannot train on (ValueError, one line)."""

    def export_config(self, config: Any) -> None:
        """Record in the exported config what readers of `hf_model/` need (the input format, statistics)."""

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))
        parallel.destroy_process_group_at_exit()
        keep_freed_memory(self.trainer.strategy.root_device)  # CPU: see rlhf_lightning/infra/cpu_allocator.py

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt, sched = self.build_optimizer(params, self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self) -> None:
        """Under a ModelParallelStrategy: FSDP2-shard each decoder layer, then the whole classifier (head included).
        Other strategies: no-op."""
        if not parallel.is_fsdp2(self._trainer) or parallel.is_sharded(self.model):
            return
        parallel.shard_module(self.model, self.device_mesh["data_parallel"], self.trainer.precision,
                              device=self.trainer.strategy.root_device)

    def log_lr(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    # --------------------------------------------------------------------------------------------- export
    def _full_model(self) -> nn.Module:
        """The classifier with full weights: under FSDP2 gathered on every rank (a collective) into a freshly
        built model on rank 0; the other ranks get the sharded one back."""
        def build() -> nn.Module:
            model = self.load_model()
            return model if self.lora_config is None else add_lora(model, self.lora_config, self.hparams.seed)

        return parallel.full_model(self.model, self.trainer.global_rank, build)

    def export(self, out: str | os.PathLike, model: nn.Module | None = None) -> Path:
        """Write model + tokenizer to `out` (loadable with the `AutoModelFor...Classification` / `AutoTokenizer`;
        with LoRA as `lora_export` says: merged, or the adapter + head for peft), the config carrying
        `export_config`'s fields. `model`: the unsharded classifier when the caller gathered it (`_full_model`);
        default `self.model`."""
        out = Path(out)
        model = export_view(self.model if model is None else model, self.lora_export)
        check_finite_model(model, out)  # never write NaN/inf weights where a user would load them
        out.mkdir(parents=True, exist_ok=True)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.export_config(model.config)
        save_export(model, out, self.hparams.model_name_or_path)
        self.tokenizer.save_pretrained(out)
        return out

    def on_fit_end(self) -> None:
        model = self._full_model()  # on every rank: gathering sharded weights is a collective
        out = self.export_dir()  # on every rank too: the run dir is broadcast from rank 0
        if self.trainer.global_rank == 0:
            out = self.export(out, model)
            rank_zero_info(f"[rlhf_lightning] exported {self.what} and tokenizer to {out}")

    # ------------------------------------------------------------------------------------ guard, checkpoints
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        PolicyModuleBase.on_train_batch_end(self, outputs, batch, batch_idx)  # the non-finite weights check
        self.log("train/skipped_steps", float(self.nonfinite_guard.skipped), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_guard"] = self.nonfinite_guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_guard.load_state_dict(checkpoint.get("nonfinite_guard", {}))


def _check_optimizer_args(lr: Any, weight_decay: float, lr_schedule: str, warmup_steps: int) -> None:
    if not (isinstance(lr, (int, float)) and 0 < lr < 1):
        raise ValueError(f"lr must be in (0, 1), got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if lr_schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr_schedule must be constant|cosine|linear, got {lr_schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

