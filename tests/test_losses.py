"""Unit tests for rlhf_lightning.losses against small hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.algorithms.kl_control import AdaptiveKLController, FixedKLController
from rlhf_lightning.losses import (
    aggregate,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    ppo_token_rewards,
    process_advantages,
    value_loss,
)

NAN = float("nan")
EPS = 1e-4


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# masked statistics


def test_masked_sum_mean_ignore_garbage_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, torch.inf, 6.0], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    close(masked_sum(x, mask), 13.0)
    close(masked_sum(x, mask, dim=1), [3.0, 10.0, 0.0])
    close(masked_mean(x, mask), 13.0 / 4)
    close(masked_mean(x, mask, dim=1), [1.5, 5.0, 0.0])  # empty row -> 0, not NaN
    close(masked_mean(x, mask, dim=0), [2.5, 2.0, 6.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_sum_gradient_is_finite_with_nan_padding():
    x = torch.tensor([1.0, NAN, 3.0], requires_grad=True)
    masked_mean(x, torch.tensor([True, False, True])).backward()
    close(x.grad, [0.5, 0.0, 0.5])


def test_masked_var_and_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_var(x, mask), 5.0 / 3)
    close(masked_var(x, mask, unbiased=False), 5.0 / 4)
    close(masked_var(x, torch.tensor([0, 0, 1, 0, 0])), 0.0)  # one entry: undefined -> 0
    close(masked_var(x, torch.zeros(5)), 0.0)
    s = math.sqrt(5.0 / 3 + 1e-8)
    close(masked_whiten(x, mask), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0])
    close(masked_whiten(x, mask, shift_mean=False), [2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s, 0.0])


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(torch.ones(2, 3), torch.ones(3, 2))


# ----------------------------------------------------------------------------------------------------
# group advantages


def test_group_advantages_group_scale():
    # group 1: mean 1/3, unbiased var ((2/3)^2 + 2(1/3)^2) / 2 = 1/3; group 2 all equal -> 0
    s = math.sqrt(1 / 3)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0]), group_size=3)
    close(adv, [(2 / 3) / (s + EPS), (-1 / 3) / (s + EPS), (-1 / 3) / (s + EPS), 0.0, 0.0, 0.0])
    assert adv.dtype == torch.float32


def test_group_advantages_batch_and_none_scale():
    r = torch.tensor([0.0, 1.0, 2.0, 4.0])  # group means 0.5 and 3
    # batch: mean 1.75, squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75, unbiased var 8.75/3
    std = math.sqrt(8.75 / 3)
    d = std + EPS
    close(group_advantages(r, 2, scale="batch"), [-0.5 / d, 0.5 / d, -1 / d, 1 / d])
    close(group_advantages(r, 2, scale="none"), [-0.5, 0.5, -1.0, 1.0])


def test_group_advantages_nan_rewards_and_single_valid():
    # group 1: valid {1, 3}, mean 2, unbiased std sqrt(2); group 2: one valid reward -> 0
    adv = group_advantages(torch.tensor([1.0, NAN, 3.0, 5.0, NAN, NAN]), 3)
    s = math.sqrt(2.0)
    close(adv, [-1 / (s + EPS), 0.0, 1 / (s + EPS), 0.0, 0.0, 0.0])
    for scale in ("batch", "none"):
        out = group_advantages(torch.tensor([1.0, NAN, 3.0, 5.0, NAN, NAN]), 3, scale=scale)
        assert not out.isnan().any()
        assert out[1] == 0 and (out[3:] == 0).all()


def test_batch_scale_reduced_over_ranks_equals_one_process_on_the_whole_batch():
    """`all_reduce` (a sum over ranks) of the count / sum / sum of squares gives each rank the std of the whole
    batch: rank A's advantages are the first rows of one process's advantages on A + B. Without it they differ."""
    a = torch.tensor([0.0, 1.0, 2.0, NAN, 3.0, 3.0])  # "rank 0": groups of 2
    b = torch.tensor([10.0, 0.0, 7.0, 5.0])  # "rank 1": a much wider spread
    whole = group_advantages(torch.cat([a, b]), 2, scale="batch")
    seen = []
    group_advantages(b, 2, scale="batch", all_reduce=lambda stats: seen.append(stats) or stats)  # rank 1's numbers
    across = group_advantages(a, 2, scale="batch", all_reduce=lambda stats: stats + seen[0])
    close(across, whole[:6])
    assert not torch.allclose(group_advantages(a, 2, scale="batch"), whole[:6])  # per rank: another std
    # by hand: the 9 valid rewards have mean 31/9 and unbiased variance (sum of squares - 31^2/9) / 8
    std = math.sqrt((0 + 1 + 4 + 9 + 9 + 100 + 0 + 49 + 25 - 31**2 / 9) / 8)
    close(across, [-0.5 / (std + EPS), 0.5 / (std + EPS), 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_rewards_are_exactly_zero(scale):
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, NAN, NAN, NAN])
    adv = group_advantages(r, 3, scale=scale, eps=0.0)
    assert torch.equal(adv, torch.zeros(9))


def test_group_advantages_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), 3)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(6), 3, scale="rank")


# ----------------------------------------------------------------------------------------------------
# process supervision


def test_process_advantages_hand_example():
    # group 1 (rows 0, 1): valid step rewards 1, 0, 0 -> mean 1/3, unbiased std sqrt(1/3)
    #   row 0: steps end at tokens 1 and 3; row 1: one step ending at token 2 (second slot is padding, its 9 ignored)
    # group 2 (rows 2, 3): row 2 has only a NaN reward and a padded slot; row 3's two valid rewards are equal -> 0
    rewards = torch.tensor([[1.0, 0.0], [0.0, 9.0], [NAN, 5.0], [2.0, 2.0]])
    ends = torch.tensor([[1, 3], [2, -1], [0, -1], [1, 3]])
    adv = process_advantages(rewards, ends, group_size=2, num_tokens=5)
    s = math.sqrt(1 / 3)
    a, b = (2 / 3) / (s + EPS), (-1 / 3) / (s + EPS)
    expected = [
        [a + b, a + b, b, b, 0.0],  # tokens 0-1 in step 1 (sees both steps), 2-3 in step 2, 4 after the last step
        [b, b, b, 0.0, 0.0],
        [0.0] * 5,
        [0.0] * 5,
    ]
    close(adv, expected)


def test_process_advantages_errors():
    with pytest.raises(ValueError, match="num_tokens"):
        process_advantages(torch.ones(2, 1), torch.tensor([[4], [0]]), group_size=2, num_tokens=4)
    with pytest.raises(ValueError, match="group_size"):
        process_advantages(torch.ones(3, 1), torch.zeros(3, 1), group_size=2, num_tokens=4)


# ----------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_hand_values():
    logp = torch.tensor([0.0, -1.0, -0.5])
    ref = torch.tensor([-1.0, 0.0, -0.5])  # log(ref/pi) = [-1, 1, 0]
    close(kl_estimate(logp, ref, "k1"), [1.0, -1.0, 0.0])
    close(kl_estimate(logp, ref, "k2"), [0.5, 0.5, 0.0])
    close(kl_estimate(logp, ref, "k3"), [math.exp(-1), math.e - 2, 0.0])


def test_kl_k3_clamps_instead_of_overflowing():
    out = kl_estimate(torch.tensor([-200.0, 0.0]), torch.tensor([0.0, -200.0]), "k3")
    assert torch.isfinite(out).all()
    close(out, [math.exp(20) - 21, math.exp(-20) + 19], atol=1.0)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


# ----------------------------------------------------------------------------------------------------
# aggregation


def test_aggregate_hand_values():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(aggregate(v, m, "token-mean"), 7 / 3)  # (1 + 2 + 4) / 3 tokens
    close(aggregate(v, m, "seq-mean-token-mean"), (1.5 + 4.0) / 2)  # empty row not counted
    close(aggregate(v, m, "seq-mean-token-sum-norm"), (3 / 3 + 4 / 3 + 0) / 3)
    close(aggregate(v, m, "seq-mean-token-sum-norm", max_len=4), (3 / 4 + 4 / 4) / 3)
    close(aggregate(v, m, "token-mean", normalizer=10), 7 / 10)
    with pytest.raises(ValueError, match="agg"):
        aggregate(v, m, "sum")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_all_zero_mask_is_zero_with_graph(agg):
    v = torch.full((2, 3), NAN, requires_grad=True)
    out = aggregate(v, torch.zeros(2, 3), agg)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(v.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_microbatches_with_global_normalizer_equal_full_batch(agg):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5, generator=g).requires_grad_()
    m = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    )
    full = aggregate(v, m, agg)
    (full_grad,) = torch.autograd.grad(full, v)
    # global counts the caller would all-reduce over the optimizer step
    counts = {"token-mean": m.sum(), "seq-mean-token-mean": (m.sum(1) > 0).sum(), "seq-mean-token-sum-norm": 6}
    normalizer = counts[agg]
    parts = (slice(0, 2), slice(2, 6))  # uneven micro-batches
    halves = sum(aggregate(v[p], m[p], agg, normalizer=normalizer, max_len=5) for p in parts)
    (half_grad,) = torch.autograd.grad(halves, v)
    close(halves, full.detach())
    close(half_grad, full_grad)
    # without the global normaliser, the per-half means would not add up to the full loss
    naive = sum(aggregate(v[p], m[p], agg) for p in parts) / 2
    assert not torch.allclose(naive, full)


# ----------------------------------------------------------------------------------------------------
# policy loss

# Ratios per token; advantages +1 (row 0) and -1 (row 1), ε = 0.2
#   row 0, A=+1: ρ = 1.5 (clipped high: -1.2, no grad), 0.9 (-0.9, grad -0.9),
#                ρ = 0.5 (A>0 is not clipped below: -0.5, grad -0.5)
#   row 1, A=-1: ρ = 0.5 (clipped low: 0.8, no grad), 1.1 (1.1, grad 1.1), 1.5 (masked out)
RATIOS = torch.tensor([[1.5, 0.9, 0.5], [0.5, 1.1, 1.5]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])


def _token_case(dtype=torch.float32):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.0]])
    logp = (old + RATIOS.log()).to(dtype).requires_grad_()
    return logp, old


def test_policy_loss_token_level_value_grad_and_stats():
    logp, old = _token_case()
    loss, stats = policy_loss(logp, old, ADV, MASK, agg="seq-mean-token-mean")
    row0, row1 = (-1.2 - 0.9 - 0.5) / 3, (0.8 + 1.1) / 2
    close(loss, (row0 + row1) / 2)
    loss.backward()
    # d loss / d logp_t = -ρ_t A / (|y_i| · 2) where unclipped, 0 where clipped or masked
    close(logp.grad, [[0.0, -0.9 / 6, -0.5 / 6], [0.0, 1.1 / 4, 0.0]])
    close(stats["clip_frac_low"], 1 / 5)
    close(stats["clip_frac_high"], 1 / 5)
    close(stats["ratio_mean"], (1.5 + 0.9 + 0.5 + 0.5 + 1.1) / 5)
    kl = sum((r - 1) - math.log(r) for r in (1.5, 0.9, 0.5, 0.5, 1.1)) / 5
    close(stats["approx_kl"], kl)
    assert all(not s.requires_grad for s in stats.values())


def test_policy_loss_token_mean_and_per_token_advantages_and_clip_higher():
    logp, old = _token_case()
    adv_bt = ADV.unsqueeze(1).expand(2, 3).clone()
    adv_bt[1, 2] = NAN  # garbage under the mask
    loss, stats = policy_loss(logp, old, adv_bt, MASK, clip_low=0.2, clip_high=0.28, agg="token-mean")
    close(loss, (-1.28 - 0.9 - 0.5 + 0.8 + 1.1) / 5)
    loss.backward()
    close(logp.grad, [[0.0, -0.9 / 5, -0.5 / 5], [0.0, 1.1 / 5, 0.0]])
    close(stats["clip_frac_high"], 1 / 5)


def test_policy_loss_bf16_inputs_compute_in_float32():
    logp, old = _token_case(torch.bfloat16)
    loss, _ = policy_loss(logp, old.bfloat16(), ADV, MASK)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16 and torch.isfinite(logp.grad).all()


def test_policy_loss_sequence_level_gspo():
    # row 0: log-ratios 0.1, 0.3 -> s = e^0.2 ≈ 1.221 < 1.3 (not clipped), A=+1
    # row 1: log-ratios -0.5, -0.5 (third token masked, garbage logp) -> s = e^-0.5 ≈ 0.607 < 0.8, A=-1: clipped
    old = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0]])
    logp = (old + torch.tensor([[0.1, 0.3, 0.0], [-0.5, -0.5, 0.0]])).requires_grad_()
    with torch.no_grad():
        logp[1, 2] = 100.0
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, stats = policy_loss(logp, old, ADV, mask, clip_low=0.2, clip_high=0.3, level="sequence")
    s0 = math.exp(0.2)
    close(loss, (-s0 + 0.8) / 2)
    loss.backward()
    # value of every token ratio is s_i; gradient = that of -s_0 A_0 / 2 = -(s0/2) · (1/2) per token of row 0
    close(logp.grad, [[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]])
    close(stats["ratio_mean"], (2 * s0 + 2 * math.exp(-0.5)) / 4)
    close(stats["clip_frac_low"], 2 / 4)
    close(stats["clip_frac_high"], 0.0)
    close(stats["approx_kl"], ((s0 - 1 - 0.2) * 2 + (math.exp(-0.5) - 1 + 0.5) * 2) / 4)


def test_policy_loss_sequence_grad_matches_direct_sequence_objective():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 4, generator=g) * 0.1 - 1
    logp = (old + torch.randn(3, 4, generator=g) * 0.05).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.5, clip_high=0.5, level="sequence")
    (grad,) = torch.autograd.grad(loss, logp)
    s = torch.exp(((logp - old) * mask).sum(1) / mask.sum(1))  # no clipping active at ε = 0.5
    (direct_grad,) = torch.autograd.grad(-(s * adv).mean(), logp)
    close(grad, direct_grad)


def test_policy_loss_bad_arguments():
    logp, old = _token_case()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="level"):
        policy_loss(logp, old, ADV, MASK, level="group")


# ----------------------------------------------------------------------------------------------------
# PPO


def test_ppo_token_rewards():
    scores = torch.tensor([2.0, 3.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    out = ppo_token_rewards(scores, kl, mask, kl_coef=0.1)
    close(out, [[-0.01, -0.02, -0.03 + 2.0], [-0.05, -0.05 + 3.0, 0.0], [0.0, 0.0, 0.0]])


def test_gae_hand_values_and_padding():
    # row 0 (γ=0.9, λ=0.8, γλ=0.72): δ2 = 3 - 1.5 = 1.5; δ1 = 2 + 0.9·1.5 - 1 = 2.35; δ0 = 1 + 0.9·1 - 0.5 = 1.4
    #   A2 = 1.5, A1 = 2.35 + 0.72·1.5 = 3.43, A0 = 1.4 + 0.72·3.43 = 3.8696
    # row 1 (last token padded): V after token 1 is 0 -> δ1 = 2 - 1 = 1, A1 = 1; A0 = 1.4 + 0.72 = 2.12
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 999.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 777.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[3.8696, 3.43, 1.5], [2.12, 1.0, 0.0]])
    close(ret, [[4.3696, 4.43, 3.0], [2.62, 2.0, 0.0]])
    # garbage in padded positions changes nothing
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[1, 2], values2[1, 2] = NAN, -1e9
    adv2, ret2 = gae(rewards2, values2, mask, gamma=0.9, lam=0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_gamma_lambda_one_is_monte_carlo():
    rewards = torch.tensor([[0.0, -0.1, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[0.9, 0.9, 1.0, 0.0]])  # sum of future rewards
    close(adv, [[0.7, 0.5, 0.4, 0.0]])


def test_value_loss_clipped_and_unclipped():
    # token 0: v-R = -1 -> 1; v_clip = 0.5 + 0.2 = 0.7, 0.7-2 = -1.3 -> 1.69 (clipped term wins, no grad)
    # token 1: v = old, both terms 1; token 2 masked
    values = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    close(loss, (0.5 * 1.69 + 0.5 * 1.0) / 2)
    close(stats["value_clip_frac"], 0.5)
    loss.backward()
    close(values.grad, [[0.0, 1.0 / 2, 0.0]])

    values.grad = None
    loss, stats = value_loss(values, old, returns, mask, clip_range=None, normalizer=4)
    close(loss, (0.5 + 0.5) / 4)
    close(stats["value_clip_frac"], 0.0)
    loss.backward()
    close(values.grad, [[-1.0 / 4, 1.0 / 4, 0.0]])


def test_explained_variance():
    # R - v = [0, 0, 0, 1]: unbiased var 0.25; Var(R) = 5/3 -> 1 - 0.15 = 0.85
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [3.0, -100.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(explained_variance(values, returns, mask), 0.85)
    close(explained_variance(values, returns, mask * 0), 0.0)
    close(explained_variance(torch.zeros(3), torch.full((3,), 2.0), torch.ones(3)), 0.0)  # Var(R) = 0


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05

    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # error clip(0.5) = 0.2 -> × (1 + 0.2·256/10000)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl.update(6.6, 100)  # error 0.1 -> × 1.001
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 1.001)
    ctl.update(0.0, 1000)  # error clip(-1) = -0.2 -> × 0.98
    expected = 0.1 * 1.00512 * 1.001 * 0.98
    assert ctl.value == pytest.approx(expected)

    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (pytest.approx(expected), 6.0, 10000)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
