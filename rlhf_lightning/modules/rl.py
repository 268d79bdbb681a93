"""The one RL loop GRPO and PPO share: rollout → rewards → (old / reference passes) → advantages → updates → log.

`RLModule.training_step` is the whole data path, top to bottom, in code order:

    1. sample_and_score(batch)   `rollout` (the `rollout_engine` samples `samples_per_prompt` completions per prompt,
                                 no grad, eval mode) then `score_rollout` (the reward sources, or a subclass's
                                 `compute_rewards`) -> an `RLStep`. With `off_policy_steps: 1`, `overlapped_step`
                                 instead: the batch goes to the sampler thread and the previous batch's rollout,
                                 sampled during the previous update, is scored (`rollout.overlap`)
    2. old_and_reference(step)   the no-grad passes the algorithm needs: π_old (and V_old), π_ref. Where the policy
                                 has not moved since sampling, the update's own forward stands in for π_old
    3. compute_step_advantages   the algorithm's part: GRPO "group baseline, KL in the loss"; PPO "critic + GAE,
                                 KL in the reward". Sets step.advantages and step.loss_mask
    4. update(step)              `epochs` x `minibatches` optimizer steps, each over micro-batches whose losses add
                                 up to the step's (`micro_batch_loss`, normalised by the whole step's count on all
                                 ranks); every optimizer clips, steps and schedules; the engine gets the weights
    5. after_update(step)        (PPO: the adaptive KL controller)
    6. log_step(step)            one all-gather of every scalar; sample tables / histograms every N rollouts

Manual optimization: Lightning's `trainer.global_step` counts the steps of every optimizer, so `trainer.max_steps`
= rollouts x epochs x minibatches x optimizers; `self.rollouts` / `self.optimizer_steps` count explicitly and the
TensorBoard x-axis is the rollout index.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..infra.decline import DeclineWatch
from ..rollout import Rollout, RolloutBatch, completion_logprobs, decode_completions
from ..rollout.overlap import OverlappedSampler
from .base import PolicyModuleBase, grad_norm
from .step_logging import StepLogging


@dataclass
class RLStep:
    """One training step's data, filled in code order by `RLModule.training_step`. N rows, T completion tokens."""

    rollout: Rollout
    rewards: Any  # as scored: [N] (NaN = no reward), or N lists of step rewards (process supervision)
    t_gen: float  # seconds spent sampling
    metrics: dict[str, Tensor] = field(default_factory=dict)  # rollout-level metrics gathered on the way
    scores: Tensor | None = None  # [N] one reward per completion, after penalties (logged as reward/*)
    ctx: dict[str, Tensor] = field(default_factory=dict)  # prompt/completion ids and masks ([N, P] / [N, T])
    old_logp: Tensor | None = None  # [N, T] log π_old; None = the update's own log-probs, detached
    ref_logp: Tensor | None = None  # [N, T] log π_ref when the KL is in the loss
    forward: tuple[Tensor, ...] | None = None  # the update's own first forward (fused old passes), with grad
    advantages: Tensor | None = None  # [N] or [N, T]
    loss_mask: Tensor | None = None  # [N, T] the tokens that get a loss
    stats: dict[str, float] = field(default_factory=dict)  # the updates' metrics (policy/*, value/*)
    t_train: float = 0.0  # seconds from the no-grad passes to the last optimizer step
    behaviour_logp: Tensor | None = None  # [N, T] log π of the weights that sampled it (off_policy_steps: 1)


