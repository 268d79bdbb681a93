"""Overlap of sampling and training (`off_policy_steps: 1`): rollout k+1 is sampled while the update on rollout k runs.

The modules' `training_step(batch k)` with an `OverlappedSampler` (`modules.rl.RLModule.overlapped_step`):

    main thread                                           sampler thread (its own copy of the policy)
    take rollout k-1 (wait if still sampling)
    copy <- θ_{k-1}  (`sync`: the weights after k-1 updates)
    submit batch k  ────────────────────────────────────▶ sample batch k with θ_{k-1}, then its log-probs under
    score rollout k-1, update θ_{k-1} -> θ_k                 θ_{k-1} (the behaviour policy of the importance ratio)

Rollout k-1 was sampled with θ_{k-2} and is trained at θ_{k-1}: one optimizer step stale (`rollout/staleness`), the
ratio π_θ / π_behaviour clipped as usual. The first `training_step` only submits (no update: `trainer.max_steps`
optimizer steps take max_steps + 1 batches), and the batch submitted at the last step is never trained.

Why a thread, not a process: torch ops release the GIL, so with one intra-op thread each the decode loop and the
update run on two cores at once, with no weights to serialise: `sync` is a memcpy between two models in the same
memory. The copy is the cost: one more set of policy weights (like a colocated serving engine). Autocast is
thread-local, so the caller's autocast state (Lightning's `bf16-mixed`) is re-entered on the sampler thread.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable

import torch


class OverlappedSampler:
    """One background thread sampling with its own frozen copy of the policy; at most one job in flight."""

    def __init__(self, policy: torch.nn.Module, engine_cls: type, device_type: str) -> None:
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)  # the behaviour policy θ_{k-1}
        self.engine = engine_cls(self.model)
        self.device_type = device_type
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-sampler")
        self.pending: Future | None = None

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's parameters and buffers into the sampler's model (only while no job runs)."""
        assert self.pending is None or self.pending.done(), "sync while the sampler thread reads the weights"
        for dst, src in zip(_tensors(self.model), _tensors(policy), strict=True):
            dst.copy_(src)

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Run `job(self, *args)` on the sampler thread, under no_grad and the caller's autocast state."""
        assert self.pending is None, "submit with a job still pending"
        autocast = (torch.autocast(self.device_type, dtype=torch.get_autocast_dtype(self.device_type))
                    if torch.is_autocast_enabled(self.device_type) else nullcontext())

        def run() -> Any:
            with torch.no_grad(), autocast:
                return job(self, *args)

        self.pending = self._pool.submit(run)

    def restore(self, result: Any) -> None:
        """A finished job's result (from a checkpoint), as if it had just been sampled."""
        future: Future = Future()
        future.set_result(result)
        self.pending = future

    def wait(self) -> Any:
        """The pending job's result (raising its exception), leaving it pending; None when there is none."""
        return None if self.pending is None else self.pending.result()

    def take(self) -> Any:
        """`wait`, then clear the slot for the next `submit`."""
        result = self.wait()
        self.pending = None
        return result

    def close(self) -> None:
        """Let a running job finish (its result is dropped) and stop the thread."""
        self.pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)


def _tensors(model: torch.nn.Module):
    yield from (p.data for p in model.parameters())
    yield from model.buffers()
