"""Iterative RL with GRPO (DeepSeekMath §4.1.4, Algorithm 1) as a Lightning callback.

A reward model trained once goes stale: the policy drifts to completions the RM never saw. Algorithm 1 keeps the
RM up to date. Every K rollouts (`every_n_steps`) the callback

    1. samples fresh completions from the *current* policy (`pl_module.rollout`) on training prompts it draws
       itself from `trainer.datamodule.train_rows` (so the samples are on-policy at the moment of the update,
       not the stale rollouts of the last K steps, and their number is `samples_per_iteration`, not tied to the
       training batch);
    2. labels them with a verifier (`labeler`, TRL signature, 1 = correct, 0 = wrong, None = skip) and builds
       preference pairs inside each prompt group: every distinct correct completion vs every distinct wrong one;
    3. mixes the new pairs with a replay of `replay_fraction` x len(new) pairs drawn from all earlier pairs
       (the paper's 10% of historical data, against forgetting);
    4. continues training the reward model on that set for `rm_epochs` with its own AdamW (a plain torch loop,
       Bradley-Terry loss from `modules.reward_model`);
    5. copies the policy's weights into the frozen reference (`pl_module.ref_policy`, when beta > 0).

GRPO then continues with the updated RM: the module's reward function is a `RewardModelSource` whose `.model` is
the very network trained here (shared, not copied), so the next rollout is scored by the new weights.

Logged once per iteration (x-axis = rollout index): `iterative/rm_accuracy` (accuracy of the updated RM on the
pairs it was just trained on, i.e. training accuracy), `iterative/rm_accuracy_before` (accuracy on the fresh pairs
*before* the update: held-out, the RM has never seen them — how well it generalised to the current policy),
`iterative/rm_loss` (mean BT loss of the last epoch), `iterative/pairs` (new pairs), `iterative/replay_pairs`,
`iterative/rm_updates`, `iterative/reference_resets`, `iterative/label_mean` (share of correct samples).

Under DDP each rank samples its own prompts; the pairs are all-gathered so every rank trains the same RM on the
same data. The callback's `state_dict` holds the counters, the pair history, and the RM's weights and optimizer
state (the module's scorer is not part of the module's checkpoint), so a resumed run continues the same RM.
At the end of fit the updated RM is exported next to the policy: `<log_dir>/reward_model/`.
"""

from __future__ import annotations

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


def mix_with_replay(new: list[Pair], history: list[Pair], replay_fraction: float,
                    rng: random.Random) -> tuple[list[Pair], int]:
    """(new + a sample without replacement of `replay_count(len(new))` historical pairs, number replayed).

    The replay is capped by the history's size (the first iteration has none)."""
    n = min(replay_count(len(new), replay_fraction), len(history))
    return list(new) + rng.sample(history, n), n


