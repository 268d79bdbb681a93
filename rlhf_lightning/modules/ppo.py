"""PPO for LMs: actor + critic, KL penalty in the reward, GAE, two optimizers under manual optimization.

The classic RLHF optimizer as Ziegler et al. 2019, InstructGPT and "The N+ Implementation Details of RLHF with
PPO" (Huang et al. 2024; the recipe of TRL's last PPOTrainer) describe it. One `training_step` = one rollout:

    1. rollout            one completion per prompt, sampling with the `rollout_engine` at `temperature`,
                          under no_grad, eval mode; the sampler pads after EOS ("EOS truncation")
    2. no-grad passes     old log-probs log π_old (= the sampling policy), values V_old(s_t) from the critic and
                          reference log-probs log π_ref, all at the same temperature, eval mode. With one epoch
                          of one minibatch, π_old and V_old are the update's own forward, detached (the same
                          weights: `fuses_old_passes`), and only π_ref runs here
    3. compute_rewards    the sequence score: reward model logit at the last real token and/or reward functions
                          (TRL signature), summed; `missing_eos_penalty` is subtracted for truncated completions
    4. token_rewards      r_t = -β·KL_t (k1 = log π_old - log π_ref) at every completion token, + score at the
                          last real token (Ziegler eq. 2); optional reward whitening (scale only)
    5. compute_advantages GAE(γ, λ) over the real tokens (values and rewards after the last one are ignored),
                          returns = A + V_old, then advantage whitening
    6. updates            `ppo_epochs` x `minibatches`: clipped surrogate + vf_coef · clipped value loss, one
                          backward, then the actor and the critic optimizers each clip, step and schedule
    7. KL controller      adaptive β (Ziegler §2.2) sees the rollout's mean sequence KL; fixed otherwise

Critic (`critic=`):
    separate  a `ValueModel`: its own copy of a causal-LM backbone + Linear(hidden, 1); initialised from the reward
              model (backbone and its `score` head, as TRL did) when `reward_model` is given, else from the policy.
    shared    a Linear(hidden, 1) head on the policy's last hidden state: one forward gives logits and values.
              The critic optimizer holds the head only; the value loss also trains the shared backbone through
              the actor optimizer, scaled by `vf_coef`.

Counting: Lightning's `trainer.global_step` counts every optimizer.step() of BOTH optimizers, so
    trainer.max_steps = 2 x rollouts x ppo_epochs x minibatches
(e.g. `max_steps: 400` with 1 epoch and 1 minibatch is 200 rollouts). `self.rollouts` and `self.optimizer_steps`
(actor updates) are explicit counters, saved in checkpoints. The TensorBoard x-axis is the rollout index
(Lightning's batch counter), the same as GRPO's.

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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import losses
from ..algorithms.advantages import AdvantageInputs, get_estimator
from ..rewards import RewardModelSource, RewardOutput
from ..rollout import RolloutBatch, completion_logprobs, decode_completions, position_ids_from_mask
from .base import PolicyModuleBase, grad_norm
from .grpo import Rollout


class ValueModel(nn.Module):
    """V(s_t) at every position: a causal-LM backbone (e.g. `Qwen2Model`) + a scalar `head` (Linear(hidden, 1)).

    `backbone=None` is the shared critic: the module holds only the head, and the caller feeds it the policy's
    last hidden state through `values_from_hidden` (so the policy backbone is not registered twice).
    """

    def __init__(self, backbone: nn.Module | None, hidden_size: int, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            # A fresh head starts at V = 0 everywhere. A randomly initialised one (std 1/sqrt(hidden + 1), the
            # "N+ details" reward-head init) gives values of std ~1 that differ token by token, and on the first
            # rollouts those differences ARE the advantages: measured on the addition task, they wreck an SFT
            # policy before the critic catches up. With V = 0 the first updates are REINFORCE on the whitened
            # return, and the gradient still reaches the head (its input is not 0), so it learns from step 1.
            head = nn.Linear(hidden_size, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head

    def values_from_hidden(self, hidden: Tensor) -> Tensor:
        """hidden [B, L, H] -> values [B, L] (float32)."""
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Values at every position of input_ids [B, L] -> [B, L] float32 (separate critic only)."""
        if self.backbone is None:
            raise ValueError("a shared ValueModel has no backbone: call values_from_hidden with the policy's hidden "
                             "states")
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # [B, L, H]
        return self.values_from_hidden(hidden)


