"""Supervised warm start: next-token cross-entropy on the completion tokens only (prompt tokens are -100)."""

from __future__ import annotations

from typing import Any

import torch

from .base import PolicyModuleBase


class SFTModule(PolicyModuleBase):
    """Supervised fine-tuning on (prompt, completion) pairs, the first stage of the classic pipeline.

    Use with `PromptDataModule(completion_column=...)` (built-in tasks have a `completion` column). The loss is the
    mean cross-entropy over completion tokens (EOS included), so the model learns where to stop. Validation
    reports `val/loss` and, with reward functions (or a built-in task), greedy `val/reward` / `val/accuracy`.
    Args: `PolicyModuleBase`'s (model, reward functions for validation, optimizer; here lr 1e-3 with a cosine
    schedule; LoRA, gradient checkpointing and the non-finite guard included: a step with a NaN/inf loss or
    gradient is skipped and counted in `train/skipped_steps`).
    """

    def __init__(self, model_name_or_path: str = "tiny", *, lr: float = 1e-3, lr_schedule: str = "cosine",
                 **kwargs: Any):
        super().__init__(model_name_or_path, lr=lr, lr_schedule=lr_schedule, **kwargs)
        self.apply_lora()

    def sft_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError("SFTModule needs prompt/completion pairs: set data.completion_column "
                             "(built-in tasks: completion)")
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, L, V]
        labels = batch["labels"][:, 1:]  # [B, L-1] token t+1 is predicted at position t
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-100)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.sft_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the non-finite weights check
        self.optimizer_steps = self.trainer.global_step
        self.log("train/skipped_steps", float(self.nonfinite_guard.skipped), batch_size=1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "labels" in batch:
            self.log(f"{self.eval_prefix}/loss", self.sft_loss(batch), batch_size=batch["input_ids"].shape[0],
                     sync_dist=True, prog_bar=True)
        super().validation_step(batch, batch_idx)
