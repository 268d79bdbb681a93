"""Sampled evaluation of a policy module: `val/pass@k` and `val/maj@k` (`test/...` under `trainer.test`).

With `eval_num_samples: n > 0`, every validation (and `rlhf-lightning validate` / `test`) batch draws n completions
per held-out prompt in one engine call (`generate`, at `eval_temperature` / `eval_top_p`, `val_max_new_tokens`
long, from a generator of its own seeded with `eval_seed` and the rank, so the training sampling stream is not
touched), scores them with the validation verifier (the one behind `val/accuracy`) and votes on their extracted
answers (`rewards.extract_answer`, compared as `rewards.canonical_answer`). Per prompt: `evaluation.pass_at_k` for
each k of `eval_k` from all n samples, `evaluation.maj_at_k` over the first k. The epoch logs sums / prompt count,
reduced over ranks exactly: one all-reduce of the sums and counts (never a mean of per-rank means), and the rows a
`DistributedSampler` repeats to even out the ranks are left out, so every held-out prompt counts once.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn


def default_eval_k(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n}) if n > 0 else []


class SampledEvaluation:
    """Mixin of `PolicyModuleBase`: pass@k / maj@k of `eval_num_samples` sampled completions per held-out prompt."""

    def eval_checks(self, hp) -> list[tuple[bool, str]]:
        """The range checks of the eval_* arguments (part of `hparam_checks`)."""
        n, ks = hp.eval_num_samples, hp.eval_k
        ks_ok = ks is None or (len(ks) > 0 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                   for k in ks))
        return [
            (isinstance(n, int) and n >= 0, f"eval_num_samples must be an integer >= 0 (0 = off), got {n!r}"),
            (ks_ok, f"eval_k must be a non-empty list of integers >= 1, got {ks!r}"),
            (not ks_ok or ks is None or not isinstance(n, int) or max(ks) <= n,
             f"eval_k={list(ks or [])} asks for k={max(ks or [0])} but eval_num_samples={n}: every k must be <= "
             "eval_num_samples"),
            (hp.eval_temperature > 0, f"eval_temperature must be > 0 (sampling), got {hp.eval_temperature}"),
            (0 < hp.eval_top_p <= 1, f"eval_top_p must be in (0, 1], got {hp.eval_top_p}"),
        ]

    @property
    def eval_ks(self) -> list[int]:
        """The k of pass@k / maj@k, sorted: `eval_k`, or `default_eval_k(eval_num_samples)`."""
        ks = self.hparams.get("eval_k")
        return sorted(set(ks)) if ks else default_eval_k(self.hparams.get("eval_num_samples", 0))

    @property
    def eval_prefix(self) -> str:
        """`test` under `trainer.test`, else `val`: the namespace of the validation metrics."""
        trainer = self._trainer
        return "test" if trainer is not None and trainer.testing else "val"

    def eval_sampling_params(self):
        """The `SamplingParams` of the sampled evaluation: eval_temperature / eval_top_p, val_max_new_tokens."""
        from ..rollout import SamplingParams

        hp = self.hparams
        return SamplingParams(max_new_tokens=self.val_max_new_tokens, temperature=hp.eval_temperature,
                              top_p=hp.eval_top_p, eos_token_id=self.tokenizer.eos_token_id,
                              pad_token_id=self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------ epoch state
    def _reset_sampled_eval(self) -> None:
        ks = self.eval_ks
        self._eval_sums = [0.0] * (2 * len(ks))  # pass@k for each k, then maj@k for each k: sums over prompts
        self._eval_prompts = 0
        self._eval_unusable = 0  # batches whose verifier values were not all 0/1
        self._eval_rows_seen = 0
        self._eval_generator = None

    def on_validation_epoch_start(self) -> None:
        self._reset_sampled_eval()

    def on_test_epoch_start(self) -> None:
        self._reset_sampled_eval()

    def on_validation_epoch_end(self) -> None:
        self.log_sampled_eval()

    def on_test_epoch_end(self) -> None:
        self.log_sampled_eval()

    def _generator_for_eval(self) -> torch.Generator:
        if self._eval_generator is None:
            self._eval_generator = torch.Generator(device=self.device)
            self._eval_generator.manual_seed(self.hparams.eval_seed + 1000 * self.global_rank)
        return self._eval_generator

    def _real_rows(self, rows: int) -> int:
        """How many of this batch's `rows` are held-out prompts rather than the repeats a `DistributedSampler`
        appends so that every rank gets as many rows (rank r's j-th row is row r + j * world of the padded list;
        those past the dataset's end are repeats)."""
        from torch.utils.data import DistributedSampler

        trainer = self.trainer
        loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        seen, self._eval_rows_seen = self._eval_rows_seen, self._eval_rows_seen + rows
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return rows
        mine = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
        return max(0, min(rows, mine - seen))

    # ------------------------------------------------------------------------------------------ the step
    def sampled_eval_step(self, batch: dict[str, Any]) -> None:
        """Sample, verify and vote for one validation batch; adds to the epoch's sums (`log_sampled_eval` logs)."""
        n = self.hparams.get("eval_num_samples", 0)
        verifier = self.validation_verifier()
        if not n:
            return
        if verifier is None:
            rank_zero_warn(f"eval_num_samples={n}: no verifier to score the samples (no reward function); "
                           "val/pass@k and val/maj@k are not logged")
            return
        from ..rewards import canonical_answer, extract_answer
        from ..rollout import decode_completions

        if not hasattr(self, "_eval_sums"):  # validation_step called outside an epoch (by hand)
            self._reset_sampled_eval()
        B, first = len(batch["prompts"]), self._eval_rows_seen == 0
        real = self._real_rows(B)
        samples = self.generate(batch["prompt_ids"].repeat_interleave(n, dim=0),
                                batch["prompt_mask"].repeat_interleave(n, dim=0), self.eval_sampling_params(),
                                self._generator_for_eval(), rows=self.batch_rows(batch, repeat=n))
        completions = decode_completions(self.tokenizer, samples.completion_ids, samples.completion_mask)
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        values = self.score(prompts, completions, self.reward_columns(batch, repeat=n, samples=samples),
                            fns=[verifier])[1][0]
        values = values.reshape(B, n)[:real].double().cpu()
        if not bool(((values == 0) | (values == 1) | values.isnan()).all()):
            self._eval_unusable += 1
            return
        extracted = [extract_answer(c) for c in completions]
        answers = [canonical_answer(a) for a in extracted]
        self.add_sampled_eval(values == 1, [answers[i * n:(i + 1) * n] for i in range(real)])
        if first and real and self.trainer.global_rank == 0 and not self.trainer.sanity_checking:
            self.log_eval_samples(prompts[:n], completions[:n], extracted[:n], values[0])

    def log_eval_samples(self, prompts: list[str], completions: list[str], answers: list[str | None],
                         correct: torch.Tensor, max_rows: int = 8) -> None:
        """`val/samples`: the first held-out prompt's sampled completions, their extracted answers and whether the
        verifier took them, in every logger that shows tables (`infra.media`)."""
        from ..infra.media import log_table

        rows = [[p, c, str(a), float(v)] for p, c, a, v in zip(prompts, completions, answers, correct.tolist())]
        log_table(self.loggers, f"{self.eval_prefix}/samples", ["prompt", "completion", "answer", "correct"],
                  rows[:max_rows], self.trainer.global_step)

    def add_sampled_eval(self, correct: torch.Tensor, answers: list[list[str | None]]) -> None:
        """Add prompts' pass@k and maj@k to the epoch's sums: `correct` [P, n] bool, `answers` P lists of n
        canonical answers (None = no answer)."""
        from ..evaluation import maj_at_k, pass_at_k

        ks = self.eval_ks
        for row, votes in zip(correct.tolist(), answers):
            c = sum(row)
            for j, k in enumerate(ks):
                self._eval_sums[j] += pass_at_k(len(row), c, k)
                self._eval_sums[len(ks) + j] += maj_at_k(votes, row, k)
        self._eval_prompts += len(answers)

    def log_sampled_eval(self) -> None:
        """Reduce the epoch's sums and prompt counts over ranks (one all-reduce) and log their ratios."""
        if not self.hparams.get("eval_num_samples", 0) or self.validation_verifier() is None:
            return
        if not hasattr(self, "_eval_sums"):
            self._reset_sampled_eval()
        ks = self.eval_ks
        local = torch.tensor([*self._eval_sums, self._eval_prompts, self._eval_unusable], dtype=torch.float64,
                             device=self.device)
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        total = total.tolist()
        prompts, unusable = total[-2], total[-1]
        if unusable:
            rank_zero_warn("the validation verifier gave values other than 0/1 (or None): pass@k / maj@k need a "
                           "right/wrong verifier and are not logged")
            return
        if not prompts:
            return
        names = [f"{self.eval_prefix}/{metric}@{k}" for metric in ("pass", "maj") for k in ks]
        for name, value in zip(names, total):
            # identical on every rank after the all-reduce: "max" keeps the value exactly
            self.log(name, value / prompts, batch_size=1, sync_dist=True, reduce_fx="max")
