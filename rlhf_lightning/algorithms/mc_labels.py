"""Monte-Carlo step labels (Math-Shepherd, Wang et al. 2024): process labels for policy samples, without humans.

For step k of a completion, `num_rollouts` continuations are sampled from the policy given the prompt and steps
1..k; each full text (steps 1..k + continuation) is scored by the task's outcome verifier. The step's label is

    hard estimation   1.0 if any continuation reaches the correct answer, else 0.0
    soft estimation   the fraction of the continuations that do

so a step from which the policy can still finish correctly is a good step. Steps are split as process supervision
splits them (`algorithms.process`): `completion.split(separator)`, a step ends at its last character and the
separator starts the next one, so the continuation of step k's prefix begins with the separator (or EOS).

The last step's prefix is the whole completion: by default (`final_step="verify"`) it is labelled by the verifier
on the completion itself (the outcome, what its rollouts would converge to) and costs no sampling;
`final_step="rollout"` samples continuations from it too (e.g. for completions cut off by `max_new_tokens`).
With `end_step=True` each completion gets one label more, its end step's (`algorithms.process`): the verifier on
the completion itself ("finished and right"); `as_stepwise_rows` writes it as a last, empty step.

Cost: num_rollouts x (steps - 1) sampled continuations per completion (x steps with `final_step="rollout"`),
fewer with `dedupe` where completions share a prefix (GRPO groups often repeat their first steps).

`generate` is any callable `(prompt texts) -> continuation texts`, so the labelling is engine-agnostic;
`module_generate` builds it from a live policy module (its tokenizer, engine, sampling settings and seeded stream),
so a callback can label fresh samples of the policy being trained. `as_stepwise_rows` writes the labels in TRL's
stepwise-supervision format (`{"prompt", "completions": [step, ...], "labels": [bool, ...]}`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

MODES = ("hard", "soft")
FINAL_STEPS = ("verify", "rollout")
Generate = Callable[[list[str]], list[str]]  # prompt texts -> continuation texts, one per prompt


def step_prefixes(completion: str, separator: str = "\n") -> list[str]:
    """The completion through the end of each step: "a\\nb\\nc" -> ["a", "a\\nb", "a\\nb\\nc"].

    One prefix per `completion.split(separator)` piece (an empty completion has one empty step; a trailing
    separator makes a last, empty step), the number of step rewards process supervision expects."""
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"separator must be a non-empty string, got {separator!r}")
    prefixes, end = [], 0
    for piece in completion.split(separator):
        end += len(piece)
        prefixes.append(completion[:end])
        end += len(separator)
    return prefixes


def mc_step_labels(generate: Generate, prompts: Sequence[str], completions: Sequence[str], verifier: Any,
                   columns: dict[str, list] | None = None, separator: str = "\n", num_rollouts: int = 8,
                   mode: str = "hard", batch_size: int | None = None, final_step: str = "verify",
                   dedupe: bool = True, end_step: bool = False) -> list[list[float]]:
    """Math-Shepherd labels: one list per completion, one value per step (`step_prefixes`), NaN where the
    verifier had no opinion (None) on every continuation of that step.

    Args:
        generate: `(prompt texts) -> continuation texts`; called with `prompt + prefix` texts, each repeated
            `num_rollouts` times in a row (`module_generate` builds it from a policy module).
        prompts / completions / columns: the rows to label and their dataset columns (aligned lists, as the
            rollout has them: `Rollout.prompts`, `.completions`, `.columns`).
        verifier: the outcome verifier, TRL signature `f(prompts, completions, **columns)`, a callable or an
            import path / built-in name; a value >= 0.5 counts as correct, None as no opinion.
        num_rollouts: continuations per step (Math-Shepherd's N).
        mode: `hard` (1.0 if any continuation is correct) or `soft` (the fraction correct).
        batch_size: continuations per `generate` call. Every continuation of the batch is sampled in
            ceil(Q x num_rollouts / batch_size) calls (one call when None), Q the prefixes rolled out.
        final_step: `verify` (the last step is the verifier on the completion: no sampling) or `rollout`.
        dedupe: roll out a (prompt, prefix, columns) once, however many completions share it.
        end_step: append the end step's label, the verifier on the whole completion (no sampling).
    """
    _check_args(prompts, completions, num_rollouts, mode, batch_size, final_step)
    from ..rewards import resolve_reward_fn

    verifier = resolve_reward_fn(verifier)
    columns = {k: list(v) for k, v in (columns or {}).items()}
    queries, slots = _plan(prompts, completions, columns, separator, final_step == "rollout", dedupe)
    expanded = [q for q in queries for _ in range(num_rollouts)]  # (row, prefix) of every continuation
    continuations = sample_in_chunks(generate, [prompts[row] + prefix for row, prefix in expanded], batch_size)
    finals = [i for i, s in enumerate(slots) if s[-1] is None or end_step]  # completions verified as they are
    correct = _correct(verifier, prompts, columns, [row for row, _ in expanded] + finals,
                       [prefix + c for (_, prefix), c in zip(expanded, continuations)] +
                       [completions[i] for i in finals])  # [Q x N + len(finals)]
    values = _reduce(correct[:len(expanded)].view(len(queries), num_rollouts), mode).tolist()  # [Q]
    final_values = dict(zip(finals, correct[len(expanded):].tolist()))
    return [[final_values[i] if q is None else values[q] for q in s] + ([final_values[i]] if end_step else [])
            for i, s in enumerate(slots)]


def _check_args(prompts: Sequence[str], completions: Sequence[str], num_rollouts: int, mode: str,
                batch_size: int | None, final_step: str) -> None:
    checks = [
        (len(prompts) == len(completions), f"{len(prompts)} prompts but {len(completions)} completions"),
        (isinstance(num_rollouts, int) and num_rollouts >= 1, f"num_rollouts must be an integer >= 1, got "
         f"{num_rollouts!r}"),
        (mode in MODES, f"mode must be {'|'.join(MODES)}, got {mode!r}"),
        (batch_size is None or (isinstance(batch_size, int) and batch_size >= 1), f"batch_size must be an integer "
         f">= 1 or None, got {batch_size!r}"),
        (final_step in FINAL_STEPS, f"final_step must be {'|'.join(FINAL_STEPS)}, got {final_step!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _plan(prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list], separator: str,
          roll_last: bool, dedupe: bool) -> tuple[list[tuple[int, str]], list[list[int | None]]]:
    """(queries: (row, prefix) to roll out, in first-seen order; slots: per completion and step, the index of
    its query, None for a last step labelled by the verifier)."""
    queries: list[tuple[int, str]] = []
    seen: dict[tuple[str, str, str], int] = {}
    slots: list[list[int | None]] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        prefixes = step_prefixes(completion, separator)
        row_slots: list[int | None] = []
        for k, prefix in enumerate(prefixes):
            if k == len(prefixes) - 1 and not roll_last:
                row_slots.append(None)
                continue
            key = (prompt, prefix, repr([col[i] for col in columns.values()]))
            if not dedupe or key not in seen:
                seen[key] = len(queries)
                queries.append((i, prefix))
            row_slots.append(seen[key])
        slots.append(row_slots)
    return queries, slots


def sample_in_chunks(generate: Generate, texts: list[str], batch_size: int | None) -> list[str]:
    """`generate` over `texts`, `batch_size` at a time (all at once when None): ceil(len / batch_size) calls."""
    size = batch_size or max(len(texts), 1)
    out: list[str] = []
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        got = list(generate(chunk))
        if len(got) != len(chunk):
            raise ValueError(f"generate returned {len(got)} continuations for {len(chunk)} prompts")
        out += got
    return out


def _correct(verifier: Callable, prompts: Sequence[str], columns: dict[str, list], rows: list[int],
             texts: list[str]) -> torch.Tensor:
    """1.0 where the verifier scores text j (a completion of prompt rows[j]) >= 0.5, 0.0 below, NaN for no
    opinion [J]: one call through the reward-function path (its checks, TRL's conversational format)."""
    if not rows:
        return torch.zeros(0)
    from ..rewards import call_reward_fns

    _, per_fn = call_reward_fns([verifier], None, [prompts[r] for r in rows], texts,
                                {name: [col[r] for r in rows] for name, col in columns.items()})
    scores = per_fn[0]  # [J]
    return torch.where(scores.isnan(), scores, (scores >= 0.5).float())


def _reduce(correct: torch.Tensor, mode: str) -> torch.Tensor:
    """Per query [Q] from [Q, N] 0/1/NaN: the fraction correct among the judged (soft), or whether any is (hard);
    NaN when none was judged."""
    judged = (~correct.isnan()).sum(dim=-1)  # [Q]
    hits = torch.nan_to_num(correct).sum(dim=-1)  # [Q]
    value = hits / judged.clamp(min=1) if mode == "soft" else (hits > 0).float()
    return torch.where(judged > 0, value, torch.full_like(value, math.nan))


def module_generate(module: Any, max_new_tokens: int | None = None, temperature: float | None = None) -> Generate:
    """`generate` for `mc_step_labels` from a policy module (GRPOModule, PPOModule): texts tokenized by its
    tokenizer, left-padded as the data pads prompts, sampled by `module.generate` (its rollout engine, no grad,
    eval mode) under `module.sampling_params()` with the module's seeded stream (`module._update_generator()`,
    saved in checkpoints), decoded without EOS.

    `max_new_tokens` / `temperature`: None = the module's. `min_new_tokens` is 0 (a continuation of a finished
    prefix may be just EOS)."""
    from ..rollout import decode_completions, left_pad

    if getattr(module, "env_interaction", None) is not None:
        raise ValueError("Monte-Carlo step labels continue a step's prefix in one turn; a module with an "
                         "`environment` samples whole episodes, which have no such prefix")
    tok, base = module.tokenizer, module.sampling_params()
    params = dataclasses.replace(base, min_new_tokens=0, max_new_tokens=max_new_tokens or base.max_new_tokens,
                                 temperature=base.temperature if temperature is None else temperature)

    def generate(texts: list[str]) -> list[str]:
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if not seqs:
            return []
        empty = [i for i, s in enumerate(seqs) if not s]
        if empty:
            raise ValueError(f"prompt text {texts[empty[0]]!r} has no tokens to continue")
        ids, mask = left_pad(seqs, tok.pad_token_id)  # [B, P]
        out = module.generate(ids.to(module.device), mask.to(module.device), params, module._update_generator())
        return decode_completions(tok, out.completion_ids, out.completion_mask)

    return generate


def as_stepwise_rows(prompts: Sequence[str], completions: Sequence[str], labels: Sequence[Sequence[float]],
                     separator: str = "\n", threshold: float = 0.5) -> list[dict[str, Any]]:
    """Rows in TRL's stepwise-supervision format, `{"prompt": str, "completions": [step, ...], "labels": [bool,
    ...]}`: the steps are `completion.split(separator)` (without separators), a label is `value >= threshold`
    (hard labels are 0/1; soft ones are thresholded); one label more than steps is the end step's (`mc_step_labels`
    with `end_step`), written as a last step "". A completion with a NaN label (no verdict) is left out, and so is
    one with an empty step that is not the end step (`StepwiseDataModule` refuses those)."""
    if not (len(prompts) == len(completions) == len(labels)):
        raise ValueError(f"prompts/completions/labels differ in length: {len(prompts)}/{len(completions)}/"
                         f"{len(labels)}")
    rows = []
    for i, (prompt, completion, values) in enumerate(zip(prompts, completions, labels)):
        steps = completion.split(separator)
        if len(values) not in (len(steps), len(steps) + 1):
            raise ValueError(f"completion {i} has {len(steps)} steps but {len(values)} labels")
        if any(math.isnan(float(v)) for v in values) or not all(step.strip() for step in steps):
            continue
        steps = steps + [""] * (len(values) - len(steps))  # the end step
        rows.append({"prompt": prompt, "completions": steps, "labels": [float(v) >= threshold for v in values]})
    return rows
