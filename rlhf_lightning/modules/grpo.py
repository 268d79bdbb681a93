"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4.1), with the later fixes.

GRPO is "group baseline, KL in the loss" on the shared RL loop (`rl.RLModule.training_step`):

    1. rollout            each prompt is repeated G times *inside* the step (a group never spans ranks); DAPO's
                          dynamic sampling re-samples all-equal groups (`dynamic_sampling_max_tries` rounds) and
                          the soft overlong punishment (eq. 13) is added to the rewards
    2. old / ref passes   π_old only when the policy moves before a sample is used (num_iterations > 1 or
                          minibatches > 1) or the reward needs the KL (reinforce_pp); otherwise the ratio is
                          exactly 1 and the current log-probs stand in (detached). π_ref only when beta > 0
    3. advantages         the `advantage_estimator` from the registry (`algorithms.advantages`): by default
                          group-relative, (r - mean_group) / (std_group + eps) (§4.1.2; `scale_rewards=none` is
                          Dr. GRPO, `batch` uses the batch std), or the process form (§4.1.3)
    4. updates            num_iterations (μ) x minibatches optimizer steps of the clipped surrogate (the
                          `importance_sampling` loss of `algorithms.policy_losses`) + beta * KL(π_θ‖π_ref)
                          (k3 by default) - entropy_coef * entropy, aggregated by `loss_agg` (eq. 3)

`trainer.max_steps` = rollouts x num_iterations x minibatches (one optimizer).

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import losses
from ..algorithms import dynamic_sampling
from ..algorithms.advantages import AdvantageInputs, Estimator, get_estimator
from ..algorithms.policy_losses import PolicyLossInputs, get_policy_loss
from ..algorithms.process import step_boundaries, turn_boundaries
from ..infra import parallel
from ..rollout import Rollout, completion_logprobs, decode_completions
from .rl import RLModule, RLStep


@dataclass
class GRPOStep(RLStep):
    uninformative: Tensor | None = None  # [N/G] bool: groups whose task rewards are all equal (zero advantage)