class RLModule(StepLogging, PolicyModuleBase):
    """Base of the RL modules. Not used directly; the arguments every RL module has:

    Args (beyond `PolicyModuleBase`'s model / reward / optimizer arguments):
        max_new_tokens / min_new_tokens / temperature: sampling. The temperature also divides the logits of every
            log-prob pass (old, reference, training), so ratio and KL compare the distribution that was sampled.
        clip_low / clip_high: ε of the clipped surrogate below / above 1 (clip-higher, DAPO: clip_high > clip_low).
        minibatches: optimizer steps per pass over a rollout.
        micro_batch_size: rows per forward/backward inside an optimizer step (gradient accumulation; the loss is
            normalised by the whole step's count on all ranks, so it does not change the update). None = the
            minibatch.
        max_tokens_per_micro_batch: token-budget micro-batches for every pass over a rollout (old, reference,
            training, critic): rows sorted by length are packed while rows x (longest prompt + longest completion
            of the micro-batch) stays within the budget (a longer row goes alone), and each forward runs at its
            own micro-batch's length, not the rollout's longest (padding columns dropped: `rollout.trim_padding`).
            On ragged rollouts this skips most of the padding work. With `micro_batch_size` too, both limits hold.
            None = off.
        max_grad_norm: gradient clipping of each optimizer's parameters (None = off).
        sample_seed: seed of the sampling generator (offset by the global rank; saved in checkpoints). None (the
            default) = 1234 + the global seed (`seed_everything`, Lightning's `PL_GLOBAL_SEED`), so runs that differ
            only in their seed sample differently (recorded in hparams as resolved).
        log_samples_every_n_steps: text table of sample completions and histograms of rewards / advantages every
            N rollouts (0 = off).
        lr: the policy's learning rate. val_max_new_tokens: None = max_new_tokens.
        process_reward_model: a trained `ProcessRewardModel`'s `hf_model/` export (or hub id), one more reward
            source (`rewards.ProcessRewardModelSource`, after `reward_fns`; with `reward_weights`, list its weight
            after theirs). process_reward_aggregation: what it gives: `steps` (each step's P(correct): GRPO
            `supervision: process`) or one reward per completion, the `min` / `last` / `product` of the steps'
            (GRPO outcome, PPO); null = `steps` under supervision=process, else `min`.
        off_policy_steps: 0 (on-policy) or 1: rollout k+1 is sampled on a background thread, by a copy of the
            policy synced before each submit, while the update on rollout k runs (`rollout.overlap`); the update
            uses the sampler's log-probs as π_old of the clipped ratio (one optimizer step stale:
            rollout/staleness). On a CPU give each thread one core (`torch.set_num_threads(1)` on 2 cores; there
            on-policy at 2 intra-op threads measured faster: docs/performance.md). The first batch is only
            sampled (max_steps updates take max_steps + 1 batches). Single-turn rollouts on an unsharded policy (no tools / environment; GRPO: no dynamic sampling, no remax).
        share_prompt_prefix: in every log-prob pass (old, reference, training), rows that repeat a prompt (GRPO's
            G samples) run it through the model once and read its KV cache (`rollout.shared_prompt_logits`: the
            same log-probs and gradients to float rounding; off with gradient checkpointing). False = one forward
            of prompt + completion per row.
    """

    samples_per_prompt = 1  # completions sampled per prompt (GRPO: group_size)
    step_type = RLStep  # what `sample_and_score` builds (an algorithm may add fields)
    loss_metric = "policy/loss"  # the metric name of an optimizer step's total loss
    progress_bar = {"reward": "reward/mean", "kl": "policy/kl"}  # progress-bar name -> logged metric

    def __init__(self, model_name_or_path: str = "tiny", *, max_new_tokens: int = 32, min_new_tokens: int = 0,
                 temperature: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.2, minibatches: int = 1,
                 micro_batch_size: int | None = None, max_tokens_per_micro_batch: int | None = None,
                 max_grad_norm: float | None = 1.0, sample_seed: int | None = None,
                 log_samples_every_n_steps: int = 50, lr: float = 1e-5, val_max_new_tokens: int | None = None,
                 process_reward_model: str | None = None, process_reward_aggregation: str | None = None,
                 off_policy_steps: int = 0, share_prompt_prefix: bool = True, **kwargs: Any):
        weights = kwargs.get("reward_weights")
        if process_reward_model is not None:
            kwargs["reward_weights"] = None  # checked below, once the process reward model is one of the sources
        super().__init__(model_name_or_path, lr=lr, val_max_new_tokens=val_max_new_tokens or max_new_tokens,
                         **kwargs)
        self.process_reward_source = None  # a plain attribute: the PRM is frozen and not part of checkpoints
        if process_reward_model is not None:
            from ..rewards import ProcessRewardModelSource, check_reward_weights

            self.process_reward_source = ProcessRewardModelSource(process_reward_model,
                                                                  aggregate=self.process_reward_aggregation)
            self.reward_funcs.append(self.process_reward_source)
            if weights is not None:  # one per reward_fns entry, then the process reward model's
                if len(weights) != len(self.reward_funcs):
                    raise ValueError(f"reward_weights needs {len(self.reward_funcs)} entries: one per reward_fns "
                                     f"entry and one (last) for process_reward_model")
                self.reward_weights = check_reward_weights(weights, len(self.reward_funcs))
        if sample_seed is None:  # the run's seed decides the sampling: seed_everything 1 != seed_everything 0
            self.hparams.sample_seed = 1234 + int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.decline_watch = DeclineWatch()  # warns when held-out accuracy stays below its start (`on_validation_end`)
        self.automatic_optimization = False
        self.sample_generator: torch.Generator | None = None  # the sampling RNG, see `_generator`
        self._sample_generator_state: Tensor | None = None
        self.update_generator: torch.Generator | None = None  # off_policy_steps: 1, see `_update_generator`
        self._update_generator_state: Tensor | None = None
        self.overlap: OverlappedSampler | None = None  # off_policy_steps: 1, built at the first training_step
        self._restored_pending: dict[str, Any] | None = None  # a checkpoint's rollout sampled ahead

    def hparam_checks(self, hp) -> list[tuple[bool, str]]:
        return super().hparam_checks(hp) + [
            (isinstance(hp.max_new_tokens, int) and hp.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got "
             f"{hp.max_new_tokens!r}"),
            (0 <= hp.min_new_tokens <= hp.max_new_tokens, f"min_new_tokens must be in [0, max_new_tokens="
             f"{hp.max_new_tokens}], got {hp.min_new_tokens}"),
            (0 <= hp.clip_low < 1, f"clip_low must be in [0, 1), got {hp.clip_low}"),
            (hp.clip_high >= 0, f"clip_high must be >= 0, got {hp.clip_high}"),
            (isinstance(hp.minibatches, int) and hp.minibatches >= 1, f"minibatches must be an integer >= 1, got "
             f"{hp.minibatches!r}"),
            (hp.micro_batch_size is None or hp.micro_batch_size >= 1, f"micro_batch_size must be >= 1 or null, got "
             f"{hp.micro_batch_size!r}"),
            (hp.max_tokens_per_micro_batch is None or hp.max_tokens_per_micro_batch >= 1,
             f"max_tokens_per_micro_batch must be >= 1 or null, got {hp.max_tokens_per_micro_batch!r}"),
            (hp.max_grad_norm is None or hp.max_grad_norm > 0, f"max_grad_norm must be > 0 or null, got "
             f"{hp.max_grad_norm}"),
            (hp.sample_seed is None or isinstance(hp.sample_seed, int), f"sample_seed must be an integer or null, got "
             f"{hp.sample_seed!r}"),
            (isinstance(hp.log_samples_every_n_steps, int) and hp.log_samples_every_n_steps >= 0,
             f"log_samples_every_n_steps must be an integer >= 0, got {hp.log_samples_every_n_steps!r}"),
            *_process_reward_checks(hp),
            (hp.off_policy_steps in (0, 1), f"off_policy_steps must be 0 (on-policy) or 1 (sample the next rollout "
             f"during the update), got {hp.off_policy_steps!r}"),
            (hp.off_policy_steps == 0 or not (hp.get("tools") or hp.get("environment")), "off_policy_steps: 1 "
             "samples single-turn rollouts only: the tool / environment loop runs on the main thread (set "
             "off_policy_steps: 0 with tools or environment)"),
        ]

    @property
    def process_reward_aggregation(self) -> str:
        """What `process_reward_model` gives: `process_reward_aggregation`, or by default `steps` under GRPO's
        supervision=process and `min` (one reward per completion) otherwise."""
        return _aggregation(self.hparams)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.process_reward_source is not None:  # a plain attribute: Lightning does not move it
            self.process_reward_source.to(self.trainer.strategy.root_device)

    # ------------------------------------------------------------------------------------------ the loop
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        step = self.overlapped_step(batch) if self.hparams.off_policy_steps else self.sample_and_score(batch)  # 1.
        if step is None:  # off_policy_steps: 1, the first batch: sampling it is all this step does
            return
        t1 = time.perf_counter()
        step.ctx = step.rollout.samples.model_inputs()
        self.old_and_reference(step)  # 2. no-grad passes
        self.compute_step_advantages(step)  # 3. the algorithm
        step.stats = self.update(step)  # 4. optimizer steps
        step.t_train = time.perf_counter() - t1
        self.rollouts += 1
        self.after_update(step)  # 5.
        self.log_step(step)  # 6.

    def sample_and_score(self, batch: dict[str, Any], rollout: Rollout | None = None) -> RLStep:
        """`rollout` (unless given: sampled ahead by `overlapped_step`) then `score_rollout`: the step's rollout
        (with each reward source's values) and rewards."""
        t0 = time.perf_counter()
        rollout = self.rollout(batch) if rollout is None else rollout
        t_gen = time.perf_counter() - t0
        return self.step_type(rollout, self.rollout_rewards(rollout, batch), t_gen)

    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample `samples_per_prompt` completions per prompt; rows i*n .. i*n+n-1 share prompt i."""
        return self.build_rollout(batch, self.rollout_samples(batch, self.engine, self._generator()))

    def rollout_samples(self, batch: dict[str, Any], engine, generator: torch.Generator) -> RolloutBatch:
        """The `RolloutBatch` of `samples_per_prompt` completions per prompt from `engine`: token ids only, so
        that the sampler thread of `overlapped_step` can run it."""
        n = self.samples_per_prompt
        prompt_ids = batch["prompt_ids"].repeat_interleave(n, dim=0)  # [N, P], N = B*n
        prompt_mask = batch["prompt_mask"].repeat_interleave(n, dim=0)  # [N, P]
        return self.generate(prompt_ids, prompt_mask, self.sampling_params(), generator,
                             rows=self.batch_rows(batch, repeat=n), engine=engine)

    def build_rollout(self, batch: dict[str, Any], samples: RolloutBatch) -> Rollout:
        """The `Rollout` of sampled token ids: texts, prompts and dataset columns aligned with the rows."""
        n = self.samples_per_prompt
        completions = decode_completions(self.tokenizer, samples.completion_ids, samples.completion_mask)
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        return Rollout(samples, prompts, completions, self.reward_columns(batch, repeat=n, samples=samples))

    # ------------------------------------------------------------------------------------------ overlap
    def overlapped_step(self, batch: dict[str, Any]) -> RLStep | None:
        """off_policy_steps: 1 (`rollout.overlap`): take the rollout the sampler thread made of the previous batch,
        sync its copy of the policy, hand it `batch`, and return the previous rollout scored (None at the first
        batch, which only starts the sampler). Rewards run here, on the main thread, while the thread samples."""
        sampler = self._overlapped_sampler()
        t0 = time.perf_counter()
        done = sampler.take()  # waits for the thread when the update was faster than the sampling
        wait = time.perf_counter() - t0
        sampler.sync(self.policy)
        sampler.submit(self._sample_ahead, batch, self._generator(), self.optimizer_steps)
        if done is None:
            return None
        step = self.sample_and_score(done["batch"], rollout=self.build_rollout(done["batch"], done["samples"]))
        step.t_gen = wait  # the sampling time the step did not hide
        step.behaviour_logp = done["behaviour_logp"]
        step.metrics["rollout/staleness"] = torch.tensor(float(self.optimizer_steps - done["sampled_at"]))
        step.metrics["perf/sampler_s"] = torch.tensor(done["sampler_s"])
        return step

    def _sample_ahead(self, sampler: OverlappedSampler, batch: dict[str, Any], generator: torch.Generator,
                      sampled_at: int) -> dict[str, Any]:
        """The sampler thread's job: the batch's samples and their log-probs under the weights that sampled them."""
        t0 = time.perf_counter()
        samples = self.rollout_samples(batch, sampler.engine, generator)
        behaviour_logp = self.logprobs_no_grad(sampler.model, samples.model_inputs())
        return {"batch": batch, "samples": samples, "behaviour_logp": behaviour_logp, "sampled_at": sampled_at,
                "sampler_s": time.perf_counter() - t0}

    def _overlapped_sampler(self) -> OverlappedSampler:
        if self.overlap is None:
            from ..infra import parallel

            if not type(self).rollout.__module__.startswith("rlhf_lightning."):
                raise ValueError(f"off_policy_steps: 1 samples through rollout_samples on a background thread, so "
                                 f"{type(self).__name__}.rollout would be skipped: override rollout_samples / "
                                 f"build_rollout instead, or set off_policy_steps: 0")
            if parallel.is_sharded(self.policy):
                raise ValueError("off_policy_steps: 1 needs an unsharded policy (its sampler thread keeps a full "
                                 "copy of the weights): use it with DDP or one device, not FSDP")
            self.overlap = OverlappedSampler(self.policy, self._engine_cls, self.device.type)
            if self._restored_pending is not None:
                self.overlap.restore(self._restored_pending)
                self._restored_pending = None
        return self.overlap

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if self.overlap is not None:  # the batch sampled at the last step is never trained
            self.overlap.close()
            self.overlap = None

    def rollout_rewards(self, rollout: Rollout, batch: dict[str, Any]):
        """`score_rollout` of a rollout (dataset columns aligned with its rows, its `samples` for reward models):
        the rewards, with each source's values kept on the rollout (`per_source`, logged as reward/<name>)."""
        scored = self.score_rollout(rollout.prompts, rollout.completions,
                                    {"columns": rollout.columns, "samples": rollout.samples, **batch})
        rollout.per_source = scored.per_source
        return scored.rewards

    def old_and_reference(self, step: RLStep) -> None:
        """π_old where the policy moves before a row is used (`needs_old_logprobs`), π_ref where the KL needs it."""
        if step.behaviour_logp is not None:  # off_policy_steps: 1: the sampler's weights are π_old
            step.old_logp = step.behaviour_logp
        elif self.needs_old_logprobs():
            step.old_logp = self.logprobs_no_grad(self.policy, step.ctx)
        step.ref_logp = self.reference_logprobs(step.ctx)

    def needs_old_logprobs(self) -> bool:
        """Whether π_old needs its own pass: the policy changes before a row is used (several epochs or
        minibatches). Otherwise the update's log-probs, detached, are exactly π_old (ratio 1)."""
        return self.epochs > 1 or self.hparams.minibatches > 1

    def compute_step_advantages(self, step: RLStep) -> None:
        raise NotImplementedError

    def after_update(self, step: RLStep) -> None:
        """After the step's last optimizer step (PPO: the KL controller)."""

    # ------------------------------------------------------------------------------------------ updates
    @property
    def epochs(self) -> int:
        """Passes over each rollout (GRPO: num_iterations μ, PPO: ppo_epochs)."""
        return 1

    def updates_per_batch(self) -> tuple[int, int]:
        """epochs x minibatches steps of each optimizer per rollout (see `schedule_horizon`)."""
        return self.epochs * self.hparams.minibatches, len(self.optimizer_names)

    def update(self, step: RLStep) -> dict[str, float]:
        """`epochs` x `minibatches` optimizer steps over the rollout; returns the metrics of the updates."""
        N = step.loss_mask.shape[0]
        self.check_minibatches(N // self.samples_per_prompt)
        opts, scheds = _as_list(self.optimizers()), _as_list(self.lr_schedulers())
        sums: dict[str, float] = {}
        norms: dict[str, list[float]] = {}
        step_losses: list[float] = []
        count = 0
        for module in self.trained_modules():
            module.train()
        for _ in range(self.epochs):
            for rows in self.minibatch_rows(N):
                normalizer = self._global_count(self.loss_normalizer(step.loss_mask[rows]))
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                step_loss = 0.0  # micro-batch losses add up to the step's loss (global normaliser)
                for idx in self._micro_batches(N, rows, step.ctx):
                    loss, stats = self.micro_batch_loss(step, idx, normalizer)
                    # DDP averages gradients over ranks; the normaliser is already global, so undo the mean
                    self.manual_backward(loss * self.trainer.world_size)
                    step_loss += float(loss.detach())
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                step_losses.append(step_loss)
                for (name, params), opt, sched in zip(self.optimizer_parameters(), opts, scheds):
                    # the norm before clipping: the number that tells whether clipping is active
                    norms.setdefault(name, []).append(float(grad_norm(params)))
                    if self.hparams.max_grad_norm is not None:
                        self.clip_gradients(opt, gradient_clip_val=self.hparams.max_grad_norm,
                                            gradient_clip_algorithm="norm")
                    opt.step()
                    sched.step()
                self.policy_stepped()
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out.update({name: sum(v) / len(v) for name, v in norms.items()})
        out[self.loss_metric] = sum(step_losses) / len(step_losses)
        return out

    def minibatch_rows(self, n_rows: int) -> list[Tensor]:
        """One pass's minibatches: row indices, exactly `minibatches` of them (sizes differ by at most one unit)."""
        units = torch.arange(n_rows // self.samples_per_prompt, device=self.device)
        n = self.samples_per_prompt
        return [(u.unsqueeze(-1) * n + torch.arange(n, device=self.device)).flatten()
                for u in units.tensor_split(self.hparams.minibatches)]

    def loss_normalizer(self, mask: Tensor) -> Tensor:
        """The count a minibatch's loss is divided by (summed over ranks by the caller): its tokens."""
        return mask.sum()

    def micro_batch_loss(self, step: RLStep, idx: Tensor, normalizer: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Rows `idx`' share of the optimizer step's loss, and its metrics (full names: policy/..., value/...)."""
        raise NotImplementedError

    def trained_modules(self) -> list[torch.nn.Module]:
        """The modules put in train mode for the updates."""
        return [self.policy]

    def optimizer_parameters(self) -> list[tuple[str, list[torch.nn.Parameter]]]:
        """(grad-norm metric, parameters) of each optimizer, in `configure_optimizers` order."""
        return [("policy/grad_norm", self.trainable_parameters())]

    def configure_optimizers(self):
        opt, sched = self.build_optimizer(self.trainable_parameters(), self.hparams.lr)
        return [opt], [sched]

    # ------------------------------------------------------------------------------------------ passes
    @torch.no_grad()
    def logprobs_no_grad(self, model: torch.nn.Module, ctx: dict[str, Tensor]) -> Tensor:
        """log π(completion) [N, T] of `model` at the sampling temperature, in eval mode (dropout off, like the
        sampling pass), micro-batch by micro-batch."""
        was_training = model.training
        model.eval()
        N = ctx["completion_ids"].shape[0]
        out = None
        for idx in self._micro_batches(N, ctx=ctx):  # token-budget micro-batches come in length order
            logp = completion_logprobs(model, **{k: v[idx] for k, v in ctx.items()},
                                       temperature=self.hparams.temperature,
                                       share_prompts=self.hparams.share_prompt_prefix)
            out = logp.new_zeros(N, logp.size(1)) if out is None else out  # float32, whatever the default dtype
            out[idx] = logp
        model.train(was_training)
        return out

    def reference_logprobs(self, ctx: dict[str, Tensor]) -> Tensor | None:
        """log π_ref [N, T] (None without a reference; with LoRA the policy with its adapter disabled)."""
        with self.reference_policy() as ref:
            return self.logprobs_no_grad(ref, ctx) if ref is not None else None

    # ------------------------------------------------------------------------------------------ helpers
    def _make_reference(self) -> torch.nn.Module | None:
        """A frozen copy of the initial policy: π_ref of the KL penalty (run in eval mode by the no-grad passes).

        With LoRA there is no copy: the base model with the adapter disabled is exactly the initial policy.
        """
        if self.lora_config is not None:
            self._lora_reference = True
            return None
        ref = copy.deepcopy(self.policy)
        ref.requires_grad_(False)
        return ref


    def on_validation_end(self) -> None:
        """The decline guard (`infra.decline`): `val/accuracy` (else `val/reward`) more than 0.05 below its value at
        the start (the sanity check, else the first validation) for 2 validations in a row -> one warning naming
        the likely causes. It only warns: the run goes on."""
        metrics = self.trainer.callback_metrics
        key = next((k for k in ("val/accuracy", "val/reward") if k in metrics), None)
        if key is None:
            return
        got = self.decline_watch.update(float(metrics[key]), start=self.trainer.sanity_checking)
        if got is not None:
            hp = self.hparams
            kl = f"beta={hp.beta}" if "beta" in hp else f"kl_coef={hp.get('kl_coef')}"
            learned = [getattr(f, "__name__", "?") for f in self.reward_funcs if getattr(f, "learned", False)]
            hacked = (f"; or the learned reward ({', '.join(learned)}) is being exploited: compare val/reward with "
                      f"the verifier's val/accuracy") if learned else ""
            rank_zero_warn(f"{key} fell from {got[0]:.3f} at the start to {', '.join(f'{v:.3f}' for v in got[1])} "
                           f"in the last {len(got[1])} validations: the policy is getting worse than it began. "
                           f"Likely causes: the learning rate (lr={hp.lr}, lr_schedule={hp.get('lr_schedule')}), a "
                           f"KL too weak to hold it ({kl}){hacked}.")

    def _generator(self) -> torch.Generator:
        """The sampling RNG stream: its own generator, seeded per rank (`sample_seed`), saved in checkpoints."""
        if self.sample_generator is None or self.sample_generator.device != self.device:
            self.sample_generator = self._seeded(0, self._sample_generator_state)
            self._sample_generator_state = None
        return self.sample_generator

    def _update_generator(self) -> torch.Generator:
        """The RNG of what the main thread draws besides the rollouts (PPO's minibatch shuffles, MC step labels):
        the sampling stream when on-policy; with off_policy_steps: 1 the sampler thread owns that stream, so these
        draw from a second one (saved in checkpoints too) and neither stream depends on the threads' timing."""
        if not self.hparams.off_policy_steps:
            return self._generator()
        if self.update_generator is None or self.update_generator.device != self.device:
            self.update_generator = self._seeded(500, self._update_generator_state)
            self._update_generator_state = None
        return self.update_generator

    def _seeded(self, offset: int, state: Tensor | None) -> torch.Generator:
        """A generator on this device seeded `sample_seed` + 1000 x rank + offset, or set to a saved `state`."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.hparams.sample_seed + 1000 * self.global_rank + offset)
        if state is not None:
            gen.set_state(state)
        return gen

    def _micro_batches(self, n: int, rows: Tensor | None = None, ctx: dict[str, Tensor] | None = None
                       ) -> list[Tensor]:
        """Row indices split into chunks of `micro_batch_size` (None = one chunk), or with
        `max_tokens_per_micro_batch` (and the rollout's `ctx` to read lengths from) `token_budget_chunks`."""
        rows = torch.arange(n, device=self.device) if rows is None else rows
        size = self.hparams.micro_batch_size or len(rows)
        budget = self.hparams.get("max_tokens_per_micro_batch")
        if budget is None or ctx is None:
            return list(rows.split(size))
        return token_budget_chunks(rows, ctx["prompt_mask"].sum(-1)[rows], ctx["completion_mask"].sum(-1)[rows],
                                   budget, size)

    def _global_count(self, value: Tensor) -> float:
        """Sum of a count over all ranks (the loss normaliser of an optimizer step)."""
        return float(self._global_sum(value.float()))

    def _global_sum(self, value: Tensor) -> Tensor:
        """`value` summed over all ranks (a copy, on value's device and dtype; itself with one process)."""
        value = value.detach().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            summed = value.to(self.device)  # NCCL reduces device tensors only
            torch.distributed.all_reduce(summed)
            value = summed.to(value.device)
        return value

    def policy_stepped(self) -> None:
        """After each optimizer step: count it, and hand the updated policy to the engine (`sync_weights`)."""
        self.optimizer_steps += 1
        self.engine.sync_weights(self.policy)

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        pending = self.overlap.wait() if self.overlap is not None else None  # before the generator state is read
        if pending is not None:  # the rollout sampled ahead: resuming without it would change the run
            samples = pending["samples"]
            checkpoint["off_policy_pending"] = {**pending, "samples": {f.name: getattr(samples, f.name)
                                                                        for f in fields(samples)}}
        for key, gen in (("sample_generator_states", self.sample_generator),
                         ("update_generator_states", self.update_generator)):
            states = self._generator_states(gen)
            if any(state is not None for state in states):
                checkpoint[key] = states
        checkpoint["decline_watch"] = self.decline_watch.state_dict()  # a resumed run keeps the original start

    def _generator_states(self, gen: torch.Generator | None) -> list[Tensor | None]:
        """Every rank's state of `gen` (a sampling generator), indexed by rank. Lightning calls `on_save_checkpoint`
        on all ranks but writes rank 0's dict: saving rank 0's state alone would give every rank one stream after
        a resume."""
        state = gen.get_state() if gen is not None else None
        dist = torch.distributed
        if self._trainer is None or self.trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [state]
        states: list[Tensor | None] = [None] * self.trainer.world_size
        dist.all_gather_object(states, state)
        return states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get("sample_generator_states")
        if states is None and "sample_generator_state" in checkpoint:  # checkpoints written before per-rank states
            states = [checkpoint["sample_generator_state"]]
        # a rank the checkpoint has no state for (more ranks than when it was saved) starts its seeded stream
        self._sample_generator_state = states[self.global_rank] if states and self.global_rank < len(states) else None
        self.sample_generator = None  # rebuilt from the saved state on the next _generator() call
        states = checkpoint.get("update_generator_states")
        self._update_generator_state = states[self.global_rank] if states and self.global_rank < len(states) else None
        self.update_generator = None
        if "decline_watch" in checkpoint:
            self.decline_watch.load_state_dict(checkpoint["decline_watch"])
        pending = checkpoint.get("off_policy_pending")
        if pending is not None:
            if not self.hparams.off_policy_steps:
                raise ValueError("this checkpoint was written with off_policy_steps: 1 and holds the rollout sampled "
                                 "ahead; resume it with off_policy_steps: 1 (or it would not resume exactly)")
            self._restored_pending = {**pending, "samples": RolloutBatch(**pending["samples"])}


def _aggregation(hp) -> str:
    default = "steps" if hp.get("supervision") == "process" else "min"
    return hp.get("process_reward_aggregation") or default


def _process_reward_checks(hp) -> list[tuple[bool, str]]:
    """(holds, one-line message) for `process_reward_model` / `process_reward_aggregation` (`hparam_checks`)."""
    from ..rewards.process_model import AGGREGATIONS

    prm, given, agg = hp.process_reward_model, hp.process_reward_aggregation, _aggregation(hp)
    process = hp.get("supervision") == "process"
    return [
        (prm is None or (isinstance(prm, (str, os.PathLike)) and str(prm)), f"process_reward_model must be a "
         f"directory or hub id, got {prm!r}"),
        (given is None or given in AGGREGATIONS, f"process_reward_aggregation must be {'|'.join(AGGREGATIONS)} or "
         f"null, got {given!r}"),
        (given is None or prm is not None, "process_reward_aggregation applies to model.process_reward_model, which "
         "is not set (it would be silently ignored)"),
        (prm is None or agg != "steps" or process, "process_reward_aggregation=steps gives one reward per step, "
         "which only GRPO's supervision: process uses; for one reward per completion use min|last|product"),
        (prm is None or not process or agg == "steps", f"supervision=process needs step rewards: "
         f"process_reward_aggregation must be steps (or null), got {agg!r}"),
    ]


def token_budget_chunks(rows: Tensor, prompt_lens: Tensor, completion_lens: Tensor, budget: int,
                        max_rows: int) -> list[Tensor]:
    """`rows` [n] in micro-batches of similar length: sorted longest first, a row joins the current micro-batch
    while (its rows + 1) x (longest prompt + longest completion among them) <= `budget` and it has fewer than
    `max_rows` rows; a row longer than the budget goes alone. The cost of a micro-batch's forward is about that
    product once its padding columns are dropped."""
    order = torch.argsort(completion_lens + prompt_lens, descending=True, stable=True).tolist()
    p, c = prompt_lens.tolist(), completion_lens.tolist()
    chunks: list[list[int]] = []
    width_p = width_c = 0
    for j in order:
        wp, wc = max(width_p, p[j]), max(width_c, c[j])
        if chunks and len(chunks[-1]) < max_rows and (len(chunks[-1]) + 1) * (wp + wc) <= budget:
            chunks[-1].append(j)
            width_p, width_c = wp, wc
        else:
            chunks.append([j])
            width_p, width_c = p[j], c[j]
    return [rows[torch.tensor(chunk, device=rows.device)] for chunk in chunks]


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]
