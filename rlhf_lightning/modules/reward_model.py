"""Reward model: a scalar head on a causal-LM backbone, trained with the Bradley-Terry loss on preference pairs.

    loss = -log σ(r_chosen - r_rejected - margin)  +  c · (r_chosen + r_rejected)²
           (InstructGPT eq. 1 for one pair; the margin as in Llama 2 §3.2.2; the centering term as in TRL)

The second term (`center_rewards_coefficient` c, 0 = off; TRL suggests 0.01) pins the reward's mean near 0,
which the BT loss alone leaves free. Once trained, the model is a reward function: `RewardModelScorer` wraps
a `RewardModel` or its exported `hf_model/` directory in the TRL signature `(prompts, completions, **kw)`.

Input format (one definition, `preference.reward_input_ids`): tokens of `prompt + response`, then EOS (none
when the tokenizer pads with EOS). The exported model scores the same way:

    model = AutoModelForSequenceClassification.from_pretrained(d); tok = AutoTokenizer.from_pretrained(d)
    ids = tok(prompt + response, add_special_tokens=False).input_ids
    ids += [tok.eos_token_id] if model.config.reward_append_eos else []
    score = model(torch.tensor([ids])).logits[0, 0]

`config.pad_token_id` is set, so batched scoring reads the last non-pad token (left or right padding).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from ..infra import parallel
from ..infra.cpu_allocator import keep_freed_memory
from ..infra.nonfinite import NonFiniteGuard, check_finite_model
from ..models import (
    add_lora,
    check_lora_export,
    enable_gradient_checkpointing,
    export_view,
    load_sequence_classifier,
    lora_config,
    save_export,
)
from ..rewards import RewardModelSource
from ..rewards.model_inputs import appends_eos
from ..tokenizer import load_tokenizer
from .base import PolicyModuleBase


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Mean of −log σ(r_c − r_r − m) over pairs, plus c · mean((r_c + r_r)²). Inputs [B]; returns a scalar."""
    diff = chosen_rewards - rejected_rewards  # [B]
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


