"""Dynamic sampling's bookkeeping (DAPO §3.2): re-sampled groups replace uninformative ones, row for row.

A rollout's rows are grouped: rows i*G .. i*G+G-1 belong to prompt i. Re-sampling a few prompts gives a second,
smaller rollout; these functions build the one rollout (and rewards) whose row i is row `rows[i]` of the two
stacked, so everything downstream sees an ordinary rollout of the original size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


def replacement_rows(n_rows: int, group_size: int, groups: Tensor, new_groups: Tensor) -> Tensor:
    """Row index into [old rows; new rows]: every row of old group groups[k] taken from new group new_groups[k]
    instead, the rest kept. [n_rows]"""
    rows = torch.arange(n_rows)
    offsets = torch.arange(group_size)
    if groups.numel():
        rows[(groups.unsqueeze(-1) * group_size + offsets).flatten()] = n_rows + (
            new_groups.unsqueeze(-1) * group_size + offsets).flatten()
    return rows


def select_prompts(batch: dict[str, Any], idx: Tensor) -> dict[str, Any]:
    """The batch restricted to prompts `idx` (tensors and per-prompt lists indexed; anything else as it is)."""
    n = len(batch["prompts"])
    picked = idx.tolist()
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[idx.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = [value[i] for i in picked]
        else:
            out[key] = value
    return out


def cat_rows(a: Any, b: Any, pad_value: float = 0.0, left: bool = False) -> Any:
    """Rows of a then rows of b: tensors (padded to the longer dim 1, on the right or `left`), lists, dicts of
    them; None stays."""
    if a is None or b is None:
        return None
    if isinstance(a, dict):
        return {k: cat_rows(a[k], b[k], pad_value, left) for k in a}
    if dataclasses.is_dataclass(a):  # per-row stats (`TurnStats`): field by field
        return dataclasses.replace(a, **{f.name: cat_rows(getattr(a, f.name), getattr(b, f.name), pad_value, left)
                                         for f in dataclasses.fields(a)})
    if isinstance(a, Tensor):
        b = b.to(a.device)
        if a.dim() > 1 and a.shape[1] != b.shape[1]:
            width = max(a.shape[1], b.shape[1])
            pads = [(width - x.shape[1], 0) if left else (0, width - x.shape[1]) for x in (a, b)]
            a, b = (torch.nn.functional.pad(x, p, value=pad_value) for x, p in zip((a, b), pads))
        return torch.cat([a, b])
    return list(a) + list(b)


def select_rows(x: Any, rows: Tensor) -> Any:
    """Rows `rows` of a tensor, list or dict of them (None stays None)."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: select_rows(v, rows) for k, v in x.items()}
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: select_rows(getattr(x, f.name), rows) for f in dataclasses.fields(x)})
    if isinstance(x, Tensor):
        return x[rows.to(x.device)]
    return [x[i] for i in rows.tolist()]


def merge_rollouts(old: Any, new: Any, rows: Tensor, pad_token_id: int) -> Any:
    """The rollout whose row i is row rows[i] of [old; new]: re-sampled groups replace uninformative ones.
    Completions of different lengths are right-padded (pad token, mask 0), as the sampler pads them; prompts
    left-padded, as the data pads them."""
    def merged(name: str, a: Any, b: Any) -> Any:
        pad = pad_token_id if name in ("completion_ids", "prompt_ids") else 0
        return select_rows(cat_rows(a, b, pad, left=name.startswith("prompt_")), rows)

    samples = dataclasses.replace(old.samples, **{f.name: merged(f.name, getattr(old.samples, f.name),
                                                                  getattr(new.samples, f.name))
                                                  for f in dataclasses.fields(old.samples)})
    return dataclasses.replace(old, samples=samples, prompts=merged("prompts", old.prompts, new.prompts),
                               completions=merged("completions", old.completions, new.completions),
                               columns=merged("columns", old.columns, new.columns),
                               baseline_scores=merged("baseline_scores", old.baseline_scores, new.baseline_scores),
                               per_source={k: merged(k, v, new.per_source[k]) for k, v in old.per_source.items()
                                           if k in new.per_source})