# ---------------------------------------------------------------------------------------------- the callback
class IterativeRewardModelCallback(L.Callback):
    """DeepSeekMath Algorithm 1 for `GRPOModule` (any module with `rollout`, `reward_funcs`, `rollouts`, `ref_policy`).

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
    """

    def __init__(self, labeler: str | Callable, reward_model: str | None = None, every_n_steps: int = 50,
                 samples_per_iteration: int = 256, replay_fraction: float = 0.1, rm_epochs: int = 1,
                 rm_lr: float = 1e-4, rm_batch_size: int = 32, rm_max_grad_norm: float | None = 1.0,
                 reset_reference: bool = True, seed: int = 0):
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
        self.labeler = resolve_reward_fn(labeler)
        self.reward_model = reward_model
        self.every_n_steps, self.samples_per_iteration = every_n_steps, samples_per_iteration
        self.replay_fraction, self.rm_epochs, self.rm_lr = replay_fraction, rm_epochs, rm_lr
        self.rm_batch_size, self.rm_max_grad_norm = rm_batch_size, rm_max_grad_norm
        self.reset_reference, self.seed = reset_reference, seed
        # state (saved in checkpoints)
        self.history: list[Pair] = []
        self.iterations = 0
        self.rm_updates = 0
        self.reference_resets = 0
        self.last_rollout = 0  # module.rollouts at the last iteration
        self.scorer: RewardModelSource | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None  # RM weights / optimizer from load_state_dict

    # ------------------------------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find (or install) the scorer the module rewards with; runs after module.setup and checkpoint restore."""
        if self.reset_reference and getattr(pl_module, "_lora_reference", False):
            raise ValueError("IterativeRewardModelCallback.reset_reference needs a reference copy, but with LoRA the "
                             "reference is the base model (adapter disabled); set reset_reference: false")
        funcs = pl_module.reward_funcs
        existing = [i for i, f in enumerate(funcs) if isinstance(f, RewardModelSource)]
        if self.reward_model is not None:
            scorer = RewardModelSource(self.reward_model)
            if existing:
                funcs[existing[-1]] = scorer
            else:
                if pl_module.reward_weights is not None:
                    raise ValueError("IterativeRewardModelCallback.reward_model adds a reward function but the module "
                                     "has reward_weights; give the module reward_model= instead")
                funcs.append(scorer)
        elif existing:
            scorer = funcs[existing[-1]]
        else:
            raise ValueError("IterativeRewardModelCallback needs a reward model: set reward_model on the callback or "
                             "on the module (GRPOModule(reward_model=...))")
        self.scorer = scorer
        params = [p for p in scorer.model.parameters()]
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(params, lr=self.rm_lr)
        if self._pending is not None:
            self._apply_pending()
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_rows") or not hasattr(dm, "collate"):
            raise ValueError("IterativeRewardModelCallback needs a PromptDataModule (train_rows + collate) to draw "
                             "prompts from")

    # ------------------------------------------------------------------------------------------ iteration
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rollouts = pl_module.rollouts
        if rollouts <= self.last_rollout or rollouts % self.every_n_steps:
            return
        self.last_rollout = rollouts
        self.run_iteration(trainer, pl_module)

    def run_iteration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Algorithm 1's outer-loop body: sample, label, pair, replay-mix, train the RM, reset the reference."""
        self.iterations += 1
        # prompts differ per rank; the replay draw and RM shuffles are the same on every rank (same RM everywhere)
        sample_rng = random.Random(self.seed + 7919 * self.iterations + 1_000_003 * trainer.global_rank)
        rng = random.Random(self.seed + 7919 * self.iterations)
        prompts, completions, labels = self.collect_samples(trainer, pl_module, sample_rng)
        new = group_preference_pairs(prompts, completions, labels, pl_module.hparams.group_size)
        new = _all_gather_pairs(new, trainer)
        train_set, n_replay = mix_with_replay(new, self.history, self.replay_fraction, rng)
        self.history.extend(new)
        metrics: dict[str, float] = {"iterative/pairs": float(len(new)), "iterative/replay_pairs": float(n_replay)}
        valid = [float(y) for y in labels if y is not None and not math.isnan(float(y))]
        metrics["iterative/label_mean"] = sum(valid) / len(valid) if valid else float("nan")
        if train_set:
            if new:
                metrics["iterative/rm_accuracy_before"] = self.accuracy(new)
            metrics["iterative/rm_loss"] = self.train_reward_model(train_set, rng)
            metrics.update(self.refresh_statistics(train_set))
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

    def collect_samples(self, trainer: L.Trainer, pl_module: L.LightningModule,
                        rng: random.Random) -> tuple[list[str], list[str], list[float | None]]:
        """Fresh completions of the current policy on random training prompts, labelled by the verifier."""
        dm = trainer.datamodule
        G = pl_module.hparams.group_size
        n_prompts = math.ceil(self.samples_per_iteration / G)
        chunk = getattr(getattr(dm, "hparams", {}), "batch_size", None) or n_prompts
        rows = [dm.train_rows[rng.randrange(len(dm.train_rows))] for _ in range(n_prompts)]
        prompts: list[str] = []
        completions: list[str] = []
        labels: list[float | None] = []
        for i in range(0, n_prompts, chunk):
            batch = dm.collate(rows[i:i + chunk])
            batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad():
                ro = pl_module.rollout(batch)
            # the reward-function call path: checks, and TRL's conversational format for chat prompts
            _, got = call_reward_fns([self.labeler], None, ro.prompts, ro.completions, ro.columns)  # [1, N]
            prompts += ro.prompts
            completions += ro.completions
            labels += [None if math.isnan(y) else y for y in got[0].tolist()]
        return prompts, completions, labels

    # ------------------------------------------------------------------------------------------ the RM
    def _pair_rewards(self, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen [B], r_rejected [B]) from one forward pass over [2B, L] (chosen rows first)."""
        tok, model = self.scorer.tokenizer, self.scorer.model
        seqs = ([reward_input_ids(tok, p["prompt"], p["chosen"]) for p in pairs] +
                [reward_input_ids(tok, p["prompt"], p["rejected"]) for p in pairs])
        ids, mask = right_pad(seqs, tok.pad_token_id)  # [2B, L]
        device = next(model.parameters()).device
        rewards = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()  # [2B]
        return rewards[:len(pairs)], rewards[len(pairs):]

    def train_reward_model(self, pairs: list[Pair], rng: random.Random) -> float:
        """`rm_epochs` shuffled passes of AdamW on the BT loss; returns the last epoch's mean loss."""
        model = self.scorer.model
        was_training = model.training
        model.train()
        last: list[float] = []
        try:
            for _ in range(self.rm_epochs):
                order = list(pairs)
                rng.shuffle(order)
                last = []
                for i in range(0, len(order), self.rm_batch_size):
                    r_c, r_r = self._pair_rewards(order[i:i + self.rm_batch_size])
                    loss = bradley_terry_loss(r_c, r_r)
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

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = run_dir(trainer) / "reward_model"  # on every rank: the run dir is broadcast from rank 0
        if trainer.global_rank != 0 or self.scorer is None or not self.rm_updates:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.scorer.model.save_pretrained(out, safe_serialization=True)
        self.scorer.tokenizer.save_pretrained(out)
        rank_zero_info(f"[rlhf_lightning] exported the iteratively trained reward model to {out}")

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history), "iterations": self.iterations, "rm_updates": self.rm_updates,
            "reference_resets": self.reference_resets, "last_rollout": self.last_rollout,
            "rm_state": self.scorer.model.state_dict() if self.scorer is not None else None,
            "rm_optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "rm_statistics": self.scorer.statistics() if self.scorer is not None and self.rm_updates else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.iterations, self.rm_updates = state_dict["iterations"], state_dict["rm_updates"]
        self.reference_resets, self.last_rollout = state_dict["reference_resets"], state_dict["last_rollout"]
        if state_dict.get("rm_state") is not None:
            self._pending = {"rm_state": state_dict["rm_state"], "rm_optimizer": state_dict.get("rm_optimizer"),
                             "rm_statistics": state_dict.get("rm_statistics")}
            if self.scorer is not None:  # already set up: apply now (else in on_fit_start, once the scorer is known)
                self._apply_pending()

    def _apply_pending(self) -> None:
        """Put the checkpoint's RM weights, optimizer state and score statistics into the live scorer."""
        pending, self._pending = self._pending, None
        self.scorer.model.load_state_dict(pending["rm_state"])
        if pending.get("rm_optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(pending["rm_optimizer"])
        if pending.get("rm_statistics") is not None:
            self.scorer.set_statistics(*pending["rm_statistics"])


def _all_gather_pairs(pairs: list[Pair], trainer: L.Trainer) -> list[Pair]:
    """Every rank's pairs, in rank order, on every rank (so all ranks train the same RM); as is on one process."""
    dist = torch.distributed
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return pairs
    gathered: list[list[Pair] | None] = [None] * trainer.world_size
    dist.all_gather_object(gathered, pairs)
    return [p for part in gathered for p in (part or [])]
