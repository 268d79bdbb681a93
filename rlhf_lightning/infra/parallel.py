"""Scaling through Lightning strategies: FSDP2 sharding (`ModelParallelStrategy`), precision, strategy checks.

No home-made distribution: Lightning launches the processes, builds the device mesh and the distributed sampler;
this file only says *what* to shard (`configure_model` of each module calls `shard_module`) and keeps sampling
correct on a sharded policy (`sampling_context`).

Why `ModelParallelStrategy` and not `FSDPStrategy`: Lightning's FSDP1 strategy does not support manual
optimization (Lightning #19626, #19685), and every RL module here optimizes manually; FSDP2 (`fully_shard` in
`configure_model`) does, on GPUs and on CPU processes with the gloo backend alike.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

FSDP_MISUSE = ("{name} uses manual optimization, which Lightning's FSDPStrategy does not support (Lightning "
               "#19626, #19685); use FSDP2 instead: rlhf_lightning.infra.parallel.FSDP2Strategy (a "
               "ModelParallelStrategy), e.g. --config configs/fsdp.yaml")


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` whose device mesh is pure data parallel by default: FSDP2 over every process.

    Lightning's defaults are `data_parallel_size = nodes` and `tensor_parallel_size = devices per node`, i.e. a
    tensor-parallel mesh inside each node; our modules apply no tensor parallelism, so with those defaults every
    rank of a node would get the same data (the sampler splits by the data-parallel mesh) and nothing would be
    sharded. Here `tensor_parallel_size` defaults to 1 and `data_parallel_size` to the world size, so
    `--trainer.devices N` works unchanged. The process group backend follows the device (gloo on CPU, NCCL on GPU).
    """

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto", tensor_parallel_size: int = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, **kwargs: Any):
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            world = self.num_nodes * self.num_processes
            if world % self._tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={self._tensor_parallel_size} does not divide the world size "
                                 f"{world}")
            self._data_parallel_size = world // self._tensor_parallel_size
        super().setup_environment()


_DESTROY_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group at interpreter exit, while Python is still alive (registered once, where a
    group exists). Lightning leaves the group to interpreter finalization, where gloo's worker threads can still
    hold work objects whose tensors need the GIL being torn down: a finished 2-process CPU run then aborted
    ("terminate called without an active exception", exit -6: once in the 2-process tests of 3 suite runs on
    2026-12-03; pytorch/pytorch#179291)."""
    global _DESTROY_REGISTERED
    dist = torch.distributed
    if _DESTROY_REGISTERED or not (dist.is_available() and dist.is_initialized()):
        return
    _DESTROY_REGISTERED = True
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    dist = torch.distributed
    if dist.is_initialized():
        dist.destroy_process_group()


def check_strategy(module: Any, strategy: Any) -> None:
    """Refuse Lightning's FSDPStrategy for a manually optimized module, with a message naming what works."""
    is_fsdp1 = isinstance(strategy, FSDPStrategy) or (isinstance(strategy, str) and strategy.startswith("fsdp")
                                                      and strategy != "fsdp2")
    if is_fsdp1 and not getattr(module, "automatic_optimization", True):
        raise ValueError(FSDP_MISUSE.format(name=type(module).__name__))


def is_fsdp2(trainer: Any) -> bool:
    """True when the module runs under a ModelParallelStrategy (FSDP2 sharding in `configure_model`)."""
    return trainer is not None and isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's MixedPrecisionPolicy for a Lightning precision flag.

    `bf16-mixed`: fp32 sharded (master) weights, gathered and computed in bf16, gradients reduced in fp32.
    `bf16-true` / `32-true`: the weights already have the compute dtype (cast before sharding), nothing to cast.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF model (the classes it lists in `_no_split_modules`), outermost first.

    Works through wrappers (peft's PeftModel, our ValueModel backbone) because it walks `modules()`.
    """
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_module(module: nn.Module, mesh: Any, precision: str, layered: bool = True,
                 device: torch.device | None = None) -> None:
    """`fully_shard` each decoder layer of `module` (when `layered`), then `module` itself as the root unit.

    One unit per layer is what makes FSDP2 save memory: only one layer's full weights exist at a time (plus the
    root's embeddings / head). For `bf16-true` the weights are cast first, so every shard holds bf16.
    Rank 0's weights are broadcast first: FSDP2 (unlike DDP) keeps each rank's own slice of its local tensor, so
    any weight initialised from an unseeded RNG (a LoRA A matrix, a fresh classifier head) would otherwise be
    stitched together from different initialisations.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if precision == "bf16-true":
        module.to(torch.bfloat16)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        module.to(device)  # NCCL broadcasts device tensors; fully_shard would move them there anyway
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.detach(), src=0)
    policy = mixed_precision_policy(precision)
    if layered:
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP2 module, on CPU, on rank 0 (empty elsewhere). A collective: every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model(module: nn.Module, rank: int, build: Callable[[], nn.Module]) -> nn.Module:
    """`module` with full weights for an export: itself when it is not sharded; under FSDP2 its weights are
    gathered (a collective: call it on every rank) into `build()`, a freshly built model of the same structure,
    on rank 0, while the other ranks get the sharded module back."""
    if not is_sharded(module):
        return module
    full = full_state_dict(module)
    if rank != 0:
        return module
    model = build()
    model.load_state_dict(full)
    return model


def run_dir(trainer: Any) -> Path:
    """The run's output folder: the first logger's `log_dir` (TensorBoard: `<save_dir>/<name>/version_<n>/`), else
    `default_root_dir`. A collective under DDP / FSDP2 (Lightning broadcasts rank 0's `trainer.log_dir`): call it
    on EVERY rank, also when only rank 0 writes there; a rank-0-only call waits for a peer that has moved on and
    the run dies at its end with "Connection closed by peer"."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check_all_trainable_sharded(root: nn.Module) -> None:
    """Every trainable parameter must live in a sharded unit: FSDP2 only reduces the gradients of its own
    parameters, so a plain one would silently train differently on each rank."""
    from torch.distributed.tensor import DTensor

    plain = [name for name, p in root.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if plain:
        raise ValueError(f"{type(root).__name__}: trainable parameters outside any FSDP2 unit ({plain[0]}, ...); "
                         "add their module to fsdp_units()")


@contextmanager
def sampling_context(model: nn.Module) -> Iterator[None]:
    """Keep a sharded model gathered while sampling from it; a no-op for an unsharded one.

    The decode loop stops when every row of *this rank* has emitted EOS, so ranks run different numbers of
    forward passes. With the usual reshard-after-forward, each forward all-gathers every layer: a rank that stops
    early would leave the others waiting forever. Switching resharding off makes the first (prefill) forward,
    which all ranks run, gather the weights once; the later decode steps need no collective at all (and are
    faster). Afterwards every unit is resharded and training resumes the memory-saving behaviour.
    """
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False, recurse=True)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in units:
            # layers reshard after forward (memory); the root keeps its weights (FSDP2's own default for the root)
            unit.set_reshard_after_forward(unit is not model, recurse=False)
