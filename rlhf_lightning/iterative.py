"""Iterative RL with GRPO (DeepSeekMath §4.1.4, Algorithm 1) as Lightning callbacks.

A reward model trained once goes stale: the policy drifts to completions the RM never saw. Algorithm 1 keeps the
RM up to date. Every K rollouts (`every_n_steps`) a callback

    1. samples fresh completions from the *current* policy (`pl_module.rollout`) on training prompts it draws
       itself from `trainer.datamodule.train_rows` (so the samples are on-policy at the moment of the update,
       not the stale rollouts of the last K steps, and their number is `samples_per_iteration`, not tied to the
       training batch), and labels them with a verifier (`labeler`, TRL signature, 1 = correct, 0 = wrong,
       None = skip);
    2. turns them into training rows for its reward model (the subclass's part, below);
    3. mixes the new rows with a replay of `replay_fraction` x len(new) rows drawn from all earlier ones
       (the paper's 10% of historical data, against forgetting);
    4. continues training the reward model on that set for `rm_epochs` with its own AdamW (a plain torch loop);
    5. copies the policy's weights into the frozen reference (`pl_module.ref_policy`, when beta > 0).

Two reward models, one loop (`IterativeCallbackBase`, this file):

    IterativeRewardModelCallback         a sequence RM (`RewardModelSource`): preference pairs inside each prompt
                                         group (every distinct correct completion vs every distinct wrong one),
                                         Bradley-Terry loss (`modules.reward_model`)
    IterativeProcessRewardModelCallback  a process RM (`ProcessRewardModelSource`, `iterative_prm.py`): Monte-Carlo
                                         step labels of the samples (`algorithms.mc_labels`, hard estimation with
                                         the labeler as outcome verifier), token-classification CE at step ends

GRPO then continues with the updated RM: the module's reward source is the very network trained here (shared, not
copied), so the next rollout is scored by the new weights.

Logged once per iteration (x-axis = rollout index), by both: `iterative/rm_updates`, `iterative/reference_resets`,
`iterative/label_mean` (share of correct samples), `iterative/<unit>` (new rows: `pairs` / `rows`),
`iterative/replay_<unit>`, `iterative/<rm|prm>_loss` (mean loss of the last epoch); and each subclass's accuracy
before (on the fresh rows, held-out: the RM has never seen them) and after the update.

Under DDP each rank samples (and labels) its own prompts; the rows are all-gathered so every rank trains the same
RM on the same data. A callback's `state_dict` holds the counters, the row history, and the RM's weights and
optimizer state (the module's scorer is not part of the module's checkpoint), so a resumed run continues the same
RM. At the end of fit the updated RM is exported next to the policy: `<log_dir>/reward_model/` (or
`process_reward_model/`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from .infra.parallel import run_dir
from .modules.reward_model import bradley_terry_loss
from .rewards import RewardModelSource, call_reward_fns, resolve_reward_fn
from .rewards.model_inputs import reward_input_ids, right_pad

Pair = dict[str, str]  # {"prompt", "chosen", "rejected"}
Row = dict[str, Any]  # one training row of the reward model (a Pair, a stepwise row)


# ---------------------------------------------------------------------------------------------- pure helpers
def group_preference_pairs(prompts: list[str], completions: list[str], labels: list[float | None],
                           group_size: int) -> list[Pair]:
    """Pairs inside each group of `group_size` rows (one prompt): every distinct correct completion (label 1) as
    chosen vs every distinct wrong one (label 0) as rejected. Groups that are all right or all wrong give none;
    rows labelled None / NaN are skipped. Distinct texts only: G samples often repeat a completion."""
    if not (len(prompts) == len(completions) == len(labels)):
        raise ValueError(f"prompts/completions/labels differ in length: {len(prompts)}/{len(completions)}/"
                         f"{len(labels)}")
    if len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} rows do not split into groups of group_size={group_size}")
    pairs: list[Pair] = []
    for start in range(0, len(prompts), group_size):
        right: list[str] = []
        wrong: list[str] = []
        for c, y in zip(completions[start:start + group_size], labels[start:start + group_size]):
            if y is None or (isinstance(y, float) and math.isnan(y)):
                continue
            bucket = right if float(y) >= 0.5 else wrong
            if c not in bucket:
                bucket.append(c)
        pairs += [{"prompt": prompts[start], "chosen": c, "rejected": r} for c in right for r in wrong]
    return pairs


def replay_count(num_new: int, replay_fraction: float) -> int:
    """round_half_up(replay_fraction x num_new): 10% of 50 new pairs = 5 replayed, of 15 = 2."""
    return math.floor(replay_fraction * num_new + 0.5 + 1e-9)


def mix_with_replay(new: list[Row], history: list[Row], replay_fraction: float,
                    rng: random.Random) -> tuple[list[Row], int]:
    """(new + a sample without replacement of `replay_count(len(new))` historical rows, number replayed).

    The replay is capped by the history's size (the first iteration has none)."""
    n = min(replay_count(len(new), replay_fraction), len(history))
    return list(new) + rng.sample(history, n), n


