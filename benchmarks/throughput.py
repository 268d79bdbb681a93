"""Training throughput: rlhf_lightning against TRL on the same machine, model, batch and precision.

    .venv-bench/bin/python benchmarks/throughput.py --out bench_out/throughput            # everything
    .venv-bench/bin/python benchmarks/throughput.py --algos grpo --sizes small --precisions fp32 --rounds 1

What is compared (issue 7):
- GRPO: `GRPOModule` vs TRL's `GRPOTrainer` (the bench venv's release): 8 prompts x 8 samples per step, 64
  completion tokens forced (`min_new_tokens`), beta 0.04 (a reference model runs), mu = 1, one optimizer step per
  rollout, token-mean loss (TRL `dapo`), gradient clipping 1.0, activation checkpointing off on TRL's side.
- PPO: `PPOModule` vs TRL 0.21's `PPOTrainer` (TRL's last PPO; its own venv, `--trl-ppo-python`): policy,
  reference, reward model and critic of one size (the critic starts from the reward model on both sides),
  64 prompts, 64 tokens (TRL: no stop token, so every row runs to 64; ours: min_new_tokens = 64), 1 PPO epoch,
  1 minibatch, k1 KL penalty in the reward with coefficient 0.05.
- Models: one random Llama-style decoder per size, written once with `save_pretrained` (with the char tokenizer)
  and loaded by both sides: `small` (hidden 256, 4 layers) and `medium` (hidden 768, 12 layers, ~85M parameters
  plus a small embedding). Llama, not Qwen2, because transformers 5 reloads every qwen2 directory with a
  byte-level tokenizer that mangles the char vocabulary (see rlhf_lightning/models.py); the two architectures
  differ only by the q/k/v biases.
- Precisions: `fp32` on both; `bf16` = the fastest each offers on this CPU: ours `precision="bf16-true"` (weights,
  activations and gradients in bf16, AdamW on bf16 weights), TRL's model loaded in bfloat16 with `bf16=True`
  (the same pure-bf16 weights plus autocast).

How it is timed: every run is its own process (so its peak RSS is its own), with `--threads` torch threads. A run
makes `--warmup` + `--measure` steps and only the last `--measure` count (start-up, compilation of oneDNN kernels
and the first steps are excluded). Runs are interleaved ours, TRL, ours, TRL ... (`--rounds`) so that load from
other jobs on a shared machine hits both; the table shows the median step time over all measured steps of a
system, and the median CPU seconds (process time) per step, which waiting for a core under contention does not
inflate: on a busy machine the CPU ratio is the steadier comparison. The matmul peak of each precision is
measured in the same invocation, before and after the runs, and the best of the two is the "compute floor" our
achieved FLOP/s are compared with. FLOPs per step count the work each system's step executes (generation, no-grad
passes, forward + backward), with the matmul and attention FLOPs of the decoder (`step_flops`; `_useful_flops`
says which passes each side runs). "Our floor" = our FLOPs / the matmul peak: the step time of a perfect
implementation of our step on this machine, so "TRL / floor" bounds the ratio any code could reach here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import load_average, machine_line, matmul_peak_flops, trl_grpo_config

SIZES = ("small", "medium")
PRECISIONS = ("fp32", "bf16")
DEFAULT_STEPS = {"small": (2, 4), "medium": (1, 2)}  # (warm-up, measured) steps per run
GROUP_SIZE, PROMPTS_GRPO, PROMPTS_PPO, TOKENS = 8, 8, 64, 64
# The workloads (`--workload`): `forced` = every completion runs to TOKENS (min_new_tokens), the short addition
# prompts; `ragged` = completions end at EOS (the random policy emits it with probability ~1/vocab per token: a
# geometric spread of lengths with a tail to the RAGGED_CAP cap), and every prompt starts with PREAMBLE, a fixed
# few-shot block of 120+ tokens, so the G samples of a group share a long prompt (what math RL batches look like).
WORKLOADS = ("forced", "ragged")
RAGGED_CAP = 256
RAGGED_TOKEN_BUDGET = 4096  # our max_tokens_per_micro_batch on the ragged workload (length-sorted, trimmed passes)
PREAMBLE = ("Add the two numbers and write only the sum.\n12+7=19\n40+45=85\n3+99=102\n58+21=79\n6+6=12\n"
            "71+18=89\n25+25=50\n90+9=99\nNow this one:\n")


def workload_settings(workload: str) -> tuple[int, int]:
    """(max new tokens, min new tokens) of a workload."""
    return (TOKENS, TOKENS) if workload == "forced" else (RAGGED_CAP, 0)
LR = 1e-6  # tiny: the weights barely move, so step times do not drift with what the model learns


def digit_fraction(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """A cheap reward with spread (fraction of digit characters), so groups have non-zero advantages."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


