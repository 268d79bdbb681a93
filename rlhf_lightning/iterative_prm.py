"""Iterative RL with a process reward model: DeepSeekMath's Algorithm 1 as written for process supervision.

`IterativeProcessRewardModelCallback` is `iterative.IterativeCallbackBase`'s loop (fresh on-policy samples every K
rollouts, 10% replay, continued training of the reward model, reference reset, exact resume, export at fit end)
with a process reward model in it. Every iteration it

    1. samples fresh completions of the current policy on training prompts (the shared loop);
    2. labels every step of each (and its end, when the PRM scores ends: the verifier on the whole completion) by
       Monte-Carlo estimation (Math-Shepherd, `algorithms.mc_labels.mc_step_labels`, hard estimation): from each
       step's prefix `num_rollouts` continuations are sampled from the policy being trained (`module_generate`:
       its engine, sampling settings and seeded stream) and the step is correct when any reaches the right answer
       by `labeler`, the task's outcome verifier;
    3. writes them as TRL stepwise rows (`mc_labels.as_stepwise_rows`), mixes in 10% of the earlier rows, and
       continues training the PRM with the token-classification cross-entropy at each step's end
       (`modules.process_reward_model.step_loss`, `ProcessRewardModel`'s loss), inputs built as the PRM reads
       them (`rewards.model_inputs.stepwise_input_ids`);
    4. resets the reference to the policy.

The PRM trained is the module's `ProcessRewardModelSource` (`GRPOModule(process_reward_model=...)`), the very
network that scores GRPO's steps: shared, not copied. The number of steps per row is whatever the rows have.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from .algorithms.mc_labels import as_stepwise_rows, mc_step_labels, module_generate
from .iterative import IterativeCallbackBase, Row, Samples
from .modules.process_reward_model import ProcessRewardModel, export_config, step_loss, step_metrics
from .rewards import ProcessRewardModelSource
from .rewards.model import eval_mode
from .rewards.model_inputs import right_pad, step_label_row, stepwise_input_ids


class IterativeProcessRewardModelCallback(IterativeCallbackBase):
    """DeepSeekMath Algorithm 1 for `GRPOModule` with a process reward model: Monte-Carlo step labels of fresh
    policy samples, token-classification cross-entropy at each step's end.

    Args:
        labeler: the task's outcome verifier, `f(prompts, completions, **columns) -> list of 0/1` (a callable or an
            import path / built-in name, e.g. `rlhf_lightning.rewards.final_answer_match`): it labels the samples
            and, as Math-Shepherd's verifier, the continuations of each step's prefix.
        process_reward_model: an exported `ProcessRewardModel` `hf_model/` directory to train and make the module's
            process reward (it replaces the module's `ProcessRewardModelSource`, or is appended when there is
            none); None = train the one the module has (`GRPOModule(process_reward_model=...)`).
        every_n_steps: K, rollouts between iterations (an iteration runs after rollouts K, 2K, ...).
        samples_per_iteration: fresh policy completions to sample and label per iteration (rounded up to whole
            groups).
        replay_fraction: historical rows replayed per iteration, as a fraction of the new rows (paper: 0.1).
        num_rollouts: Math-Shepherd's N, continuations sampled from each step's prefix (hard estimation: the step
            is correct if any of them ends right). The last step is the verifier on the completion itself.
        mc_batch_size: continuations per sampling call of the labelling (null = all in one call).
        mc_max_new_tokens: the continuations' token budget (null = the module's `max_new_tokens`).
        rm_epochs / rm_lr / rm_batch_size / rm_max_grad_norm: the PRM's training (AdamW, kept across iterations;
            `rm_batch_size` rows per step).
        reset_reference: copy the policy into `ref_policy` after each iteration (no-op when beta = 0; refused with
            LoRA, whose reference is the base model itself).
        seed: seeds the prompt draws, shuffles and replay sampling (offset by iteration and rank); the
            continuations come from the module's seeded sampling stream.

    Logs `iterative/rows`, `iterative/replay_rows`, `iterative/mc_continuations` (continuations sampled this
    iteration), `iterative/step_label_mean` (share of the new rows' steps labelled correct),
    `iterative/prm_step_accuracy_before` / `iterative/prm_step_f1_before` (the PRM on the fresh rows before the
    update: held-out; F1 of the incorrect class), `iterative/prm_step_accuracy` (after, on the rows it trained on),
    `iterative/prm_loss`, and the shared keys. Exports `<log_dir>/process_reward_model/` at fit end.
    """

    source_type = ProcessRewardModelSource
    model_arg = "process_reward_model"
    prefix = "prm"
    unit = "rows"
    export_name = "process_reward_model"

    def __init__(self, labeler: str | Callable, process_reward_model: str | None = None, every_n_steps: int = 50,
                 samples_per_iteration: int = 256, replay_fraction: float = 0.1, num_rollouts: int = 8,
                 mc_batch_size: int | None = 512, mc_max_new_tokens: int | None = None, rm_epochs: int = 1,
                 rm_lr: float = 1e-4, rm_batch_size: int = 32, rm_max_grad_norm: float | None = 1.0,
                 reset_reference: bool = True, seed: int = 0):
        super().__init__(labeler, process_reward_model, every_n_steps, samples_per_iteration, replay_fraction,
                         rm_epochs, rm_lr, rm_batch_size, rm_max_grad_norm, reset_reference, seed)
        for name, value, optional in (("num_rollouts", num_rollouts, False), ("mc_batch_size", mc_batch_size, True),
                                      ("mc_max_new_tokens", mc_max_new_tokens, True)):
            if not ((optional and value is None) or (isinstance(value, int) and value >= 1)):
                raise ValueError(f"{name} must be an integer >= 1{' or null' if optional else ''}, got {value!r}")
        self.num_rollouts, self.mc_batch_size, self.mc_max_new_tokens = num_rollouts, mc_batch_size, mc_max_new_tokens

    @property
    def process_reward_model(self) -> str | None:
        return self.model_path

    def build_scorer(self, pl_module: L.LightningModule) -> ProcessRewardModelSource:
        return ProcessRewardModelSource(self.model_path, device=pl_module.device,
                                        aggregate=getattr(pl_module, "process_reward_aggregation", "steps"))

    def find_scorer(self, pl_module: L.LightningModule) -> ProcessRewardModelSource:
        scorer = super().find_scorer(pl_module)
        if hasattr(pl_module, "process_reward_source"):
            pl_module.process_reward_source = scorer  # the module's own name for its PRM, kept true
        return scorer

    # ------------------------------------------------------------------------------------------ rows
    def make_rows(self, pl_module: L.LightningModule, samples: Samples) -> tuple[list[Row], dict[str, float]]:
        """Stepwise rows of this rank's samples, every step labelled by Monte-Carlo hard estimation."""
        sep, sampled = self.scorer.step_separator, []
        generate = module_generate(pl_module, max_new_tokens=self.mc_max_new_tokens)

        def counted(texts: list[str]) -> list[str]:
            sampled.append(len(texts))
            return generate(texts)

        labels = mc_step_labels(counted, samples.prompts, samples.completions, self.labeler, samples.columns,
                                separator=sep, num_rollouts=self.num_rollouts, mode="hard",
                                batch_size=self.mc_batch_size, end_step=self.scorer.score_end)
        rows = as_stepwise_rows(samples.prompts, samples.completions, labels, separator=sep)
        steps = [float(y) for row in rows for y in row["labels"]]
        return rows, {"iterative/mc_continuations": float(sum(sampled)),
                      "iterative/step_label_mean": sum(steps) / len(steps) if steps else float("nan")}

    # ------------------------------------------------------------------------------------------ the PRM
    def _logits_and_labels(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, L, 2] float32, token labels [B, L]: step k's label at its separator's last token, -100
        elsewhere) of stepwise rows, read as the PRM scores them."""
        from .data.rows import prompt_text

        tok, model, sep = self.scorer.tokenizer, self.scorer.model, self.scorer.step_separator
        built = [stepwise_input_ids(tok, prompt_text(tok, r["prompt"]), list(r["completions"]), sep) for r in rows]
        ids, mask = right_pad([b[0] for b in built], tok.pad_token_id)  # [B, L]
        labels = torch.tensor([step_label_row(ids.shape[1], positions, r["labels"])
                               for (_, positions), r in zip(built, rows)], dtype=torch.long)  # [B, L]
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, L, 2]
        return logits, labels.to(device)

    def batch_loss(self, rows: list[Row]) -> torch.Tensor:
        return step_loss(*self._logits_and_labels(rows))

    @torch.no_grad()
    def step_metrics(self, rows: list[Row]) -> dict[str, float]:
        """`ProcessRewardModel`'s step metrics (step_accuracy, step_f1 of the incorrect class, first_error_found)
        of the current PRM on `rows`, in eval mode, `rm_batch_size` rows at a time."""
        metrics = step_metrics()
        with eval_mode(self.scorer.model):
            for i in range(0, len(rows), self.rm_batch_size):
                logits, labels = self._logits_and_labels(rows[i:i + self.rm_batch_size])
                ProcessRewardModel.update_step_metrics(metrics, logits.argmax(-1).cpu(), labels.cpu())
        return {name: float(metric.compute()) for name, metric in metrics.items()}

    def metrics_before(self, new: list[Row]) -> dict[str, float]:
        got = self.step_metrics(new)
        return {"iterative/prm_step_accuracy_before": got["step_accuracy"],
                "iterative/prm_step_f1_before": got["step_f1"]}

    def metrics_after(self, train_set: list[Row]) -> dict[str, float]:
        return {"iterative/prm_step_accuracy": self.step_metrics(train_set)["step_accuracy"]}

    def prepare_export(self) -> None:
        """The export reads as a `ProcessRewardModel`'s: `config.step_separator`, `scores_end` and the class names."""
        export_config(self.scorer.model.config, self.scorer.step_separator, self.scorer.score_end)
