"""CPU memory reuse: give glibc's malloc the caching behaviour PyTorch's CUDA allocator has.

On the GPU, PyTorch's caching allocator keeps freed blocks and hands them out again. On the CPU, tensors come from
glibc malloc, which serves every block above its mmap threshold (at most 32 MiB) with a fresh `mmap` and gives it
back with `munmap` when the tensor dies. An RL step allocates and frees the same large activations every step
(a [64, 71, 3072] fp32 MLP activation is 56 MiB), so each step the kernel maps, zero-fills and page-faults
gigabytes again; keeping freed memory cuts the page faults and the system time of a step several-fold
(measured in docs/performance.md, "Reusing freed CPU memory").

`keep_freed_memory()` sets two glibc malloc options for the whole process: M_MMAP_MAX = 0 (large blocks come
from the heap, so a freed one can be reused) and M_TRIM_THRESHOLD = -1 (the heap is never shrunk back to the
OS). The trade-off is the CUDA allocator's: the process keeps its peak memory instead of returning it between
steps. The RL and reward-model modules call it at `setup` with their device (a no-op off the CPU); set the
environment variable `RLHF_LIGHTNING_CPU_ALLOCATOR=system` to keep glibc's defaults (`cache`, the default,
applies it). It does nothing outside Linux/glibc (e.g. musl or macOS), where the options do not exist.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

ENV_VAR = "RLHF_LIGHTNING_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_applied = False


def allocator_setting() -> str:
    """`cache` (default) or `system`, from RLHF_LIGHTNING_CPU_ALLOCATOR; anything else is a one-line error."""
    value = os.environ.get(ENV_VAR, "cache").strip().lower() or "cache"
    if value not in ("cache", "system"):
        raise ValueError(f"{ENV_VAR} must be 'cache' (reuse freed CPU memory) or 'system' (glibc defaults), "
                         f"got {os.environ.get(ENV_VAR)!r}")
    return value


def keep_freed_memory(device: torch.device | str = "cpu") -> bool:
    """Make glibc malloc keep freed memory for reuse when training on `device` is on the CPU (see the module
    docstring). True if the setting is in effect in this process, False where it was turned off or cannot apply
    (another device: its memory is not glibc's). Idempotent."""
    global _applied
    if torch.device(device).type != "cpu":
        return False
    if _applied:
        return True
    if allocator_setting() == "system" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    return _applied
