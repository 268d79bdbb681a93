"""Behaviour is pinned: seeded GRPO and PPO runs export the weights they exported before the RL-loop redesign.

`tests/data/golden_weights.json` was written by this file (`RLHF_WRITE_GOLDEN=1 pytest tests/test_same_weights.py`)
at commit 592ff5e, before `modules/` was rebuilt on one shared RL loop. Each case trains the tiny preset a few
rollouts with a different set of options (so that every branch of the loop runs: old/ref passes, minibatches,
micro-batches, dynamic sampling, the fused PPO passes, the shared critic, adaptive KL) and compares the exported
`hf_model/model.safetensors` tensor by tensor: sum, sum of |x| and 8 fixed entries. A refactor that changes any
update, even in the last bit of a sum over a rollout, shows here; regenerate the file only for an intended change
of behaviour, and say so in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from rlhf_lightning import GRPOModule, PPOModule, PromptDataModule
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.tokenizer import load_tokenizer

GOLDEN = Path(__file__).parent / "data" / "golden_weights.json"


def starts_with_digit(prompts, completions, **kwargs):
    """A reward the random tiny policy can move (about 1 in 10 completions at init): the rollouts have signal."""
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def digit_steps(prompts, completions, **kwargs):
    """Process rewards of the same kind: one per line, 1 when the line starts with a digit."""
    return [[1.0 if line[:1].isdigit() else 0.0 for line in c.split("\n")] for c in completions]


CASES = {
    "grpo_default": (GRPOModule, dict(beta=0.04), "addition"),
    "grpo_iterations_minibatches": (GRPOModule, dict(beta=0.1, num_iterations=2, minibatches=2, micro_batch_size=4,
                                                     loss_agg="token-mean", clip_high=0.28, mask_truncated=True,
                                                     entropy_coef=0.01), "addition"),
    "grpo_dynamic_sampling_overlong": (GRPOModule, dict(beta=0.0, drop_uninformative_groups=True,
                                                        dynamic_sampling_max_tries=2, overlong_buffer_len=2,
                                                        scale_rewards="batch",
                                                        importance_sampling="sequence"), "addition"),
    "grpo_rloo": (GRPOModule, dict(beta=0.04, advantage_estimator="rloo"), "addition"),
    "grpo_remax": (GRPOModule, dict(beta=0.0, advantage_estimator="remax"), "addition"),
    "grpo_reinforce_pp": (GRPOModule, dict(beta=0.05, advantage_estimator="reinforce_pp"), "addition"),
    "grpo_process": (GRPOModule, dict(beta=0.04, supervision="process", minibatches=2, reward_fns=[digit_steps],
                                      step_separator="\n"), "chain"),
    "ppo_fused": (PPOModule, dict(ppo_epochs=1, minibatches=1), "addition"),
    "ppo_epochs_minibatches": (PPOModule, dict(ppo_epochs=2, minibatches=2, micro_batch_size=2, whiten_rewards=True,
                                               missing_eos_penalty=1.0, adaptive_kl=True, kl_target=1.0,
                                               kl_estimator="k3"), "addition"),
    "ppo_shared_critic": (PPOModule, dict(critic="shared", ppo_epochs=2, value_clip=None), "addition"),
}


def _train(root: Path, cls, kw: dict, task: str) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    common = dict(model_name_or_path="tiny", max_new_tokens=6, lr=1e-3, log_samples_every_n_steps=0,
                  reward_fns=[starts_with_digit])
    if cls is GRPOModule:
        common["group_size"] = 4
    module = cls(**{**common, **kw})
    data = PromptDataModule(task=task, num_train=64, num_val=0, batch_size=4, seed=0)
    steps = 3 * module.updates_per_batch()[0] * module.updates_per_batch()[1]  # 3 rollouts
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1,
              default_root_dir=root).fit(module, data)
    assert module.rollouts == 3
    (export,) = root.rglob("hf_model/model.safetensors")
    weights = load_file(export)
    initial = load_causal_lm("tiny", load_tokenizer("tiny"), seed=0).state_dict()
    moved = [n for n, w in weights.items() if not torch.equal(w, initial[n])]
    assert len(moved) > len(weights) // 2, f"the run barely trained: {len(moved)} of {len(weights)} tensors moved"
    return weights


def _digest(weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    out = {}
    for name in sorted(weights):
        x = weights[name].detach().double().flatten()
        picks = torch.linspace(0, x.numel() - 1, 8).long()
        out[name] = [float(x.sum()), float(x.abs().sum()), *map(float, x[picks])]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_seeded_run_exports_the_same_weights_as_before_the_redesign(tmp_path, case):
    cls, kw, task = CASES[case]
    digest = _digest(_train(tmp_path, cls, kw, task))
    if os.environ.get("RLHF_WRITE_GOLDEN") == "1":
        table = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        table[case] = digest
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())[case]
    assert sorted(digest) == sorted(golden)
    for name, values in golden.items():
        # the same arithmetic gives the same bits; the tolerance only absorbs another CPU's float rounding. The sum
        # of a tensor cancels (it can be far smaller than its terms), so its rounding scales with the sum of |x|:
        # an Intel Xeon with AMX gave sums 1e-6 .. 2e-5 off the golden ones, 2.5e-7 of sum |x| at most, while one
        # different update moves every entry by about lr = 1e-3
        sum_tol = 1e-6 * values[1]
        assert digest[name][0] == pytest.approx(values[0], rel=0, abs=max(sum_tol, 1e-6)), name
        assert digest[name][1:] == pytest.approx(values[1:], rel=1e-5, abs=1e-6), name
