"""The policy-loss registry: the registered losses by hand, the setting validated by the registry, a new loss."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from rlhf_lightning import GRPOModule, PromptDataModule, losses
from rlhf_lightning.algorithms.policy_losses import (
    POLICY_LOSSES,
    PolicyLossInputs,
    get_policy_loss,
    register_policy_loss,
)


def _inputs(**kw) -> PolicyLossInputs:
    # one completion of 2 tokens, one of 1 (+ padding); log π_θ - log π_old = log(1.5), log(0.5) | log(1.1)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.1, 7.0]]))
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    return PolicyLossInputs(logp, old, adv, mask, **{"clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean", **kw})


def test_token_ratio_loss_by_hand():
    """-min(ρA, clip(ρ)A) per token: row 0 (A=+1) ρ = 1.5 -> 1.2 (clipped), 0.5 -> 0.5; row 1 (A=-1) ρ = 1.1 -> -1.1.
    token-mean over 3 tokens."""
    loss, stats = get_policy_loss("token")(_inputs())
    expected = (-1.2 - 0.5 + 1.1) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(stats["clip_frac_high"]) == pytest.approx(1 / 3)  # the 1.5 token: A > 0 and ρ > 1.2


def test_sequence_ratio_loss_by_hand():
    """GSPO: s_0 = exp(mean(log 1.5, log 0.5)) = sqrt(0.75) for both tokens of row 0 (A=+1, inside the clip range
    [0.8, 1.2]? 0.866 yes), s_1 = 1.1 (A=-1: -min(-1.1, -1.1) = 1.1)."""
    loss, _ = get_policy_loss("sequence")(_inputs())
    s0 = math.sqrt(0.75)
    expected = (-s0 - s0 + 1.1) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_registered_losses_are_the_losses_module_math():
    for name, level in (("token", "token"), ("sequence", "sequence")):
        x = _inputs(agg="seq-mean-token-mean", normalizer=2.0)
        got, _ = get_policy_loss(name)(x)
        want, _ = losses.policy_loss(x.logp, x.old_logp, x.advantages, x.mask, level=level,
                                     agg="seq-mean-token-mean", normalizer=2.0)
        assert torch.equal(got, want)


def test_the_setting_is_validated_by_the_registry():
    with pytest.raises(ValueError, match=r"importance_sampling must be token\|sequence, got 'tokens'"):
        GRPOModule("tiny", importance_sampling="tokens")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("token")(lambda inputs: None)


def test_a_new_registered_loss_is_selected_by_name_and_trains(tmp_path):
    """One function + one registration: `importance_sampling: plain_pg` (REINFORCE, no ratio) is what the
    update differentiates."""
    calls = []

    @register_policy_loss("plain_pg")
    def plain_pg(inputs: PolicyLossInputs):
        calls.append(inputs.logp.shape)
        per_token = -inputs.logp * inputs.advantages.unsqueeze(-1)  # [B, T]
        return losses.aggregate(per_token, inputs.mask, inputs.agg, normalizer=inputs.normalizer,
                                max_len=inputs.max_len), {}

    try:
        def digit(prompts, completions, **kw):
            return [1.0 if c[:1].isdigit() else 0.0 for c in completions]

        L.seed_everything(0)
        module = GRPOModule("tiny", reward_fns=[digit], importance_sampling="plain_pg", group_size=4,
                            max_new_tokens=4, beta=0.0, lr=1e-3, log_samples_every_n_steps=0)
        before = [p.detach().clone() for p in module.policy.parameters()]
        L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(
            module, PromptDataModule(task="addition", num_train=32, num_val=0, batch_size=4))
        assert len(calls) == 2  # one optimizer step per rollout, one micro-batch each
        assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
    finally:
        POLICY_LOSSES.pop("plain_pg", None)
