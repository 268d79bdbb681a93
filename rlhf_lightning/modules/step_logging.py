"""What an RL step logs, and how: one all-gather of every scalar per rollout, sample tables and histograms.

`StepLogging.log_step(step)` logs what every RL algorithm has (lengths, timings, lr, counters, each reward
source, the non-finite guard, the updates' metrics) plus the algorithm's own `step_metrics(step)`. The x-axis of
every RL metric is the rollout index (0-based, as Lightning numbers the batches its `val/` metrics follow).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch


class StepLogging:
    """Mixin of `RLModule`: per-rollout logging. Reads `self.rollouts`, `self.hparams`, the trainer's loggers."""

    def log_step(self, step) -> None:
        """Log the step's metrics (reduced across ranks), the progress bar, and every N rollouts the samples."""
        s = step.rollout.samples
        lengths = s.completion_mask.sum(-1).float()
        n_tokens = float(s.completion_mask.sum())
        metrics = {
            "rollout/completion_len_mean": lengths.mean(),
            "rollout/completion_len_max": lengths.max(),
            "rollout/truncated_frac": s.is_truncated.float().mean(),
            "perf/tokens_per_s": torch.tensor(n_tokens / max(step.t_gen + step.t_train, 1e-9)),
            "perf/generation_s": torch.tensor(step.t_gen),
            "perf/training_s": torch.tensor(step.t_train),
            "policy/lr": torch.tensor(_first(self.optimizers()).param_groups[0]["lr"]),
            "perf/rollouts": torch.tensor(float(self.rollouts)),
            "perf/optimizer_steps": torch.tensor(float(self.optimizer_steps)),
        }
        if s.turns is not None:  # a multi-turn rollout (tools): per completion, and the share of tool tokens
            t = s.turns
            metrics.update({"tools/calls_per_completion": t.tool_calls.mean(), "tools/turns_per_completion":
                            t.turns.mean(), "tools/error_frac": t.tool_errors.sum() / t.tool_calls.sum().clamp(min=1),
                            "tools/timeout_frac": t.tool_timeouts.sum() / t.tool_calls.sum().clamp(min=1),
                            "tools/masked_token_frac": 1.0 - s.trained_mask.sum() / max(n_tokens, 1.0)})
        if s.env_rewards is not None:  # an environment's episodes: return, steps, and how many it ended itself
            metrics.update({"env/return": torch.tensor([sum(r) for r in s.env_rewards]).float().mean(),
                            "env/steps_per_completion": torch.tensor([len(r) for r in s.env_rewards]).float().mean(),
                            "env/done_frac": s.turns.env_done.float().mean()})
        metrics.update(self.step_metrics(step))
        metrics.update(self.per_function_reward_metrics(step.rollout.per_source))
        metrics.update(self.guard_metrics())
        metrics.update(step.metrics)
        metrics.update({k: torch.tensor(v) for k, v in step.stats.items()})
        logged = self.log_step_metrics(metrics)
        if self.should_log_samples():
            self.log_samples(step)
        for name, key in self.progress_bar.items():
            if key in logged:
                self.log(name, logged[key], prog_bar=True, logger=False, batch_size=len(step.rollout.completions))

    def step_metrics(self, step) -> dict[str, Any]:
        """The algorithm's own scalars of a step (reward/*, policy/advantage_abs_mean, value/*)."""
        return {}

    def log_samples(self, step) -> None:
        """The sample table and the histograms of rewards and advantages (`log_samples_every_n_steps`)."""

    @property
    def log_index(self) -> int:
        """The x-axis of the step being logged: the rollout index (`self.rollouts` counts it once done)."""
        return max(self.rollouts - 1, 0)

    def log_step_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Log a dict of scalars once per rollout, reduced across ranks in ONE collective (`reduce_step_metrics`).

        `self.log_dict` costs a few ms per key (result collections, per-key syncs); an RL step logs ~30 keys.
        Keys ending in `_max` are max-reduced, the rest averaged.
        """
        keys = list(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).detach().reshape(()).cpu()
                              for k in keys]).to(self.device)  # [K]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            values = reduce_step_metrics(keys, values)
        out = dict(zip(keys, values.tolist()))
        # visible to callbacks (ModelCheckpoint(monitor="reward/mean"), EarlyStopping) like self.log'd values
        as_tensors = {k: v.detach().clone() for k, v in zip(keys, values.cpu())}
        self.trainer.callback_metrics.update(as_tensors)
        self.trainer.logged_metrics.update(as_tensors)
        if self.logger is not None:
            self.logger.log_metrics(out, step=self.log_index)
        return out

    def shown_completions(self, rollout) -> list[str]:
        """The completions for the sample table: tool turns marked `<<tool: ...>>` in a multi-turn rollout."""
        if rollout.samples.turns is None:
            return rollout.completions
        from ..rollout.multi_turn import marked_conversations

        return marked_conversations(self.tokenizer, rollout.samples)

    def log_sample_table(self, prompts: list[str], completions: list[str], rewards: torch.Tensor,
                         advantages: torch.Tensor, max_rows: int = 8) -> None:
        """A table of sample completions (prompt, completion, extracted answer, reward, advantage) in every logger
        that shows tables (`infra.media`: TensorBoard's Text tab, W&B, MLflow), rank 0 only."""
        from ..infra.media import log_table
        from ..rewards import extract_answer

        if self.trainer.global_rank != 0:
            return
        adv = advantages if advantages.dim() == 1 else advantages[:, 0]  # process supervision: first token's
        rows = [[prompts[i], completions[i], str(extract_answer(completions[i])), float(rewards[i]), float(adv[i])]
                for i in range(min(max_rows, len(completions)))]
        log_table(self.loggers, "samples", ["prompt", "completion", "answer", "reward", "advantage"], rows,
                  self.log_index)

    def log_histograms(self, values: dict[str, torch.Tensor]) -> None:
        """Histograms of this rank's values in every logger that shows them (`infra.media`), rank 0 only.

        Not reduced across ranks: gathering whole reward/advantage vectors every N steps would cost a collective
        of variable size for a picture that one rank's sample already shows. NaN entries are dropped.
        """
        from ..infra.media import log_histogram

        if self.trainer.global_rank != 0:
            return
        for tag, x in values.items():
            log_histogram(self.loggers, tag, x, self.log_index)

    def per_function_reward_metrics(self, per_source: dict[str, torch.Tensor]) -> dict[str, Any]:
        """`reward/<function name>` and `reward/<function name>_std`: each reward function's mean and std over
        the rows that got a reward (unweighted, so a hacked component shows even when its weight is small)."""
        out: dict[str, Any] = {}
        for name, row in per_source.items():
            ok = ~torch.isnan(row)
            out[f"reward/{name}"] = row[ok].mean() if ok.any() else torch.zeros(())
            out[f"reward/{name}_std"] = row[ok].std() if ok.sum() > 1 else torch.zeros(())
        return out

    def should_log_samples(self) -> bool:
        """True on the rollouts that log the sample table and histograms: the 1st, then every
        `log_samples_every_n_steps` (0 = never)."""
        every = self.hparams.get("log_samples_every_n_steps", 0)
        return bool(every) and (self.rollouts - 1) % every == 0

    def on_train_end(self) -> None:
        """The run's final metric in TensorBoard's HParams tab: `hp_metric` = the last rollout's `reward/mean`.

        Lightning's TensorBoardLogger writes the hyperparameters with `hp_metric` (-1) when fit starts; the
        HParams tab shows a metric's last value, so logging the final reward under that key completes the row.
        A `RunLogger(default_hp_metric=False)` wrote nothing then, so it writes the hyperparameters here with it.
        """
        from lightning.pytorch.loggers import TensorBoardLogger

        from ..infra.loggers import RunLogger

        final = self.trainer.callback_metrics.get("reward/mean")
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger) or final is None:
                continue
            if isinstance(logger, RunLogger) and not logger.writes_default_hp_metric:
                logger.log_hyperparams(self.hparams, metrics={"hp_metric": float(final)}, step=self.rollouts)
            else:
                logger.log_metrics({"hp_metric": float(final)}, step=self.rollouts)


def reduce_step_metrics(keys: list[str], values: torch.Tensor) -> torch.Tensor:
    """Values [K] of `keys` reduced over all ranks in one all_gather: keys ending in `_max` max-reduced, the rest
    averaged. Every rank must log the same keys in the same order; a checksum of the key names travels with the
    values, so a rank that logs other keys stops the run with an error instead of averaging unrelated numbers."""
    checksum = float(zlib.crc32("\x1f".join(keys).encode()) & 0xFFFFFF)  # < 2**24: exact in float32
    local = torch.cat([values.float(), values.new_tensor([checksum], dtype=torch.float32)])  # [K + 1]
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    table = torch.stack(gathered)  # [W, K + 1]
    if not bool((table[:, -1] == checksum).all()):
        raise ValueError(f"ranks logged different metric keys in log_step_metrics (rank "
                         f"{torch.distributed.get_rank()}: {keys}); log the same keys on every rank")
    is_max = torch.tensor([k.endswith("_max") for k in keys], device=values.device)
    return torch.where(is_max, table[:, :-1].max(0).values, table[:, :-1].mean(0))


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x