# ---------------------------------------------------------------------------------------------- the shared loop
@dataclasses.dataclass
class Samples:
    """Fresh policy samples of one iteration: rows i*G .. i*G+G-1 share prompt i; `columns` are the dataset's,
    aligned with the completions; `labels` the labeler's (None = no opinion)."""

    prompts: list[str]
    completions: list[str]
    labels: list[float | None]
    columns: dict[str, list]
    group_size: int


class IterativeCallbackBase(L.Callback):
    """Algorithm 1's loop for a module with `rollout`, `reward_funcs`, `rollouts`, `ref_policy` (GRPOModule); the
    reward model it trains is a subclass's. Not used directly.

    Subclasses set `source_type` (the reward source class they train), `model_arg` (the argument naming its
    export, on the callback and on the module), `prefix` (`iterative/<prefix>_loss`), `unit` (what a training row
    is called in `iterative/<unit>`) and `export_name`, and implement `build_scorer`, `make_rows`, `batch_loss`,
    `metrics_before` / `metrics_after`; `extra_state` / `apply_extra_state` add to the checkpoint state.

    Args (shared, documented on each subclass): labeler, every_n_steps, samples_per_iteration, replay_fraction,
        rm_epochs, rm_lr, rm_batch_size, rm_max_grad_norm, reset_reference, seed.
    """

    source_type: type = RewardModelSource
    model_arg = "reward_model"
    prefix = "rm"
    unit = "pairs"
    export_name = "reward_model"

    def __init__(self, labeler: str | Callable, model_path: str | None, every_n_steps: int,
                 samples_per_iteration: int, replay_fraction: float, rm_epochs: int, rm_lr: float,
                 rm_batch_size: int, rm_max_grad_norm: float | None, reset_reference: bool, seed: int):
        _check_args(every_n_steps, samples_per_iteration, replay_fraction, rm_epochs, rm_lr, rm_batch_size,
                    rm_max_grad_norm)
        self.labeler = resolve_reward_fn(labeler)
        self.model_path = model_path
        self.every_n_steps, self.samples_per_iteration = every_n_steps, samples_per_iteration
        self.replay_fraction, self.rm_epochs, self.rm_lr = replay_fraction, rm_epochs, rm_lr
        self.rm_batch_size, self.rm_max_grad_norm = rm_batch_size, rm_max_grad_norm
        self.reset_reference, self.seed = reset_reference, seed
        # state (saved in checkpoints)
        self.history: list[Row] = []
        self.iterations = 0
        self.rm_updates = 0
        self.reference_resets = 0
        self.last_rollout = 0  # module.rollouts at the last iteration
        self.scorer: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None  # RM weights / optimizer from load_state_dict

    # ------------------------------------------------------------------------------------------ the subclass's
    def build_scorer(self, pl_module: L.LightningModule) -> Any:
        """A fresh reward source of `self.model_path`, on the module's device."""
        raise NotImplementedError

    def make_rows(self, pl_module: L.LightningModule, samples: Samples) -> tuple[list[Row], dict[str, float]]:
        """(this rank's new training rows, metrics of their making) from the iteration's samples."""
        raise NotImplementedError

    def batch_loss(self, rows: list[Row]) -> torch.Tensor:
        """The reward model's training loss on a batch of rows (train mode, with gradients)."""
        raise NotImplementedError

    def metrics_before(self, new: list[Row]) -> dict[str, float]:
        """Metrics of the RM on the fresh rows before it trains on them (held-out)."""
        return {}

    def metrics_after(self, train_set: list[Row]) -> dict[str, float]:
        """Metrics of the retrained RM on the rows it was trained on."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def apply_extra_state(self, state: dict[str, Any]) -> None:
        """Put a checkpoint's `extra_state` into the live scorer."""

    def prepare_export(self) -> None:
        """Fix up the scorer's model config before `save_pretrained` (fields readers of the export need)."""

    # ------------------------------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find (or install) the scorer the module rewards with; runs after module.setup and checkpoint restore."""
        name = type(self).__name__
        if getattr(pl_module, "env_interaction", None) is not None:
            raise ValueError(f"{name} retrains its scorer on single-turn policy samples, but the module plays "
                             "episodes of an environment (`environment`); use one or the other")
        if self.reset_reference and getattr(pl_module, "_lora_reference", False):
            raise ValueError(f"{name}.reset_reference needs a reference copy, but with LoRA the reference is the "
                             "base model (adapter disabled); set reset_reference: false")
        self.scorer = self.find_scorer(pl_module)
        params = list(self.scorer.model.parameters())
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(params, lr=self.rm_lr)
        if self._pending is not None:
            self._apply_pending()
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_rows") or not hasattr(dm, "collate"):
            raise ValueError(f"{name} needs a PromptDataModule (train_rows + collate) to draw prompts from")

    def find_scorer(self, pl_module: L.LightningModule) -> Any:
        """The module's last reward source of `source_type`, or (with `model_path`) a fresh one in its place,
        appended when the module has none."""
        funcs, name, arg = pl_module.reward_funcs, type(self).__name__, self.model_arg
        existing = [i for i, f in enumerate(funcs) if isinstance(f, self.source_type)]
        if self.model_path is None:
            if not existing:
                raise ValueError(f"{name} needs a {arg.replace('_', ' ')}: set {arg} on the callback or on the "
                                 f"module (GRPOModule({arg}=...))")
            return funcs[existing[-1]]
        scorer = self.build_scorer(pl_module)
        if existing:
            funcs[existing[-1]] = scorer
        elif pl_module.reward_weights is not None:
            raise ValueError(f"{name}.{arg} adds a reward function but the module has reward_weights; give the "
                             f"module {arg}= instead")
        else:
            funcs.append(scorer)
        return scorer

    # ------------------------------------------------------------------------------------------ iteration
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rollouts = pl_module.rollouts
        if rollouts <= self.last_rollout or rollouts % self.every_n_steps:
            return
        self.last_rollout = rollouts
        self.run_iteration(trainer, pl_module)

    def run_iteration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Algorithm 1's outer-loop body: sample, label, make rows, replay-mix, train the RM, reset the reference."""
        self.iterations += 1
        # prompts differ per rank; the replay draw and RM shuffles are the same on every rank (same RM everywhere)
        sample_rng = random.Random(self.seed + 7919 * self.iterations + 1_000_003 * trainer.global_rank)
        rng = random.Random(self.seed + 7919 * self.iterations)
        samples = self.collect_samples(trainer, pl_module, sample_rng)
        new, made = self.make_rows(pl_module, samples)
        new = _all_gather_rows(new, trainer)
        train_set, n_replay = mix_with_replay(new, self.history, self.replay_fraction, rng)
        self.history.extend(new)
        valid = [float(y) for y in samples.labels if y is not None and not math.isnan(float(y))]
        metrics: dict[str, float] = {f"iterative/{self.unit}": float(len(new)),
                                     f"iterative/replay_{self.unit}": float(n_replay),
                                     "iterative/label_mean": sum(valid) / len(valid) if valid else float("nan"),
                                     **made}
        if train_set:
            if new:
                metrics.update(self.metrics_before(new))
            metrics[f"iterative/{self.prefix}_loss"] = self.train_reward_model(train_set, rng)
            metrics.update(self.metrics_after(train_set))
            self.rm_updates += 1
        if self.reset_reference and getattr(pl_module, "ref_policy", None) is not None:
            pl_module.ref_policy.load_state_dict(pl_module.policy.state_dict())
            self.reference_resets += 1
        metrics["iterative/rm_updates"] = float(self.rm_updates)
        metrics["iterative/reference_resets"] = float(self.reference_resets)
        if hasattr(pl_module, "log_step_metrics"):
            pl_module.log_step_metrics(metrics)
        elif pl_module.logger is not None:
            pl_module.logger.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def collect_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, rng: random.Random) -> Samples:
        """Fresh completions of the current policy on random training prompts, labelled by the verifier."""
        dm = trainer.datamodule
        G = pl_module.hparams.group_size
        n_prompts = math.ceil(self.samples_per_iteration / G)
        chunk = getattr(getattr(dm, "hparams", {}), "batch_size", None) or n_prompts
        rows = [dm.train_rows[rng.randrange(len(dm.train_rows))] for _ in range(n_prompts)]
        out = Samples([], [], [], {}, G)
        for i in range(0, n_prompts, chunk):
            batch = dm.collate(rows[i:i + chunk])
            batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad():
                ro = pl_module.rollout(batch)
            # the reward-function call path: checks, and TRL's conversational format for chat prompts
            _, got = call_reward_fns([self.labeler], None, ro.prompts, ro.completions, ro.columns)  # [1, N]
            out.prompts += ro.prompts
            out.completions += ro.completions
            out.labels += [None if math.isnan(y) else y for y in got[0].tolist()]
            for name, values in ro.columns.items():
                out.columns.setdefault(name, []).extend(values)
        return out

    def train_reward_model(self, rows: list[Row], rng: random.Random) -> float:
        """`rm_epochs` shuffled passes of AdamW on `batch_loss`; returns the last epoch's mean loss."""
        model = self.scorer.model
        was_training = model.training
        model.train()
        last: list[float] = []
        try:
            for _ in range(self.rm_epochs):
                order = list(rows)
                rng.shuffle(order)
                last = []
                for i in range(0, len(order), self.rm_batch_size):
                    loss = self.batch_loss(order[i:i + self.rm_batch_size])
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.rm_max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), self.rm_max_grad_norm)
                    self.optimizer.step()
                    last.append(float(loss.detach()))
        finally:
            model.train(was_training)
            self.optimizer.zero_grad(set_to_none=True)
        return sum(last) / len(last)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = run_dir(trainer) / self.export_name  # on every rank: the run dir is broadcast from rank 0
        if trainer.global_rank != 0 or self.scorer is None or not self.rm_updates:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.prepare_export()
        self.scorer.model.save_pretrained(out, safe_serialization=True)
        self.scorer.tokenizer.save_pretrained(out)
        rank_zero_info(f"[rlhf_lightning] exported the iteratively trained {self.model_arg.replace('_', ' ')} to {out}")

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history), "iterations": self.iterations, "rm_updates": self.rm_updates,
            "reference_resets": self.reference_resets, "last_rollout": self.last_rollout,
            "rm_state": self.scorer.model.state_dict() if self.scorer is not None else None,
            "rm_optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.iterations, self.rm_updates = state_dict["iterations"], state_dict["rm_updates"]
        self.reference_resets, self.last_rollout = state_dict["reference_resets"], state_dict["last_rollout"]
        if state_dict.get("rm_state") is not None:
            self._pending = dict(state_dict)
            if self.scorer is not None:  # already set up: apply now (else in on_fit_start, once the scorer is known)
                self._apply_pending()

    def _apply_pending(self) -> None:
        """Put the checkpoint's RM weights, optimizer state and extra state into the live scorer."""
        pending, self._pending = self._pending, None
        self.scorer.model.load_state_dict(pending["rm_state"])
        if pending.get("rm_optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(pending["rm_optimizer"])
        self.apply_extra_state(pending)


def _check_args(every_n_steps: int, samples_per_iteration: int, replay_fraction: float, rm_epochs: int,
                rm_lr: float, rm_batch_size: int, rm_max_grad_norm: float | None) -> None:
    checks = [
        (isinstance(every_n_steps, int) and every_n_steps >= 1,
         f"every_n_steps must be an integer >= 1, got {every_n_steps!r}"),
        (isinstance(samples_per_iteration, int) and samples_per_iteration >= 1,
         f"samples_per_iteration must be an integer >= 1, got {samples_per_iteration!r}"),
        (0 <= replay_fraction <= 1, f"replay_fraction must be in [0, 1], got {replay_fraction}"),
        (isinstance(rm_epochs, int) and rm_epochs >= 1, f"rm_epochs must be an integer >= 1, got {rm_epochs!r}"),
        (0 < rm_lr < 1, f"rm_lr must be in (0, 1), got {rm_lr}"),
        (isinstance(rm_batch_size, int) and rm_batch_size >= 1,
         f"rm_batch_size must be an integer >= 1, got {rm_batch_size!r}"),
        (rm_max_grad_norm is None or rm_max_grad_norm > 0,
         f"rm_max_grad_norm must be > 0 or null, got {rm_max_grad_norm}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _all_gather_rows(rows: list[Row], trainer: L.Trainer) -> list[Row]:
    """Every rank's rows, in rank order, on every rank (so all ranks train the same RM); as is on one process."""
    dist = torch.distributed
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return rows
    gathered: list[list[Row] | None] = [None] * trainer.world_size
    dist.all_gather_object(gathered, rows)
    return [r for part in gathered for r in (part or [])]


# ---------------------------------------------------------------------------------------------- the sequence RM
class IterativeRewardModelCallback(IterativeCallbackBase):
    """DeepSeekMath Algorithm 1 for `GRPOModule` with a sequence reward model: preference pairs of fresh samples,
    Bradley-Terry loss.

    Args:
        labeler: verifier that labels policy samples, `f(prompts, completions, **columns) -> list of 0/1`: a
            callable or an import path / built-in name (e.g. `rlhf_lightning.rewards.exact_match`).
        reward_model: an exported RewardModel `hf_model/` directory to train and make the module's reward (it
            replaces the module's `RewardModelSource`, or is appended when there is none); None = train the
            scorer the module already has (`GRPOModule(reward_model=...)`).
        every_n_steps: K, rollouts between iterations (an iteration runs after rollouts K, 2K, ...).
        samples_per_iteration: fresh policy completions to sample per iteration (rounded up to whole groups).
        replay_fraction: historical pairs replayed per iteration, as a fraction of the new pairs (paper: 0.1).
        rm_epochs / rm_lr / rm_batch_size / rm_max_grad_norm: the RM's training (AdamW, kept across iterations).
        reset_reference: copy the policy into `ref_policy` after each iteration (no-op when beta = 0; refused with
            LoRA, whose reference is the base model itself).
        seed: seeds the prompt draws, shuffles and replay sampling (offset by iteration and rank).

    Logs `iterative/rm_accuracy` (accuracy of the updated RM on the pairs it was just trained on),
    `iterative/rm_accuracy_before` (on the fresh pairs before the update), `iterative/rm_loss` (BT),
    `iterative/pairs`, `iterative/replay_pairs`, `iterative/rm_reward_mean` / `_std`, and the shared keys.
    """

    def __init__(self, labeler: str | Callable, reward_model: str | None = None, every_n_steps: int = 50,
                 samples_per_iteration: int = 256, replay_fraction: float = 0.1, rm_epochs: int = 1,
                 rm_lr: float = 1e-4, rm_batch_size: int = 32, rm_max_grad_norm: float | None = 1.0,
                 reset_reference: bool = True, seed: int = 0):
        super().__init__(labeler, reward_model, every_n_steps, samples_per_iteration, replay_fraction, rm_epochs,
                         rm_lr, rm_batch_size, rm_max_grad_norm, reset_reference, seed)

    @property
    def reward_model(self) -> str | None:
        return self.model_path

    def build_scorer(self, pl_module: L.LightningModule) -> RewardModelSource:
        return RewardModelSource(self.model_path)

    def make_rows(self, pl_module: L.LightningModule, samples: Samples) -> tuple[list[Row], dict[str, float]]:
        return group_preference_pairs(samples.prompts, samples.completions, samples.labels, samples.group_size), {}

    def _pair_rewards(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen [B], r_rejected [B]) from one forward pass over [2B, L] (chosen rows first)."""
        tok, model = self.scorer.tokenizer, self.scorer.model
        seqs = ([reward_input_ids(tok, p["prompt"], p["chosen"]) for p in pairs] +
                [reward_input_ids(tok, p["prompt"], p["rejected"]) for p in pairs])
        ids, mask = right_pad(seqs, tok.pad_token_id)  # [2B, L]
        device = next(model.parameters()).device
        rewards = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()  # [2B]
        return rewards[:len(pairs)], rewards[len(pairs):]

    def batch_loss(self, rows: list[Row]) -> torch.Tensor:
        return bradley_terry_loss(*self._pair_rewards(rows))

    @torch.no_grad()
    def pair_scores(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen [B], r_rejected [B]) of the current RM, in eval mode, `rm_batch_size` pairs at a time."""
        model = self.scorer.model
        was_training = model.training
        model.eval()
        try:
            parts = [self._pair_rewards(pairs[i:i + self.rm_batch_size])
                     for i in range(0, len(pairs), self.rm_batch_size)]
        finally:
            model.train(was_training)
        return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])

    def accuracy(self, pairs: list[Pair]) -> float:
        """Share of pairs with r_chosen > r_rejected (ties count as wrong), in eval mode."""
        r_c, r_r = self.pair_scores(pairs)
        return float((r_c > r_r).float().mean())

    def metrics_before(self, new: list[Row]) -> dict[str, float]:
        return {"iterative/rm_accuracy_before": self.accuracy(new)}

    def metrics_after(self, train_set: list[Row]) -> dict[str, float]:
        return self.refresh_statistics(train_set)

    def refresh_statistics(self, pairs: list[Pair]) -> dict[str, float]:
        """After a retrain: the accuracy on `pairs`, and the retrained RM's score mean / std over both sides of
        them (as `RewardModel` records them over its held-out pairs) handed to the scorer, so
        `normalize_reward_model` standardises with the new RM's statistics, not the exported ones."""
        r_c, r_r = self.pair_scores(pairs)
        scores = torch.cat([r_c, r_r])
        mean, std = float(scores.mean()), float(scores.std(unbiased=False))
        self.scorer.set_statistics(mean, std)
        return {"iterative/rm_accuracy": float((r_c > r_r).float().mean()), "iterative/rm_reward_mean": mean,
                "iterative/rm_reward_std": std}

    def extra_state(self) -> dict[str, Any]:
        return {"rm_statistics": self.scorer.statistics() if self.scorer is not None and self.rm_updates else None}

    def apply_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("rm_statistics") is not None:
            self.scorer.set_statistics(*state["rm_statistics"])