class GRPOModule(RLModule):
    """Critic-free RL for LMs (DeepSeekMath §4.1) with DAPO / Dr. GRPO / GSPO options.

    Args (beyond `RLModule`'s sampling / update arguments and `PolicyModuleBase`'s model / reward /
    optimizer ones):
        reward_model: a trained reward model (`RewardModel`'s `hf_model/` export, any local
            AutoModelForSequenceClassification directory, or a hub id), used as one more reward function
            (`rewards.RewardModelSource`; weight 1 unless reward_weights lists it last).
        normalize_reward_model: standardise its scores with the mean/std recorded at its last validation.
        group_size: G completions sampled per prompt (≥ 2: advantages are relative within a group).
        beta: weight of the KL(π_θ‖π_ref) penalty in the loss; 0 loads no reference model.
        kl_estimator: `k3` (unbiased, always ≥ 0; the paper's eq. 4), `k1`, or `k2`.
        scale_rewards: `group` (paper: divide by the group std), `batch` (the std of the whole batch, all ranks
            together), `none` (Dr. GRPO).
        advantage_estimator: a name from `rlhf_lightning.algorithms.advantages.ESTIMATORS`: `grpo` (default,
            scaled by `scale_rewards`), `dr_grpo`, `rloo`, `reinforce_pp` (KL to the reference in the reward,
            weighted by beta, instead of in the loss), `reinforce_pp_baseline`, `remax` (samples one greedy
            completion per prompt as the baseline). See docs/grpo.md.
        loss_agg: `seq-mean-token-mean` (paper), `token-mean` (DAPO), `seq-mean-token-sum-norm` (Dr. GRPO; the
            token sum is divided by max_new_tokens). Normalised over the whole optimizer step.
        importance_sampling: the policy loss of `algorithms.policy_losses.POLICY_LOSSES`: `token` (PPO-style
            per-token ratio) or `sequence` (GSPO length-normalised ratio).
        num_iterations: μ, optimizer passes over one rollout (old log-probs are cached once per rollout).
        minibatches: (RLModule's) the rollout's groups are split among them (whole groups, sizes differing by
            at most one; more minibatches than groups is refused).
        top_p / top_k: nucleus / top-k sampling (1.0 / 0 = off).
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
        lora, lora_export, gradient_checkpointing, rollout_engine, nonfinite_rewards, max_nonfinite_steps: see
            `PolicyModuleBase` (with LoRA, π_ref = adapter disabled).
    """

    minibatch_unit = "groups"  # minibatches hold whole groups (a group's advantages are relative to each other)
    step_type = GRPOStep

    def __init__(
        self,
        model_name_or_path: str = "tiny",
        *,
        reward_fns: Sequence[str] | None = None,
        reward_weights: Sequence[float] | None = None,
        reward_model: str | None = None,
        normalize_reward_model: bool = False,
        group_size: int = 8,
        beta: float = 0.04,
        kl_estimator: str = "k3",
        scale_rewards: str = "group",
        advantage_estimator: str = "grpo",
        loss_agg: str = "seq-mean-token-mean",
        importance_sampling: str = "token",
        num_iterations: int = 1,
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
        **kwargs: Any,
    ):
        super().__init__(model_name_or_path, reward_fns=reward_fns,
                         reward_weights=reward_weights if reward_model is None else None, **kwargs)
        self.apply_lora()
        if reward_model is not None:
            from ..rewards import RewardModelSource, check_reward_weights

            # the scorer is a plain attribute (not a submodule): the RM is frozen and not part of checkpoints
            self.reward_funcs.append(RewardModelSource(reward_model, normalize=normalize_reward_model))
            if reward_weights is not None:
                if len(reward_weights) != len(self.reward_funcs):
                    prm = " and one for process_reward_model" if self.process_reward_source is not None else ""
                    raise ValueError(f"reward_weights needs {len(self.reward_funcs)} entries: one per reward_fns "
                                     f"entry{prm} and one (last) for reward_model")
                self.reward_weights = check_reward_weights(reward_weights, len(self.reward_funcs))
        self.ref_policy = self._make_reference() if beta > 0 else None
        self.step_separator = step_separator

    def hparam_checks(self, hp) -> list[tuple[bool, str]]:
        self.estimator = _check_estimator(hp)
        get_policy_loss(hp.importance_sampling)  # the registry names the choices
        return super().hparam_checks(hp) + _grpo_checks(hp)

    # ------------------------------------------------------------------------------------------ set-up
    @property
    def samples_per_prompt(self) -> int:
        return self.hparams.group_size

    @property
    def epochs(self) -> int:
        return self.hparams.num_iterations

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
        """Process supervision: the task's outcome verifier (the reward functions give step rewards), if any; with
        an environment, the episode's return (`rewards.environment_reward`: 0/1 episodes are solved or not)."""
        if self.hparams.supervision != "process":
            return super().validation_verifier()
        if self.env_interaction is not None:
            from ..rewards import environment_reward

            return environment_reward
        task = self.data_task()
        return task.reward_fns[0] if task is not None and task.reward_fns else None

    @property
    def process_rewards(self) -> bool:
        """supervision=process: the reward functions give step rewards (`compute_rewards` returns N step lists)."""
        return self.hparams.supervision == "process"

    # ------------------------------------------------------------------------------------------ 1. rollout
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample `group_size` completions per prompt (rows i*G .. i*G+G-1 share prompt i); remax adds each
        prompt's greedy reward as the baseline."""
        rollout = super().rollout(batch)
        if self.estimator.needs_baseline:
            rollout.baseline_scores = self.greedy_baseline(batch)
        return rollout

    def greedy_baseline(self, batch: dict[str, Any]) -> Tensor:
        """ReMax's baseline: the reward of each prompt's greedy completion, repeated for its G rows. [N]"""
        greedy = self.greedy_samples(batch, self.hparams.max_new_tokens)
        completions = decode_completions(self.tokenizer, greedy.completion_ids, greedy.completion_mask)
        scores = self.score_rollout(list(batch["prompts"]), completions,
                                    {"columns": self.reward_columns(batch, samples=greedy), **batch}).rewards
        return torch.as_tensor(scores, dtype=torch.float32).to(self.device).repeat_interleave(self.hparams.group_size)

    def sample_and_score(self, batch: dict[str, Any], rollout: Rollout | None = None) -> RLStep:
        """The rollout and its rewards after DAPO's dynamic sampling (`resample_uninformative`), with the soft
        overlong penalty added. `step.uninformative` [N/G]: the groups whose task rewards are all equal."""
        step = self.resample_uninformative(super().sample_and_score(batch, rollout), batch)
        hp = self.hparams
        # informative = the task's rewards differ inside the group (DAPO filters on accuracy, before the penalty)
        step.uninformative = self._zero_std_groups(self.outcome_rewards(step.rewards))  # [N/G] bool
        if hp.overlong_buffer_len > 0:
            penalty = losses.overlong_penalty(step.rollout.samples.completion_lengths(), hp.max_new_tokens,
                                              hp.overlong_buffer_len, hp.overlong_penalty_factor)
            step.rewards = step.rewards + penalty.to(step.rewards.device)  # a missing (NaN) reward stays missing
            step.metrics["reward/overlong_penalty"] = penalty.mean()
        step.scores = self.outcome_rewards(step.rewards)  # [N] for logging / group statistics
        return step

    def resample_uninformative(self, step: GRPOStep, batch: dict[str, Any]) -> RLStep:
        """DAPO's dynamic sampling: while some group's rewards are all equal and `dynamic_sampling_max_tries`
        allows another round, its prompt is sampled G more times and the new group replaces it when informative.

        Under DDP every rank loops on its own (no collective inside), bounded; the batch keeps its size, so every
        rank takes the same optimizer steps. A sharded (FSDP2) policy all-gathers its weights in every sampling
        call, so there the ranks go round together while any of them has a group to redo (a rank with none samples
        one group and discards it). Re-sampling draws from the saved sampling generator: runs stay seeded and
        resume exactly. Groups still uninformative after the last round stay (drop_uninformative_groups drops them).
        """
        G, tries = self.hparams.group_size, self.hparams.dynamic_sampling_max_tries
        rounds = 0
        while rounds < tries:
            redo = self._zero_std_groups(self.outcome_rewards(step.rewards)).nonzero().flatten().cpu()  # prompts
            if not self._any_rank(redo.numel() > 0):
                break
            rounds += 1
            idle = redo.numel() == 0  # lockstep only: sample prompt 0 along with the others, keep nothing
            redo = torch.zeros(1, dtype=torch.long) if idle else redo
            sub_batch = dynamic_sampling.select_prompts(batch, redo)
            # the merged rollout's non-finite counts; taken before `rollout`, whose remax baseline scores too
            stats = self._reward_stats
            t0 = time.perf_counter()
            extra = self.rollout(sub_batch)
            step.t_gen += time.perf_counter() - t0
            extra_rewards = self.rollout_rewards(extra, sub_batch)
            fixed = (~self._zero_std_groups(self.outcome_rewards(extra_rewards))).cpu() & (not idle)
            rows = dynamic_sampling.replacement_rows(len(step.rollout.prompts), G, redo[fixed],
                                                     fixed.nonzero().flatten())
            step.rollout = dynamic_sampling.merge_rollouts(step.rollout, extra, rows, self.tokenizer.pad_token_id)
            step.rewards = dynamic_sampling.select_rows(dynamic_sampling.cat_rows(step.rewards, extra_rewards), rows)
            for key, value in stats.items():  # score_rollout resets the counts for each call
                self._reward_stats[key] = self._reward_stats.get(key, 0) + value
        if tries > 0:
            informative = ~self._zero_std_groups(self.outcome_rewards(step.rewards))
            step.metrics.update({"rollout/resample_rounds": torch.tensor(float(rounds)),
                                 "rollout/informative_groups": informative.float().sum()})
        return step

    def _any_rank(self, wanted: bool) -> bool:
        """`wanted` on this rank, or (sharded policy: the ranks sample in lockstep) on any rank."""
        if not parallel.is_sharded(self.policy):
            return wanted
        return float(self._global_sum(torch.tensor(float(wanted), device=self.device))) > 0

    def _zero_std_groups(self, rewards: Tensor) -> Tensor:
        """[N/G] bool: the groups whose valid rewards are all equal (no signal)."""
        grouped = rewards.view(-1, self.hparams.group_size)  # [N/G, G]
        valid = ~torch.isnan(grouped)
        filled = torch.where(valid, grouped, grouped.nan_to_num().sum(-1, keepdim=True) /
                             valid.sum(-1, keepdim=True).clamp(min=1))
        return (filled.max(-1).values - filled.min(-1).values) == 0

    # ------------------------------------------------------------------------------------------ 2. passes
    def needs_old_logprobs(self) -> bool:
        """Also when the reward needs the KL (reinforce_pp with beta > 0): it is π_old's KL to π_ref."""
        return super().needs_old_logprobs() or (self.estimator.kl_in_reward and self.hparams.beta > 0)

    # ------------------------------------------------------------------------------------------ 3. advantages
    def compute_step_advantages(self, step: GRPOStep) -> None:
        hp = self.hparams
        if self.estimator.kl_in_reward and step.ref_logp is not None:
            # REINFORCE++: the KL shapes the reward before the advantages and is not added to the loss again
            step.rollout.kl = losses.kl_estimate(step.old_logp, step.ref_logp, hp.kl_estimator)  # [N, T]
            step.ref_logp = None
        step.advantages = self.compute_advantages(step.rewards, step.rollout).to(self.device).float()
        s = step.rollout.samples
        loss_mask = s.trained_mask.float()  # [N, T] the policy's tokens (tool output gets no loss, KL, entropy)
        if hp.mask_truncated:
            loss_mask = loss_mask * (~s.is_truncated).float().unsqueeze(-1)
        if hp.drop_uninformative_groups:
            keep_rows = (~step.uninformative).repeat_interleave(hp.group_size)  # [N]
            loss_mask = loss_mask * keep_rows.float().unsqueeze(-1)
        step.loss_mask = loss_mask

    def compute_advantages(self, rewards, rollout: Rollout) -> Tensor:
        """Outcome: the `advantage_estimator`'s, [N] (one per completion) or [N, T] (token-level: reinforce_pp).
        Process: [N, T] per-token sums of normalised step rewards."""
        hp = self.hparams
        if hp.supervision == "process":
            T = rollout.samples.completion_ids.shape[1]
            step_rewards, step_ends = self.step_boundaries(rewards, rollout)
            return losses.process_advantages(step_rewards, step_ends, hp.group_size, num_tokens=T)
        mask = rollout.samples.trained_mask
        # scale_rewards=batch: the std of the whole batch over all ranks (all_reduce), as one process would see it
        out = self.estimator.fn(AdvantageInputs(mask=mask, scores=rewards.to(mask.device), group_size=hp.group_size,
                                                scale=hp.scale_rewards, kl=rollout.kl, kl_coef=hp.beta,
                                                baseline_scores=rollout.baseline_scores,
                                                all_reduce=self._global_sum))
        return out.sequence if out.sequence is not None else out.advantages

    def step_boundaries(self, step_rewards: list[list[float]], rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Step rewards [N, S] and the completion-token index where each step ends [N, S] (-1 = none), the
        steps split by `step_separator` (`algorithms.process.step_boundaries`); with an environment the steps
        are the policy's turns (`algorithms.process.turn_boundaries`)."""
        s = rollout.samples
        if s.env_ends is not None:
            rewards, ends = turn_boundaries(step_rewards, s.env_ends)
            return rewards.to(self.device), ends.to(self.device)
        rewards, ends = step_boundaries(self.tokenizer, rollout.completions, s.completion_ids, s.completion_mask,
                                        step_rewards, self.step_separator)
        return rewards.to(self.device), ends.to(self.device)

    # ------------------------------------------------------------------------------------------ 4. updates
    def loss_normalizer(self, mask: Tensor) -> Tensor:
        """token-mean: the minibatch's tokens; the seq-mean forms: its sequences with any token."""
        if self.hparams.loss_agg == "token-mean":
            return mask.sum()
        return (mask.sum(-1) > 0).sum()

    def micro_batch_loss(self, step: GRPOStep, idx: Tensor, normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Rows `idx`' share of the optimizer step's loss: clipped surrogate + beta * KL - entropy_coef * entropy,
        each aggregated by loss_agg over the whole step's `normalizer`."""
        hp = self.hparams
        mask = step.loss_mask[idx]
        logp, entropy = completion_logprobs(self.policy, **{k: v[idx] for k, v in step.ctx.items()},
                                            temperature=hp.temperature, return_entropy=True,
                                            share_prompts=hp.share_prompt_prefix)
        old = step.old_logp[idx] if step.old_logp is not None else logp.detach()
        loss, stats = self.policy_loss(logp, old, step.advantages[idx], mask, normalizer)
        stats = {f"policy/{k}": v for k, v in stats.items()}
        if step.ref_logp is not None:
            kl = losses.kl_estimate(logp, step.ref_logp[idx], hp.kl_estimator)  # [n, T]
            kl_loss = losses.aggregate(kl, mask, hp.loss_agg, normalizer=normalizer, max_len=hp.max_new_tokens)
            loss = loss + hp.beta * kl_loss
            stats["policy/kl"] = losses.masked_mean(kl.detach(), mask)
        if hp.entropy_coef > 0:  # off: the entropy stays out of the graph (no extra backward work)
            loss = loss + losses.entropy_bonus(entropy, mask, hp.entropy_coef, hp.loss_agg, normalizer=normalizer,
                                               max_len=hp.max_new_tokens)
        stats["policy/entropy"] = losses.masked_mean(entropy.detach(), mask)
        return loss, stats

    def policy_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The `importance_sampling` loss of the registry (eq. 3 without the KL term), over the optimizer step."""
        hp = self.hparams
        return get_policy_loss(hp.importance_sampling)(PolicyLossInputs(
            logp, old_logp, advantages, mask, clip_low=hp.clip_low, clip_high=hp.clip_high, agg=hp.loss_agg,
            normalizer=normalizer, max_len=hp.max_new_tokens))

    def after_update(self, step: GRPOStep) -> None:
        if step.rollout.kl is not None:  # reinforce_pp: the KL that shaped the reward
            step.stats["policy/kl"] = float(losses.masked_mean(step.rollout.kl, step.loss_mask))

    # ------------------------------------------------------------------------------------------ 5. logging
    def step_metrics(self, step: GRPOStep) -> dict[str, Any]:
        rewards = step.scores
        valid = ~torch.isnan(rewards)
        return {
            "reward/mean": rewards[valid].mean() if valid.any() else torch.zeros(()),
            "reward/std": rewards[valid].std() if valid.sum() > 1 else torch.zeros(()),
            "reward/missing_frac": (~valid).float().mean(),
            "rollout/zero_std_group_frac": step.uninformative.float().mean(),
            "policy/advantage_abs_mean": step.advantages.abs().mean(),
        }

    def log_samples(self, step: GRPOStep) -> None:
        r = step.rollout
        self.log_sample_table(r.prompts, self.shown_completions(r), step.scores, step.advantages)
        # process supervision: every real token's advantage, not only the first
        adv = step.advantages if step.advantages.dim() == 1 else step.advantages[r.samples.trained_mask.bool()]
        self.log_histograms({"reward/histogram": step.scores, "policy/advantage_histogram": adv})


def _check_estimator(hp) -> Estimator:
    """The registered `advantage_estimator`, or one line naming what it cannot be combined with."""
    est = get_estimator(hp.advantage_estimator)
    if est.needs_values:
        raise ValueError(f"advantage_estimator={est.name} needs a critic: use PPOModule (GRPO is critic-free)")
    if hp.supervision == "process" and est.name != "grpo":
        raise ValueError(f"supervision=process has its own advantages (GRPO §4.1.3): it needs "
                         f"advantage_estimator=grpo, got {est.name!r}")
    if hp.off_policy_steps and est.needs_baseline:
        raise ValueError(f"advantage_estimator={est.name} samples a greedy baseline with the current policy, which "
                         f"off_policy_steps: 1 does not have at sampling time: use off_policy_steps: 0")
    if hp.scale_rewards != "group" and est.name != "grpo":
        raise ValueError(f"scale_rewards={hp.scale_rewards} applies to advantage_estimator=grpo only, got "
                         f"{est.name!r}")
    return est


def _grpo_checks(hp) -> list[tuple[bool, str]]:
    """(holds, one-line message) for GRPO's own arguments (`hparam_checks`)."""
    return [
        (isinstance(hp.group_size, int) and hp.group_size >= 2, f"group_size must be an integer >= 2 (advantages "
         f"are relative within a group), got {hp.group_size!r}"),
        (hp.beta >= 0, f"beta must be >= 0, got {hp.beta}"),
        (hp.kl_estimator in ("k1", "k2", "k3"), f"kl_estimator must be k1|k2|k3, got {hp.kl_estimator!r}"),
        (hp.scale_rewards in ("group", "batch", "none"), f"scale_rewards must be group|batch|none, got "
         f"{hp.scale_rewards!r}"),
        (hp.loss_agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"),
         f"loss_agg must be seq-mean-token-mean|token-mean|seq-mean-token-sum-norm, got {hp.loss_agg!r}"),
        (isinstance(hp.num_iterations, int) and hp.num_iterations >= 1, f"num_iterations must be >= 1, got "
         f"{hp.num_iterations!r}"),
        (hp.temperature > 0 and math.isfinite(hp.temperature), f"temperature must be > 0 for GRPO (temperature 0 "
         f"samples G identical completions: every group has zero advantage), got {hp.temperature}"),
        (0 < hp.top_p <= 1, f"top_p must be in (0, 1], got {hp.top_p}"),
        (hp.top_k != 1, "top_k=1 is greedy: every group would be G identical completions with zero advantage"),
        (hp.supervision in ("outcome", "process"), f"supervision must be outcome|process, got {hp.supervision!r}"),
        (isinstance(hp.dynamic_sampling_max_tries, int) and hp.dynamic_sampling_max_tries >= 0,
         f"dynamic_sampling_max_tries must be an integer >= 0, got {hp.dynamic_sampling_max_tries!r}"),
        (hp.dynamic_sampling_max_tries == 0 or not hp.off_policy_steps, "dynamic_sampling_max_tries re-samples "
         "with the current policy inside the step, which off_policy_steps: 1 samples ahead: use one of the two"),
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