# --------------------------------------------------------------------------------------------- models
def model_paths(root: Path) -> dict[str, dict[str, str]]:
    """Where `write_models` puts each size's policy and reward model (children only read them)."""
    return {size: {kind: str(root / size / kind) for kind in ("policy", "reward")} for size in SIZES}


def read_prompts(root: Path, n: int, workload: str = "forced") -> list[str]:
    """The first n of the built-in addition prompts that `write_models` stored (no rlhf_lightning import, so the
    TRL 0.21 venv needs only TRL), behind the few-shot PREAMBLE for the ragged workload."""
    prompts = json.loads((root / "prompts.json").read_text())
    lead = PREAMBLE if workload == "ragged" else ""
    return [lead + prompts[i % len(prompts)] for i in range(n)]


def write_models(root: Path) -> dict[str, dict[str, str]]:
    """One random policy and one reward model (sequence classifier) per size, written with save_pretrained,
    plus the prompts (`prompts.json`, built-in 2-digit addition) every run draws from."""
    from rlhf_lightning.data.tasks import get_task
    from rlhf_lightning.models import load_causal_lm, load_sequence_classifier
    from rlhf_lightning.tokenizer import load_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.json").write_text(json.dumps([r["prompt"] for r in get_task("addition").make_examples(
        4096, seed=0)]))
    for size in SIZES:
        paths = {kind: Path(p) for kind, p in model_paths(root)[size].items()}
        if not (paths["policy"] / "config.json").exists() or not (paths["reward"] / "config.json").exists():
            tok = load_tokenizer(size)
            for kind, path in paths.items():
                load = load_causal_lm if kind == "policy" else load_sequence_classifier
                model = load(size, tok, seed=0 if kind == "policy" else 1)
                model.save_pretrained(path)
                tok.save_pretrained(path)
    return model_paths(root)


def step_flops(config, rows: int, prompt_len: int, tokens: int, no_grad_passes: int, train_passes: int,
               prompt_rows: int | None = None) -> float:
    """Useful FLOPs of one RL step: sampling + `no_grad_passes` forwards + `train_passes` forward+backward.

    Per token and layer: 2 x (q, k, v, o projections + the 3 MLP matrices) for the matmuls, 4 x hidden x context
    for attention (QK^T and AV); the LM head (2 x hidden x vocab) only where logits are needed. Backward = 2 x
    forward. Sampling: the prompt once, then one token per step against a growing cache. `prompt_rows`: the rows
    whose prompt tokens run (shared prompts: one per group; None = every row).
    """
    prompt_rows = rows if prompt_rows is None else prompt_rows
    d, layers, f = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    linear = 2 * layers * (d * d + 2 * d * kv + d * d + 3 * d * f)  # per token
    head = 2 * d * config.vocab_size

    def attention(ctx: float) -> float:
        return 4 * layers * d * ctx

    prompt = prompt_len * (linear + attention(prompt_len / 2))  # one row's prompt tokens through every layer
    sampling = prompt_rows * prompt + rows * head
    sampling += rows * sum(linear + attention(prompt_len + t) + head for t in range(1, tokens))
    # one full-sequence forward: the prompts, then the completion tokens against prompt + the completion so far
    full = prompt_rows * prompt + rows * (tokens * (linear + attention(prompt_len + tokens / 2)) + (tokens + 1) * head)
    return sampling + full * (no_grad_passes + 3 * train_passes)


