"""Learning quality and wall time: our `GRPOModule` against TRL's `GRPOTrainer`, from the same warm start.

Issue 3's criterion: from the same warm start, data, seed and hyperparameters, our GRPO must reach at least the
held-out accuracy that TRL reaches, in no more wall time. Run it from the bench venv (see benchmarks/README.md):

    .venv-bench/bin/python benchmarks/learning_vs_trl.py --steps 20 --out bench_out/learning_vs_trl

Fairness choices (why each knob is set the way it is):
- Same weights: both systems load the warm-start directory with `load_causal_lm` in float32 (TRL builds its
  reference model from the same directory in the same dtype). No `--warm-start`: an SFT run of `--sft-steps`
  through rlhf_lightning's `SFTModule` writes one into a temporary directory first.
- Same prompts in the same order: both train on `AdditionTask.make_examples(num_train, seed)`; TRL's
  `RepeatSampler` and our `ResumableSampler` both draw `torch.randperm(n)` from a generator seeded with `seed`,
  so in the first epoch step k sees the same prompts in both (later epochs reshuffle differently: we reseed with
  seed + epoch, TRL's generator runs on). The script records every rollout's prompts and reports for how many
  steps the orders matched, instead of assuming it.
- Same prompt tokens: plain-text prompts (no chat template). TRL tokenizes with `add_special_tokens=True`; the
  script checks that this adds nothing to the char tokenizer's prompts, and stops if it would.
- Same reward: `rlhf_lightning.rewards.exact_match` (TRL's signature) for both, through one recording wrapper
  that also yields the per-rollout training reward.
- Same objective: G = group_size completions per prompt, prompts_per_step x G completions in ONE optimizer step
  (TRL: per_device_train_batch_size = prompts x G, num_generations = G, no gradient accumulation); k3 KL in the
  loss with weight beta; clip epsilon/epsilon_high; loss_agg <-> TRL loss_type (token-mean = dapo,
  seq-mean-token-mean = grpo, seq-mean-token-sum-norm = dr_grpo); the same scale_rewards, num_iterations,
  temperature/top_p; AdamW (weight decay 0, betas 0.9/0.999), grad-norm clip, and the same lr schedule:
  constant, or linear warm-up then cosine to min_lr_ratio x lr (TRL: `cosine_with_min_lr`, min_lr_rate).
- Same arithmetic: float32 on both sides (TRL's default bf16=True is turned off; `--bf16` turns on
  bf16 autocast for both). TRL's default gradient checkpointing is turned off (ours does not checkpoint, and
  recomputation would only slow TRL down). TRL generates with HF `generate` (no vLLM on CPU); that is TRL's own
  engine and part of what is measured.
- Wall time = the `fit()` / `train()` call alone: model loading and evaluation are outside it; each framework's
  own set-up inside it (dataloaders, optimizer; Lightning's end-of-fit export of the policy) counts.
  Both run in this one process, one after the other, on the same threads; the machine is shared and noisy,
  so use `--threads 1`, repeat, and swap the `--systems` order before reading much into differences.
- Accuracy = greedy exact match on `--eval-examples` held-out prompts (a seed neither run trains on) via
  `rlhf_lightning.evaluation.greedy_accuracy`, budget `--max-new-tokens`, same for before and after.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from _common import LOSS_TYPE, trl_grpo_config  # benchmarks/ is on sys.path when run as a script

from rlhf_lightning import GRPOModule, PromptDataModule, SFTModule
from rlhf_lightning.data.tasks import get_task
from rlhf_lightning.evaluation import greedy_accuracy
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.rewards import exact_match
from rlhf_lightning.tokenizer import load_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NOT_COMPARED = {"model_name_or_path", "reward_fns", "val_max_new_tokens", "log_samples_every_n_steps"}
HELD_OUT_SEED = 424242  # the demo's held-out seed: neither SFT nor GRPO trains on it
# flag -> (config, section, key). The demo's YAML values are the flags' defaults, so tuning the demo's configs
# retunes this benchmark (a flag on the command line still wins).
FROM_CONFIG = {
    "steps": ("grpo", "trainer", "max_steps"), "prompts_per_step": ("grpo", "data", "batch_size"),
    "num_train": ("grpo", "data", "num_train"), "group_size": ("grpo", "model", "group_size"),
    "lr": ("grpo", "model", "lr"), "lr_schedule": ("grpo", "model", "lr_schedule"),
    "warmup_steps": ("grpo", "model", "warmup_steps"), "min_lr_ratio": ("grpo", "model", "min_lr_ratio"),
    "beta": ("grpo", "model", "beta"), "epsilon": ("grpo", "model", "clip_low"),
    "epsilon_high": ("grpo", "model", "clip_high"), "scale_rewards": ("grpo", "model", "scale_rewards"),
    "loss_agg": ("grpo", "model", "loss_agg"), "num_iterations": ("grpo", "model", "num_iterations"),
    "max_new_tokens": ("grpo", "model", "max_new_tokens"), "temperature": ("grpo", "model", "temperature"),
    "top_p": ("grpo", "model", "top_p"), "max_grad_norm": ("grpo", "model", "max_grad_norm"),
    "mask_truncated": ("grpo", "model", "mask_truncated"), "sft_steps": ("sft", "trainer", "max_steps"),
    "model": ("sft", "model", "model_name_or_path"), "sft_lr": ("sft", "model", "lr"),
    "sft_warmup": ("sft", "model", "warmup_steps"), "sft_batch_size": ("sft", "data", "batch_size"),
}


def config_defaults(paths: dict[str, str]) -> dict[str, Any]:
    """Flag defaults read from the demo's YAML configs; a path of 'none' reads nothing from that config."""
    sections = {}
    for which, path in ((w, p) for w, p in paths.items() if p != "none"):
        if not Path(path).is_file():
            raise ValueError(f"--{which}-config {path!r} does not exist (pass 'none' to use built-in defaults)")
        cfg = yaml.safe_load(Path(path).read_text()) or {}
        sections[which] = {"trainer": cfg.get("trainer") or {}, "model": (cfg.get("model") or {}).get("init_args")
                           or {}, "data": (cfg.get("data") or {}).get("init_args") or {}}
    out = {flag: sections[w][sec][key] for flag, (w, sec, key) in FROM_CONFIG.items()
           if w in sections and key in sections[w][sec]}
    params, mapped = inspect.signature(GRPOModule.__init__).parameters, {k for _, _, k in FROM_CONFIG.values()}
    skipped = {k: v for k, v in sections.get("grpo", {}).get("model", {}).items() if k not in mapped | NOT_COMPARED
               and (k not in params or v != params[k].default)}
    if skipped:
        print(f"[bench] note: {paths['grpo']} sets {skipped}: not carried over to either system "
              "(differs from the demo)")
    if "max_grad_norm" in out and out["max_grad_norm"] is None:
        out["max_grad_norm"] = 0.0  # YAML null = off, spelled 0 here
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)  # first pass: only the configs that hold the defaults
    p.add_argument("--grpo-config", default=str(CONFIGS / "grpo_arithmetic.yaml"), help="GRPO flag defaults")
    p.add_argument("--sft-config", default=str(CONFIGS / "sft_arithmetic.yaml"), help="SFT flag defaults")
    known, _ = p.parse_known_args(argv)
    p = argparse.ArgumentParser(description=__doc__, parents=[p], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm-start", default=None, help="HF export dir of a (partially) SFT'd policy")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps when no --warm-start is given")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-warmup", type=int, default=20)
    p.add_argument("--sft-batch-size", type=int, default=64)
    p.add_argument("--model", default="tiny", help="preset (or HF dir) the SFT warm start starts from")
    p.add_argument("--digits", type=int, default=2, help="addition task: operands of up to this many digits")
    p.add_argument("--num-train", type=int, default=5000, help="training prompts (the same rows for both systems)")
    p.add_argument("--steps", type=int, default=100, help="rollout steps (optimizer steps = steps x num_iterations)")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="cosine: linear warm-up, then cosine decay to --min-lr-ratio x lr over the run")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=0.04, help="k3 KL weight in the loss; 0 = no reference model")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range below 1 (our clip_low)")
    p.add_argument("--epsilon-high", type=float, default=0.28, help="clip range above 1 (our clip_high)")
    p.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])
    p.add_argument("--loss-agg", default="token-mean", choices=sorted(LOSS_TYPE))
    p.add_argument("--num-iterations", type=int, default=1, help="mu: optimizer passes over one rollout")
    p.add_argument("--max-new-tokens", type=int, default=8, help="completion budget (training and evaluation)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no gradient clipping")
    p.add_argument("--mask-truncated", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both systems (default: float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both (0: torch's default)")
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--systems", default="rlhf_lightning,trl", help="which to run, in this order")
    p.add_argument("--out", default="bench_out/learning_vs_trl", help="directory for results.json / results.md")
    p.set_defaults(**config_defaults({"grpo": known.grpo_config, "sft": known.sft_config}))
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or not set(args.systems) <= {"rlhf_lightning", "trl"}:
        raise ValueError(f"--systems must list rlhf_lightning and/or trl, got {args.systems}")
    for name in ("steps", "prompts_per_step", "group_size", "num_iterations", "max_new_tokens", "eval_examples",
                 "sft_steps", "num_train"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


class RecordingReward:
    """`exact_match` for both systems, remembering each rollout's prompts and mean reward (TRL's signature)."""

    def __init__(self) -> None:
        self.__name__ = self.__qualname__ = "exact_match"  # what TRL's and our logs / hparams call it
        self.prompts: list[list[str]] = []  # one list per rollout
        self.means: list[float] = []

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        rewards = exact_match(prompts, completions, **columns)
        self.prompts.append(list(prompts))
        self.means.append(sum(rewards) / max(len(rewards), 1))
        return rewards


def train_warm_start(args: argparse.Namespace, root: Path) -> Path:
    """A partially SFT'd policy, trained with our SFTModule through the Python API, exported as an HF dir."""
    L.seed_everything(args.seed, verbose=False)
    module = SFTModule(model_name_or_path=args.model, lr=args.sft_lr, warmup_steps=args.sft_warmup,
                       lr_schedule="cosine", val_max_new_tokens=args.max_new_tokens, seed=args.seed)
    data = PromptDataModule(task="addition", task_kwargs={"digits": args.digits}, num_train=args.num_train,
                            num_val=0, completion_column="completion", batch_size=args.sft_batch_size,
                            seed=args.seed)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.sft_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root / "sft"))
    trainer.fit(module, datamodule=data)
    return module.export_dir()


def run_ours(args: argparse.Namespace, warm: Path, reward: RecordingReward, root: Path):
    """Our GRPOModule under a Lightning Trainer; returns (wall seconds of fit, trained policy)."""
    L.seed_everything(args.seed, verbose=False)
    module = GRPOModule(
        model_name_or_path=str(warm), reward_fns=[reward], group_size=args.group_size, beta=args.beta,
        kl_estimator="k3", clip_low=args.epsilon, clip_high=args.epsilon_high, scale_rewards=args.scale_rewards,
        loss_agg=args.loss_agg, num_iterations=args.num_iterations, minibatches=1,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        mask_truncated=args.mask_truncated, max_grad_norm=args.max_grad_norm or None, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
        torch_dtype="float32", sample_seed=args.seed, log_samples_every_n_steps=0,
        seed=args.seed)
    data = PromptDataModule(task="addition", task_kwargs={"digits": args.digits}, num_train=args.num_train,
                            num_val=0, batch_size=args.prompts_per_step, seed=args.seed)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps * args.num_iterations, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root / "ours"),
                        precision="bf16-mixed" if args.bf16 else "32-true")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - t0, module.policy


