"""What every policy-training module shares: loading, rewards, greedy validation, optimizers, export, checkpoints.

Subclasses: `SFTModule` (automatic optimization) and `rl.RLModule` (GRPO, PPO: the shared RL loop). Counters:
`self.rollouts` / `self.optimizer_steps` are explicit (Lightning's `global_step` counts every optimizer's steps in
manual optimization, so it is not the same quantity across modules).

Arguments are declared once, where they belong: here the model / reward / optimizer ones, in `RLModule` the
sampling and update ones every RL module has, in each module its algorithm's. Subclasses take the rest as
`**kwargs` (jsonargparse follows them, so the CLI and `--help` list every argument), and each class adds its own
range checks to `hparam_checks`, all run before any model is loaded.
"""

from __future__ import annotations

import math
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
from .sampled_eval import SampledEvaluation
from .scoring import RewardScoring


class PolicyModuleBase(RewardScoring, SampledEvaluation, L.LightningModule):
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
        val_max_new_tokens: token budget of the greedy validation completions (and of the sampled ones).
        eval_num_samples: completions sampled per held-out prompt at every validation / test for `val/pass@k` and
            `val/maj@k` (`sampled_eval.py`, docs/evaluation.md); 0 = off (greedy metrics only).
        eval_k: the k of pass@k / maj@k, each <= eval_num_samples (None = 1, 2, 4, ... and eval_num_samples).
        eval_temperature, eval_top_p: how those completions are sampled. eval_seed: their generator's seed (its own
            stream, offset by the rank: validation never draws from the training sampler).
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
        lora: dict[str, Any] | None = None,
        lora_export: str = "merged",
        gradient_checkpointing: bool = False,
        rollout_engine: str = "auto",
        nonfinite_rewards: str = "error",
        max_nonfinite_steps: int = 3,
        eval_num_samples: int = 0, eval_k: list[int] | None = None,  # the sampled evaluation (sampled_eval.py)
        eval_temperature: float = 1.0, eval_top_p: float = 1.0, eval_seed: int = 0,
        tools: Sequence[str] | None = None, tool_format: str = "auto", max_turns: int = 4,
        tool_timeout_s: float = 5.0, environment: str | dict | None = None,
    ):
        super().__init__()
        # every class's arguments (subclasses' frames included): the checkpoint's and the logger's hyperparameters
        self.save_hyperparameters()
        for ok, message in self.hparam_checks(self.hparams):
            if not ok:
                raise ValueError(message)
        from ..rewards import check_reward_weights, resolve_reward_fn

        self.nonfinite_rewards, self.nonfinite_guard = nonfinite_rewards, NonFiniteGuard(max_nonfinite_steps)
        self._reward_stats: dict[str, int] = {}  # the last scoring's counts (non-finite rewards made missing)
        self.reward_funcs: list[Callable] = [resolve_reward_fn(f) for f in (reward_fns or [])]
        if reward_fns:
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
        self.optimizer_steps = self.rollouts = 0
        self.tool_interaction = None  # set with `tools`: every `generate` runs the multi-turn loop
        if tools:
            from ..rollout.multi_turn import ToolInteraction
            from ..tools import ToolRunner, get_tool_format, load_tools

            fns = load_tools(list(tools))
            self.tool_fns = fns
            self.tool_interaction = ToolInteraction(ToolRunner(fns, timeout_s=tool_timeout_s),
                                                    get_tool_format(tool_format, self.tokenizer, fns), self.tokenizer)
        self.env_interaction = None  # set with `environment`: every `generate` plays one episode per row
        if environment is not None:
            # checkpoints store import paths, not classes (weights_only loading refuses pickled code)
            if callable(environment):
                self.hparams["environment"] = _import_path(environment)
            elif isinstance(environment, dict) and callable(environment.get("class_path")):
                self.hparams["environment"] = {**environment, "class_path": _import_path(environment["class_path"])}
            from ..environments import load_environment
            from ..rollout.multi_turn import EnvironmentInteraction

            self.env_interaction = EnvironmentInteraction(load_environment(environment), self.tokenizer)

    tool_fns: list[Callable] = []  # the loaded `tools`

    @property
    def chat_tool_schemas(self) -> list[dict] | None:
        """The tools' JSON schemas for chat prompts (PromptDataModule passes them to `apply_chat_template(...,
        tools=...)`) when the tool format is the chat template's own (hermes); None otherwise (the char format
        has no template to describe them: its SFT data shows the calls)."""
        from ..tools import HermesToolFormat, tool_schemas

        if self.tool_interaction is None or not isinstance(self.tool_interaction.fmt, HermesToolFormat):
            return None
        return tool_schemas(self.tool_fns)

    def hparam_checks(self, hp) -> list[tuple[bool, str]]:
        """(holds, one-line message) for every range check of the arguments; subclasses add theirs. Run on the
        hyperparameters before any model is loaded."""
        from ..rewards import NONFINITE_MODES

        return [
            (isinstance(hp.lr, (int, float)) and 0 < hp.lr < 1, f"lr must be in (0, 1), got {hp.lr!r}"),
            (hp.weight_decay >= 0, f"weight_decay must be >= 0, got {hp.weight_decay}"),
            (hp.lr_schedule in ("constant", "cosine", "linear"), f"lr_schedule must be constant|cosine|linear, got "
             f"{hp.lr_schedule!r}"),
            (hp.warmup_steps >= 0, f"warmup_steps must be >= 0, got {hp.warmup_steps}"),
            (hp.val_max_new_tokens is None or hp.val_max_new_tokens >= 1, f"val_max_new_tokens must be >= 1, got "
             f"{hp.val_max_new_tokens}"),
            (hp.nonfinite_rewards in NONFINITE_MODES, f"nonfinite_rewards must be {'|'.join(NONFINITE_MODES)}, got "
             f"{hp.nonfinite_rewards!r}"),
            (isinstance(hp.max_turns, int) and hp.max_turns >= 1, f"max_turns must be an integer >= 1, got "
             f"{hp.max_turns!r}"),
            (hp.tool_timeout_s > 0, f"tool_timeout_s must be > 0, got {hp.tool_timeout_s}"),
            *self.eval_checks(hp),
        ]

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
        parallel.destroy_process_group_at_exit()
        keep_freed_memory(self.trainer.strategy.root_device)  # CPU: reuse activation memory step to step
        batch_size = getattr(getattr(getattr(self.trainer, "datamodule", None), "hparams", None), "batch_size", None)
        if stage == "fit" and "minibatches" in self.hparams and isinstance(batch_size, int):
            self.check_minibatches(batch_size)  # the data's batch size is known: refuse before the first step
        if not self.reward_funcs and self.env_interaction is not None:  # the environment's rewards
            self.reward_funcs = list(self.default_environment_reward_fns())
            self.reward_weights = None
        if not self.reward_funcs:
            task = self.data_task()
            if task is not None:
                self.reward_funcs = list(self.default_reward_fns(task))
                if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
                    self.reward_weights = None
        self._check_reward_signatures()

    minibatch_unit = "completions"  # what a rollout's minibatches split (GRPO: whole groups)

    def check_minibatches(self, units: int) -> None:
        """Refuse `minibatches` larger than the `units` of a rollout (one per prompt of data.batch_size): some
        minibatch would be empty and the run would quietly take fewer optimizer steps than configured. (Fewer
        that do not divide evenly are fine: the minibatches then differ in size by at most one unit.)"""
        mb = self.hparams.minibatches
        if units < mb:
            raise ValueError(f"minibatches={mb} is more than the {units} {self.minibatch_unit} of a rollout "
                             f"(data.batch_size={units} per rank); raise data.batch_size or lower minibatches")

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
                 generator: torch.Generator | None = None, rows: list[dict] | None = None, engine=None):
        """A `RolloutBatch` from the engine (`engine`, else `self.engine`), inside `sampling_context` (every
        sampling call goes through here). With `tools` or an `environment` the multi-turn loop drives the engine;
        an environment needs each row's dataset row (`rows`, see `batch_rows`)."""
        engine = self.engine if engine is None else engine
        with self.sampling_context():
            if self.tool_interaction is not None or self.env_interaction is not None:
                from ..rollout.multi_turn import multi_turn_generate

                return multi_turn_generate(engine, prompt_ids, prompt_mask, params, generator,
                                           self.tool_interaction, self.tokenizer, self.hparams.max_turns,
                                           env=self.env_interaction, rows=rows)
            return engine.generate(prompt_ids, prompt_mask, params, generator)

    @torch.no_grad()
    def greedy_samples(self, batch: dict[str, Any], max_new_tokens: int | None = None):
        """Greedy `RolloutBatch` of the batch's prompts (token ids and masks)."""
        params = self.sampling_params(greedy=True, max_new_tokens=max_new_tokens or self.val_max_new_tokens)
        return self.generate(batch["prompt_ids"], batch["prompt_mask"], params, rows=self.batch_rows(batch))

    def greedy_completions(self, batch: dict[str, Any], max_new_tokens: int | None = None) -> list[str]:
        from ..rollout import decode_completions

        out = self.greedy_samples(batch, max_new_tokens)
        return decode_completions(self.tokenizer, out.completion_ids, out.completion_mask)

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
        checkpoint["rng_states"] = collect_rng_states()  # torch/CUDA/python/numpy: dropout, user reward fns

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("rlhf_counters", {})
        self.optimizer_steps = counters.get("optimizer_steps", 0)
        self.rollouts = counters.get("rollouts", 0)
        self.nonfinite_guard.skipped = counters.get("skipped_steps", 0)
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


def _can_fuse_adamw(params: list, precision_plugin: Any) -> bool:
    """Whether AdamW can run fused: one kernel per update instead of ~10 passes over every tensor (the timing is in
    docs/performance.md; TRL's default optimizer is fused too).

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


def _import_path(fn: Callable) -> str:
    """`module.qualname` of a function (or of a callable object's class) for checkpoint hyperparameters."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{target.__module__}.{target.__qualname__}"