# ---------------------------------------------------------------------------------------- one run each
class PhaseTimer:
    """Wraps methods of an object to add up the seconds spent in each named phase (calls on the main thread only:
    the `overlap` system's sampler thread runs some of the same methods, hidden behind the update)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: set[str] = set()  # phases being timed now: a wrapped method called inside another counts once

    def wrap(self, obj: Any, method: str, phase: str, grad: bool | None = None) -> None:
        """Time `obj.method` as `phase`; `grad` True / False: only calls made with / without grad enabled."""
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            if ((grad is not None and torch.is_grad_enabled() != grad) or phase in self._open
                    or threading.current_thread() is not threading.main_thread()):
                return original(*args, **kwargs)
            self._open.add(phase)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._open.discard(phase)
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

        setattr(obj, method, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def _phase_means(snapshots: list[dict[str, float]], first: int) -> dict[str, float]:
    """Mean seconds per measured step of each phase, from cumulative snapshots taken at every step's end."""
    steps = len(snapshots) - first
    if steps <= 0:
        return {}
    start = snapshots[first - 1] if first > 0 else {}
    return {k: (v - start.get(k, 0.0)) / steps for k, v in snapshots[-1].items()}


def run_ours(algo: str, size: str, precision: str, models: dict[str, str], warmup: int, measure: int,
             prompts: list[str], workload: str = "forced", token_budget: int | None = None,
             overlap: bool = False, share_prompts: bool = True) -> dict:
    """Our module; `overlap` = `off_policy_steps: 1` (the `overlap` system: sampling on a second thread)."""
    import lightning as L

    from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule

    L.seed_everything(0, verbose=False)
    max_new, min_new = workload_settings(workload)
    prompts_text = prompts
    common = dict(model_name_or_path=models["policy"], max_new_tokens=max_new, min_new_tokens=min_new, lr=LR,
                  max_grad_norm=1.0, log_samples_every_n_steps=0, max_tokens_per_micro_batch=token_budget or None,
                  off_policy_steps=int(overlap), share_prompt_prefix=share_prompts)
    steps = warmup + measure
    if algo == "grpo":
        module = GRPOModule(reward_fns=[digit_fraction], group_size=GROUP_SIZE, beta=0.04, num_iterations=1,
                            minibatches=1, loss_agg="token-mean", **common)
        prompts, max_steps = PROMPTS_GRPO, steps
    else:
        module = PPOModule(reward_model=models["reward"], critic="separate", kl_coef=0.05, ppo_epochs=1,
                           minibatches=1, **common)
        prompts, max_steps = PROMPTS_PPO, 2 * steps  # both optimizers count in trainer.global_step
    phases = PhaseTimer()
    # overlap: sampling runs on the sampler thread; the step's "generation" is its wait for that thread
    if overlap:
        from rlhf_lightning.rollout.overlap import OverlappedSampler

        phases.wrap(OverlappedSampler, "take", "generation (waiting for the sampler thread)")
    else:
        phases.wrap(module, "rollout", "generation")
    tokens: list[float] = []  # completion tokens of each trained rollout (EOS included)
    build_rollout = module.build_rollout

    def counted_rollout(batch, samples):
        tokens.append(float(samples.completion_mask.sum()))
        return build_rollout(batch, samples)

    module.build_rollout = counted_rollout
    if algo == "grpo":
        phases.wrap(module, "logprobs_no_grad", "no-grad passes")
    else:
        phases.wrap(module, "_no_grad_passes", "no-grad passes")  # not called at 1 epoch x 1 minibatch (fused)
        phases.wrap(module, "reference_logprobs", "no-grad passes")
        phases.wrap(module, "compute_rewards", "no-grad passes")  # the reward model's forward
    phases.wrap(module, "update", "forward+backward+step")
    if algo == "ppo":  # the fused PPO update's forward runs before `update` (`PPOModule.fuses_old_passes`)
        phases.wrap(module, "policy_and_values", "forward+backward+step", grad=True)
    rows = [{"prompt": p} for p in prompts_text[: prompts * (steps + 2)]]
    data_file = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PromptDataModule(path=str(data_file), val_fraction=0.0, batch_size=prompts, shuffle=False,
                            max_prompt_length=512)
    times: list[float] = []
    cpu: list[float] = []
    snapshots: list[dict[str, float]] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *_):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, *_):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)
            snapshots.append(phases.snapshot())

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Timer()], default_root_dir=tempfile.mkdtemp(),
                        precision="bf16-true" if precision == "bf16" else "32-true")
    trainer.fit(module, datamodule=data)
    first = warmup + int(overlap)  # overlap: the first batch is only handed to the sampler (no update)
    return {"step_s": times[first:], "cpu_s": cpu[first:], "phases": _phase_means(snapshots, first),
            "tokens": tokens[warmup:]}


