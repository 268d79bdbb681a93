"""`ProcessRewardModelSource`: a trained process reward model (a `ProcessRewardModel` export or module) as a reward
source: every step of a completion gets its P(correct), or the steps' scores are aggregated into one reward."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from .functions import _check_inputs
from .interface import RewardOutput, RewardSource
from .model import eval_mode
from .model_inputs import right_pad, split_steps, stepwise_input_ids

AGGREGATIONS = ("steps", "min", "last", "product")


class ProcessRewardModelSource(RewardSource):
    """A process reward model as a reward source (`score(prompts, completions, columns) -> RewardOutput`).

    Each completion is split into steps on the model's `step_separator` (`split_steps`: as many steps as
    separators + 1, what process supervision's step boundaries count), read as training read its rows
    (`stepwise_input_ids`), and every step's P(correct) (softmax of the 2-class head at the last token of its
    separator) comes from one forward pass per batch, in eval mode, without gradients.

    aggregate: `steps` (`process = True`: N lists of step scores, GRPO `supervision: process`), or one outcome
        reward per completion (`process = False`, logged as `reward/process_reward_model`): `min` (the weakest step:
        a chain is as good as its worst step), `last` (the final step's score) or `product` (all steps right).
    model_dir_or_module: an exported `hf_model/` directory (or hub id) of `ProcessRewardModel`, the module itself
        (its weights are shared, not copied), or a bare token-classification model (then `tokenizer` is required).
    step_separator: default the one recorded in the export (`config.step_separator`), else "\\n"; one that differs
        from the recorded one is refused (the model learned to score that one).
    score_end: also score each completion's end, as the end step "" after its steps (`algorithms.process`: how
        stopping early is blamed); default: what the model records (`config.scores_end`: it was trained on end
        steps), else False. Then every completion has one score more than steps (the last is its end's).
    batch_size: completions per forward pass. device: where to run (default: where the model is).
    """

    __name__ = "process_reward_model"  # how reward logs name it
    learned = True  # a model's opinion, not a verifier: val/accuracy uses the task's verifier

    def __init__(self, model_dir_or_module: str | os.PathLike | nn.Module, tokenizer: Any = None,
                 aggregate: str = "steps", step_separator: str | None = None, batch_size: int = 64,
                 device: str | torch.device | None = None, score_end: bool | None = None):
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be {'|'.join(AGGREGATIONS)}, got {aggregate!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, recorded, scores_end = _load(model_dir_or_module, tokenizer)
        self.score_end = scores_end if score_end is None else bool(score_end)
        if step_separator is not None and recorded is not None and step_separator != recorded:
            raise ValueError(f"step_separator {step_separator!r} differs from the {recorded!r} the process reward "
                             f"model was trained with")
        self.step_separator = step_separator or recorded or "\n"
        if device is not None:
            self.model.to(device)
        self.aggregate, self.batch_size = aggregate, batch_size
        self.process = aggregate == "steps"

    def to(self, device: str | torch.device) -> ProcessRewardModelSource:
        self.model.to(device)
        return self

    def step_scores(self, prompts: list[Any], completions: list[Any]) -> list[list[float]]:
        """P(correct) of every step of every completion (prompts / completions as TRL passes them), then of its
        end with `score_end`."""
        from ..data.rows import prompt_text, response_text

        sep, end = self.step_separator, [""] if self.score_end else []
        rows = [stepwise_input_ids(self.tokenizer, prompt_text(self.tokenizer, p),
                                   split_steps(response_text(c, "completion"), sep) + end, sep)
                for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        out: list[list[float]] = []
        with torch.no_grad(), eval_mode(self.model):
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i:i + self.batch_size]
                ids, mask = right_pad([r[0] for r in chunk], self.tokenizer.pad_token_id)  # [b, L]
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [b, L, 2]
                p_correct = logits.float().softmax(-1)[..., 1].cpu()  # [b, L]
                out += [p_correct[j, positions].tolist() for j, (_, positions) in enumerate(chunk)]
        return out

    def score(self, prompts, completions, columns=None) -> RewardOutput:
        prompts, completions, _ = _check_inputs(prompts, completions, columns)
        steps = self.step_scores(prompts, completions)
        if self.process:
            return RewardOutput(steps)
        rewards = torch.tensor([aggregate_steps(s, self.aggregate) for s in steps], dtype=torch.float32)
        return RewardOutput(rewards, {self.name: rewards})


def aggregate_steps(scores: list[float], how: str) -> float:
    """One reward from a completion's step scores: their `min`, the `last` one, or their `product`."""
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "product":
        return math.prod(scores)
    raise ValueError(f"unknown aggregation {how!r}; choose min|last|product")


def _load(source: Any, tokenizer: Any) -> tuple[nn.Module, Any, str | None, bool]:
    """(model, tokenizer, recorded step separator, scores ends) of a directory / hub id, a `ProcessRewardModel` or
    a model."""
    from ..models import load_token_classifier
    from ..modules.process_reward_model import ProcessRewardModel
    from ..tokenizer import load_tokenizer

    if isinstance(source, ProcessRewardModel):
        return source.model, tokenizer or source.tokenizer, source.step_separator, source.scores_end
    if isinstance(source, nn.Module):
        if tokenizer is None:
            raise ValueError("ProcessRewardModelSource needs `tokenizer` when given a bare model")
        return (source, tokenizer, getattr(source.config, "step_separator", None),
                bool(getattr(source.config, "scores_end", False)))
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"model_dir_or_module must be a directory, a ProcessRewardModel or a model, "  # noqa: TRY004
                         f"got {type(source).__name__}")
    if str(source).endswith(".ckpt"):
        raise ValueError(f"process_reward_model {os.fspath(source)!r} is a Lightning checkpoint; pass the "
                         "ProcessRewardModel's hf_model export directory")
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) else \
        load_tokenizer(os.fspath(tokenizer or source))
    model = load_token_classifier(os.fspath(source), tok, require_trained_head=True)
    if model.config.num_labels != 2:
        raise ValueError(f"process reward model {os.fspath(source)!r} has {model.config.num_labels} classes; "
                         "a process reward model has 2 (0 = incorrect, 1 = correct)")
    model.requires_grad_(False)  # frozen: scored in eval mode, no gradients
    return model, tok, getattr(model.config, "step_separator", None), bool(getattr(model.config, "scores_end", False))
