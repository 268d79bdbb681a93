"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4.1), with the later fixes.

One `training_step` = one rollout + its updates:

    1. rollout            each prompt is repeated G times *inside* the step (a group never spans ranks) and
                          sampled with the `rollout_engine` (`rollout.RolloutEngine`), under no_grad, eval mode
                          (dynamic sampling: all-equal groups re-sampled, `dynamic_sampling_max_tries` rounds)
    2. compute_rewards    reward functions (TRL signature) -> one reward per completion (outcome) or one reward
                          per reasoning step (process); None/NaN = "no reward" (advantage 0, counted)
    3. old / ref log-probs old log-probs are needed only when the policy moves before a sample is used
                          (num_iterations > 1 or minibatches > 1) or the reward needs the KL (reinforce_pp);
                          otherwise the ratio is exactly 1 and the current log-probs stand in (detached). The
                          reference pass runs only when beta > 0.
    4. compute_advantages the `advantage_estimator` from the registry (`algorithms.advantages`): by default
                          group-relative, (r - mean_group) / (std_group + eps) (§4.1.2; `scale_rewards=none` is
                          Dr. GRPO, `batch` uses the batch std), or the process form (§4.1.3)
    5. updates            num_iterations (μ) x minibatches optimizer steps of the clipped surrogate
                          + beta * KL(π_θ‖π_ref) (k3 by default) added to the loss (eq. 3)