def run_trl_grpo(size: str, precision: str, models: dict[str, str], warmup: int, measure: int,
                 prompts: list[str], workload: str = "forced") -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from rlhf_lightning.models import load_causal_lm
    from rlhf_lightning.tokenizer import load_tokenizer

    steps = warmup + measure
    bf16 = precision == "bf16"
    tokenizer = load_tokenizer(models["policy"])
    max_new, min_new = workload_settings(workload)
    config = trl_grpo_config(tempfile.mkdtemp(), completions_per_step=PROMPTS_GRPO * GROUP_SIZE,
                             group_size=GROUP_SIZE, max_steps=steps, max_new_tokens=max_new, lr=LR, beta=0.04,
                             bf16=bf16, loss_agg="token-mean", logging_steps=steps,
                             generation_kwargs={"min_new_tokens": min_new} if min_new else None)
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    model = load_causal_lm(models["policy"], tokenizer, torch_dtype="bfloat16" if bf16 else "float32")
    trainer = GRPOTrainer(model=model, reward_funcs=[digit_fraction], args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    phases = PhaseTimer()
    phases.wrap(trainer, "_generate", "generation")
    phases.wrap(trainer, "_get_per_token_logps_and_entropies", "no-grad passes", grad=False)
    times: list[float] = []
    cpu: list[float] = []
    snapshots: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)
            snapshots.append(phases.snapshot())
            lengths = trainer._metrics["train"].get("completions/mean_length", [])  # one per step until logged
            tokens.append(lengths[-1] * PROMPTS_GRPO * GROUP_SIZE if lengths else float("nan"))

    tokens: list[float] = []
    trainer.add_callback(Timer())
    trainer.train()
    return {"step_s": times[warmup:], "cpu_s": cpu[warmup:],
            "phases": _with_rest(_phase_means(snapshots, warmup), times[warmup:]), "tokens": tokens[warmup:]}


