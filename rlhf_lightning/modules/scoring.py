"""How a policy module scores completions: its reward sources, a subclass's `compute_rewards`, the verifier.

One scoring path for training and validation (`score_rollout`): the weighted reward sources (`rewards/`), or a
subclass's own `compute_rewards`, with non-finite values stopped or made missing as `nonfinite_rewards` says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


class RewardScoring:
    """Mixin of `PolicyModuleBase`: reward functions / sources, scoring, and the validation metrics of rewards."""

    def _check_reward_signatures(self) -> None:
        """Before the first step: each reward function accepts the columns the data will pass (one collated row
        shows which), else a config error telling the user to add `**kwargs`."""
        from ..infra.errors import ConfigError, RewardFunctionError
        from ..rewards import check_signature

        datamodule = getattr(self._trainer, "datamodule", None)
        rows = getattr(datamodule, "train_rows", None)
        if not self.reward_funcs or not rows or not callable(getattr(datamodule, "collate", None)):
            return
        columns = list(self.reward_columns(datamodule.collate(rows[:1])))
        if getattr(self, "env_interaction", None) is not None:
            columns.append("env_rewards")  # added by the rollout: each completion's environment step rewards
        for fn in self.reward_funcs:
            try:
                check_signature(fn, columns)
            except RewardFunctionError as err:
                raise ConfigError(str(err)) from err

    def data_task(self):
        """The datamodule's built-in task (its verifiers), or None."""
        return getattr(getattr(self._trainer, "datamodule", None), "task", None)

    def default_reward_fns(self, task) -> Sequence[Callable]:
        """Reward functions used when none are configured and the data is a built-in task."""
        return task.reward_fns

    def default_environment_reward_fns(self) -> Sequence[Callable]:
        """Reward functions used when none are configured and an environment answers the turns: the sum of its
        step rewards (GRPO under supervision=process: one step reward per turn)."""
        from ..rewards import environment_reward, environment_turn_rewards

        return [environment_turn_rewards if self.process_rewards else environment_reward]

    @staticmethod
    def reward_columns(batch: dict[str, Any], repeat: int = 1, samples=None) -> dict[str, list]:
        """The batch's extra dataset columns, each repeated `repeat` times per row (aligned with completions), and
        `env_rewards` (each row's step rewards) when `samples` came from an environment's episodes."""
        skip = {"prompt_ids", "prompt_mask", "prompts", "input_ids", "attention_mask", "labels"}
        columns = {k: [v for v in vals for _ in range(repeat)] for k, vals in batch.items()
                   if k not in skip and isinstance(vals, list)}
        if samples is not None and getattr(samples, "env_rewards", None) is not None:
            columns["env_rewards"] = [list(r) for r in samples.env_rewards]
        return columns

    def batch_rows(self, batch: dict[str, Any], repeat: int = 1) -> list[dict[str, Any]] | None:
        """Each rollout row's dataset row for an environment's `reset`: {"prompt": the prompt (its chat messages
        for conversational data), other columns}; None without an environment."""
        from ..rewards import CHAT_PROMPTS

        if getattr(self, "env_interaction", None) is None:
            return None
        columns = self.reward_columns(batch, repeat)
        messages = columns.pop(CHAT_PROMPTS, None)
        prompts = [p for p in batch["prompts"] for _ in range(repeat)]
        if messages is not None:
            prompts = [m if m is not None else p for m, p in zip(messages, prompts)]
        return [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list], fns=None):
        """(total [B], per-function [F, B]) rewards of `fns` (default: the reward functions); NaN = 'no reward'."""
        from ..rewards import call_reward_fns

        fns = self.reward_funcs if fns is None else fns
        weights = self.reward_weights if fns is self.reward_funcs else None
        return call_reward_fns(fns, weights, prompts, completions, columns, self.nonfinite_rewards,
                               self._reward_stats)

    process_rewards = False  # True: the reward sources give step rewards (GRPO's supervision=process)

    def reward_source(self):
        """The module's reward as one `RewardSource`: `reward_fns` (functions or sources) weighted by
        `reward_weights`, with non-finite values handled as `nonfinite_rewards` says."""
        from ..rewards import WeightedSources

        return WeightedSources(self.reward_funcs, self.reward_weights, self.process_rewards, self.nonfinite_rewards,
                               self._reward_stats)

    def score_sources(self, prompts: list[str], completions: list[str], batch: dict[str, Any]):
        """The library's own `RewardOutput` of a rollout: `reward_source()` scored (PPO adds its reward model)."""
        return self.reward_source().score(prompts, completions, batch["columns"])

    def compute_rewards(self, prompts: list[str], completions: list[str], batch: dict[str, Any]):
        """Outcome rewards [N] (NaN = no reward; process supervision: N lists of step rewards) of the weighted
        reward sources; `batch["columns"]` holds the dataset columns aligned with completions. Override for a new
        task; training and validation both score through it."""
        return self.score_sources(prompts, completions, batch).rewards

    def score_rollout(self, prompts: list[str], completions: list[str], batch: dict[str, Any]):
        """The `RewardOutput` of `compute_rewards` (a subclass's own included: its rewards, no per-source values),
        with ±inf / float32-overflowing values stopped or made missing as `nonfinite_rewards` says. The one
        scoring path of training and validation."""
        from ..rewards import RewardOutput, check_finite_rewards

        self._reward_stats = {}
        hook = self.compute_rewards
        if _is_library_hook(hook):  # the sources themselves: their per-source values come along
            out = self.score_sources(prompts, completions, batch)
        else:
            out = RewardOutput(hook(prompts, completions, batch))
        rewards = out.rewards
        if isinstance(rewards, torch.Tensor):  # a subclass may build it on the CPU
            rewards = rewards.to(self.device)
        out.rewards = check_finite_rewards(rewards, f"{type(self).__name__}.compute_rewards", self.nonfinite_rewards,
                                           self._reward_stats)
        return out

    def has_reward(self) -> bool:
        """Whether validation can score: reward functions, or a `compute_rewards` of the user's own."""
        owner = next(c for c in type(self).__mro__ if "compute_rewards" in c.__dict__)
        return bool(self.reward_funcs) or not owner.__module__.startswith("rlhf_lightning.")

    def outcome_rewards(self, rewards) -> torch.Tensor:
        """One reward per completion [N]: the rewards themselves, or (process supervision: step lists) each
        completion's mean step reward over the steps that got one (NaN when none did)."""
        if isinstance(rewards, torch.Tensor):
            return rewards.float().to(self.device)
        vals = []
        for steps in rewards:
            got = [float(v) for v in steps if v is not None and not math.isnan(float(v))]
            vals.append(sum(got) / len(got) if got else math.nan)
        return torch.tensor(vals, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions on held-out prompts: `val/reward`, and `val/accuracy` for 0/1 verifiers (plus the
        sampled `val/pass@k`, `val/maj@k` with eval_num_samples; `test/...` under `trainer.test`)."""
        if self.has_reward():
            self.log_reward_fn_metrics(batch, self.greedy_samples(batch))

    def log_reward_fn_metrics(self, batch: dict[str, Any], samples) -> None:
        """`val/reward`: the mean reward of the greedy `samples` through `score_rollout` (the training path, so a
        subclass's `compute_rewards` is what validation measures; process supervision: the mean step reward;
        'no reward' counts 0). `val/accuracy`: the mean of `validation_verifier` when its values are all 0/1.
        Then the sampled evaluation of the batch (`sampled_eval_step`, when eval_num_samples > 0)."""
        from ..rollout import decode_completions

        completions = decode_completions(self.tokenizer, samples.completion_ids, samples.completion_mask)
        columns = self.reward_columns(batch, samples=samples)
        scored = self.score_rollout(batch["prompts"], completions, {**batch, "columns": columns, "samples": samples})
        rewards = scored.rewards
        B, prefix = len(completions), self.eval_prefix
        self.log(f"{prefix}/reward", torch.nan_to_num(self.outcome_rewards(rewards)).mean(), batch_size=B,
                 sync_dist=True, prog_bar=True)
        verified = self._verifier_values(batch["prompts"], completions, columns, scored.per_source)
        if verified is not None and bool(((verified == 0) | (verified == 1)).all()):
            self.log(f"{prefix}/accuracy", verified.mean(), batch_size=B, sync_dist=True, prog_bar=True)
        self.sampled_eval_step(batch)

    def validation_verifier(self) -> Callable | None:
        """The reward function whose 0/1 values are `val/accuracy`: the first reward function that is not a trained
        model (`RewardSource.learned`: a reward model's or process reward model's opinion is what RL optimises,
        not what it is measured by), else the built-in task's verifier (for a task with no reward_fns
        configured: the task's verifier, which is then the first reward function)."""
        own = [fn for fn in self.reward_funcs if not getattr(fn, "learned", False)]
        if own:
            return own[0]
        task = self.data_task()
        return task.reward_fns[0] if task is not None and task.reward_fns else None

    def _verifier_values(self, prompts: list[str], completions: list[str], columns: dict[str, list],
                         per_source: dict[str, torch.Tensor]):
        """The verifier's values [B]: reused from the scoring just done (`per_source`) when it scored the verifier,
        else its own call (a subclass's compute_rewards, process supervision, PPO's reward model alone)."""
        fn = self.validation_verifier()
        if fn is None:
            return None
        # per_source is keyed by name: reuse only when every reward function has its own entry, the first first
        if self.reward_funcs and fn is self.reward_funcs[0] and len(per_source) == len(self.reward_funcs):
            return next(iter(per_source.values()))
        return self.score(prompts, completions, columns, fns=[fn])[1][0]


def _is_library_hook(method: Callable) -> bool:
    """Whether a bound `compute_rewards` is this package's own (not a subclass's, nor a wrapper set on the instance)."""
    func = getattr(method, "__func__", None)
    return func is not None and getattr(func, "__module__", "").startswith("rlhf_lightning.")