Manual optimization: one optimizer step per (iteration, minibatch). Lightning's `trainer.global_step` counts
optimizer steps, so `trainer.max_steps` = rollouts x num_iterations x minibatches; the TensorBoard x-axis is the
rollout index (Lightning's batch counter), the same as for PPO.

Hooks a subclass overrides (each is small and documented below):
    rollout(batch) -> Rollout              sampling through `self.engine` (a new engine: docs/extending.md)
    compute_rewards(prompts, completions, batch) -> Tensor [N] (outcome) or list[list[float]] (process)
    compute_advantages(rewards, rollout) -> Tensor [N] or [N, T]
    policy_loss(logp, old_logp, advantages, mask, normalizer) -> (loss, stats)
Overriding `compute_rewards` alone is enough for a new task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import losses
from ..algorithms import dynamic_sampling
from ..algorithms.advantages import AdvantageInputs, Estimator, get_estimator
from ..infra import parallel
from ..rollout import RolloutBatch, completion_logprobs, decode_completions
from .base import PolicyModuleBase, grad_norm


@dataclass
class Rollout:
    """Everything one rollout produced. Row i belongs to group i // group_size."""

    samples: RolloutBatch  # prompt/completion ids and masks, behaviour log-probs
    prompts: list[str]  # [N] prompt text per row (N = prompts x group_size)
    completions: list[str]  # [N] decoded completions (no EOS/pad)
    columns: dict[str, list]  # dataset columns, aligned with rows
    extras: dict[str, Any] = field(default_factory=dict)  # room for subclasses (e.g. step boundaries)
    baseline_scores: Tensor | None = None  # [N] reward of the prompt's greedy completion (remax)
    kl: Tensor | None = None  # [N, T] KL to the reference, set before advantages when it shapes the reward
    per_source: dict[str, Tensor] = field(default_factory=dict)  # reward/<name>: each source's rewards, once scored


class GRPOModule(PolicyModuleBase):
    """Critic-free RL for LMs (DeepSeekMath §4.1) with DAPO / Dr. GRPO / GSPO options.

    Args (beyond `PolicyModuleBase`'s model / reward / optimizer arguments):
        reward_model: a trained reward model (`RewardModel`'s `hf_model/` export, any local
            AutoModelForSequenceClassification directory, or a hub id), used as one more reward function
            (`rewards.RewardModelSource`; weight 1 unless reward_weights lists it last).
        normalize_reward_model: standardise its scores with the mean/std recorded at its last validation.
        group_size: G completions sampled per prompt (≥ 2: advantages are relative within a group).
        beta: weight of the KL(π_θ‖π_ref) penalty in the loss; 0 loads no reference model.
        kl_estimator: `k3` (unbiased, always ≥ 0; the paper's eq. 4), `k1`, or `k2`.
        clip_low / clip_high: ε of the clipped surrogate below / above 1 (clip-higher, DAPO: clip_high > clip_low).
        scale_rewards: `group` (paper: divide by the group std), `batch` (the std of the whole batch, all ranks
            together), `none` (Dr. GRPO).
        advantage_estimator: a name from `rlhf_lightning.algorithms.advantages.ESTIMATORS`: `grpo` (default,
            scaled by `scale_rewards`), `dr_grpo`, `rloo`, `reinforce_pp` (KL to the reference in the reward,
            weighted by beta, instead of in the loss), `reinforce_pp_baseline`, `remax` (samples one greedy
            completion per prompt as the baseline). See docs/grpo.md.
        loss_agg: `seq-mean-token-mean` (paper), `token-mean` (DAPO), `seq-mean-token-sum-norm` (Dr. GRPO; the
            token sum is divided by max_new_tokens). Normalised over the whole optimizer step.
        importance_sampling: `token` (PPO-style per-token ratio) or `sequence` (GSPO length-normalised ratio).
        num_iterations: μ, optimizer passes over one rollout (old log-probs are cached once per rollout).
        minibatches: optimizer steps per pass; the rollout's groups are split among them (whole groups, sizes
            differing by at most one; more minibatches than groups is refused).
        micro_batch_size: rows per forward/backward (gradient accumulation inside an optimizer step; the loss is
            normalised by the whole step's count, so it does not change the result). None = the minibatch.
        max_new_tokens / min_new_tokens / temperature / top_p / top_k: sampling. The temperature also divides
            the logits of every log-prob pass, so ratios compare the distribution that was sampled.
        supervision: `outcome` (one reward per completion) or `process` (one reward per reasoning step).
        step_separator: splits a completion into steps for process supervision (default: the task's, or "\\n").
        mask_truncated: completions that hit max_new_tokens without EOS get no loss (DAPO overlong filtering).
        drop_uninformative_groups: groups whose rewards are all equal (zero advantage) are dropped from the
            loss and its normaliser (DAPO dynamic sampling).
        dynamic_sampling_max_tries: with drop_uninformative_groups, re-sample the uninformative groups' prompts
            up to this many rounds per rollout (each rank its own), keeping each newly informative group, so the
            batch holds as many informative groups as the bound allows (DAPO dynamic sampling). 0 = no
            re-sampling. Logged as rollout/resample_rounds and rollout/informative_groups.
        overlong_buffer_len / overlong_penalty_factor: DAPO's soft overlong punishment (eq. 13): completions
            longer than max_new_tokens - overlong_buffer_len tokens get a reward penalty growing linearly to
            -overlong_penalty_factor at max_new_tokens (reward/overlong_penalty). 0 = off. Outcome rewards only.
        entropy_coef: entropy bonus: the loss minus entropy_coef x the policy's mean token entropy, aggregated
            like the policy loss (loss_agg). 0 = off.
        max_grad_norm: gradient clipping (None = off).
        sample_seed: seed of the sampling generator (offset by the global rank).
        log_samples_every_n_steps: text table of sample completions and histograms of rewards / advantages every
            N rollouts (0 = off).
        lora, lora_export, gradient_checkpointing, rollout_engine, nonfinite_rewards, max_nonfinite_steps: see
            `PolicyModuleBase` (with LoRA, π_ref = adapter disabled).
    """

    minibatch_unit = "groups"  # minibatches hold whole groups (a group's advantages are relative to each other)

    def __init__(
        self,
        model_name_or_path: str = "tiny",
        tokenizer_name_or_path: str | None = None,
        reward_fns: Sequence[str] | None = None,
        reward_weights: Sequence[float] | None = None,
        reward_model: str | None = None,
        normalize_reward_model: bool = False,
        group_size: int = 8,
        beta: float = 0.04,
        kl_estimator: str = "k3",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        scale_rewards: str = "group",
        advantage_estimator: str = "grpo",
        loss_agg: str = "seq-mean-token-mean",
        importance_sampling: str = "token",
        num_iterations: int = 1,
        minibatches: int = 1,
        micro_batch_size: int | None = None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        supervision: str = "outcome",
        step_separator: str | None = None,
        mask_truncated: bool = False,
        drop_uninformative_groups: bool = False,
        dynamic_sampling_max_tries: int = 0,
        overlong_buffer_len: int = 0,
        overlong_penalty_factor: float = 1.0,
        entropy_coef: float = 0.0,
        max_grad_norm: float | None = 1.0,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
        torch_dtype: str | None = None,
        trust_remote_code: bool = False,
        val_max_new_tokens: int | None = None,
        sample_seed: int = 1234,
        log_samples_every_n_steps: int = 50,
        seed: int = 0,
        lora: dict[str, Any] | None = None,
        lora_export: str = "merged",
        gradient_checkpointing: bool = False,
        rollout_engine: str = "auto",
        nonfinite_rewards: str = "error",
        max_nonfinite_steps: int = 3,
    ):
        self.save_hyperparameters()
        _validate_grpo_args(self.hparams)
        self.estimator = _check_estimator(self.hparams)
        super().__init__(model_name_or_path, tokenizer_name_or_path, reward_fns,
                         reward_weights if reward_model is None else None, lr, weight_decay,
                         betas, warmup_steps, lr_schedule, min_lr_ratio, torch_dtype, trust_remote_code,
                         val_max_new_tokens or max_new_tokens, seed, lora=lora, lora_export=lora_export,
                         gradient_checkpointing=gradient_checkpointing, rollout_engine=rollout_engine,
                         nonfinite_rewards=nonfinite_rewards, max_nonfinite_steps=max_nonfinite_steps)
        self.apply_lora()
        self.automatic_optimization = False
        if reward_model is not None:
            from ..rewards import RewardModelSource

            # the scorer is a plain attribute (not a submodule): the RM is frozen and not part of checkpoints
            self.reward_funcs.append(RewardModelSource(reward_model, normalize=normalize_reward_model))
            if reward_weights is not None:
                from ..rewards import check_reward_weights

                if len(reward_weights) != len(self.reward_funcs):
                    raise ValueError(f"reward_weights needs {len(self.reward_funcs)} entries: one per reward_fns "
                                     f"entry and one (last) for reward_model")
                self.reward_weights = check_reward_weights(reward_weights, len(self.reward_funcs))
        self.ref_policy = self._make_reference() if beta > 0 else None
        self.step_separator = step_separator

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.step_separator is None:
            task = self.data_task()
            self.step_separator = getattr(task, "step_separator", None) or "\n"
        if self.hparams.supervision == "process" and not self.reward_funcs:
            raise ValueError("supervision=process needs reward_fns that return step rewards "
                             "(e.g. rlhf_lightning.rewards.chain_step_rewards)")
        if stage == "fit" and not self.has_reward():
            raise ValueError("GRPOModule has no reward: set model.reward_fns, use a built-in data.task, or override "
                             "compute_rewards")

    def default_reward_fns(self, task):
        return task.process_reward_fns if self.hparams.supervision == "process" else task.reward_fns

    def validation_verifier(self):
        """Process supervision: the task's outcome verifier (the reward functions give step rewards), if any."""
        if self.hparams.supervision != "process":
            return super().validation_verifier()
        task = self.data_task()
        return task.reward_fns[0] if task is not None and task.reward_fns else None

    def configure_optimizers(self):
        opt, sched = self.build_optimizer(self.trainable_parameters(), self.hparams.lr)
        return [opt], [sched]

    def updates_per_batch(self) -> tuple[int, int]:
        """num_iterations x minibatches steps of the one optimizer per rollout (see `schedule_horizon`)."""
        return self.hparams.num_iterations * self.hparams.minibatches, 1

    # ------------------------------------------------------------------------------------------ hooks
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample `group_size` completions per prompt. Rows i*G .. i*G+G-1 share prompt i."""
        G = self.hparams.group_size
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, dim=0)  # [N, P], N = B*G
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, dim=0)  # [N, P]
        samples = self.generate(prompt_ids, prompt_mask, self.sampling_params(), self._generator())
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        completions = decode_completions(self.tokenizer, samples.completion_ids, samples.completion_mask)
        rollout = Rollout(samples, prompts, completions, self.reward_columns(batch, repeat=G))
        if self.estimator.needs_baseline:
            rollout.baseline_scores = self.greedy_baseline(batch)
        return rollout

    def greedy_baseline(self, batch: dict[str, Any]) -> Tensor:
        """ReMax's baseline: the reward of each prompt's greedy completion, repeated for its G rows. [N]"""
        greedy = self.greedy_samples(batch, self.hparams.max_new_tokens)
        completions = decode_completions(self.tokenizer, greedy.completion_ids, greedy.completion_mask)
        scores = self.score_rollout(list(batch["prompts"]), completions,
                                    {"columns": self.reward_columns(batch), **batch}).rewards
        return torch.as_tensor(scores, dtype=torch.float32).to(self.device).repeat_interleave(self.hparams.group_size)

    @property
    def process_rewards(self) -> bool:
        """supervision=process: the reward functions give step rewards (`compute_rewards` returns N step lists)."""
        return self.hparams.supervision == "process"

    def compute_advantages(self, rewards, rollout: Rollout) -> Tensor:
        """Outcome: the `advantage_estimator`'s, [N] (one per completion) or [N, T] (token-level: reinforce_pp).
        Process: [N, T] per-token sums of normalised step rewards."""
        hp = self.hparams
        if hp.supervision == "process":
            T = rollout.samples.completion_ids.shape[1]
            step_rewards, step_ends = self.step_boundaries(rewards, rollout)
            return losses.process_advantages(step_rewards, step_ends, hp.group_size, num_tokens=T)
        mask = rollout.samples.completion_mask
        # scale_rewards=batch: the std of the whole batch over all ranks (all_reduce), as one process would see it
        out = self.estimator.fn(AdvantageInputs(mask=mask, scores=rewards.to(mask.device), group_size=hp.group_size,
                                                scale=hp.scale_rewards, kl=rollout.kl, kl_coef=hp.beta,
                                                baseline_scores=rollout.baseline_scores,
                                                all_reduce=self._global_sum))
        return out.sequence if out.sequence is not None else out.advantages

    def policy_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped surrogate (eq. 3 without the KL term), aggregated over the optimizer step."""
        hp = self.hparams
        return losses.policy_loss(logp, old_logp, advantages, mask, clip_low=hp.clip_low, clip_high=hp.clip_high,
                                  level=hp.importance_sampling, agg=hp.loss_agg, normalizer=normalizer,
                                  max_len=hp.max_new_tokens)

    # ------------------------------------------------------------------------------------------ process
    def step_boundaries(self, step_rewards: list[list[float]], rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Pad step rewards to [N, S] and find the completion-token index where each step ends ([N, S], -1 = none).

        A step is a piece of the completion split by `step_separator`; it ends at its last character (the
        separator belongs to the next step's start). Character offsets map to tokens through the cumulative
        length of the decoded tokens.
        """
        ids, mask = rollout.samples.completion_ids, rollout.samples.completion_mask
        N = len(step_rewards)
        S = max(1, max(len(r) for r in step_rewards))
        rewards = torch.full((N, S), float("nan"))
        ends = torch.full((N, S), -1, dtype=torch.long)
        sep = self.step_separator
        for i, (text, r) in enumerate(zip(rollout.completions, step_rewards)):
            n_tok = int(mask[i].sum())
            if n_tok == 0 or not r:
                continue
            token_texts = self.tokenizer.batch_decode(ids[i, :n_tok].unsqueeze(-1).tolist(),
                                                      skip_special_tokens=True)
            char_end = torch.tensor([len(t) for t in token_texts]).cumsum(0)  # [n_tok] chars decoded so far
            pieces = text.split(sep)
            pos = 0
            for s, piece in enumerate(pieces[:len(r)]):
                pos += len(piece)
                last_char = max(pos - 1, 0)
                # first token whose decoded text reaches past the step's last character
                tok = int(torch.searchsorted(char_end, torch.tensor(last_char), right=True))
                ends[i, s] = min(tok, n_tok - 1)
                rewards[i, s] = float("nan") if r[s] is None else float(r[s])
                pos += len(sep)
        return rewards.to(self.device), ends.to(self.device)

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        rollout, raw_rewards, t_gen, rollout_metrics = self._sample_and_score(batch)
        s = rollout.samples
        # informative = the task's rewards differ inside the group (DAPO filters on accuracy, before the penalty)
        group_std_zero = self._zero_std_groups(self.outcome_rewards(raw_rewards))  # [N/G] bool
        if hp.overlong_buffer_len > 0:
            penalty = losses.overlong_penalty(s.completion_lengths(), hp.max_new_tokens, hp.overlong_buffer_len,
                                              hp.overlong_penalty_factor).to(raw_rewards.device)
            raw_rewards = raw_rewards + penalty  # a missing (NaN) reward stays missing
            rollout_metrics["reward/overlong_penalty"] = penalty.mean()
        ctx = dict(prompt_ids=s.prompt_ids, prompt_mask=s.prompt_mask, completion_ids=s.completion_ids,
                   completion_mask=s.completion_mask)
        t1 = time.perf_counter()
        old_logp, ref_logp = self._old_and_reference_logprobs(ctx)
        if self.estimator.kl_in_reward and ref_logp is not None:
            # REINFORCE++: the KL shapes the reward before the advantages and is not added to the loss again
            rollout.kl = losses.kl_estimate(old_logp, ref_logp, hp.kl_estimator)  # [N, T]
            ref_logp = None
        advantages = self.compute_advantages(raw_rewards, rollout).to(self.device).float()  # [N] or [N, T]
        rewards = self.outcome_rewards(raw_rewards)  # [N] for logging / group statistics

        loss_mask = s.completion_mask.float()  # [N, T]
        if hp.mask_truncated:
            loss_mask = loss_mask * (~s.is_truncated).float().unsqueeze(-1)
        if hp.drop_uninformative_groups:
            keep_rows = (~group_std_zero).repeat_interleave(hp.group_size)  # [N]
            loss_mask = loss_mask * keep_rows.float().unsqueeze(-1)

        update_stats = self._update(ctx, advantages, loss_mask, old_logp, ref_logp)
        if rollout.kl is not None:
            update_stats["kl"] = float(losses.masked_mean(rollout.kl, loss_mask))
        t_train = time.perf_counter() - t1
        self.rollouts += 1
        self._log_step(rollout, rewards, advantages, group_std_zero, loss_mask, update_stats, t_gen, t_train,
                       rollout_metrics)

    def _sample_and_score(self, batch: dict[str, Any]) -> tuple[Rollout, Any, float, dict[str, Tensor]]:
        """(rollout, its rewards, generation seconds, metrics): `rollout` + `score_rollout`, then DAPO's dynamic
        sampling: while some group's rewards are all equal and `dynamic_sampling_max_tries` allows another round,
        its prompt is sampled G more times and the new group replaces it when it is informative.

        Under DDP every rank loops on its own (no collective inside), bounded; the batch keeps its size, so every
        rank takes the same optimizer steps. A sharded (FSDP2) policy all-gathers its weights in every sampling
        call, so there the ranks go round together while any of them has a group to redo (a rank with none samples
        one group and discards it). Re-sampling draws from the saved sampling generator: runs stay seeded and
        resume exactly. Groups still uninformative after the last round stay (drop_uninformative_groups drops them).
        """
        t0 = time.perf_counter()
        rollout = self.rollout(batch)
        t_gen = time.perf_counter() - t0
        rewards = self._score(rollout, batch)
        rounds = 0
        lockstep = parallel.is_sharded(self.policy)
        while rounds < self.hparams.dynamic_sampling_max_tries:
            redo = self._zero_std_groups(self.outcome_rewards(rewards)).nonzero().flatten().cpu()  # prompt indices
            wanted = float(redo.numel() > 0)
            if lockstep:
                wanted = float(self._global_sum(torch.tensor(wanted, device=self.device)))
            if wanted == 0:
                break
            rounds += 1
            idle = redo.numel() == 0  # lockstep only: sample prompt 0 along with the others, keep nothing
            redo = torch.zeros(1, dtype=torch.long) if idle else redo
            sub_batch = dynamic_sampling.select_prompts(batch, redo)
            # the merged rollout's non-finite counts; taken before `rollout`, whose remax baseline scores too
            stats = self._reward_stats
            t0 = time.perf_counter()
            extra = self.rollout(sub_batch)
            t_gen += time.perf_counter() - t0
            extra_rewards = self._score(extra, sub_batch)
            fixed = (~self._zero_std_groups(self.outcome_rewards(extra_rewards))).cpu() & (not idle)
            rows = dynamic_sampling.replacement_rows(len(rollout.prompts), self.hparams.group_size, redo[fixed],
                                                     fixed.nonzero().flatten())
            rollout = dynamic_sampling.merge_rollouts(rollout, extra, rows, self.tokenizer.pad_token_id)
            rewards = dynamic_sampling.select_rows(dynamic_sampling.cat_rows(rewards, extra_rewards), rows)
            self._merge_reward_logs(stats)
        metrics = {}
        if self.hparams.dynamic_sampling_max_tries > 0:
            informative = ~self._zero_std_groups(self.outcome_rewards(rewards))
            metrics = {"rollout/resample_rounds": torch.tensor(float(rounds)),
                       "rollout/informative_groups": informative.float().sum()}
        return rollout, rewards, t_gen, metrics

    def _score(self, rollout: Rollout, batch: dict[str, Any]):
        """`score_rollout` of one rollout, its dataset columns aligned with its rows: the rewards, with each
        source's values kept on the rollout (`per_source`, logged as reward/<name>)."""
        scored = self.score_rollout(rollout.prompts, rollout.completions, {"columns": rollout.columns, **batch})
        rollout.per_source = scored.per_source
        return scored.rewards

    def _merge_reward_logs(self, stats_before: dict[str, int]) -> None:
        """Count every round's non-finite rewards (score_rollout resets the counts for each call)."""
        for key, value in stats_before.items():
            self._reward_stats[key] = self._reward_stats.get(key, 0) + value

    def _zero_std_groups(self, rewards: Tensor) -> Tensor:
        grouped = rewards.view(-1, self.hparams.group_size)  # [N/G, G]
        valid = ~torch.isnan(grouped)
        filled = torch.where(valid, grouped, grouped.nan_to_num().sum(-1, keepdim=True) /
                             valid.sum(-1, keepdim=True).clamp(min=1))
        return (filled.max(-1).values - filled.min(-1).values) == 0

    def _old_and_reference_logprobs(self, ctx: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """(π_old, π_ref) log-probs of the rollout [N, T], each None where it is not needed.

        π_old only when the policy changes before a row is used (μ > 1 or minibatches > 1), or when the reward
        needs the KL (reinforce_pp with beta > 0); otherwise the update's own log-probs, detached, stand in.
        π_ref only when beta > 0.
        """
        hp = self.hparams
        needs_old = hp.num_iterations > 1 or hp.minibatches > 1 or (self.estimator.kl_in_reward and hp.beta > 0)
        old_logp = self._logprobs_no_grad(self.policy, ctx) if needs_old else None
        with self.reference_policy() as ref:
            ref_logp = self._logprobs_no_grad(ref, ctx) if ref is not None else None
        return old_logp, ref_logp

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, ctx: dict[str, Tensor]) -> Tensor:
        """Old-policy / reference log-probs, in eval mode (dropout off) like the sampling pass."""
        was_training = model.training
        model.eval()
        out = []
        for idx in self._micro_batches(ctx["completion_ids"].shape[0]):
            out.append(completion_logprobs(model, **{k: v[idx] for k, v in ctx.items()},
                                           temperature=self.hparams.temperature))
        model.train(was_training)
        return torch.cat(out)

    def _normalizer(self, mask: Tensor) -> Tensor:
        if self.hparams.loss_agg == "token-mean":
            return mask.sum()
        return (mask.sum(-1) > 0).sum()

    def _update(self, ctx: dict[str, Tensor], advantages: Tensor, loss_mask: Tensor, old_logp: Tensor | None,
                ref_logp: Tensor | None) -> dict[str, float]:
        """μ passes x `minibatches` optimizer steps over the rollout (groups stay whole inside a minibatch)."""
        hp = self.hparams
        opt = self.optimizers()
        sched = self.lr_schedulers()
        N = loss_mask.shape[0]
        n_groups = N // hp.group_size
        self.check_minibatches(n_groups)
        world = self.trainer.world_size
        sums: dict[str, float] = {}
        count = 0
        grad_norms: list[float] = []
        step_losses: list[float] = []
        self.policy.train()
        for _ in range(hp.num_iterations):
            group_order = torch.arange(n_groups, device=self.device)
            # exactly `minibatches` steps (chunk() would make fewer when they do not divide the groups)
            for mb_groups in group_order.tensor_split(hp.minibatches):
                rows = (mb_groups.unsqueeze(-1) * hp.group_size +
                        torch.arange(hp.group_size, device=self.device)).flatten()  # [rows in minibatch]
                normalizer = self._global_count(self._normalizer(loss_mask[rows]))
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0  # micro-batch losses add up to the step's loss (global normaliser)
                for idx in self._micro_batches(N, rows):
                    loss, stats = self._micro_batch_loss(ctx, idx, advantages, loss_mask[idx], old_logp, ref_logp,
                                                         normalizer)
                    # DDP averages gradients over ranks; the normaliser is already global, so undo the mean
                    self.manual_backward(loss * world)
                    step_loss += float(loss.detach())
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                # grad norm before clipping: the number that tells whether clipping is active
                grad_norms.append(float(grad_norm(self.trainable_parameters())))
                step_losses.append(step_loss)
                if hp.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
                self.policy_stepped()
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["loss"] = sum(step_losses) / len(step_losses)
        return out

    def _micro_batch_loss(self, ctx: dict[str, Tensor], idx: Tensor, advantages: Tensor, mask: Tensor,
                          old_logp: Tensor | None, ref_logp: Tensor | None,
                          normalizer: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Rows `idx`' share of the optimizer step's loss: clipped surrogate + beta * KL - entropy_coef * entropy,
        each aggregated by loss_agg over the whole step's `normalizer`."""
        hp = self.hparams
        mb = {k: v[idx] for k, v in ctx.items()}
        logp, entropy = completion_logprobs(self.policy, **mb, temperature=hp.temperature, return_entropy=True)
        old = old_logp[idx] if old_logp is not None else logp.detach()
        loss, stats = self.policy_loss(logp, old, advantages[idx], mask, normalizer)
        if ref_logp is not None:
            kl = losses.kl_estimate(logp, ref_logp[idx], hp.kl_estimator)  # [n, T]
            kl_loss = losses.aggregate(kl, mask, hp.loss_agg, normalizer=normalizer, max_len=hp.max_new_tokens)
            loss = loss + hp.beta * kl_loss
            stats["kl"] = losses.masked_mean(kl.detach(), mask)
        if hp.entropy_coef > 0:  # off: the entropy stays out of the graph (no extra backward work)
            loss = loss + losses.entropy_bonus(entropy, mask, hp.entropy_coef, hp.loss_agg, normalizer=normalizer,
                                               max_len=hp.max_new_tokens)
        stats["entropy"] = losses.masked_mean(entropy.detach(), mask)
        return loss, stats

    # ------------------------------------------------------------------------------------------ logging
    def _log_step(self, rollout: Rollout, rewards: Tensor, advantages: Tensor, group_std_zero: Tensor,
                  loss_mask: Tensor, stats: dict[str, float], t_gen: float, t_train: float,
                  rollout_metrics: dict[str, Tensor]) -> None:
        s = rollout.samples
        lengths = s.completion_mask.sum(-1).float()
        valid = ~torch.isnan(rewards)
        n_tokens = float(s.completion_mask.sum())
        metrics = {
            "reward/mean": rewards[valid].mean() if valid.any() else torch.zeros(()),
            "reward/std": rewards[valid].std() if valid.sum() > 1 else torch.zeros(()),
            "reward/missing_frac": (~valid).float().mean(),
            "rollout/zero_std_group_frac": group_std_zero.float().mean(),
            "rollout/completion_len_mean": lengths.mean(),
            "rollout/completion_len_max": lengths.max(),
            "rollout/truncated_frac": s.is_truncated.float().mean(),
            "policy/advantage_abs_mean": advantages.abs().mean(),
            "perf/tokens_per_s": torch.tensor(n_tokens / max(t_gen + t_train, 1e-9)),
            "perf/generation_s": torch.tensor(t_gen),
            "perf/training_s": torch.tensor(t_train),
            "policy/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
            "perf/rollouts": torch.tensor(float(self.rollouts)),
            "perf/optimizer_steps": torch.tensor(float(self.optimizer_steps)),
        }
        metrics.update(self.per_function_reward_metrics(rollout.per_source))
        metrics.update(self.guard_metrics())
        metrics.update(rollout_metrics)
        for k, v in stats.items():
            key = {"kl": "policy/kl", "entropy": "policy/entropy", "loss": "policy/loss"}.get(k, f"policy/{k}")
            metrics[key] = torch.tensor(v)
        logged = self.log_step_metrics(metrics)
        if self.should_log_samples():
            self.log_sample_table(rollout.prompts, rollout.completions, rewards, advantages)
            # process supervision: every real token's advantage, not only the first
            adv = advantages if advantages.dim() == 1 else advantages[s.completion_mask.bool()]
            self.log_histograms({"reward/histogram": rewards, "policy/advantage_histogram": adv})
        self.log("reward", logged["reward/mean"], prog_bar=True, logger=False, batch_size=len(rewards))
        if "policy/kl" in logged:
            self.log("kl", logged["policy/kl"], prog_bar=True, logger=False, batch_size=len(rewards))


def _check_estimator(hp) -> Estimator:
    """The registered `advantage_estimator`, or one line naming what it cannot be combined with."""
    est = get_estimator(hp.advantage_estimator)
    if est.needs_values:
        raise ValueError(f"advantage_estimator={est.name} needs a critic: use PPOModule (GRPO is critic-free)")
    if hp.supervision == "process" and est.name != "grpo":
        raise ValueError(f"supervision=process has its own advantages (GRPO §4.1.3): it needs "
                         f"advantage_estimator=grpo, got {est.name!r}")
    if hp.scale_rewards != "group" and est.name != "grpo":
        raise ValueError(f"scale_rewards={hp.scale_rewards} applies to advantage_estimator=grpo only, got "
                         f"{est.name!r}")
    return est


def _validate_grpo_args(hp) -> None:
    """One-line errors for out-of-range hyperparameters, before any model is loaded."""
    checks = [
        (isinstance(hp.group_size, int) and hp.group_size >= 2, f"group_size must be an integer >= 2 (advantages "
         f"are relative within a group), got {hp.group_size!r}"),
        (hp.beta >= 0, f"beta must be >= 0, got {hp.beta}"),
        (hp.kl_estimator in ("k1", "k2", "k3"), f"kl_estimator must be k1|k2|k3, got {hp.kl_estimator!r}"),
        (0 <= hp.clip_low < 1, f"clip_low must be in [0, 1), got {hp.clip_low}"),
        (hp.clip_high >= 0, f"clip_high must be >= 0, got {hp.clip_high}"),
        (hp.scale_rewards in ("group", "batch", "none"), f"scale_rewards must be group|batch|none, got "
         f"{hp.scale_rewards!r}"),
        (hp.loss_agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"),
         f"loss_agg must be seq-mean-token-mean|token-mean|seq-mean-token-sum-norm, got {hp.loss_agg!r}"),
        (hp.importance_sampling in ("token", "sequence"), f"importance_sampling must be token|sequence, got "
         f"{hp.importance_sampling!r}"),
        (isinstance(hp.num_iterations, int) and hp.num_iterations >= 1, f"num_iterations must be >= 1, got "
         f"{hp.num_iterations!r}"),
        (isinstance(hp.minibatches, int) and hp.minibatches >= 1, f"minibatches must be >= 1, got "
         f"{hp.minibatches!r}"),
        (hp.micro_batch_size is None or hp.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got "
         f"{hp.micro_batch_size!r}"),
        (isinstance(hp.max_new_tokens, int) and hp.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got "
         f"{hp.max_new_tokens!r}"),
        (0 <= hp.min_new_tokens <= hp.max_new_tokens, f"min_new_tokens must be in [0, max_new_tokens="
         f"{hp.max_new_tokens}], got {hp.min_new_tokens}"),
        (hp.temperature > 0 and math.isfinite(hp.temperature), f"temperature must be > 0 for GRPO (temperature 0 "
         f"samples G identical completions: every group has zero advantage), got {hp.temperature}"),
        (0 < hp.top_p <= 1, f"top_p must be in (0, 1], got {hp.top_p}"),
        (hp.top_k != 1, "top_k=1 is greedy: every group would be G identical completions with zero advantage"),
        (hp.supervision in ("outcome", "process"), f"supervision must be outcome|process, got {hp.supervision!r}"),
        (hp.max_grad_norm is None or hp.max_grad_norm > 0, f"max_grad_norm must be > 0 or null, got "
         f"{hp.max_grad_norm}"),
        (hp.log_samples_every_n_steps >= 0, "log_samples_every_n_steps must be >= 0"),
        (isinstance(hp.dynamic_sampling_max_tries, int) and hp.dynamic_sampling_max_tries >= 0,
         f"dynamic_sampling_max_tries must be an integer >= 0, got {hp.dynamic_sampling_max_tries!r}"),
        (hp.dynamic_sampling_max_tries == 0 or hp.drop_uninformative_groups, "dynamic_sampling_max_tries re-samples "
         "the groups drop_uninformative_groups drops: set drop_uninformative_groups: true (it would be ignored)"),
        (isinstance(hp.overlong_buffer_len, int) and 0 <= hp.overlong_buffer_len <= hp.max_new_tokens,
         f"overlong_buffer_len must be an integer in [0, max_new_tokens={hp.max_new_tokens}], got "
         f"{hp.overlong_buffer_len!r}"),
        (hp.overlong_penalty_factor >= 0 and math.isfinite(hp.overlong_penalty_factor),
         f"overlong_penalty_factor must be finite and >= 0, got {hp.overlong_penalty_factor}"),
        (hp.overlong_buffer_len == 0 or hp.supervision == "outcome", "overlong_buffer_len penalises outcome rewards: "
         "it needs supervision=outcome"),
        (hp.entropy_coef >= 0 and math.isfinite(hp.entropy_coef), f"entropy_coef must be finite and >= 0, got "
         f"{hp.entropy_coef}"),
        (not hp.normalize_reward_model or hp.reward_model is not None, "normalize_reward_model applies to "
         "model.reward_model, which is not set (it would be silently ignored)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
