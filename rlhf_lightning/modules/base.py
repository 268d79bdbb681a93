"""What every policy-training module shares: loading, reward functions, greedy validation, optimizers, export.

Subclasses (SFT, GRPO, PPO) add their own `training_step`. Counters:
- `self.rollouts` / `self.optimizer_steps` are explicit (Lightning's `global_step` counts every optimizer's
  steps in manual optimization, so it is not the same quantity across modules). TensorBoard's x-axis is
  `trainer.global_step` for SFT and "rollout steps" for RL modules (see `log_step`).
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..infra import parallel
from ..infra.checkpoints import collect_rng_states, restore_rng_states
from ..infra.cpu_allocator import keep_freed_memory
from ..infra.nonfinite import NonFiniteGuard, check_finite_model
from ..models import load_causal_lm, model_source, save_export
from ..tokenizer import load_tokenizer


class PolicyModuleBase(L.LightningModule):
    """Base for modules that train a causal-LM policy. Not used directly.

    Shared init arguments (subclasses forward them):
        model_name_or_path: a preset (`tiny`, `small`, `medium`), a `save_pretrained` directory, or a hub id.
        tokenizer_name_or_path: defaults to `model_name_or_path` (presets use the built-in char tokenizer).
        reward_fns: import paths of reward functions `f(prompts, completions, **columns) -> list[float|None]`
            (Python callers may pass callables). None = the built-in task's verifiers when the data is a task.
        reward_weights: one weight per reward function (default 1 each).
        lr, weight_decay, betas, warmup_steps, lr_schedule (`constant|cosine|linear`), min_lr_ratio: AdamW and
            its schedule; the schedule's horizon is the trainer's estimated optimizer steps.
        torch_dtype: dtype of the weights (`float32`, `bfloat16`); precision is the Trainer's business.
        trust_remote_code: off unless you trust the model repository.
        val_max_new_tokens: token budget of the greedy validation completions.
        seed: initialisation seed for presets.
        lora: train a LoRA adapter instead of the full policy (peft): `{r, alpha, dropout, target_modules}`
            (defaults 8, 16, 0.0, all linear layers). The reference policy is then the base model with the
            adapter disabled, not a second copy. `lora_export`: `merged` (a plain model in `hf_model/`) or
            `adapter` (only the adapter, reloaded with `peft.PeftModel.from_pretrained(base, dir)`).
        gradient_checkpointing: recompute each decoder layer's activations in backward instead of storing them
            (less activation memory, one more forward per layer in backward); works under every strategy.
        rollout_engine: the registered `rollout.RolloutEngine` that samples (`rollout.register_engine`): `auto`
            (the lean `rollout.fast` decoder where the policy is a plain HF Llama/Qwen2/Mistral, else the model's
            own forward), `hf` (always the model's forward) or `fast` (fail with the reason if it cannot apply).
        nonfinite_rewards: a reward that is ±inf or overflows float32 (1e300): `error` (default: the run stops with
            one line naming the reward function, row and value, after writing error.ckpt) or `missing` (it counts
            as "no reward", like None, and is counted in `reward/nonfinite_count`).
        max_nonfinite_steps: optimizer steps with a NaN/inf loss or gradient are skipped (the weights stay as
            they were; counted in `policy/skipped_steps`); this many in a row stop the run with a message.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny",
        tokenizer_name_or_path: str | None = None,
        reward_fns: Sequence[Any] | None = None,
        reward_weights: Sequence[float] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
        torch_dtype: str | None = None,
        trust_remote_code: bool = False,
        val_max_new_tokens: int = 32,
        seed: int = 0,
        *,
        lora: dict[str, Any] | None = None,
        lora_export: str = "merged",
        gradient_checkpointing: bool = False,
        rollout_engine: str = "auto",
        nonfinite_rewards: str = "error",
        max_nonfinite_steps: int = 3,
    ):
        # subclasses call save_hyperparameters() before this (to validate first); LightningModule.__init__ resets
        # the flag it set, and without it Lightning never writes the hyperparameters to the logger (HParams tab)
        log_hyperparams = self.__dict__.get("_log_hyperparams", False)
        super().__init__()
        self._log_hyperparams = log_hyperparams
        if not (isinstance(lr, (int, float)) and 0 < lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be constant|cosine|linear, got {lr_schedule!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if val_max_new_tokens < 1:
            raise ValueError(f"val_max_new_tokens must be >= 1, got {val_max_new_tokens}")
        from ..rewards import NONFINITE_MODES, check_reward_weights, resolve_reward_fn

        if nonfinite_rewards not in NONFINITE_MODES:
            raise ValueError(f"nonfinite_rewards must be {'|'.join(NONFINITE_MODES)}, got {nonfinite_rewards!r}")
        self.nonfinite_rewards = nonfinite_rewards
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps)
        self._reward_stats: dict[str, int] = {}  # the last scoring's counts (non-finite rewards made missing)
        self.reward_funcs: list[Callable] = [resolve_reward_fn(f) for f in (reward_fns or [])]
        if reward_fns and "reward_fns" in self.hparams:
            # checkpoints store import paths, not function objects (weights_only loading refuses pickled code)
            self.hparams["reward_fns"] = [f if isinstance(f, str) else _import_path(f) for f in reward_fns]
        self.reward_weights = check_reward_weights(reward_weights, len(self.reward_funcs))
        model_source(model_name_or_path)  # a missing model path is named as such, not as the tokenizer's
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                                        trust_remote_code=trust_remote_code)
        self.policy = load_causal_lm(model_name_or_path, self.tokenizer, torch_dtype=torch_dtype,
                                     trust_remote_code=trust_remote_code, seed=seed)
        self.policy.train()  # from_pretrained returns eval mode; sampling / no-grad passes switch to eval themselves
        from ..models import check_lora_export, enable_gradient_checkpointing, lora_config

        self.lora_config = lora_config(lora) if lora is not None else None  # applied by `apply_lora`
        self.lora_export = check_lora_export(lora_export)
        self._lora_reference = False  # True: π_ref is the policy with its adapter disabled
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        from ..rollout import get_engine

        self.rollout_engine = rollout_engine
        self._engine_cls = get_engine(rollout_engine, setting="rollout_engine")  # an unknown name fails here
        self._engine = None  # built on first use, on the policy as it is then (after LoRA / sharding)
        self.val_max_new_tokens = val_max_new_tokens
        self.optimizer_steps = 0
        self.rollouts = 0
        self.sample_generator: torch.Generator | None = None  # RL modules' sampling RNG, see _generator
        self._sample_generator_state: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ trainer
    @property
    def trainer(self) -> L.Trainer:
        return L.LightningModule.trainer.fget(self)

    @trainer.setter
    def trainer(self, trainer: L.Trainer | None) -> None:
        # Lightning attaches the trainer at the start of fit, before it checks its own configuration: the one
        # place where a Trainer flag this module cannot honour is refused with the module's own setting named
        if trainer is not None and not self.automatic_optimization:
            check_manual_optimization_flags(self, trainer)
        L.LightningModule.trainer.fset(self, trainer)

    # ------------------------------------------------------------------------------------------ rewards
    def setup(self, stage: str) -> None:
        from ..data import PreferenceDataModule

        if isinstance(getattr(self.trainer, "datamodule", None), PreferenceDataModule):
            raise ValueError(f"{type(self).__name__} trains on prompts, but the data is a PreferenceDataModule (pairs "
                             "for RewardModel); use data: rlhf_lightning.PromptDataModule")
        parallel.check_strategy(self, self.trainer.strategy)
        keep_freed_memory(self.trainer.strategy.root_device)  # CPU: reuse activation memory step to step
        batch_size = getattr(getattr(getattr(self.trainer, "datamodule", None), "hparams", None), "batch_size", None)
        if stage == "fit" and "minibatches" in self.hparams and isinstance(batch_size, int):
            self.check_minibatches(batch_size)  # the data's batch size is known: refuse before the first step
        if not self.reward_funcs:
            task = self.data_task()
            if task is not None:
                self.reward_funcs = list(self.default_reward_fns(task))
                if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
                    self.reward_weights = None
        self._check_reward_signatures()

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
        for fn in self.reward_funcs:
            try:
                check_signature(fn, columns)
            except RewardFunctionError as err:
                raise ConfigError(str(err)) from err

    def data_task(self):
        """The datamodule's built-in task (its verifiers), or None."""
        return getattr(getattr(self._trainer, "datamodule", None), "task", None)

    minibatch_unit = "completions"  # what a rollout's minibatches split (GRPO: whole groups)

    def check_minibatches(self, units: int) -> None:
        """Refuse `minibatches` larger than the `units` of a rollout (one per prompt of data.batch_size): some
        minibatch would be empty and the run would quietly take fewer optimizer steps than configured. (Fewer
        that do not divide evenly are fine: the minibatches then differ in size by at most one unit.)"""
        mb = self.hparams.minibatches
        if units < mb:
            raise ValueError(f"minibatches={mb} is more than the {units} {self.minibatch_unit} of a rollout "
                             f"(data.batch_size={units} per rank); raise data.batch_size or lower minibatches")

    def default_reward_fns(self, task) -> Sequence[Callable]:
        """Reward functions used when none are configured and the data is a built-in task."""
        return task.reward_fns

    @staticmethod
    def reward_columns(batch: dict[str, Any], repeat: int = 1) -> dict[str, list]:
        """The batch's extra dataset columns, each repeated `repeat` times per row (aligned with completions)."""
        skip = {"prompt_ids", "prompt_mask", "prompts", "input_ids", "attention_mask", "labels"}
        return {k: [v for v in vals for _ in range(repeat)] for k, vals in batch.items()
                if k not in skip and isinstance(vals, list)}

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

    # ------------------------------------------------------------------------------------------ logging
    def log_step_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Log a dict of scalars once per rollout, reduced across ranks in ONE collective (`reduce_step_metrics`).

        `self.log_dict` costs a few ms per key (result collections, per-key syncs); an RL step logs ~30 keys.
        Keys ending in `_max` are max-reduced, the rest averaged. The step is Lightning's batch counter, the
        same x-axis Lightning uses for `val/` metrics, so for every RL module the x-axis is the rollout index.
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
            self.logger.log_metrics(out, step=self.trainer.fit_loop.epoch_loop._batches_that_stepped)
        return out

    def log_sample_table(self, prompts: list[str], completions: list[str], rewards: torch.Tensor,
                         advantages: torch.Tensor, max_rows: int = 8) -> None:
        """A markdown table of sample completions in TensorBoard's Text tab (rank 0, TensorBoard loggers)."""
        experiment = getattr(self.logger, "experiment", None) if self.trainer.global_rank == 0 else None
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        adv = advantages if advantages.dim() == 1 else advantages[:, 0]  # process supervision: first token's

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", "⏎")[:200]

        rows = ["| prompt | completion | reward | advantage |", "| --- | --- | --- | --- |"]
        for i in range(min(max_rows, len(completions))):
            rows.append(f"| {cell(prompts[i])} | {cell(completions[i])} | {float(rewards[i]):.3f} | "
                        f"{float(adv[i]):.3f} |")
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        experiment.add_text("samples", "\n".join(rows), global_step=step)

    def per_function_reward_metrics(self, per_source: dict[str, torch.Tensor]) -> dict[str, Any]:
        """`reward/<function name>` and `reward/<function name>_std`: each reward function's mean and std over
        the rows that got a reward (unweighted, so a hacked component shows even when its weight is small)."""
        out: dict[str, Any] = {}
        for name, row in per_source.items():
            ok = ~torch.isnan(row)
            out[f"reward/{name}"] = row[ok].mean() if ok.any() else torch.zeros(())
            out[f"reward/{name}_std"] = row[ok].std() if ok.sum() > 1 else torch.zeros(())
        return out

    def log_histograms(self, values: dict[str, torch.Tensor]) -> None:
        """Histograms (TensorBoard's Histograms/Distributions tabs) of this rank's values, rank 0 only.

        Not reduced across ranks: gathering whole reward/advantage vectors every N steps would cost a collective
        of variable size for a picture that one rank's sample already shows. NaN entries are dropped.
        """
        experiment = getattr(self.logger, "experiment", None) if self.trainer.global_rank == 0 else None
        if experiment is None or not hasattr(experiment, "add_histogram"):
            return
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        for tag, x in values.items():
            x = x.detach().float().flatten().cpu()
            x = x[~torch.isnan(x)]
            if x.numel():
                experiment.add_histogram(tag, x, global_step=step)

    def should_log_samples(self) -> bool:
        """True on the rollouts that log the sample table and histograms: the 1st, then every
        `log_samples_every_n_steps` (0 = never)."""
        every = self.hparams.get("log_samples_every_n_steps", 0)
        return bool(every) and (self.rollouts - 1) % every == 0

    def on_train_end(self) -> None:
        """The run's final metric in TensorBoard's HParams tab: `hp_metric` = the last rollout's `reward/mean`.

        Lightning's TensorBoardLogger writes the hyperparameters with `hp_metric` (-1) when fit starts; the
        HParams tab shows a metric's last value, so logging the final reward under that key completes the row.
        With `default_hp_metric=False` nothing was written, so the hyperparameters are written here with it.
        """
        from lightning.pytorch.loggers import TensorBoardLogger

        final = self.trainer.callback_metrics.get("reward/mean")
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger) or final is None:
                continue
            if logger._default_hp_metric:
                logger.log_metrics({"hp_metric": float(final)}, step=step)
            else:
                logger.log_hyperparams(self.hparams, metrics={"hp_metric": float(final)}, step=step)

    # ------------------------------------------------------------------------------------ LoRA, scaling
    def apply_lora(self) -> None:
        """Wrap the policy in a peft LoRA adapter (when `lora` is set). Subclasses call it once everything that
        copies the plain policy (PPO's critic) is built; only the adapter stays trainable."""
        if self.lora_config is None:
            return
        from ..models import add_lora

        self.policy = add_lora(self.policy, self.lora_config, self.hparams.seed)

    @contextmanager
    def reference_policy(self) -> Iterator[torch.nn.Module | None]:
        """π_ref for a no-grad pass: the frozen copy, the policy with its LoRA adapter disabled, or None."""
        if self._lora_reference:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield getattr(self, "ref_policy", None)

    def fsdp_units(self) -> list[tuple[torch.nn.Module, bool]]:
        """(module, shard its decoder layers) pairs that FSDP2 shards. The frozen reference is sharded like the
        policy: it is as large, and its forward passes run on all ranks in lockstep with the policy's."""
        units = [(self.policy, True)]
        if getattr(self, "ref_policy", None) is not None:
            units.append((self.ref_policy, True))
        return units

    def configure_model(self) -> None:
        """Under a ModelParallelStrategy: FSDP2-shard every unit of `fsdp_units` (Lightning calls this hook before
        `configure_optimizers`, so the optimizers are built over the sharded parameters). Other strategies: no-op."""
        if not parallel.is_fsdp2(self._trainer) or parallel.is_sharded(self.policy):
            return
        mesh = self.device_mesh["data_parallel"]
        for module, layered in self.fsdp_units():
            parallel.shard_module(module, mesh, self.trainer.precision, layered=layered,
                                  device=self.trainer.strategy.root_device)
        parallel.check_all_trainable_sharded(self)

    def sampling_context(self):
        """Wrap every sampling loop on the policy (see `parallel.sampling_context`: ranks stop at different steps)."""
        return parallel.sampling_context(self.policy)

    # ------------------------------------------------------------------------------------ rollout engine
    @property
    def engine(self):
        """The `rollout_engine` (a `rollout.RolloutEngine`) on the policy, built at the first sampling call."""
        if self._engine is None:
            self._engine = self._engine_cls(self.policy)
        return self._engine

    def sampling_params(self, greedy: bool = False, max_new_tokens: int | None = None):
        """The `rollout.SamplingParams` of the hyperparameters (top_p / top_k where the module has them), or
        greedy decoding of `max_new_tokens` (validation, baselines)."""
        from ..rollout import SamplingParams

        hp, ids = self.hparams, dict(eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        if greedy:
            return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, **ids)
        return SamplingParams(max_new_tokens=hp.max_new_tokens, min_new_tokens=hp.min_new_tokens,
                              temperature=hp.temperature, top_p=hp.get("top_p", 1.0), top_k=hp.get("top_k", 0), **ids)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params,
                 generator: torch.Generator | None = None):
        """A `RolloutBatch` from the engine, inside `sampling_context` (every sampling call goes through here)."""
        with self.sampling_context():
            return self.engine.generate(prompt_ids, prompt_mask, params, generator)

    def policy_stepped(self) -> None:
        """After each optimizer step: count it, and hand the updated policy to the engine (`sync_weights`)."""
        self.optimizer_steps += 1
        self.engine.sync_weights(self.policy)

    # ------------------------------------------------------------------------------------ RL machinery
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

    def _generator(self) -> torch.Generator:
        """The sampling RNG stream: its own generator, seeded per rank (`sample_seed`), saved in checkpoints."""
        if self.sample_generator is None or self.sample_generator.device != self.device:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.hparams.sample_seed + 1000 * self.global_rank)
            if self._sample_generator_state is not None:
                gen.set_state(self._sample_generator_state)
                self._sample_generator_state = None
            self.sample_generator = gen
        return self.sample_generator

    def _micro_batches(self, n: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Row indices split into chunks of `micro_batch_size` (None = one chunk)."""
        rows = torch.arange(n, device=self.device) if rows is None else rows
        size = self.hparams.micro_batch_size or len(rows)
        return list(rows.split(size))

    def _global_count(self, value: torch.Tensor) -> float:
        """Sum of a count over all ranks (the loss normaliser of an optimizer step)."""
        return float(self._global_sum(value.float()))

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over all ranks (a copy, on value's device and dtype; itself with one process)."""
        value = value.detach().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            summed = value.to(self.device)  # NCCL reduces device tensors only
            torch.distributed.all_reduce(summed)
            value = summed.to(value.device)
        return value

    # --------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def greedy_samples(self, batch: dict[str, Any], max_new_tokens: int | None = None):
        """Greedy `RolloutBatch` of the batch's prompts (token ids and masks)."""
        params = self.sampling_params(greedy=True, max_new_tokens=max_new_tokens or self.val_max_new_tokens)
        return self.generate(batch["prompt_ids"], batch["prompt_mask"], params)

    def greedy_completions(self, batch: dict[str, Any], max_new_tokens: int | None = None) -> list[str]:
        from ..rollout import decode_completions

        out = self.greedy_samples(batch, max_new_tokens)
        return decode_completions(self.tokenizer, out.completion_ids, out.completion_mask)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy completions on held-out prompts: `val/reward`, and `val/accuracy` for 0/1 verifiers."""
        if self.has_reward():
            self.log_reward_fn_metrics(batch, self.greedy_samples(batch))

    def log_reward_fn_metrics(self, batch: dict[str, Any], samples) -> None:
        """`val/reward`: the mean reward of the greedy `samples` through `score_rollout` (the training path, so a
        subclass's `compute_rewards` is what validation measures; process supervision: the mean step reward;
        'no reward' counts 0). `val/accuracy`: the mean of `validation_verifier` when its values are all 0/1."""
        from ..rollout import decode_completions

        completions = decode_completions(self.tokenizer, samples.completion_ids, samples.completion_mask)
        columns = self.reward_columns(batch)
        scored = self.score_rollout(batch["prompts"], completions, {**batch, "columns": columns, "samples": samples})
        rewards = scored.rewards
        B = len(completions)
        self.log("val/reward", torch.nan_to_num(self.outcome_rewards(rewards)).mean(), batch_size=B, sync_dist=True,
                 prog_bar=True)
        verified = self._verifier_values(batch["prompts"], completions, columns, scored.per_source)
        if verified is not None and bool(((verified == 0) | (verified == 1)).all()):
            self.log("val/accuracy", verified.mean(), batch_size=B, sync_dist=True, prog_bar=True)

    def validation_verifier(self) -> Callable | None:
        """The reward function whose 0/1 values are `val/accuracy`: the first reward function (for a built-in
        task with no reward_fns configured, the task's verifier)."""
        return self.reward_funcs[0] if self.reward_funcs else None

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

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        completions = self.greedy_completions(batch)
        return [{"prompt": p, "completion": c} for p, c in zip(batch["prompts"], completions)]

    # ------------------------------------------------------------------------------------------ optimizer
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def build_optimizer(self, params, lr: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        hp = self.hparams
        params = list(params)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas),
                                fused=_can_fuse_adamw(params, getattr(self._trainer, "precision_plugin", None)))
        total = self.schedule_horizon()
        warmup, kind, floor = hp.warmup_steps, hp.lr_schedule, hp.min_lr_ratio
        if warmup and total and warmup >= total:
            rank_zero_warn(f"warmup_steps={warmup} is not below the {total} optimizer steps this run takes: the lr "
                           f"never leaves warm-up (it never reaches lr={lr}); lower model.warmup_steps")

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if kind == "constant" or total <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if kind == "linear":
                return floor + (1 - floor) * (1 - progress)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def schedule_horizon(self) -> int:
        """Optimizer steps (of each optimizer) the lr schedule spans: the steps the run will actually take, the
        smaller of what `max_epochs` and `max_steps` allow, so the schedule ends at its floor when the run does.
        0 when unknown or unbounded (the lr stays constant after warm-up)."""
        trainer = self.trainer
        try:
            estimate = trainer.estimated_stepping_batches  # also sets up the train dataloader to count batches
        except Exception:  # noqa: BLE001 - no trainer / no data: constant after warmup
            return 0
        if self.automatic_optimization:  # Lightning's estimate: min(batches x epochs / accumulation, max_steps)
            return int(estimate) if math.isfinite(estimate) else 0
        # Manual optimization: `max_steps` counts every optimizer's steps, a batch makes several of them, and the
        # fit loop stops at the first batch end with global_step >= max_steps.
        updates, optimizers = self.updates_per_batch()
        batches, epochs, max_steps = trainer.num_training_batches, trainer.max_epochs, trainer.max_steps
        by_epochs = batches * epochs if epochs not in (None, -1) and math.isfinite(batches) else math.inf
        by_steps = math.ceil(max_steps / (updates * optimizers)) if max_steps not in (None, -1) else math.inf
        horizon = min(by_epochs, by_steps) * updates
        return int(horizon) if math.isfinite(horizon) else 0

    def updates_per_batch(self) -> tuple[int, int]:
        """(optimizer steps each optimizer makes per training batch, number of optimizers), for manually
        optimized modules' `schedule_horizon`."""
        return 1, 1

    def configure_optimizers(self):
        opt, sched = self.build_optimizer(self.trainable_parameters(), self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --------------------------------------------------------------------------------------------- export
    def export_dir(self) -> Path:
        """`<run dir>/hf_model` (`parallel.run_dir`: a collective under DDP / FSDP2, call it on every rank)."""
        return parallel.run_dir(self.trainer) / "hf_model"

    def export_model(self, policy: torch.nn.Module | None = None) -> torch.nn.Module:
        """The model written to `hf_model/`: the policy, its LoRA adapter alone (`lora_export: adapter`), or the
        base with the adapter merged in (a new module: the training policy keeps its adapter).
        `policy`: the unsharded policy when the caller already gathered it (`_full_policy`)."""
        from ..models import export_view

        return export_view(self.policy if policy is None else policy, self.lora_export)

    def _full_policy(self) -> torch.nn.Module:
        """The policy with full (unsharded) weights. Under FSDP2 every rank takes part in gathering them (call it
        on all ranks); rank 0 gets a freshly built model holding them, the other ranks get the sharded one."""
        def build() -> torch.nn.Module:
            hp = self.hparams
            model = load_causal_lm(hp.model_name_or_path, self.tokenizer, torch_dtype=hp.torch_dtype,
                                   trust_remote_code=hp.trust_remote_code, seed=hp.seed)
            if self.lora_config is None:
                return model
            from peft import get_peft_model

            return get_peft_model(model, self.lora_config)

        return parallel.full_model(self.policy, self.trainer.global_rank, build)

    def on_fit_end(self) -> None:
        policy = self._full_policy()  # on every rank: gathering sharded weights is a collective
        out = self.export_dir()  # on every rank too: the run dir is broadcast from rank 0
        if self.trainer.global_rank != 0:
            return
        model = self.export_model(policy)
        check_finite_model(model, out)  # never write NaN/inf weights where a user would load them
        out.mkdir(parents=True, exist_ok=True)
        save_export(model, out, self.hparams.model_name_or_path)  # an adapter names its base by absolute path
        self.tokenizer.save_pretrained(out)
        rank_zero_info(f"[rlhf_lightning] exported model and tokenizer to {out}")

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlhf_counters"] = {"optimizer_steps": self.optimizer_steps, "rollouts": self.rollouts,
                                       "skipped_steps": self.nonfinite_guard.skipped}
        states = self._generator_states()
        if any(state is not None for state in states):
            checkpoint["sample_generator_states"] = states
        checkpoint["rng_states"] = collect_rng_states()  # torch/CUDA/python/numpy: dropout, user reward fns

    def _generator_states(self) -> list[torch.Tensor | None]:
        """Every rank's sampling-generator state, indexed by rank. Lightning calls `on_save_checkpoint` on all ranks
        but writes rank 0's dict: saving rank 0's state alone would give every rank one stream after a resume."""
        state = self.sample_generator.get_state() if self.sample_generator is not None else None
        dist = torch.distributed
        if self._trainer is None or self.trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [state]
        states: list[torch.Tensor | None] = [None] * self.trainer.world_size
        dist.all_gather_object(states, state)
        return states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("rlhf_counters", {})
        self.optimizer_steps = counters.get("optimizer_steps", 0)
        self.rollouts = counters.get("rollouts", 0)
        self.nonfinite_guard.skipped = counters.get("skipped_steps", 0)
        states = checkpoint.get("sample_generator_states")
        if states is None and "sample_generator_state" in checkpoint:  # checkpoints written before per-rank states
            states = [checkpoint["sample_generator_state"]]
        # a rank the checkpoint has no state for (more ranks than when it was saved) starts its seeded stream
        self._sample_generator_state = states[self.global_rank] if states and self.global_rank < len(states) else None
        self.sample_generator = None  # rebuilt from the saved state on the next _generator() call
        self._pending_rng_states = checkpoint.get("rng_states")

    # ------------------------------------------------------------------------------------ non-finite guard
    optimizer_names: tuple[str, ...] = ("the policy",)  # how the guard's messages name each optimizer, in order

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.nonfinite_guard.see_loss(loss)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop a NaN/inf loss's or gradient's update before it reaches the weights (`NonFiniteGuard`)."""
        index = next((i for i, o in enumerate(self.trainer.optimizers) if o is optimizer), 0)
        name = self.optimizer_names[index] if index < len(self.optimizer_names) else f"optimizer {index}"
        self.nonfinite_guard.before_step(optimizer, self.trainer, name)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After every training step: NaN/inf weights stop the run (`NonFiniteWeightsError`)."""
        self.nonfinite_guard.check_weights((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def guard_metrics(self) -> dict[str, torch.Tensor]:
        """`policy/skipped_steps` (optimizer steps skipped for a NaN/inf loss or gradient, so far) and
        `reward/nonfinite_count` (this rollout's ±inf rewards made missing under nonfinite_rewards=missing)."""
        return {"policy/skipped_steps": torch.tensor(float(self.nonfinite_guard.skipped)),
                "reward/nonfinite_count": torch.tensor(float(self._reward_stats.get("nonfinite", 0)))}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The global RNG states are put back right before the first step after a resume, not at load time:
        # creating the DataLoader iterator and the sanity check in between draw from them.
        if getattr(self, "_pending_rng_states", None) is not None:
            restore_rng_states(self._pending_rng_states)
            self._pending_rng_states = None


def check_manual_optimization_flags(module: L.LightningModule, trainer: L.Trainer) -> None:
    """Refuse, when fitting, the Trainer flags a manually optimized module cannot honour (Lightning's own error
    says "switch to automatic optimization", which a GRPO/PPO user cannot do), naming the module's setting."""
    from lightning.pytorch.trainer.states import TrainerFn

    if trainer.state.fn != TrainerFn.FITTING:
        return
    name = type(module).__name__
    why = f"does not apply to {name}, which optimizes manually (its own optimizer steps per rollout)"
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} {why}; set "
                         f"model.micro_batch_size instead: gradients of micro-batches accumulate within each step")
    if trainer.gradient_clip_val not in (None, 0):
        raise ValueError(f"trainer.gradient_clip_val={trainer.gradient_clip_val} {why}; set "
                         f"model.max_grad_norm={trainer.gradient_clip_val} instead")
    if trainer.gradient_clip_algorithm is not None:
        raise ValueError(f"trainer.gradient_clip_algorithm={trainer.gradient_clip_algorithm.value!r} {why}; it clips "
                         f"by norm with model.max_grad_norm (null = off): remove the trainer flag")


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


def _can_fuse_adamw(params: list, precision_plugin: Any) -> bool:
    """Whether AdamW can run fused: one kernel per update instead of ~10 passes over every tensor (on the `medium`
    preset, one CPU thread: 0.15 s of CPU per step against 0.54-0.86 s unfused; TRL's default optimizer is fused too).

    Only for plain tensors on CPU/CUDA (FSDP2's DTensors and other subclasses keep the default implementation), and
    not under an AMP precision plugin: Lightning refuses to clip the gradients of an optimizer that unscales them
    inside `step`, which a fused one does.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    tensors = [p for p in params if isinstance(p, torch.Tensor)]
    if not tensors or len(tensors) != len(params) or isinstance(precision_plugin, MixedPrecision):
        return False
    return all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.is_floating_point()
               for p in tensors)


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the parameters' gradients (0 when none has a gradient)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _is_library_hook(method: Callable) -> bool:
    """Whether a bound `compute_rewards` is this package's own (not a subclass's, nor a wrapper set on the instance)."""
    func = getattr(method, "__func__", None)
    return func is not None and getattr(func, "__module__", "").startswith("rlhf_lightning.")


def _import_path(fn: Callable) -> str:
    """`module.qualname` of a function (or of a callable object's class) for checkpoint hyperparameters."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{target.__module__}.{target.__qualname__}"