def disable_dropout_in_model(model: nn.Module) -> None:
    """Set every dropout probability to 0 ("N+ details": with dropout on, the first PPO ratio is not 1 and the
    KL/values of the rollout disagree with the training passes). Covers nn.Dropout and HF's attention dropout."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _active_dropout(model: nn.Module) -> bool:
    """Whether a forward in train mode differs from eval mode through dropout (nn.Dropout p > 0 or HF's
    `attention_dropout`)."""
    def active(m: nn.Module) -> bool:
        rate = getattr(m, "attention_dropout", None)
        return (isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(rate, float) and rate > 0)

    return any(active(m) for m in model.modules())


def token_logprobs(logits: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """(log π(token) [B, T], entropy [B, T]) of logits [B, T, V] at `temperature`; 0 where the mask is 0.

    The same math as `rollout.completion_logprobs` (tests check they agree), for the shared critic whose single
    forward also yields the hidden states the value head reads.
    """
    z = logits.float() / temperature  # [B, T, V]
    lse = torch.logsumexp(z, dim=-1)  # [B, T]
    logp = z.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - lse  # [B, T]
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # [B, T]
    mask = completion_mask.bool()
    return torch.where(mask, logp, 0.0), torch.where(mask, entropy, 0.0)


def _join(ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """prompt (left-padded) + completion (right-padded) -> input_ids, attention_mask, position_ids [B, P + T]."""
    input_ids = torch.cat([ctx["prompt_ids"], ctx["completion_ids"]], dim=1)  # [B, P + T]
    attn = torch.cat([ctx["prompt_mask"].long(), ctx["completion_mask"].long()], dim=1)  # [B, P + T]
    return input_ids, attn, position_ids_from_mask(attn)


class PPOModule(PolicyModuleBase):
    """PPO with a critic for LMs (Ziegler et al. 2019; "The N+ Implementation Details of RLHF with PPO").

    Args (beyond `PolicyModuleBase`'s model / reward / optimizer arguments; `lr` is the actor's):
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
        clip_low, clip_high: ε of the clipped surrogate below / above 1.
        value_clip: the value update is clipped to ±value_clip around the rollout's values (None = off).
        vf_coef: weight of the value loss in the one backward (loss = pg + vf_coef · vf). With a separate critic
            it only scales the critic's gradient; with a shared one it sets how much the value loss moves the
            shared backbone.
        ppo_epochs, minibatches: passes over each rollout x optimizer steps per pass (rows shuffled per pass).
        micro_batch_size: rows per forward/backward inside a minibatch (None = the whole minibatch); the losses
            are normalised over the minibatch's tokens on all ranks, so this does not change the update.
        whiten_advantages: normalise advantages to mean 0, std 1 over the rollout's real tokens.
        whiten_rewards: scale the per-token rewards to std 1 (mean kept) before GAE ("N+ details" option).
        missing_eos_penalty: subtracted from the score of completions with no EOS within `max_new_tokens`.
        max_new_tokens, min_new_tokens, temperature: sampling; the temperature also divides the logits of every
            log-prob pass (old, reference, training), so ratio and KL compare the distribution sampled.
            No top-k / top-p: PPO's ratio and KL assume samples from the plain temperature-scaled policy.
        max_grad_norm: gradient clipping of each optimizer's parameters (None = off).
        disable_dropout: set dropout to 0 in policy and critic (see `disable_dropout_in_model`).
        sample_seed: seed of the sampling generator (offset by the global rank; saved in checkpoints).
        log_samples_every_n_steps: text table of sample completions and histograms of scores / advantages every
            N rollouts (0 = off).
        lora, lora_export, gradient_checkpointing, rollout_engine, nonfinite_rewards, max_nonfinite_steps: see
            `PolicyModuleBase` (the guard covers both optimizers). With LoRA the adapter
            is on the actor only (the critic is built from the plain model first) and π_ref is the actor with its
            adapter disabled.
    """

    fuse_old_passes: bool = True  # see `fuses_old_passes`
    optimizer_names = ("the actor", "the critic")

    def __init__(
        self,
        model_name_or_path: str = "tiny",
        tokenizer_name_or_path: str | None = None,
        reward_fns: Sequence[Any] | None = None,
        reward_weights: Sequence[float] | None = None,
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
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        value_clip: float | None = 0.2,
        vf_coef: float = 0.1,
        ppo_epochs: int = 4,
        minibatches: int = 1,
        micro_batch_size: int | None = None,
        whiten_advantages: bool = True,
        whiten_rewards: bool = False,
        missing_eos_penalty: float | None = None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        max_grad_norm: float | None = 1.0,
        disable_dropout: bool = True,
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
        seed: int = 0,
        log_samples_every_n_steps: int = 50,
        lora: dict[str, Any] | None = None,
        lora_export: str = "merged",
        gradient_checkpointing: bool = False,
        rollout_engine: str = "auto",
        nonfinite_rewards: str = "error",
        max_nonfinite_steps: int = 3,
    ):
        self.save_hyperparameters()
        _validate_ppo_args(self.hparams)
        super().__init__(model_name_or_path, tokenizer_name_or_path, reward_fns, reward_weights, lr, weight_decay,
                         betas, warmup_steps, lr_schedule, min_lr_ratio, torch_dtype, trust_remote_code,
                         val_max_new_tokens or max_new_tokens, seed, lora=lora, lora_export=lora_export,
                         gradient_checkpointing=gradient_checkpointing, rollout_engine=rollout_engine,
                         nonfinite_rewards=nonfinite_rewards, max_nonfinite_steps=max_nonfinite_steps)
        self.automatic_optimization = False
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
        self.kl_ctl = (losses.AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl
                       else losses.FixedKLController(kl_coef))

    # ------------------------------------------------------------------------------------------ set-up
    def _load_reward_model(self, name_or_path: str) -> nn.Module:
        """A frozen sequence classifier that shares the policy's tokenizer (checked), with a `score` head."""
        from ..models import load_sequence_classifier
        from ..tokenizer import load_tokenizer

        if str(name_or_path).endswith(".ckpt"):
            raise ValueError(f"reward_model {name_or_path!r} is a Lightning checkpoint; pass the RewardModel's "
                             "hf_model export directory (written by save_pretrained at the end of its fit)")
        hp = self.hparams
        rm = load_sequence_classifier(name_or_path, self.tokenizer, torch_dtype=hp.torch_dtype,
                                      trust_remote_code=hp.trust_remote_code, seed=hp.seed, require_trained_head=True)
        if not isinstance(getattr(rm, "score", None), nn.Linear) or rm.score.out_features != 1:
            raise ValueError(f"reward_model {name_or_path!r} ({type(rm).__name__}) has no scalar `score` head "
                             "(Linear(hidden, 1)); use a sequence classifier with num_labels=1")
        try:
            rm_tokenizer = load_tokenizer(name_or_path, trust_remote_code=hp.trust_remote_code)
        except ValueError:  # a directory without tokenizer files: only the embedding size can be checked
            rm_tokenizer = None
        if rm_tokenizer is not None and rm_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"reward_model {name_or_path!r} has a different tokenizer than the policy "
                             f"{hp.tokenizer_name_or_path or hp.model_name_or_path!r}; PPO scores the policy's "
                             "token ids directly, so both must share one vocabulary")
        if rm.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(f"reward_model {name_or_path!r} embeds {rm.get_input_embeddings().num_embeddings} "
                             f"tokens but the policy's tokenizer has {len(self.tokenizer)}")
        rm.requires_grad_(False)  # frozen; `reward_model_scores` switches it to eval mode for every use
        return rm

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

    def configure_optimizers(self):
        """Two AdamW optimizers (actor, critic), each with its own lr schedule; stepped by `_update`."""
        hp = self.hparams
        actor, actor_sched = self.build_optimizer(self.actor_parameters(), hp.lr)
        critic, critic_sched = self.build_optimizer(self.critic_parameters(), hp.critic_lr or hp.lr)
        return [actor, critic], [actor_sched, critic_sched]

    def updates_per_batch(self) -> tuple[int, int]:
        """ppo_epochs x minibatches steps of each of the two optimizers per rollout (see `schedule_horizon`)."""
        return self.hparams.ppo_epochs * self.hparams.minibatches, 2

    # ------------------------------------------------------------------------------------------ hooks
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """One completion per prompt, sampled from π at `temperature` (eval mode, no grad, pad after EOS)."""
        samples = self.generate(batch["prompt_ids"], batch["prompt_mask"], self.sampling_params(), self._generator())
        completions = decode_completions(self.tokenizer, samples.completion_ids, samples.completion_mask)
        return Rollout(samples, list(batch["prompts"]), completions, self.reward_columns(batch))

    def score_sources(self, prompts: list[str], completions: list[str], batch: dict[str, Any]) -> RewardOutput:
        """Sequence scores [N]: reward-model score + weighted reward functions (NaN = no score; row skipped);
        per_source: the reward functions' values. What `compute_rewards` returns unless overridden.

        `batch["columns"]` holds the dataset columns aligned with completions, `batch["samples"]` the token ids
        (`RolloutBatch`). The missing-EOS penalty is applied afterwards, by the caller.
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

    def compute_advantages(self, rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """GAE over real tokens, returns = A + V (before whitening, "N+ details"), then optional whitening.

        rewards, values, mask: [N, T] -> (advantages [N, T], returns [N, T]); 0 at masked positions.
        """
        hp = self.hparams
        out = get_estimator("gae").fn(AdvantageInputs(mask=mask, token_rewards=rewards, values=values, gamma=hp.gamma,
                                                      lam=hp.lam, whiten=hp.whiten_advantages))
        return out.advantages, out.returns

    def policy_loss(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO's clipped surrogate per token, averaged over the minibatch's tokens (token-mean)."""
        hp = self.hparams
        return losses.policy_loss(logp, old_logp, advantages, mask, clip_low=hp.clip_low, clip_high=hp.clip_high,
                                  level="token", agg="token-mean", normalizer=normalizer)

    def value_loss(self, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """0.5 · max((V - R)², (V_clip - R)²), averaged over the minibatch's tokens."""
        return losses.value_loss(values, old_values, returns, mask, clip_range=self.hparams.value_clip,
                                 normalizer=normalizer)

    # ------------------------------------------------------------------------------------------ forward passes
    def policy_and_values(self, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(log π [n, T], entropy [n, T], V [n, T]) of completion tokens; V[t] is the value of the state before
        token t (the position whose logits predict it). Differentiable when grad is enabled."""
        hp = self.hparams
        T = ctx["completion_ids"].shape[1]
        if hp.critic == "shared":
            # one forward: the logits give log-probs, the last hidden state (after the final norm) gives values
            input_ids, attn, pos = _join(ctx)
            out = self.policy(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=False,
                              logits_to_keep=T + 1, output_hidden_states=True)
            logp, entropy = token_logprobs(out.logits[:, :-1], ctx["completion_ids"], ctx["completion_mask"],
                                           hp.temperature)  # [n, T]
            values = self.value_model.values_from_hidden(out.hidden_states[-1][:, -(T + 1):-1])  # [n, T]
            return logp, entropy, values
        logp, entropy = completion_logprobs(self.policy, **ctx, temperature=hp.temperature, return_entropy=True)
        input_ids, attn, pos = _join(ctx)
        values = self.value_model(input_ids, attn, pos)[:, -(T + 1):-1]  # [n, T]
        return logp, entropy, values

    def reward_model_scores(self, samples: RolloutBatch) -> Tensor:
        """The reward model's logit at the last real token of prompt + completion (EOS when there is one). [N]"""
        input_ids, attn, pos = _join(_ctx(samples))
        return self._reward_model_source.score_ids(input_ids, attn, pos, self.hparams.micro_batch_size)

    @torch.no_grad()
    def _no_grad_passes(self, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Old log-probs, old values and reference log-probs of the rollout, in eval mode (dropout off)."""
        modules = [self.policy, self.value_model]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        old_logp, old_values = [], []
        for idx in self._micro_batches(ctx["completion_ids"].shape[0]):
            mb = {k: v[idx] for k, v in ctx.items()}
            logp, _, values = self.policy_and_values(mb)
            old_logp.append(logp)
            old_values.append(values)
        for m, mode in zip(modules, modes):
            m.train(mode)
        return torch.cat(old_logp), torch.cat(old_values), self._reference_logprobs(ctx)

    @torch.no_grad()
    def _reference_logprobs(self, ctx: dict[str, Tensor]) -> Tensor | None:
        """log π_ref of the rollout's completion tokens [N, T] (None without a reference), in eval mode."""
        ref_logp = []
        with self.reference_policy() as ref:  # a separate pass: with LoRA it toggles the policy's adapter
            if ref is None:
                return None
            mode = ref.training
            ref.eval()
            for idx in self._micro_batches(ctx["completion_ids"].shape[0]):
                mb = {k: v[idx] for k, v in ctx.items()}
                ref_logp.append(completion_logprobs(ref, **mb, temperature=self.hparams.temperature))
            ref.train(mode)
        return torch.cat(ref_logp)

    def fuses_old_passes(self, n_rows: int) -> bool:
        """Whether this rollout's π_old / V_old come from the update's own forward instead of a no-grad pass.

        With one epoch of one minibatch done in one micro-batch, the update's forward runs on the very weights
        that sampled the rollout, so "log π_old, V_old = that forward, detached" is exactly PPO's definition
        (ratio 1 at the step, the gradient of the clipped surrogate unchanged) and saves one policy and one
        critic forward per rollout (2 of the 4 no-grad passes; TRL 0.21 runs them all). Not with dropout
        active: the update runs in train mode, the old passes in eval mode. `fuse_old_passes = False` (class or
        instance attribute) turns it off, e.g. for a subclass whose `policy_and_values` differs between modes.
        """
        hp = self.hparams
        return (self.fuse_old_passes and hp.ppo_epochs == 1 and hp.minibatches == 1
                and (hp.micro_batch_size is None or hp.micro_batch_size >= n_rows)
                and not any(_active_dropout(m) for m in (self.policy, self.value_model)))

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        rollout = self.rollout(batch)
        t_gen = time.perf_counter() - t0
        s = rollout.samples
        N = s.completion_ids.shape[0]
        self.check_minibatches(N)

        t1 = time.perf_counter()
        ctx = _ctx(s)
        fused = self.fuses_old_passes(N)
        if fused:  # π_old, V_old = the update's forward, detached (see `fuses_old_passes`)
            ref_logp = self._reference_logprobs(ctx)  # [N, T] or None
        else:
            old_logp, old_values, ref_logp = self._no_grad_passes(ctx)  # [N, T] each

        # ---- sequence scores: reward model and/or reward functions, then the missing-EOS penalty
        scored = self.score_rollout(rollout.prompts, rollout.completions, {"columns": rollout.columns, "samples": s,
                                                                           **batch})
        raw_scores, rollout.per_source = scored.rewards.float(), scored.per_source  # [N]
        scores = raw_scores.clone()
        if hp.missing_eos_penalty:
            scores = scores - hp.missing_eos_penalty * s.is_truncated.float()
        has_score = ~torch.isnan(scores)  # [N]; rows with no score get no loss at all
        mask = s.completion_mask.bool() & has_score.unsqueeze(-1)  # [N, T]
        first_forward = None
        if fused:  # after the no-grad work, so their activations are freed before this graph is built
            self.policy.train()
            self.value_model.train()
            first_forward = self.policy_and_values(ctx)  # (log π, entropy, V) [N, T] each, with grad
            old_logp, old_values = first_forward[0].detach(), first_forward[2].detach()

        # ---- per-token rewards: -β·KL at every token, + score at the last real token
        kl_coef = self.kl_ctl.value
        if ref_logp is not None:
            kl = losses.kl_estimate(old_logp, ref_logp, hp.kl_estimator)  # [N, T]
        else:
            kl = torch.zeros_like(old_logp)
        kl = torch.where(mask, kl, 0.0)
        rewards = losses.ppo_token_rewards(torch.nan_to_num(scores), kl, mask, kl_coef)  # [N, T]
        if hp.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False)

        # ---- GAE, returns, whitening; then the updates
        advantages, returns = self.compute_advantages(rewards, old_values, mask)  # [N, T] each
        update_stats = self._update(ctx, mask, old_logp, old_values, advantages, returns, first_forward)
        t_train = time.perf_counter() - t1

        # ---- the KL controller sees the rollout's mean sequence KL (same on every rank)
        seq_kl = kl.sum(-1)  # [N]
        mean_seq_kl, n_rows = self._global_mean(seq_kl[has_score])
        self.kl_ctl.update(mean_seq_kl, n_rows)
        self.rollouts += 1
        self._log_step(rollout, raw_scores, scores, kl, kl_coef, rewards, old_values, returns, advantages, mask,
                       update_stats, t_gen, t_train)

    def _global_mean(self, x: Tensor) -> tuple[float, int]:
        """Mean and count of x [n] over all ranks."""
        stats = torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)])
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            dist.all_reduce(stats)
        total, count = float(stats[0]), int(stats[1])
        return total / max(count, 1), count

    def _update(self, ctx: dict[str, Tensor], mask: Tensor, old_logp: Tensor, old_values: Tensor,
                advantages: Tensor, returns: Tensor,
                first_forward: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, float]:
        """ppo_epochs x minibatches updates; each one: backward once, then clip/step/schedule both optimizers.

        `first_forward`: the whole rollout's (log π, entropy, V) already computed with grad (fused old passes,
        one epoch of one minibatch in one micro-batch); it is used instead of a second forward.

        Why ONE backward of pg + vf_coef·vf rather than two: with a shared critic both losses run through the
        same forward graph (two backwards would need retain_graph and walk the backbone twice); with a separate
        critic they touch disjoint parameters, so the sum's gradient IS each loss's own gradient, and one
        backward gives every trainable parameter a gradient, which is what DDP needs without
        `find_unused_parameters`. Each optimizer then steps only its own parameters.
        """
        hp = self.hparams
        actor_opt, critic_opt = self.optimizers()
        actor_sched, critic_sched = self.lr_schedulers()
        N = mask.shape[0]
        world = self.trainer.world_size
        sums: dict[str, float] = {}
        count = 0
        norms: dict[str, list[float]] = {"actor": [], "critic": []}
        step_losses: list[float] = []
        self.policy.train()
        self.value_model.train()
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(N, device=self.device, generator=self._generator())  # shuffle rows per epoch
            for rows in order.tensor_split(hp.minibatches):  # exactly `minibatches` steps, as counted
                normalizer = self._global_count(mask[rows].sum())  # tokens of this minibatch on all ranks
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for idx in self._micro_batches(N, rows):
                    mb = {k: v[idx] for k, v in ctx.items()}
                    if first_forward is not None:  # the one micro-batch holds every row, in `idx` order
                        logp, entropy, values = (t[idx] for t in first_forward)
                    else:
                        logp, entropy, values = self.policy_and_values(mb)  # [n, T] each, with grad
                    m = mask[idx]
                    pg_loss, stats = self.policy_loss(logp, old_logp[idx], advantages[idx], m, normalizer)
                    vf_loss, vstats = self.value_loss(values, old_values[idx], returns[idx], m, normalizer)
                    loss = pg_loss + hp.vf_coef * vf_loss
                    # DDP averages gradients over ranks; the normaliser is already global, so undo the mean
                    self.manual_backward(loss * world)
                    stats.update(vstats)
                    stats["pg_loss"], stats["vf_loss"] = pg_loss.detach(), vf_loss.detach()
                    stats["entropy"] = losses.masked_mean(entropy.detach(), m)
                    step_loss += float(loss.detach())
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                step_losses.append(step_loss)
                for name, opt, sched, params in (("actor", actor_opt, actor_sched, self.actor_parameters()),
                                                 ("critic", critic_opt, critic_sched, self.critic_parameters())):
                    norms[name].append(float(grad_norm(params)))  # before clipping: shows whether it bites
                    if hp.max_grad_norm is not None:
                        self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                    opt.step()
                    sched.step()
                self.policy_stepped()
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["actor_grad_norm"] = sum(norms["actor"]) / len(norms["actor"])
        out["critic_grad_norm"] = sum(norms["critic"]) / len(norms["critic"])
        out["loss"] = sum(step_losses) / len(step_losses)
        return out

    # ------------------------------------------------------------------------------------------ logging
    def _log_step(self, rollout: Rollout, raw_scores: Tensor, scores: Tensor, kl: Tensor, kl_coef: float,
                  rewards: Tensor, values: Tensor, returns: Tensor, advantages: Tensor, mask: Tensor,
                  stats: dict[str, float], t_gen: float, t_train: float) -> None:
        s = rollout.samples
        N = len(rollout.completions)
        has = ~torch.isnan(scores)
        lengths = s.completion_mask.sum(-1).float()
        n_tokens = float(s.completion_mask.sum())
        zero = torch.zeros((), device=self.device)
        non_score = (-kl_coef * kl).sum(-1)  # [N] the KL part of each row's return
        metrics = {
            "reward/score": scores[has].mean() if has.any() else zero,
            "reward/score_std": scores[has].std() if has.sum() > 1 else zero,
            "reward/mean": raw_scores[has].mean() if has.any() else zero,  # before the missing-EOS penalty
            "reward/std": raw_scores[has].std() if has.sum() > 1 else zero,
            "reward/non_score": non_score[has].mean() if has.any() else zero,
            "reward/total": (scores + non_score)[has].mean() if has.any() else zero,
            "reward/missing_frac": (~has).float().mean(),
            "policy/kl": losses.masked_mean(kl, mask),  # per token, as GRPO logs it
            "policy/kl_seq": kl.sum(-1)[has].mean() if has.any() else zero,  # what the controller steers
            "policy/kl_coef": torch.tensor(kl_coef),
            "value/mean": losses.masked_mean(values, mask),
            "value/return_mean": losses.masked_mean(returns, mask),
            "value/return_std": losses.masked_var(returns, mask).sqrt(),
            "value/explained_variance": losses.explained_variance(values, returns, mask),
            "policy/advantage_abs_mean": losses.masked_mean(advantages.abs(), mask),
            "rollout/completion_len_mean": lengths.mean(),
            "rollout/completion_len_max": lengths.max(),
            "rollout/truncated_frac": s.is_truncated.float().mean(),
            "perf/tokens_per_s": torch.tensor(n_tokens / max(t_gen + t_train, 1e-9)),
            "perf/generation_s": torch.tensor(t_gen),
            "perf/training_s": torch.tensor(t_train),
            "policy/lr": torch.tensor(self.optimizers()[0].param_groups[0]["lr"]),
            "value/lr": torch.tensor(self.optimizers()[1].param_groups[0]["lr"]),
            "perf/rollouts": torch.tensor(float(self.rollouts)),
            "perf/optimizer_steps": torch.tensor(float(self.optimizer_steps)),
        }
        metrics.update(self.per_function_reward_metrics(rollout.per_source))
        metrics.update(self.guard_metrics())
        names = {"pg_loss": "policy/loss", "vf_loss": "value/loss", "value_clip_frac": "value/clip_frac",
                 "critic_grad_norm": "value/grad_norm", "actor_grad_norm": "policy/grad_norm",
                 "loss": "policy/total_loss"}
        for k, v in stats.items():
            metrics[names.get(k, f"policy/{k}")] = torch.tensor(v)
        logged = self.log_step_metrics(metrics)
        if self.should_log_samples():
            self.log_sample_table(rollout.prompts, rollout.completions, scores, advantages)
            self.log_histograms({"reward/histogram": scores, "policy/advantage_histogram": advantages[mask]})
        self.log("reward", logged["reward/score"], prog_bar=True, logger=False, batch_size=N)
        self.log("kl", logged["policy/kl_seq"], prog_bar=True, logger=False, batch_size=N)

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions: `val/score` from the reward model (if any), and `val/reward` / `val/accuracy` from
        the reward functions / the task's verifiers (`log_reward_fn_metrics`)."""
        if not self.has_reward():
            return
        greedy = self.greedy_samples(batch)  # sampled once for both the reward model and the functions
        if self.reward_model is not None:
            self.log("val/score", self.reward_model_scores(greedy).mean(), batch_size=len(batch["prompts"]),
                     sync_dist=True, prog_bar=True)
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