class RewardModel(L.LightningModule):
    """Bradley-Terry reward model on an `AutoModelForSequenceClassification` backbone (num_labels=1).

    Use with `PreferenceDataModule`. Logs `train|val/loss`, `train|val/accuracy` (share of pairs with
    r_chosen > r_rejected; ties count as wrong), `train|val/margin` (mean r_chosen − r_rejected) and
    `val/reward_mean|std` (over both sides of the held-out pairs). `on_fit_end` writes `<log_dir>/hf_model/`
    (model + tokenizer); its config also carries `reward_mean`, `reward_std` (from the last validation, for
    `RewardModelScorer(normalize=True)`) and `reward_append_eos` (the input format, for readers of the export).

    Args:
        model_name_or_path: a preset (`tiny`, `small`, `medium`), a `save_pretrained` directory (an SFT export
            works: the backbone is kept and the scalar head starts fresh), or a hub id.
        tokenizer_name_or_path: defaults to `model_name_or_path`.
        center_rewards_coefficient: c of the centering term above (0 = off).
        lr, weight_decay, betas, warmup_steps, lr_schedule, min_lr_ratio: AdamW and its schedule, as in
            `PolicyModuleBase` (lr 1e-3 + cosine: the measured recipe of configs/rm_arithmetic.yaml).
        torch_dtype / trust_remote_code / seed: as in `PolicyModuleBase`.
        max_nonfinite_steps: as in `PolicyModuleBase`: optimizer steps with a NaN/inf loss or gradient are
            skipped (counted in `train/skipped_steps`); this many in a row stop the run with a message.
        lora: train a LoRA adapter (peft) on the backbone instead of every weight, `{r, alpha, dropout,
            target_modules}` as in `PolicyModuleBase`; the `score` head trains in full beside it (peft's
            `modules_to_save`). `lora_export`: `merged` (a plain `AutoModelForSequenceClassification` in
            `hf_model/`, what `RewardModelScorer`, GRPO's and PPO's `reward_model` load) or `adapter` (adapter +
            head, reloaded with `peft.PeftModel.from_pretrained(base classifier, dir)`).
        gradient_checkpointing: recompute each decoder layer's activations in backward (less memory).
    """

    # The policy modules' AdamW + warmup/cosine builder and export location, shared rather than copied
    # (they read only `self.hparams` and `self.trainer`).
    build_optimizer = PolicyModuleBase.build_optimizer
    schedule_horizon = PolicyModuleBase.schedule_horizon
    export_dir = PolicyModuleBase.export_dir
    # the non-finite guard: a step with a NaN/inf loss or gradient is skipped (`train/skipped_steps`)
    optimizer_names = ("the reward model",)
    on_before_backward = PolicyModuleBase.on_before_backward
    on_before_optimizer_step = PolicyModuleBase.on_before_optimizer_step

    def __init__(
        self,
        model_name_or_path: str = "tiny",
        tokenizer_name_or_path: str | None = None,
        center_rewards_coefficient: float = 0.0,
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
        if not (isinstance(lr, (int, float)) and 0 < lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be constant|cosine|linear, got {lr_schedule!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        self.lora_config = lora_config(lora, task="seq_cls") if lora is not None else None
        self.lora_export = check_lora_export(lora_export)
        self.save_hyperparameters()
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps)
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                                        trust_remote_code=trust_remote_code)
        self.model = load_sequence_classifier(model_name_or_path, self.tokenizer, torch_dtype=torch_dtype,
                                              trust_remote_code=trust_remote_code, seed=seed)
        # the classifier scores the last token that is not pad_token_id: it must be the tokenizer's pad
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.lora_config is not None:
            self.model = add_lora(self.model, self.lora_config, seed)
        self.model.train()  # from_pretrained returns eval mode
        self.train_accuracy, self.val_accuracy = BinaryAccuracy(), BinaryAccuracy()
        self.train_margin, self.val_margin = MeanMetric(), MeanMetric()
        self.val_reward, self.val_reward_sq = MeanMetric(), MeanMetric()
        self.reward_mean: float | None = None  # from the last validation, exported with the model
        self.reward_std: float | None = None

    # ------------------------------------------------------------------------------------------ scoring
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scalar rewards [N] (float32) for sequences built by `reward_input_ids` ([N, L], any padding side)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()

    def pair_rewards(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen [B], r_rejected [B]) from one forward pass over the [2B, L] batch (chosen rows first)."""
        rewards = self(batch["input_ids"], batch["attention_mask"])  # [2B]
        B = rewards.shape[0] // 2
        return rewards[:B], rewards[B:]

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r_c, r_r = self.pair_rewards(batch)
        loss = bradley_terry_loss(r_c, r_r, batch.get("margin"), self.hparams.center_rewards_coefficient)
        return loss, r_c, r_r

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, r_c, r_r = self._step(batch)
        B = r_c.shape[0]
        self.train_accuracy((r_c > r_r).long(), torch.ones_like(r_c, dtype=torch.long))
        self.train_margin(r_c - r_r)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/accuracy", self.train_accuracy, prog_bar=True, batch_size=B)
        self.log("train/margin", self.train_margin, batch_size=B)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, r_c, r_r = self._step(batch)
        B = r_c.shape[0]
        self.val_accuracy((r_c > r_r).long(), torch.ones_like(r_c, dtype=torch.long))
        self.val_margin(r_c - r_r)
        rewards = torch.cat([r_c, r_r])  # [2B]
        self.val_reward(rewards)
        self.val_reward_sq(rewards**2)
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=B)
        self.log("val/margin", self.val_margin, batch_size=B)

    def on_validation_epoch_end(self) -> None:
        """Record the score statistics that `RewardModelScorer(normalize=True)` uses (not from the sanity check)."""
        if self.val_reward.update_count == 0:
            return
        mean, sq = self.val_reward.compute().item(), self.val_reward_sq.compute().item()
        self.val_reward.reset()
        self.val_reward_sq.reset()
        std = math.sqrt(max(sq - mean * mean, 0.0))
        self.log("val/reward_mean", mean, batch_size=1)
        self.log("val/reward_std", std, batch_size=1)
        if not self.trainer.sanity_checking:
            self.reward_mean, self.reward_std = mean, std

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        r_c, r_r = self.pair_rewards(batch)
        return [{"prompt": p, "chosen_reward": c, "rejected_reward": r}
                for p, c, r in zip(batch["prompts"], r_c.tolist(), r_r.tolist())]

    # ------------------------------------------------------------------------------------------ optimizer
    def setup(self, stage: str) -> None:
        from ..data import PreferenceDataModule, PromptDataModule

        data = getattr(self.trainer, "datamodule", None)
        if isinstance(data, PromptDataModule) and not isinstance(data, PreferenceDataModule):
            # its batches have no chosen/rejected halves: the loss would compare unrelated rows, silently
            raise ValueError(f"RewardModel trains on preference pairs, but the data is a {type(data).__name__}; use "
                             "data: rlhf_lightning.PreferenceDataModule (prompt, chosen, rejected)")
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

    # --------------------------------------------------------------------------------------------- export
    def _full_model(self) -> nn.Module:
        """The classifier with full weights: under FSDP2 gathered on every rank (a collective) into a freshly
        built model on rank 0; the other ranks get the sharded one back."""
        def build() -> nn.Module:
            hp = self.hparams
            model = load_sequence_classifier(hp.model_name_or_path, self.tokenizer, torch_dtype=hp.torch_dtype,
                                             trust_remote_code=hp.trust_remote_code, seed=hp.seed)
            model.config.pad_token_id = self.tokenizer.pad_token_id
            return model if self.lora_config is None else add_lora(model, self.lora_config, hp.seed)

        return parallel.full_model(self.model, self.trainer.global_rank, build)

    def export(self, out: str | os.PathLike, model: nn.Module | None = None) -> Path:
        """Write model + tokenizer to `out` (loadable with AutoModelForSequenceClassification / AutoTokenizer; with
        LoRA as `lora_export` says: merged, or the adapter + head for peft).
        `model`: the unsharded classifier when the caller gathered it (`_full_model`); default `self.model`."""
        out = Path(out)
        model = export_view(self.model if model is None else model, self.lora_export)
        check_finite_model(model, out)  # never write NaN/inf weights where a user would load them
        out.mkdir(parents=True, exist_ok=True)
        config = model.config
        config.pad_token_id = self.tokenizer.pad_token_id
        config.reward_append_eos = appends_eos(self.tokenizer)
        config.reward_mean, config.reward_std = self.reward_mean, self.reward_std
        save_export(model, out, self.hparams.model_name_or_path)
        self.tokenizer.save_pretrained(out)
        return out

    def on_fit_end(self) -> None:
        model = self._full_model()  # on every rank: gathering sharded weights is a collective
        out = self.export_dir()  # on every rank too: the run dir is broadcast from rank 0
        if self.trainer.global_rank == 0:
            out = self.export(out, model)
            rank_zero_info(f"[rlhf_lightning] exported reward model and tokenizer to {out}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        PolicyModuleBase.on_train_batch_end(self, outputs, batch, batch_idx)  # the non-finite weights check
        self.log("train/skipped_steps", float(self.nonfinite_guard.skipped), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reward_stats"] = {"mean": self.reward_mean, "std": self.reward_std}
        checkpoint["nonfinite_guard"] = self.nonfinite_guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stats = checkpoint.get("reward_stats", {})
        self.reward_mean, self.reward_std = stats.get("mean"), stats.get("std")
        self.nonfinite_guard.load_state_dict(checkpoint.get("nonfinite_guard", {}))


# The scorer is the reward-model reward source, one class for GRPO, PPO and the iterative callback.
RewardModelScorer = RewardModelSource
