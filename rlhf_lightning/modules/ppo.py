"""PPO for LMs: actor + critic, KL penalty in the reward, GAE, two optimizers under manual optimization.

The classic RLHF optimizer as Ziegler et al. 2019, InstructGPT and "The N+ Implementation Details of RLHF with
PPO" (Huang et al. 2024; the recipe of TRL's last PPOTrainer) describe it: "critic + GAE, KL in the reward" on the
shared RL loop (`rl.RLModule.training_step`):

    1. rollout            one completion per prompt (the sampler pads after EOS, "EOS truncation"), scored by the
                          reward model logit at the last real token and/or the reward functions (TRL signature),
                          summed; `missing_eos_penalty` is subtracted for truncated completions
    2. no-grad passes     old log-probs log π_old, values V_old(s_t) from the critic and reference log-probs
                          log π_ref, at the sampling temperature, eval mode. With one epoch of one minibatch,
                          π_old and V_old are the update's own forward, detached (`fuses_old_passes`)
    3. advantages         r_t = -β·KL_t (k1 = log π_old - log π_ref) at every completion token, + score at the
                          last real token (Ziegler eq. 2; optional reward whitening), then GAE(γ, λ) over the real
                          tokens, returns = A + V_old, then advantage whitening (`gae` of the registry)
    4. updates            `ppo_epochs` x `minibatches`: clipped surrogate + vf_coef · clipped value loss, one
                          backward, then the actor and the critic optimizers each clip, step and schedule
    5. KL controller      adaptive β (Ziegler §2.2) sees the rollout's mean sequence KL; fixed otherwise

Critic (`critic=`):
    separate  a `ValueModel`: its own copy of a causal-LM backbone + Linear(hidden, 1); initialised from the reward
              model (backbone and its `score` head, as TRL did) when `reward_model` is given, else from the policy.
    shared    a Linear(hidden, 1) head on the policy's last hidden state: one forward gives logits and values.
              The critic optimizer holds the head only; the value loss also trains the shared backbone through
              the actor optimizer, scaled by `vf_coef`.

Counting: Lightning's `trainer.global_step` counts every optimizer.step() of BOTH optimizers, so
    trainer.max_steps = 2 x rollouts x ppo_epochs x minibatches
(e.g. `max_steps: 400` with 1 epoch and 1 minibatch is 200 rollouts).

Hooks a subclass overrides (as in GRPO):
    rollout(batch) -> Rollout
    compute_rewards(prompts, completions, batch) -> Tensor [N]   sequence scores, NaN = no score (row skipped)
    compute_advantages(rewards, values, mask) -> (advantages [N, T], returns [N, T])
    policy_loss(logp, old_logp, advantages, mask, normalizer) -> (loss, stats)
    value_loss(values, old_values, returns, mask, normalizer) -> (loss, stats)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import losses
from ..algorithms.advantages import AdvantageInputs, get_estimator
from ..algorithms.critic import ValueModel, disable_dropout_in_model, has_active_dropout
from ..algorithms.kl_control import AdaptiveKLController, FixedKLController
from ..algorithms.policy_losses import PolicyLossInputs, get_policy_loss
from ..rewards import RewardModelSource, RewardOutput
from ..rewards.model import load_frozen_reward_model
from ..rollout import Rollout, RolloutBatch, completion_logprobs, join_prompt_completion, token_logprobs
from ..rollout.base import pad_columns, trim_padding
from .rl import RLModule, RLStep


@dataclass
class PPOStep(RLStep):
    raw_scores: Tensor | None = None  # [N] the sequence scores before the missing-EOS penalty
    old_values: Tensor | None = None  # [N, T] V_old(s_t)
    kl: Tensor | None = None  # [N, T] the per-token KL of the reward (0 on rows without a score)
    kl_coef: float = 0.0  # β of this rollout (before the controller's update)
    token_rewards: Tensor | None = None  # [N, T] -β·KL_t + score at the last real token
    returns: Tensor | None = None  # [N, T] the critic's targets


class PPOModule(RLModule):
    """PPO with a critic for LMs (Ziegler et al. 2019; "The N+ Implementation Details of RLHF with PPO").

    Args (beyond `RLModule`'s sampling / update arguments and `PolicyModuleBase`'s model / reward /
    optimizer ones; `lr` is the actor's):
        reward_model: a `save_pretrained` directory (e.g. `RewardModel`'s `hf_model` export), a hub id or a
            preset, loadable as a sequence classifier with a `score` head and the policy's tokenizer. Its score is
            the logit at the last real token of prompt + completion. Summed with `reward_fns` when both are set.
            With a reward model and no `reward_fns`, a built-in task's verifiers only measure validation accuracy.
        critic: `separate` (own backbone, from the reward model if given, else from the policy) or `shared` (a
            value head on the policy's backbone).
        critic_lr: the critic optimizer's learning rate (None = `lr`).
        kl_coef: β, the weight of the per-token KL penalty in the reward (the initial β when adaptive).
        kl_estimator: per-token KL estimate of the penalty: `k1` (log π_old - log π_ref, the classic one), `k2`,
            `k3`. β = 0 without `adaptive_kl` loads no reference model.
        adaptive_kl, kl_target, kl_horizon: Ziegler's proportional controller steering the rollout's mean
            sequence KL (sum over tokens) toward `kl_target`; `kl_horizon` is in completions (TRL: 6, 10000).
        gamma, lam: GAE discount and λ (RLHF convention: γ = 1, λ = 0.95).
        value_clip: the value update is clipped to ±value_clip around the rollout's values (None = off).
        vf_coef: weight of the value loss in the one backward (loss = pg + vf_coef · vf). With a separate critic
            it only scales the critic's gradient; with a shared one it sets how much the value loss moves the
            shared backbone.
        ppo_epochs: passes over each rollout; `minibatches` optimizer steps per pass (rows shuffled per pass).
        whiten_advantages: normalise advantages to mean 0, std 1 over the rollout's real tokens.
        whiten_rewards: scale the per-token rewards to std 1 (mean kept) before GAE ("N+ details" option).
        missing_eos_penalty: subtracted from the score of completions with no EOS within `max_new_tokens`.
        max_new_tokens, min_new_tokens, temperature: (RLModule's) sampling. No top-k / top-p: PPO's ratio and KL
            assume samples from the plain temperature-scaled policy.
        disable_dropout: set dropout to 0 in policy and critic (see `disable_dropout_in_model`).
        lora, lora_export, gradient_checkpointing, rollout_engine, nonfinite_rewards, max_nonfinite_steps: see
            `PolicyModuleBase` (the guard covers both optimizers). With LoRA the adapter
            is on the actor only (the critic is built from the plain model first) and π_ref is the actor with its
            adapter disabled.
    """

    fuse_old_passes: bool = True  # see `fuses_old_passes`
    optimizer_names = ("the actor", "the critic")
    loss_metric = "policy/total_loss"
    progress_bar = {"reward": "reward/score", "kl": "policy/kl_seq"}
    step_type = PPOStep

    def __init__(
        self,
        model_name_or_path: str = "tiny",
        *,
        reward_model: str | None = None,
        critic: str = "separate",
        critic_lr: float | None = None,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        value_clip: float | None = 0.2,
        vf_coef: float = 0.1,
        ppo_epochs: int = 4,
        whiten_advantages: bool = True,
        whiten_rewards: bool = False,
        missing_eos_penalty: float | None = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ):
        super().__init__(model_name_or_path, **kwargs)
        self._explicit_reward_fns = bool(self.reward_funcs)
        if disable_dropout:
            disable_dropout_in_model(self.policy)
        self.reward_model = self._load_reward_model(reward_model) if reward_model is not None else None
        # the one reward-model scoring path; a plain attribute, so `reward_model` stays the (sharded) submodule
        self._reward_model_source = (RewardModelSource(self.reward_model, tokenizer=self.tokenizer)
                                     if self.reward_model is not None else None)
        self.value_model = self._make_critic()
        self.apply_lora()  # after the critic: it copies the plain backbone, not the adapter
        self.ref_policy = self._make_reference() if (kl_coef > 0 or adaptive_kl) else None
        self.kl_ctl = (AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl
                       else FixedKLController(kl_coef))

    def hparam_checks(self, hp) -> list[tuple[bool, str]]:
        return super().hparam_checks(hp) + _ppo_checks(hp)

    @property
    def epochs(self) -> int:
        return self.hparams.ppo_epochs

    # ------------------------------------------------------------------------------------------ set-up
    def _load_reward_model(self, name_or_path: str) -> nn.Module:
        hp = self.hparams
        return load_frozen_reward_model(name_or_path, self.tokenizer, hp.tokenizer_name_or_path or
                                        hp.model_name_or_path, torch_dtype=hp.torch_dtype,
                                        trust_remote_code=hp.trust_remote_code, seed=hp.seed)

    def _make_critic(self) -> ValueModel:
        with torch.random.fork_rng(devices=[]):  # a fresh value head is seeded like the presets: reproducible runs
            torch.manual_seed(self.hparams.seed)
            return self._build_critic()

    def _build_critic(self) -> ValueModel:
        """The value head stays float32 whatever `torch_dtype` is (values regress returns; it costs nothing)."""
        hp = self.hparams
        hidden = self.policy.config.hidden_size
        if hp.critic == "shared":
            return ValueModel(None, hidden)
        if self.reward_model is not None:
            # TRL / "N+ details": the critic starts as a copy of the reward model, head included, so the first
            # values already estimate the score
            critic = ValueModel(copy.deepcopy(self.reward_model.base_model), self.reward_model.config.hidden_size,
                                head=copy.deepcopy(self.reward_model.score).float())
            critic.requires_grad_(True)
        else:
            critic = ValueModel(copy.deepcopy(self.policy.base_model), hidden)
        if hp.disable_dropout:
            disable_dropout_in_model(critic)
        return critic

    def fsdp_units(self) -> list[tuple[nn.Module, bool]]:
        """Policy and reference (base), then the critic: its backbone by layers and its head as a unit of its own
        (the shared critic calls the head directly, outside any other unit's forward). The frozen reward model's
        backbone is sharded like the policy; its `score` head (H weights, frozen) stays replicated because
        `reward_model_scores` calls it directly."""
        units = super().fsdp_units()
        if self.value_model.backbone is not None:
            units.append((self.value_model.backbone, True))
        units.append((self.value_model.head, False))
        if self.reward_model is not None:
            units.append((self.reward_model.base_model, True))
        return units

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and not self.has_reward():
            raise ValueError("PPOModule has no reward: set model.reward_model or model.reward_fns, use a built-in "
                             "data.task, or override compute_rewards")

    # ------------------------------------------------------------------------------------------ optimizers
    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The separate critic's backbone + head, or only the head when shared."""
        return [p for p in self.value_model.parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.actor_parameters() + self.critic_parameters()

    def optimizer_parameters(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [("policy/grad_norm", self.actor_parameters()), ("value/grad_norm", self.critic_parameters())]

    def trained_modules(self) -> list[nn.Module]:
        return [self.policy, self.value_model]

    def configure_optimizers(self):
        """Two AdamW optimizers (actor, critic), each with its own lr schedule; stepped by `update`."""
        hp = self.hparams
        actor, actor_sched = self.build_optimizer(self.actor_parameters(), hp.lr)
        critic, critic_sched = self.build_optimizer(self.critic_parameters(), hp.critic_lr or hp.lr)
        return [actor, critic], [actor_sched, critic_sched]

    # ------------------------------------------------------------------------------------------ 1. rewards
    def score_sources(self, prompts: list[str], completions: list[str], batch: dict[str, Any]) -> RewardOutput:
        """Sequence scores [N]: reward-model score + weighted reward functions (NaN = no score; row skipped);
        per_source: the reward functions' values. What `compute_rewards` returns unless overridden.

        `batch["columns"]` holds the dataset columns aligned with completions, `batch["samples"]` the token ids
        (`RolloutBatch`). The missing-EOS penalty is applied afterwards (`sample_and_score`).
        """
        N = len(completions)
        total = torch.zeros(N, device=self.device)
        if self.reward_model is not None:
            total = total + self.reward_model_scores(batch["samples"])
        use_fns = self.reward_funcs and (self._explicit_reward_fns or self.reward_model is None)
        if not use_fns:
            return RewardOutput(total)
        fns = self.reward_source().score(prompts, completions, batch["columns"])
        fn_total = fns.rewards.to(self.device)
        if self.reward_model is not None:
            fn_total = torch.nan_to_num(fn_total)  # all functions abstained: the reward model still scores
        return RewardOutput(total + fn_total, fns.per_source)

    def reward_model_scores(self, samples: RolloutBatch) -> Tensor:
        """The reward model's logit at the last real token of prompt + completion (EOS when there is one). [N]"""
        input_ids, attn, pos = join_prompt_completion(**samples.model_inputs())
        return self._reward_model_source.score_ids(input_ids, attn, pos, self.hparams.micro_batch_size)

    def sample_and_score(self, batch: dict[str, Any], rollout: Rollout | None = None) -> PPOStep:
        """The rollout and its sequence scores, minus `missing_eos_penalty` for completions without EOS."""
        step = super().sample_and_score(batch, rollout)
        step.raw_scores = step.rewards.float()  # [N]
        step.scores = step.raw_scores.clone()
        if self.hparams.missing_eos_penalty:
            step.scores = step.scores - self.hparams.missing_eos_penalty * step.rollout.samples.is_truncated.float()
        return step

    # ------------------------------------------------------------------------------------------ 2. passes
    def old_and_reference(self, step: PPOStep) -> None:
        """π_ref, then π_old and V_old: a no-grad pass, or (`fuses_old_passes`) the update's own first forward,
        with grad, detached, after the no-grad work so that its activations are freed before this graph is built."""
        N = step.ctx["completion_ids"].shape[0]
        if step.behaviour_logp is not None or not self.fuses_old_passes(N, step.ctx):
            step.old_logp, step.old_values, step.ref_logp = self._no_grad_passes(step.ctx)
            if step.behaviour_logp is not None:  # off_policy_steps: 1: the sampler's weights are π_old; V_old is
                step.old_logp = step.behaviour_logp  # today's critic (the values GAE starts from)
            return
        step.ref_logp = self.reference_logprobs(step.ctx)
        for module in self.trained_modules():
            module.train()
        step.forward = self.policy_and_values(step.ctx)  # (log π, entropy, V) [N, T] each, with grad
        step.old_logp, step.old_values = step.forward[0].detach(), step.forward[2].detach()

    def fuses_old_passes(self, n_rows: int, ctx: dict[str, Tensor] | None = None) -> bool:
        """Whether this rollout's π_old / V_old come from the update's own forward instead of a no-grad pass.

        With one epoch of one minibatch done in one micro-batch, the update's forward runs on the very weights
        that sampled the rollout, so "log π_old, V_old = that forward, detached" is exactly PPO's definition
        (ratio 1 at the step, the gradient of the clipped surrogate unchanged) and saves one policy and one
        critic forward per rollout (2 of the 4 no-grad passes; TRL 0.21 runs them all). Not with dropout
        active: the update runs in train mode, the old passes in eval mode. `fuse_old_passes = False` (class or
        instance attribute) turns it off, e.g. for a subclass whose `policy_and_values` differs between modes.
        """
        hp = self.hparams
        # one micro-batch: `micro_batch_size`, and `max_tokens_per_micro_batch` on the rollout's lengths (`ctx`)
        one_graph = ((ctx is not None or hp.max_tokens_per_micro_batch is None)
                     and len(self._micro_batches(n_rows, ctx=ctx)) == 1)
        return (self.fuse_old_passes and hp.ppo_epochs == 1 and hp.minibatches == 1 and one_graph
                and not any(has_active_dropout(m) for m in (self.policy, self.value_model)))

    def policy_and_values(self, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(log π [n, T], entropy [n, T], V [n, T]) of completion tokens; V[t] is the value of the state before
        token t (the position whose logits predict it). Differentiable when grad is enabled."""
        width = ctx["completion_ids"].shape[1]
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        logp, entropy, values = self._policy_and_values(dict(zip(keys, trim_padding(*(ctx[k] for k in keys)))))
        return pad_columns(logp, width), pad_columns(entropy, width), pad_columns(values, width)

    def _policy_and_values(self, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """`policy_and_values` on inputs without all-padding columns."""
        hp = self.hparams
        T = ctx["completion_ids"].shape[1]
        input_ids, attn, pos = join_prompt_completion(**ctx)
        if hp.critic == "shared":
            # one forward: the logits give log-probs, the last hidden state (after the final norm) gives values
            out = self.policy(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=False,
                              logits_to_keep=T + 1, output_hidden_states=True)
            logp, entropy = token_logprobs(out.logits[:, :-1], ctx["completion_ids"], ctx["completion_mask"],
                                           hp.temperature)  # [n, T]
            values = self.value_model.values_from_hidden(out.hidden_states[-1][:, -(T + 1):-1])  # [n, T]
            return logp, entropy, values
        logp, entropy = completion_logprobs(self.policy, **ctx, temperature=hp.temperature, return_entropy=True,
                                            share_prompts=hp.share_prompt_prefix)
        values = self.value_model(input_ids, attn, pos)[:, -(T + 1):-1]  # [n, T]
        return logp, entropy, values

    @torch.no_grad()
    def _no_grad_passes(self, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Old log-probs, old values and reference log-probs of the rollout, in eval mode (dropout off)."""
        modules = [self.policy, self.value_model]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        N = ctx["completion_ids"].shape[0]
        old_logp = old_values = None
        for idx in self._micro_batches(N, ctx=ctx):  # token-budget micro-batches come in length order
            logp, _, values = self.policy_and_values({k: v[idx] for k, v in ctx.items()})
            if old_logp is None:
                old_logp, old_values = logp.new_zeros(N, logp.size(1)), values.new_zeros(N, values.size(1))
            old_logp[idx], old_values[idx] = logp, values
        for m, mode in zip(modules, modes):
            m.train(mode)
        return old_logp, old_values, self.reference_logprobs(ctx)

    # ------------------------------------------------------------------------------------------ 3. advantages
    def compute_step_advantages(self, step: PPOStep) -> None:
        """Per-token rewards -β·KL_t + score at the last real token, then GAE; rows with no score get no loss."""
        hp = self.hparams
        has_score = ~torch.isnan(step.scores)  # [N]
        # the policy's tokens: tool output is attended but gets no KL, reward or loss (GAE steps over it)
        mask = step.rollout.samples.trained_mask.bool() & has_score.unsqueeze(-1)  # [N, T]
        step.kl_coef = self.kl_ctl.value
        if step.ref_logp is not None:
            kl = losses.kl_estimate(step.old_logp, step.ref_logp, hp.kl_estimator)  # [N, T]
        else:
            kl = torch.zeros_like(step.old_logp)
        step.kl = torch.where(mask, kl, 0.0)
        rewards = losses.ppo_token_rewards(torch.nan_to_num(step.scores), step.kl, mask, step.kl_coef)  # [N, T]
        if hp.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
        step.token_rewards = rewards
        step.advantages, step.returns = self.compute_advantages(rewards, step.old_values, mask)  # [N, T] each
        step.loss_mask = mask

    def compute_advantages(self, rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """GAE over real tokens, returns = A + V (before whitening, "N+ details"), then optional whitening.

        rewards, values, mask: [N, T] -> (advantages [N, T], returns [N, T]); 0 at masked positions.
        """
        hp = self.hparams
        out = get_estimator("gae").fn(AdvantageInputs(mask=mask, token_rewards=rewards, values=values, gamma=hp.gamma,
                                                      lam=hp.lam, whiten=hp.whiten_advantages))
        return out.advantages, out.returns

    # ------------------------------------------------------------------------------------------ 4. updates
    def minibatch_rows(self, n_rows: int) -> list[Tensor]:
        """Rows shuffled per epoch (`_update_generator`: seeded, checkpointed), then `minibatches` slices."""
        order = torch.randperm(n_rows, device=self.device, generator=self._update_generator())
        return list(order.tensor_split(self.hparams.minibatches))

    def micro_batch_loss(self, step: PPOStep, idx: Tensor, normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """pg + vf_coef · vf for rows `idx`, normalised by the minibatch's tokens on all ranks.

        Why ONE backward of pg + vf_coef·vf rather than two: with a shared critic both losses run through the
        same forward graph (two backwards would need retain_graph and walk the backbone twice); with a separate
        critic they touch disjoint parameters, so the sum's gradient IS each loss's own gradient, and one
        backward gives every trainable parameter a gradient, which is what DDP needs without
        `find_unused_parameters`. Each optimizer then steps only its own parameters.
        """
        if step.forward is not None:  # fused: the one micro-batch holds every row, in `idx` order
            logp, entropy, values = (t[idx] for t in step.forward)
        else:
            logp, entropy, values = self.policy_and_values({k: v[idx] for k, v in step.ctx.items()})  # with grad
        m = step.loss_mask[idx]
        pg_loss, stats = self.policy_loss(logp, step.old_logp[idx], step.advantages[idx], m, normalizer)
        vf_loss, vstats = self.value_loss(values, step.old_values[idx], step.returns[idx], m, normalizer)
        out = {f"policy/{k}": v for k, v in stats.items()}
        out["value/clip_frac"] = vstats["value_clip_frac"]
        out.update({"policy/loss": pg_loss.detach(), "value/loss": vf_loss.detach(),
                    "policy/entropy": losses.masked_mean(entropy.detach(), m)})
        return pg_loss + self.hparams.vf_coef * vf_loss, out

    def policy_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO's clipped surrogate per token, averaged over the minibatch's tokens (token-mean)."""
        hp = self.hparams
        return get_policy_loss("token")(PolicyLossInputs(logp, old_logp, advantages, mask, clip_low=hp.clip_low,
                                                         clip_high=hp.clip_high, agg="token-mean",
                                                         normalizer=normalizer))

    def value_loss(self, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """0.5 · max((V - R)², (V_clip - R)²), averaged over the minibatch's tokens."""
        return losses.value_loss(values, old_values, returns, mask, clip_range=self.hparams.value_clip,
                                 normalizer=normalizer)

    def after_update(self, step: PPOStep) -> None:
        """The KL controller sees the rollout's mean sequence KL (the same on every rank)."""
        has = ~torch.isnan(step.scores)
        mean_seq_kl, n_rows = self._global_mean(step.kl.sum(-1)[has])
        self.kl_ctl.update(mean_seq_kl, n_rows)

    def _global_mean(self, x: Tensor) -> tuple[float, int]:
        """Mean and count of x [n] over all ranks."""
        stats = torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)])
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            dist.all_reduce(stats)
        total, count = float(stats[0]), int(stats[1])
        return total / max(count, 1), count

    # ------------------------------------------------------------------------------------------ 5. logging
    def step_metrics(self, step: PPOStep) -> dict[str, Any]:
        has, mask = ~torch.isnan(step.scores), step.loss_mask
        zero = torch.zeros((), device=self.device)

        def mean(x: Tensor) -> Tensor:
            return x[has].mean() if has.any() else zero

        def std(x: Tensor) -> Tensor:
            return x[has].std() if has.sum() > 1 else zero

        non_score = (-step.kl_coef * step.kl).sum(-1)  # [N] the KL part of each row's return
        values, returns = step.old_values, step.returns
        return {
            "reward/score": mean(step.scores), "reward/score_std": std(step.scores),
            "reward/mean": mean(step.raw_scores), "reward/std": std(step.raw_scores),  # before the EOS penalty
            "reward/non_score": mean(non_score), "reward/total": mean(step.scores + non_score),
            "reward/missing_frac": (~has).float().mean(),
            "policy/kl": losses.masked_mean(step.kl, mask),  # per token, as GRPO logs it
            "policy/kl_seq": mean(step.kl.sum(-1)),  # what the controller steers
            "policy/kl_coef": torch.tensor(step.kl_coef),
            "value/mean": losses.masked_mean(values, mask),
            "value/return_mean": losses.masked_mean(returns, mask),
            "value/return_std": losses.masked_var(returns, mask).sqrt(),
            "value/explained_variance": losses.explained_variance(values, returns, mask),
            "policy/advantage_abs_mean": losses.masked_mean(step.advantages.abs(), mask),
            "value/lr": torch.tensor(self.optimizers()[1].param_groups[0]["lr"]),
        }

    def log_samples(self, step: PPOStep) -> None:
        r = step.rollout
        self.log_sample_table(r.prompts, self.shown_completions(r), step.scores, step.advantages)
        self.log_histograms({"reward/histogram": step.scores,
                             "policy/advantage_histogram": step.advantages[step.loss_mask]})

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions: `val/score` from the reward model (if any), and `val/reward` / `val/accuracy` from
        the reward functions / the task's verifiers (`log_reward_fn_metrics`)."""
        if not self.has_reward():
            return
        greedy = self.greedy_samples(batch)  # sampled once for both the reward model and the functions
        if self.reward_model is not None:
            self.log(f"{self.eval_prefix}/score", self.reward_model_scores(greedy).mean(),
                     batch_size=len(batch["prompts"]), sync_dist=True, prog_bar=True)
        self.log_reward_fn_metrics(batch, greedy)

    def has_reward(self) -> bool:
        return self.reward_model is not None or super().has_reward()

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Counters (base), the KL controller and the sampling generator; Lightning saves both optimizers and
        both schedulers itself."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])


def _ppo_checks(hp) -> list[tuple[bool, str]]:
    """(holds, one-line message) for PPO's own arguments (`hparam_checks`)."""
    return [
        (hp.critic in ("separate", "shared"), f"critic must be separate|shared, got {hp.critic!r}"),
        (hp.critic_lr is None or 0 < hp.critic_lr < 1, f"critic_lr must be in (0, 1) or null, got {hp.critic_lr!r}"),
        (hp.kl_coef >= 0, f"kl_coef must be >= 0, got {hp.kl_coef}"),
        (hp.kl_estimator in ("k1", "k2", "k3"), f"kl_estimator must be k1|k2|k3, got {hp.kl_estimator!r}"),
        (not hp.adaptive_kl or hp.kl_coef > 0, "adaptive_kl needs kl_coef > 0 (the controller multiplies it)"),
        (hp.kl_target > 0, f"kl_target must be > 0, got {hp.kl_target}"),
        (isinstance(hp.kl_horizon, int) and hp.kl_horizon >= 1,
         f"kl_horizon must be an integer >= 1, got {hp.kl_horizon!r}"),
        (0 <= hp.gamma <= 1, f"gamma must be in [0, 1], got {hp.gamma}"),
        (0 <= hp.lam <= 1, f"lam must be in [0, 1], got {hp.lam}"),
        (hp.value_clip is None or hp.value_clip > 0, f"value_clip must be > 0 or null, got {hp.value_clip}"),
        (hp.vf_coef > 0, f"vf_coef must be > 0 (the critic learns only through the value loss), got {hp.vf_coef}"),
        (isinstance(hp.ppo_epochs, int) and hp.ppo_epochs >= 1,
         f"ppo_epochs must be an integer >= 1, got {hp.ppo_epochs!r}"),
        (hp.missing_eos_penalty is None or hp.missing_eos_penalty >= 0,
         f"missing_eos_penalty must be >= 0 (it is subtracted from the score), got {hp.missing_eos_penalty}"),
        (hp.temperature > 0 and math.isfinite(hp.temperature),
         f"temperature must be > 0 (PPO samples and scores the temperature-scaled policy), got {hp.temperature}"),
        (hp.reward_model is None or (isinstance(hp.reward_model, (str, Path)) and str(hp.reward_model)),
         f"reward_model must be a directory, hub id or preset name, got {hp.reward_model!r}"),
    ]