def run_trl_ppo(size: str, precision: str, models: dict[str, str], warmup: int, measure: int,
                prompts: list[str], workload: str = "forced") -> dict:
    """TRL 0.21's PPOTrainer (run by --trl-ppo-python: the venv that has trl 0.21). Ragged: `stop_token="eos"`
    (TRL truncates each response after its first EOS and pads the rest), response_length = the cap."""
    import trl.trainer.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import PPOConfig, PPOTrainer

    steps = warmup + measure
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(models["policy"])  # the char tokenizer saved with the model
    tokenizer.padding_side = "left"
    config = PPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=bf16, report_to="none", seed=0,
                       learning_rate=LR, per_device_train_batch_size=PROMPTS_PPO, gradient_accumulation_steps=1,
                       num_mini_batches=1, num_ppo_epochs=1, local_rollout_forward_batch_size=PROMPTS_PPO,
                       response_length=workload_settings(workload)[0],
                       stop_token="eos" if workload == "ragged" else None, missing_eos_penalty=None, kl_coef=0.05,
                       total_episodes=PROMPTS_PPO * steps, num_sample_generations=0, save_strategy="no",
                       logging_steps=steps, max_grad_norm=1.0, dataloader_num_workers=0)
    dataset = Dataset.from_list([{"input_ids": tokenizer(p)["input_ids"]} for p in prompts])
    policy = AutoModelForCausalLM.from_pretrained(models["policy"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(models["policy"], dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(models["reward"], num_labels=1, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(models["reward"], num_labels=1, dtype=dtype)
    for m in (reward, value):
        m.config.pad_token_id = tokenizer.pad_token_id
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset)
    sampled = [0.0]  # completion tokens of the step so far: up to and including the first EOS (or the cap)
    generate = ppo_module.batch_generation

    def counted_generation(model, queries, *args, **kwargs):
        query_responses, logits = generate(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1]:]
        is_eos = responses == tokenizer.eos_token_id
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, responses.shape[1])
        sampled[0] += float(first.sum()) if workload == "ragged" else float(responses.numel())
        return query_responses, logits

    ppo_module.batch_generation = counted_generation
    phases = PhaseTimer()
    phases.wrap(ppo_module, "batch_generation", "generation")
    times: list[float] = []
    cpu: list[float] = []
    tokens: list[float] = []
    snapshots: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        # TRL 0.21's PPO loop calls only on_step_end per batch: a step is the time between two of them
        def on_train_begin(self, *_, **__):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            now, now_cpu = time.perf_counter(), time.process_time()
            times.append(now - self.t0)
            cpu.append(now_cpu - self.c0)
            snapshots.append(phases.snapshot())
            tokens.append(sampled[0])
            sampled[0] = 0.0
            self.t0, self.c0 = now, now_cpu

    trainer.add_callback(Timer())
    trainer.train()
    return {"step_s": times[warmup:], "cpu_s": cpu[warmup:], "tokens": tokens[warmup:],
            "phases": _with_rest(_phase_means(snapshots, warmup), times[warmup:])}


def _with_rest(phases: dict[str, float], step_s: list[float]) -> dict[str, float]:
    """Adds 'rest' = step time minus the timed phases (TRL: no-grad passes we did not time, backward, step)."""
    if step_s:
        phases["rest"] = sum(step_s) / len(step_s) - sum(phases.values())
    return phases


def run_one(spec: str, models_root: Path, warmup: int, measure: int, threads: int, workload: str = "forced",
            token_budget: int | None = None, share_prompts: bool = True) -> dict:
    """Child process: one (algo, system, size, precision) run; prints its JSON on the last line."""
    torch.set_num_threads(threads)
    algo, system, size, precision = spec.split(":")
    models = model_paths(models_root)[size]
    prompts = read_prompts(models_root, (PROMPTS_GRPO if algo == "grpo" else PROMPTS_PPO) * (warmup + measure + 2),
                           workload)
    if system in ("ours", "overlap"):
        budget = token_budget if token_budget is not None else (RAGGED_TOKEN_BUDGET if workload == "ragged" else None)
        result = run_ours(algo, size, precision, models, warmup, measure, prompts, workload, budget,
                          overlap=system == "overlap", share_prompts=share_prompts)
    elif algo == "grpo":
        result = run_trl_grpo(size, precision, models, warmup, measure, prompts, workload)
    else:
        result = run_trl_ppo(size, precision, models, warmup, measure, prompts, workload)
    result.update(spec=spec, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


# ------------------------------------------------------------------------------------------- parent
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default="grpo,ppo", help="comma list of grpo, ppo")
    p.add_argument("--sizes", default="small,medium", help="comma list of small, medium")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--rounds", type=int, default=2, help="ours/TRL pairs per setting, interleaved (ABAB)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded per run (default: small 2, medium 1)")
    p.add_argument("--measure", type=int, default=None, help="steps timed per run (default: small 4, medium 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every run (both systems)")
    p.add_argument("--systems", default="ours,trl",
                   help="comma list of ours, overlap (ours with off_policy_steps: 1: sampling on a second thread), "
                        "trl (order within a round)")
    p.add_argument("--trl-ppo-python", default=str(Path(__file__).resolve().parent.parent / ".venv-trl021" / "bin"
                                                   / "python"), help="python of a venv with trl==0.21 (PPO peer)")
    p.add_argument("--models", default="bench_out/throughput_models", help="where the random models are written")
    p.add_argument("--out", default="bench_out/throughput", help="directory for results.json / results.md")
    p.add_argument("--workload", default="forced", choices=WORKLOADS,
                   help="forced: every completion runs to 64 tokens; ragged: completions end at EOS (cap 256) "
                        "behind a shared 120+ token few-shot prompt")
    p.add_argument("--token-budget", type=int, default=None,
                   help="our max_tokens_per_micro_batch (default: off for forced, 4096 for ragged; 0 = off)")
    p.add_argument("--no-share-prompts", action="store_true",
                   help="our share_prompt_prefix: false (each row's prompt in its own forward; the lever's share)")
    p.add_argument("--no-shared-prefill", action="store_true",
                   help="our fast decoder prefills every row, repeated prompts too (FastDecoder.share_prefill)")
    p.add_argument("--no-compaction", action="store_true",
                   help="our fast decoder keeps finished rows in the batch (FastDecoder.compaction)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: child process spec algo:system:size:precision
    args = p.parse_args(argv)
    for name, allowed in (("algos", ("grpo", "ppo")), ("sizes", SIZES), ("precisions", PRECISIONS),
                          ("systems", ("ours", "overlap", "trl"))):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            p.error(f"--{name} takes a comma list of {'/'.join(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, values)
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1")
    if args.warmup is not None and args.warmup < 0 or args.measure is not None and args.measure < 1:
        p.error("--warmup must be >= 0 and --measure >= 1")
    return args


def spawn(args: argparse.Namespace, spec: str, size: str) -> dict:
    warmup, measure = DEFAULT_STEPS[size]
    warmup = warmup if args.warmup is None else args.warmup
    measure = measure if args.measure is None else args.measure
    algo, system = spec.split(":")[:2]
    python = args.trl_ppo_python if (algo, system) == ("ppo", "trl") else sys.executable
    if not Path(python).exists():
        return {"spec": spec, "error": f"{python} does not exist (see benchmarks/README.md: TRL 0.21 venv)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, __file__, "--one", spec, "--models", args.models, "--threads", str(args.threads),
           "--warmup", str(warmup), "--measure", str(measure), "--workload", args.workload,
           *(["--token-budget", str(args.token_budget)] if args.token_budget is not None else []),
           *(["--no-share-prompts"] if args.no_share_prompts else []),
           *(["--no-shared-prefill"] if args.no_shared_prefill else []),
           *(["--no-compaction"] if args.no_compaction else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(f"[throughput] {spec} failed: {tail[0]}", flush=True)
        return {"spec": spec, "error": tail[0], "stderr_tail": proc.stderr[-4000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    steps = ", ".join(f"{s:.2f}" for s in result["step_s"])
    print(f"[throughput] {spec}: step s [{steps}], peak RSS {result['peak_rss_mib']:.0f} MiB, load "
          f"{load_average()[0]:.1f}", flush=True)
    return result


def summarize(runs: list[dict], args, peaks: dict[str, float], flops: dict[tuple[str, str], float]) -> list[dict]:
    rows = []
    for algo in args.algos:
        for size in args.sizes:
            for precision in args.precisions:
                row: dict[str, Any] = {"algo": algo, "size": size, "precision": precision}
                for system in args.systems:
                    mine = [r for r in runs if r["spec"] == f"{algo}:{system}:{size}:{precision}"]
                    steps = [s for r in mine if "step_s" in r for s in r["step_s"]]
                    row[system] = statistics.median(steps) if steps else None
                    cpu = [s for r in mine for s in r.get("cpu_s", [])]
                    row[f"{system}_cpu"] = statistics.median(cpu) if cpu else None
                    row[f"{system}_rss"] = max((r["peak_rss_mib"] for r in mine if "peak_rss_mib" in r), default=None)
                    row[f"{system}_errors"] = [r["error"] for r in mine if "error" in r]
                    # completion tokens per second: what each step sampled (EOS included) over its time
                    rates = [n / t for r in mine for n, t in zip(r.get("tokens", []), r.get("step_s", []))
                             if n == n and t > 0]
                    row[f"{system}_tok_s"] = statistics.median(rates) if rates else None
                    lengths = [n / ((PROMPTS_GRPO * GROUP_SIZE) if algo == "grpo" else PROMPTS_PPO)
                               for r in mine for n in r.get("tokens", []) if n == n]
                    row[f"{system}_mean_len"] = statistics.mean(lengths) if lengths else None
                    phases = [r["phases"] for r in mine if r.get("phases")]
                    row[f"{system}_phases"] = ({k: statistics.median(p.get(k, 0.0) for p in phases)
                                                for k in phases[0]} if phases else {})
                if row.get("ours") and row.get("trl"):
                    row["ratio"] = row["trl"] / row["ours"]
                if row.get("ours_tok_s") and row.get("trl_tok_s"):
                    row["tok_ratio"] = row["ours_tok_s"] / row["trl_tok_s"]
                if row.get("overlap_tok_s") and row.get("trl_tok_s"):
                    row["overlap_tok_ratio"] = row["overlap_tok_s"] / row["trl_tok_s"]
                if row.get("ours_cpu") and row.get("trl_cpu"):
                    row["cpu_ratio"] = row["trl_cpu"] / row["ours_cpu"]
                if row.get("ours"):
                    row["tflops"] = flops[(algo, size, "ours")] / row["ours"] / 1e12
                    row["peak_frac"] = row["tflops"] * 1e12 / peaks[precision]
                    # our FLOPs at 100% of the matmul peak: no code on this machine does a step faster
                    row["floor_s"] = flops[(algo, size, "ours")] / peaks[precision]
                    if row.get("trl"):
                        row["max_ratio"] = row["trl"] / row["floor_s"]
                rows.append(row)
    return rows


def markdown(rows: list[dict], peaks: dict[str, float]) -> str:
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    lines = ["| algo | model | precision | ours completion tok/s | TRL completion tok/s | ours / TRL tok/s | "
             "ours + overlap tok/s | overlap / TRL tok/s | mean length ours / TRL | ours s/step | TRL s/step | TRL / ours | ours CPU s | TRL CPU s | "
             "CPU TRL / ours | our TFLOP/s | of matmul peak | our floor s | TRL / floor | ours peak RSS MiB | "
             "TRL peak RSS MiB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: "
             "| ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['size']} | {r['precision']} | {f(r.get('ours_tok_s'), '.0f')} | "
                     f"{f(r.get('trl_tok_s'), '.0f')} | {f(r.get('tok_ratio'), '.2f')}x | "
                     f"{f(r.get('overlap_tok_s'), '.0f')} | {f(r.get('overlap_tok_ratio'), '.2f')}x | "
                     f"{f(r.get('ours_mean_len'), '.0f')} / {f(r.get('trl_mean_len'), '.0f')} | "
                     f"{f(r.get('ours'), '.2f')} | "
                     f"{f(r.get('trl'), '.2f')} | {f(r.get('ratio'), '.2f')}x | {f(r.get('ours_cpu'), '.2f')} | "
                     f"{f(r.get('trl_cpu'), '.2f')} | {f(r.get('cpu_ratio'), '.2f')}x | {f(r.get('tflops'), '.3f')} | "
                     f"{f(r.get('peak_frac'), '.0%')} | {f(r.get('floor_s'), '.2f')} | "
                     f"{f(r.get('max_ratio'), '.2f')}x | "
                     f"{f(r.get('ours_rss'), '.0f')} | {f(r.get('trl_rss'), '.0f')} |")
    lines += ["", "our floor s = the FLOPs our step executes / the matmul peak (100% of peak, zero overhead); "
              "TRL / floor = the largest TRL / ours ratio any implementation of our step could reach here."]
    lines.append("")
    lines.append("matmul peak (best 1024^3 matmul): " + ", ".join(f"{p} {v / 1e12:.3f} TFLOP/s"
                                                                  for p, v in peaks.items()))
    lines += ["", "where a step's time goes (seconds, median over runs):", ""]
    for r in rows:
        for system in ("ours", "overlap", "trl"):
            if r.get(f"{system}_phases"):
                parts = ", ".join(f"{k} {v:.2f}" for k, v in r[f"{system}_phases"].items())
                lines.append(f"- {r['algo']} {r['size']} {r['precision']} {system}: {parts}")
            for err in r.get(f"{system}_errors", []):
                lines.append(f"- {r['algo']} {r['size']} {r['precision']} {system}: FAILED: {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one:
        if args.one.split(":")[1] != "trl":  # the TRL 0.21 venv has no rlhf_lightning dependencies (lightning)
            from rlhf_lightning.rollout.fast import FastDecoder

            FastDecoder.share_prefill, FastDecoder.compaction = not args.no_shared_prefill, not args.no_compaction
        warmup = 0 if args.warmup is None else args.warmup
        print(json.dumps(run_one(args.one, Path(args.models), warmup, args.measure or 1, args.threads,
                                 args.workload, args.token_budget, not args.no_share_prompts)))
        return {}
    torch.set_num_threads(args.threads)
    models = write_models(Path(args.models))
    machine_before = machine_line(args.threads)
    print(f"[throughput] {machine_before}", flush=True)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak_flops(dtypes[p]) for p in args.precisions}
    runs = []
    for algo in args.algos:
        for size in args.sizes:
            for precision in args.precisions:
                for _ in range(args.rounds):  # ABAB: ours, TRL, ours, TRL
                    for system in args.systems:
                        runs.append(spawn(args, f"{algo}:{system}:{size}:{precision}", size))
    peaks = {p: max(v, matmul_peak_flops(dtypes[p])) for p, v in peaks.items()}
    flops = _useful_flops(args, models, runs)
    machine_after = machine_line(args.threads)
    rows = summarize(runs, args, peaks, flops)
    table = markdown(rows, peaks)
    header = (f"machine before: {machine_before}\nmachine after:  {machine_after}\n"
              f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("\n" + header + "\n" + table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: v for k, v in vars(args).items()}, "machine_before": machine_before,
               "machine_after": machine_after, "peaks": peaks, "rows": rows, "runs": runs, "table": table}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "results.md").write_text(header + "\n" + table + "\n")
    print(f"[throughput] wrote {out / 'results.md'}")
    return payload


def _useful_flops(args: argparse.Namespace, models: dict[str, dict[str, str]],
                  runs: list[dict]) -> dict[tuple[str, str, str], float]:
    """FLOPs per step each system executes, for each (algo, size, system).

    Ragged workload: at our runs' mean completion length, as if every row were exactly that long (no padding,
    no finished row computed): the floor of a padding-free implementation.

    GRPO, both: sampling + reference forward + policy fwd/bwd (mu = 1: no old-log-prob pass on either side).
    PPO: sampling + policy and critic fwd/bwd, plus no-grad forwards: TRL 0.21 runs reference, critic and reward
    model (its old log-probs are the sampler's logits); ours runs reference and reward model only (1 epoch x 1
    minibatch: old log-probs and values are the update's own forward, `PPOModule.fuses_old_passes`)."""
    from transformers import AutoConfig

    from rlhf_lightning.tokenizer import load_tokenizer

    out = {}
    for size in args.sizes:
        config = AutoConfig.from_pretrained(models[size]["policy"])
        tok = load_tokenizer(models[size]["policy"])
        prompt_len = round(statistics.mean(len(tok(p)["input_ids"])
                                           for p in read_prompts(Path(args.models), 64, args.workload)))

        def tokens(algo: str, size: str = size) -> int:
            if args.workload == "forced":
                return TOKENS
            rows = PROMPTS_GRPO * GROUP_SIZE if algo == "grpo" else PROMPTS_PPO
            got = [n / rows for r in runs if r.get("spec", "").startswith(f"{algo}:ours:{size}:")
                   for n in r.get("tokens", [])]
            return max(1, round(statistics.mean(got))) if got else RAGGED_CAP

        for system in ("ours", "trl"):  # ours shares each group's prompt (share_prompt_prefix) in every pass
            shared = system == "ours" and not args.no_share_prompts
            out[("grpo", size, system)] = step_flops(config, PROMPTS_GRPO * GROUP_SIZE, prompt_len, tokens("grpo"),
                                                     1, 1, prompt_rows=PROMPTS_GRPO if shared else None)
        out[("ppo", size, "ours")] = step_flops(config, PROMPTS_PPO, prompt_len, tokens("ppo"), 2, 2)
        out[("ppo", size, "trl")] = step_flops(config, PROMPTS_PPO, prompt_len, tokens("ppo"), 3, 2)
    return out


if __name__ == "__main__":
    main()
