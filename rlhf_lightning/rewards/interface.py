"""The reward-source interface: what scores a rollout's completions, and what the scoring returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RewardOutput:
    """What a reward source returns for N completions.

    rewards: float32 Tensor [N] (NaN = no reward for that completion), or, for a process source, N lists of step
        rewards (float, NaN = no reward for that step).
    per_source: name -> unweighted Tensor [N] of each outcome source, for `reward/<name>` logging (empty for
        process sources and for a subclass's own `compute_rewards`).
    """

    rewards: torch.Tensor | list[list[float]]
    per_source: dict[str, torch.Tensor] = field(default_factory=dict)


class RewardSource:
    """Scores completions: `source.score(prompts, completions, columns) -> RewardOutput` (also `source(...)`).

    `columns` are the dataset's other columns as lists aligned with `completions` (e.g. `answer`); prompts and
    completions are as TRL passes them (strings, or chat messages for conversational data). Subclass it and
    implement `score` for a reward that is not a TRL reward function (a remote judge, a model with its own
    batching); list it in `reward_fns` as an instance or, in YAML, by its class's import path (the class is then
    built with no arguments). `name` is what `reward/<name>` logs it as.
    """

    process = False  # True: `rewards` holds per-step lists (GRPO supervision=process)
    learned = False  # True: a trained model's opinion (reward models), never what val/accuracy measures

    @property
    def name(self) -> str:
        return getattr(self, "__name__", None) or type(self).__name__

    def score(self, prompts: list[Any], completions: list[Any], columns: dict[str, list] | None = None
              ) -> RewardOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement score(prompts, completions, columns)")

    def __call__(self, prompts: list[Any], completions: list[Any], columns: dict[str, list] | None = None
                 ) -> RewardOutput:
        return self.score(prompts, completions, columns)
