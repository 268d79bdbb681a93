"""Set-up shared by the benchmarks that drive TRL beside rlhf_lightning (learning_vs_trl.py, throughput.py).

Only what both scripts must do the same way lives here, so a fairness choice is made once:
- `trl_grpo_config`: TRL's `GRPOConfig` with the settings that make it comparable to `GRPOModule` on CPU.
- `matmul_peak_flops`: the machine's measured matmul throughput, the "compute floor" a step is compared with.
- `machine_line`: CPU, thread count and load average, recorded next to every timing (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# our loss_agg -> TRL's loss_type (the same normalisation)
LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


def trl_grpo_config(output_dir: str | Path, *, completions_per_step: int, group_size: int, max_steps: int,
                    max_new_tokens: int, lr: float, beta: float, seed: int = 0, bf16: bool = False,
                    epsilon: float = 0.2, epsilon_high: float = 0.2, loss_agg: str = "token-mean",
                    scale_rewards: str = "group", num_iterations: int = 1, mask_truncated: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, max_grad_norm: float = 1.0,
                    logging_steps: int = 1, generation_kwargs: dict[str, Any] | None = None,
                    lr_schedule: str = "constant", warmup_steps: int = 0, min_lr_ratio: float = 0.1):
    """TRL's `GRPOConfig` matched to `GRPOModule`: all completions of a step in ONE optimizer step.

    Fixed on TRL's side for a fair CPU comparison: no vLLM, `use_cpu`, no reporting or saving, plain sampling
    (`top_k=0`), and activation (gradient) checkpointing OFF (TRL's default is on; ours does not recompute, and
    recomputation would only slow TRL down). `lr_schedule`: `constant` (after a linear warm-up) or `cosine`
    (linear warm-up, then cosine to min_lr_ratio x lr: TRL's `cosine_with_min_lr`, the same curve as ours).
    """
    from trl import GRPOConfig

    # transformers 5 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing
    fields = GRPOConfig.__dataclass_fields__
    ckpt = next(f for f in ("activation_checkpointing", "gradient_checkpointing") if f in fields)
    return GRPOConfig(
        output_dir=str(output_dir), seed=seed, use_cpu=True, bf16=bf16, report_to="none",
        learning_rate=lr, weight_decay=0.0, warmup_steps=warmup_steps,
        **({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": min_lr_ratio}}
           if lr_schedule == "cosine" else {"lr_scheduler_type": "constant_with_warmup"}),
        max_grad_norm=max_grad_norm, per_device_train_batch_size=completions_per_step,
        gradient_accumulation_steps=1, num_generations=group_size, max_steps=max_steps, beta=beta,
        epsilon=epsilon, epsilon_high=epsilon_high, loss_type=LOSS_TYPE[loss_agg], scale_rewards=scale_rewards,
        num_iterations=num_iterations, importance_sampling_level="token",
        mask_truncated_completions=mask_truncated, max_completion_length=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=0, use_vllm=False, **{ckpt: False},
        save_strategy="no", eval_strategy="no", logging_steps=logging_steps, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, shuffle_dataset=True,
        generation_kwargs=generation_kwargs)


def matmul_peak_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.5) -> float:
    """Best-of-repeats FLOP/s of an n x n x n matmul in `dtype` on the current torch threads.

    The best repeat, not the mean: on a shared machine the best is the closest to what the hardware can do, and
    it is what a perfectly efficient training step could reach (its "compute floor").
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):  # warm-up: oneDNN picks and caches its kernel (AMX for bf16 where the CPU has it)
        a @ b
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bf16_flags() -> list[str]:
    """The CPU flags that make bf16 matmuls fast (AMX tiles, AVX512-BF16); without them bf16 is emulated."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags.split(":", 1)[1].split() if f.startswith("amx") or f == "avx512_bf16")


def machine_line(threads: int) -> str:
    one, five, fifteen = load_average()
    bf16 = ", ".join(bf16_flags()) or "none (bf16 is emulated: slower than fp32)"
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch thread(s), "
            f"bf16 CPU flags: {bf16}, load average {one:.1f} / {five:.1f} / {fifteen:.1f}")


def add_rollout_args(parser: argparse.ArgumentParser, *, steps: int, warmup: int, threads: int) -> None:
    """The rollout-size flags `ppo_vs_grpo.py` and `scaling.py` share (model preset, completions, timing)."""
    parser.add_argument("--preset", default="small")
    parser.add_argument("--completions", type=int, default=64, help="completions per rollout")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="forced completion length")
    parser.add_argument("--steps", type=int, default=steps, help="rollouts per run")
    parser.add_argument("--warmup", type=int, default=warmup, help="rollouts excluded from the timing")
    parser.add_argument("--threads", type=int, default=threads)


def parse_rollout_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse a parser set up with `add_rollout_args`, refusing a warm-up that leaves no rollout to time."""
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    return args


def addition_prompt_data(batch_size: int, steps: int):
    """Built-in addition prompts for `steps` rollouts of `batch_size` prompts (at least 1,000 rows), no validation:
    the data `ppo_vs_grpo.py` and `scaling.py` time their rollouts on."""
    from rlhf_lightning import PromptDataModule

    return PromptDataModule(task="addition", num_train=max(1000, batch_size * (steps + 1)), num_val=0,
                            batch_size=batch_size)


def step_timer(metric_keys: tuple[str, ...] = ()):
    """A Lightning callback whose `rows` get, per training batch, its wall seconds `s` and the listed
    `trainer.callback_metrics` at its end (lightning is imported here: the TRL 0.21 venv imports this file too)."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_train_batch_start(self, *_) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *_) -> None:
            metrics = trainer.callback_metrics
            self.rows.append({"s": time.perf_counter() - self.t0, **{k: float(metrics[k]) for k in metric_keys}})

    return StepTimer()


def run_child(script: str, argv: list[str], one: str) -> dict[str, Any]:
    """Run `script argv --one <one>` in a fresh process (its own peak RSS and allocator state) and return the
    JSON dict it prints on its last line."""
    out = subprocess.run([sys.executable, script, *argv, "--one", one], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
