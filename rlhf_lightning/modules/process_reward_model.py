"""Process reward model: a 2-class token head on a causal-LM backbone, scored at the end of each reasoning step.

DeepSeekMath §4.1.3 rewards each step with a process reward model; Math-Shepherd (Wang et al. 2024) trains one on
step labels made without humans. The layout is TRL's PRMTrainer's, so exports interoperate: each step is followed
by `step_separator`, the label (0 = incorrect, 1 = correct) sits on the last token of each separator, every other
token is ignored, and the loss is the cross-entropy at the labelled positions:

    loss = mean over labelled positions t of  −log softmax(W h_t)[y_t]

Input format (one definition, `rewards.model_inputs.stepwise_input_ids`). The exported model scores the same way:

    model = AutoModelForTokenClassification.from_pretrained(d); tok = AutoTokenizer.from_pretrained(d)
    ids, positions = stepwise_input_ids(tok, prompt, steps, model.config.step_separator)
    p_correct = model(torch.tensor([ids])).logits[0, positions].softmax(-1)[:, 1]   # one per step
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score

from ..models import load_token_classifier
from .classifier import ClassifierModule

LABELS = {0: "incorrect", 1: "correct"}


class ProcessRewardModel(ClassifierModule):
    """A process reward model on an `AutoModelForTokenClassification` backbone (num_labels=2), TRL's layout.

    Use with `StepwiseDataModule`. Logs `train|val/loss`, `train|val/step_accuracy` (labelled steps whose
    argmax class is right), `train|val/step_f1` (F1 of the *incorrect* class: finding wrong steps, which a model
    that calls every step correct never does) and `train|val/first_error_found` (share of rows whose first
    predicted-wrong step is the first labelled-wrong step, "no wrong step" counting as a value). `on_fit_end` writes
    `<log_dir>/hf_model/` (model + tokenizer) whose config carries `step_separator`, `scores_end` (trained on end
    steps, see `StepwiseDataModule`) and `id2label`.
    Once trained it is a reward source: `rewards.ProcessRewardModelSource`, or `process_reward_model` on GRPO / PPO.

    Args:
        model_name_or_path: a preset (`tiny`, `small`, `medium`), a `save_pretrained` directory (an SFT export
            works: the backbone is kept and the token head starts fresh), or a hub id.
        tokenizer_name_or_path: defaults to `model_name_or_path`.
        step_separator: what ends each step (TRL's default "\\n"); the data follows it and it is exported.
        lr, weight_decay, betas, warmup_steps, lr_schedule, min_lr_ratio, torch_dtype, trust_remote_code, seed,
            max_nonfinite_steps, gradient_checkpointing: as in `RewardModel`.
        lora / lora_export: as in `RewardModel` (the `score` head trains in full beside the adapter; `merged`
            exports a plain `AutoModelForTokenClassification`).
    """

    what = "process reward model"
    lora_task = "token_cls"
    optimizer_names = ("the process reward model",)

    def __init__(self, model_name_or_path: str = "tiny", tokenizer_name_or_path: str | None = None,
                 step_separator: str = "\n", **kwargs: Any):
        if not isinstance(step_separator, str) or not step_separator:
            raise ValueError(f"step_separator must be a non-empty string, got {step_separator!r}")
        super().__init__(model_name_or_path, tokenizer_name_or_path, **kwargs)
        if not self.tokenizer(step_separator, add_special_tokens=False)["input_ids"]:
            raise ValueError(f"step_separator {step_separator!r} tokenizes to no tokens with this tokenizer")
        self.step_separator = step_separator
        self.train_metrics, self.val_metrics = step_metrics(), step_metrics()

    def load_model(self) -> nn.Module:
        hp = self.hparams
        model = load_token_classifier(hp.model_name_or_path, self.tokenizer, torch_dtype=hp.torch_dtype,
                                      trust_remote_code=hp.trust_remote_code, seed=hp.seed, num_labels=2)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        model.config.id2label, model.config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
        return model

    # ------------------------------------------------------------------------------------------ scoring
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [N, L, 2] (float32) of every token of sequences built by `stepwise_input_ids`."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        logits, labels = self(batch["input_ids"], batch["attention_mask"]), batch["labels"]  # [B, L, 2], [B, L]
        loss = step_loss(logits, labels)
        B = labels.shape[0]
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        self.update_step_metrics(metrics, logits.argmax(-1), labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=B, sync_dist=stage == "val")
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=name == "step_accuracy", batch_size=B)
        return loss

    @staticmethod
    def update_step_metrics(metrics: nn.ModuleDict, preds: Tensor, labels: Tensor) -> None:
        """Feed step accuracy, the incorrect class's F1 and first-error agreement from token predictions [B, L]
        and token labels [B, L] (-100 = not a step end)."""
        mask = labels != -100
        metrics["step_accuracy"](preds[mask], labels[mask])
        metrics["step_f1"]((preds[mask] == 0).long(), (labels[mask] == 0).long())
        found = first_error_position(mask & (preds == 0)) == first_error_position(mask & (labels == 0))  # [B]
        metrics["first_error_found"](found.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log_lr()
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Each row's prompt and P(correct) of each step."""
        probs = self(batch["input_ids"], batch["attention_mask"]).softmax(-1)[..., 1]  # [B, L]
        mask = batch["labels"] != -100
        return [{"prompt": p, "step_scores": probs[i][mask[i]].tolist()} for i, p in enumerate(batch["prompts"])]

    # ------------------------------------------------------------------------------------------ set-up
    def check_data(self, data: Any) -> None:
        from ..data import PromptDataModule, StepwiseDataModule

        if isinstance(data, PromptDataModule) and not isinstance(data, StepwiseDataModule):
            raise ValueError(f"ProcessRewardModel trains on step labels, but the data is a {type(data).__name__}; "
                             "use data: rlhf_lightning.StepwiseDataModule (prompt, completions, labels)")

    @property
    def scores_end(self) -> bool:
        """The model judges a solution's end (the end step ""): its training rows have end steps (the data's
        `has_end_steps`), or, off a Trainer, the model it was loaded from recorded so."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(data, "has_end_steps") and data.train_rows:
            return data.has_end_steps
        return bool(getattr(self.model.config, "scores_end", False))

    def export_config(self, config: Any) -> None:
        export_config(config, self.step_separator, self.scores_end)


def export_config(config: Any, step_separator: str, scores_end: bool) -> None:
    """What a PRM export's config records: `step_separator` (what the reward source splits completions on),
    `scores_end` (trained on end steps: the source scores each completion's end) and the class names; also the
    iterative PRM callback's export."""
    config.step_separator = step_separator
    config.scores_end = bool(scores_end)
    config.id2label, config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}


def step_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The PRM's loss: the mean cross-entropy of logits [B, L, 2] at the labelled positions of labels [B, L]
    (-100 = not a step end), TRL's PRMTrainer's; also the iterative PRM callback's."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def step_metrics() -> nn.ModuleDict:
    """One stage's metrics: step accuracy, the incorrect class's F1, first-error agreement."""
    return nn.ModuleDict({"step_accuracy": BinaryAccuracy(), "step_f1": BinaryF1Score(),
                          "first_error_found": MeanMetric()})


def first_error_position(wrong: Tensor) -> Tensor:
    """[B, L] bool -> [B]: the first position that is True, L when none is ("no wrong step")."""
    L = wrong.shape[-1]
    positions = torch.arange(L, device=wrong.device).expand_as(wrong)
    return torch.where(wrong, positions, L).min(-1).values