def _ctx(samples: RolloutBatch) -> dict[str, Tensor]:
    return {"prompt_ids": samples.prompt_ids, "prompt_mask": samples.prompt_mask,
            "completion_ids": samples.completion_ids, "completion_mask": samples.completion_mask}


def _validate_ppo_args(hp) -> None:
    """One-line errors for out-of-range hyperparameters, before any model is loaded."""
    checks = [
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
        (0 <= hp.clip_low < 1, f"clip_low must be in [0, 1), got {hp.clip_low}"),
        (hp.clip_high >= 0, f"clip_high must be >= 0, got {hp.clip_high}"),
        (hp.value_clip is None or hp.value_clip > 0, f"value_clip must be > 0 or null, got {hp.value_clip}"),
        (hp.vf_coef > 0, f"vf_coef must be > 0 (the critic learns only through the value loss), got {hp.vf_coef}"),
        (isinstance(hp.ppo_epochs, int) and hp.ppo_epochs >= 1,
         f"ppo_epochs must be an integer >= 1, got {hp.ppo_epochs!r}"),
        (isinstance(hp.minibatches, int) and hp.minibatches >= 1,
         f"minibatches must be an integer >= 1, got {hp.minibatches!r}"),
        (hp.micro_batch_size is None or hp.micro_batch_size >= 1,
         f"micro_batch_size must be >= 1 or null, got {hp.micro_batch_size!r}"),
        (hp.missing_eos_penalty is None or hp.missing_eos_penalty >= 0,
         f"missing_eos_penalty must be >= 0 (it is subtracted from the score), got {hp.missing_eos_penalty}"),
        (isinstance(hp.max_new_tokens, int) and hp.max_new_tokens >= 1,
         f"max_new_tokens must be >= 1, got {hp.max_new_tokens!r}"),
        (0 <= hp.min_new_tokens <= hp.max_new_tokens,
         f"min_new_tokens must be in [0, max_new_tokens={hp.max_new_tokens}], got {hp.min_new_tokens}"),
        (hp.temperature > 0 and math.isfinite(hp.temperature),
         f"temperature must be > 0 (PPO samples and scores the temperature-scaled policy), got {hp.temperature}"),
        (hp.max_grad_norm is None or hp.max_grad_norm > 0,
         f"max_grad_norm must be > 0 or null, got {hp.max_grad_norm}"),
        (hp.reward_model is None or (isinstance(hp.reward_model, (str, Path)) and str(hp.reward_model)),
         f"reward_model must be a directory, hub id or preset name, got {hp.reward_model!r}"),
        (isinstance(hp.log_samples_every_n_steps, int) and hp.log_samples_every_n_steps >= 0,
         f"log_samples_every_n_steps must be an integer >= 0, got {hp.log_samples_every_n_steps!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