def run_trl(args: argparse.Namespace, warm: Path, reward: RecordingReward, root: Path, tokenizer, rows: list[dict]):
    """TRL's GRPOTrainer with the matching GRPOConfig; returns (wall seconds of train(), trained policy)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    config = trl_grpo_config(
        root / "trl", seed=args.seed, bf16=args.bf16, lr=args.lr, max_grad_norm=args.max_grad_norm,
        completions_per_step=args.prompts_per_step * args.group_size, group_size=args.group_size,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
        max_steps=args.steps * args.num_iterations, beta=args.beta, epsilon=args.epsilon,
        epsilon_high=args.epsilon_high, loss_agg=args.loss_agg, scale_rewards=args.scale_rewards,
        num_iterations=args.num_iterations, mask_truncated=args.mask_truncated, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, logging_steps=max(1, args.steps // 5))
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    model = load_causal_lm(str(warm), tokenizer, torch_dtype="float32")
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, trainer.accelerator.unwrap_model(trainer.model)


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = ["| system | steps | wall s | s/step | accuracy before | accuracy after |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['system']} | {r['steps']} | {r['wall_s']:.1f} | {r['s_per_step']:.2f} | "
                     f"{r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} |")
    by = {r["system"]: r for r in results}
    if {"rlhf_lightning", "trl"} <= by.keys():
        ours, trl = by["rlhf_lightning"], by["trl"]
        speed, diff = trl["wall_s"] / ours["wall_s"], ours["accuracy_after"] - trl["accuracy_after"]
        se2 = 2 * math.sqrt(sum(r["accuracy_after"] * (1 - r["accuracy_after"]) for r in (ours, trl))
                            / args.eval_examples)
        met = "met" if diff >= 0 and speed >= 1 else "NOT met"
        lines += ["", f"wall-time ratio rlhf_lightning / TRL: {1 / speed:.2f} (TRL takes {speed:.2f}x as long)",
                  f"accuracy after, rlhf_lightning - TRL: {diff:+.3f} (2 binomial standard errors: {se2:.3f})",
                  f"issue-3 criterion (accuracy >= TRL's in no more wall time): {met} (one run, seed {args.seed})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    task = get_task("addition", digits=args.digits)
    rows = task.make_examples(args.num_train, seed=args.seed)  # what PromptDataModule(seed=seed) generates
    held_out = task.make_examples(args.eval_examples, seed=HELD_OUT_SEED)
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    results, rewards = [], {}
    with tempfile.TemporaryDirectory(prefix="learning_vs_trl_") as tmp:
        root = Path(tmp)
        warm = Path(args.warm_start) if args.warm_start else train_warm_start(args, root)
        tokenizer = load_tokenizer(str(warm))
        for text in (r["prompt"] for r in rows[:20]):  # TRL tokenizes plain prompts with special tokens on
            if tokenizer(text)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]:
                raise ValueError(f"the warm-start tokenizer adds special tokens to {text!r}; TRL's prompts would "
                                 "differ")
        acc_before = greedy_accuracy(str(warm), task, held_out, max_new_tokens=args.max_new_tokens)
        print(f"[bench] warm start {warm}: held-out greedy accuracy {acc_before:.3f}", flush=True)
        for system in args.systems:
            reward = RecordingReward()
            if system == "rlhf_lightning":
                wall, policy = run_ours(args, warm, reward, root)
            else:
                wall, policy = run_trl(args, warm, reward, root, tokenizer, rows)
            acc = greedy_accuracy(policy, task, held_out, max_new_tokens=args.max_new_tokens, tokenizer=tokenizer)
            rewards[system] = reward
            k = max(1, min(5, len(reward.means)))
            results.append({"system": system, "steps": args.steps, "wall_s": wall, "s_per_step": wall / args.steps,
                            "accuracy_before": acc_before, "accuracy_after": acc, "rollouts": len(reward.means),
                            "train_reward_first": sum(reward.means[:k]) / k,
                            "train_reward_last": sum(reward.means[-k:]) / k, "train_reward": reward.means})
            print(f"[bench] {system}: {wall:.1f} s, accuracy {acc_before:.3f} -> {acc:.3f}, train reward "
                  f"{results[-1]['train_reward_first']:.3f} -> {results[-1]['train_reward_last']:.3f}", flush=True)
    table = markdown(results, args)
    same_prompts = None  # leading rollout steps whose prompts were identical in both systems
    if len(rewards) == 2:
        a, b = (r.prompts for r in rewards.values())
        same_prompts = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        table += f"\nsame prompts in the same order: {same_prompts} of {args.steps} steps"
    print("\n" + table, flush=True)
    versions = {**{n: version(n) for n in ("torch", "lightning", "transformers", "trl", "datasets")},
                "torch_threads": torch.get_num_threads()}
    payload = {"args": vars(args), "versions": versions, "results": results, "same_prompts": same_prompts,
               "table": table}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(f"{table}\n\nversions: {versions}\n")
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'}")
    return payload


if __name__ == "__main__":
    main()
