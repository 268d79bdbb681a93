"""The advantage-estimator registry: hand-computed values, the papers' formulas (loops), verl's definitions.

Each estimator gets (1) small tensors with the numbers worked out in a comment, (2) agreement with a plain
Python loop written from the paper's formula, and (3) where verl has the estimator, agreement with verl's
`core_algos.py` definition transcribed below as a reference (verl is not imported), on the same float64 inputs.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhf_lightning import losses
from rlhf_lightning.algorithms.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    get_estimator,
    register_estimator,
    returns_to_go,
)

NAN = float("nan")
EPS = 1e-4  # GRPO's std epsilon


def run(name: str, **kw):
    return get_estimator(name).fn(AdvantageInputs(**kw))


def close(actual, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=1e-5)


def last_token_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's token_level_rewards for an outcome reward: the score at the last real token, 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(mask.shape[0]):
        real = mask[i].nonzero().flatten()
        if len(real):
            out[i, real[-1]] = scores[i]
    return out


def random_batch(n_groups=3, G=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = n_groups * G
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()  # right-padded, every row >= 1 token
    scores = torch.randn(N, generator=g, dtype=torch.float64)
    kl = torch.rand(N, T, generator=g, dtype=torch.float64) * 0.3
    values = torch.randn(N, T, generator=g, dtype=torch.float64)
    return mask, scores, kl, values


# ---------------------------------------------------------------------------------------------- registry
def test_registry_holds_the_estimators_and_names_them_in_one_line():
    assert list(ESTIMATORS) == ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax", "gae"]
    with pytest.raises(ValueError) as err:
        get_estimator("ppo")
    assert str(err.value) == ("advantage_estimator must be one of grpo|dr_grpo|rloo|reinforce_pp|"
                              "reinforce_pp_baseline|remax|gae, got 'ppo'")
    assert get_estimator("reinforce_pp").kl_in_reward and not get_estimator("reinforce_pp_baseline").kl_in_reward
    assert get_estimator("remax").needs_baseline and get_estimator("gae").needs_values


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        register_estimator("grpo")(lambda inputs: None)


def test_inputs_with_wrong_shapes_or_missing_fields_fail_in_one_line():
    mask = torch.ones(4, 3)
    with pytest.raises(ValueError, match=r"scores shape \(3,\) must be \[N\] = \(4,\)"):
        AdvantageInputs(mask=mask, scores=torch.zeros(3))
    with pytest.raises(ValueError, match="kl shape"):
        AdvantageInputs(mask=mask, scores=torch.zeros(4), kl=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="group_size=3"):
        AdvantageInputs(mask=mask, scores=torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="needs baseline_scores"):
        run("remax", mask=mask, scores=torch.zeros(4))
    with pytest.raises(ValueError, match="needs values"):
        run("gae", mask=mask, scores=torch.zeros(4))


ALL = list(ESTIMATORS)


@pytest.mark.parametrize("name", ALL)
def test_nan_scores_give_zero_never_nan(name):
    # group 0: one NaN row among informative ones; group 1: all equal; group 2: all NaN
    scores = torch.tensor([1.0, NAN, 0.0, 2.0, 2.0, 2.0, NAN, NAN, NAN])
    mask = torch.tensor([[1, 1, 0]] * 9)
    out = run(name, mask=mask, scores=scores, group_size=3, kl=torch.full((9, 3), 0.1), kl_coef=0.1,
              values=torch.full((9, 3), 0.5), baseline_scores=torch.tensor([0.5] * 3 + [1.0] * 3 + [NAN] * 3))
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[[1, 6, 7, 8]] == 0).all()  # no score: no advantage
    assert (out.advantages[:, 2] == 0).all()  # padding
    if name not in ("reinforce_pp", "gae", "remax"):  # group estimators: an all-equal group has no signal
        assert (out.advantages[3:6] == 0).all()


# ---------------------------------------------------------------------------------------------- grpo, dr_grpo
def test_grpo_hand_computed():
    # scores [1, 0], G = 2: mean 0.5, unbiased std sqrt(0.5) = 0.707107; Â = ±0.5 / (0.707107 + 1e-4) = ±0.707007
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = run("grpo", mask=mask, scores=torch.tensor([1.0, 0.0]), group_size=2)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    close(out.advantages, [[a, a, 0.0], [-a, 0.0, 0.0]])
    close(out.sequence, [a, -a])
    # scale=batch, scores [0, 1, 2, 4]: group means 0.5, 3; batch unbiased var 8.75/3 (see test_losses)
    out = run("grpo", mask=torch.ones(4, 1), scores=torch.tensor([0.0, 1.0, 2.0, 4.0]), group_size=2, scale="batch")
    d = math.sqrt(8.75 / 3) + EPS
    close(out.sequence, [-0.5 / d, 0.5 / d, -1 / d, 1 / d])


def test_dr_grpo_hand_computed():
    # groups [1, 0] -> mean 0.5 -> ±0.5; [3, 3] -> 0
    out = run("dr_grpo", mask=torch.ones(4, 2), scores=torch.tensor([1.0, 0.0, 3.0, 3.0]), group_size=2)
    close(out.advantages, [[0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.0, 0.0]])


def paper_grpo(scores: list[float], G: int, std: bool) -> list[float]:
    """DeepSeekMath §4.1.2 / Dr. GRPO: (r − mean(group)) [/ (std(group) + ε)], one group at a time."""
    out = []
    for start in range(0, len(scores), G):
        group = scores[start:start + G]
        mean, sd = statistics.mean(group), statistics.stdev(group)
        out += [(r - mean) / (sd + EPS) if std else r - mean for r in group]
    return out


def verl_grpo(token_level_rewards, index, epsilon, norm_adv_by_std_in_grpo):
    """verl `compute_grpo_outcome_advantage`: per-index mean and torch.std (unbiased), score sum over tokens."""
    scores = token_level_rewards.sum(-1).clone()
    for idx in set(index):
        rows = [i for i in range(len(index)) if index[i] == idx]
        s = scores[rows]
        mean, std = s.mean(), s.std()
        scores[rows] = (s - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else s - mean
    return scores


@pytest.mark.parametrize("name, std", [("grpo", True), ("dr_grpo", False)])
def test_grpo_and_dr_grpo_match_paper_and_verl(name, std):
    mask, scores, _, _ = random_batch()
    out = run(name, mask=mask, scores=scores, group_size=4)
    close(out.sequence, paper_grpo(scores.tolist(), 4, std))
    index = [i // 4 for i in range(len(scores))]
    verl = verl_grpo(last_token_scores(scores, mask), index, epsilon=EPS, norm_adv_by_std_in_grpo=std)
    close(out.advantages, verl.unsqueeze(-1) * mask)


# ---------------------------------------------------------------------------------------------- rloo
def test_rloo_hand_computed():
    # [1, 2, 6]: 1 − (2+6)/2 = −3, 2 − (1+6)/2 = −1.5, 6 − (1+2)/2 = 4.5
    # [1, NaN, 3]: the NaN row leaves the baseline: 1 − 3 = −2, 3 − 1 = 2; [5, NaN, NaN]: one valid -> 0
    scores = torch.tensor([1.0, 2.0, 6.0, 1.0, NAN, 3.0, 5.0, NAN, NAN])
    out = run("rloo", mask=torch.ones(9, 1), scores=scores, group_size=3)
    close(out.sequence, [-3.0, -1.5, 4.5, -2.0, 0.0, 2.0, 0.0, 0.0, 0.0])


def paper_rloo(scores: list[float], G: int) -> list[float]:
    """Ahmadian et al. 2024 eq. 6: r_i − 1/(k−1) Σ_{j≠i} r_j."""
    out = []
    for start in range(0, len(scores), G):
        group = scores[start:start + G]
        out += [r - sum(group[j] for j in range(G) if j != i) / (G - 1) for i, r in enumerate(group)]
    return out


def verl_rloo(token_level_rewards, index):
    """verl `compute_rloo_outcome_advantage`: r·n/(n−1) − mean·n/(n−1) per index."""
    scores = token_level_rewards.sum(-1).clone()
    for idx in set(index):
        rows = [i for i in range(len(index)) if index[i] == idx]
        n = len(rows)
        scores[rows] = scores[rows] * n / (n - 1) - scores[rows].mean() * n / (n - 1)
    return scores


def test_rloo_matches_paper_and_verl():
    mask, scores, _, _ = random_batch()
    out = run("rloo", mask=mask, scores=scores, group_size=4)
    close(out.sequence, paper_rloo(scores.tolist(), 4))
    verl = verl_rloo(last_token_scores(scores, mask), [i // 4 for i in range(len(scores))])
    close(out.advantages, verl.unsqueeze(-1) * mask)


# ---------------------------------------------------------------------------------------------- reinforce_pp
def test_reinforce_pp_hand_computed():
    # β = 0.5, γ = 1. Row 0 rewards: −0.05, −0.1, −0.15 + 1 = 0.85 -> returns 0.7, 0.75, 0.85.
    # Row 1 (2 tokens, pad holds garbage 9): −0.2, −0.25 -> returns −0.45, −0.25.
    # The 5 returns: mean 1.6/5 = 0.32, deviations .38 .43 .53 −.77 −.57, Σ dev² = 1.528, unbiased var 0.382.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    out = run("reinforce_pp", mask=mask, scores=torch.tensor([1.0, 0.0]), kl=kl, kl_coef=0.5)
    close(out.returns, [[0.7, 0.75, 0.85], [-0.45, -0.25, 0.0]])
    s = math.sqrt(0.382 + 1e-8)
    close(out.advantages, [[0.38 / s, 0.43 / s, 0.53 / s], [-0.77 / s, -0.57 / s, 0.0]])
    # γ = 0.5, row 0: G2 = 0.85, G1 = −0.1 + 0.5·0.85 = 0.325, G0 = −0.05 + 0.5·0.325 = 0.1125
    out = run("reinforce_pp", mask=mask, scores=torch.tensor([1.0, 0.0]), kl=kl, kl_coef=0.5, gamma=0.5)
    close(out.returns[0], [0.1125, 0.325, 0.85])


def test_returns_to_go_steps_over_holes():
    # a hole (mask 0) in the middle is skipped: rewards [1, (hole 5), 2], γ = 0.5 -> G = [1 + 0.5·2, 0, 2]
    out = returns_to_go(torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[1, 0, 1]]), gamma=0.5)
    close(out, [[2.0, 0.0, 2.0]])


def paper_reinforce_pp(scores, kl, mask, beta, gamma):
    """Hu 2025: r_t = −β·KL_t (+ score at the last token), G_t = Σ_{s≥t} γ^{s−t} r_s, whitened over all tokens."""
    returns, flat = [], []
    for i in range(len(scores)):
        n = int(mask[i].sum())
        r = [-beta * float(kl[i, t]) + (float(scores[i]) if t == n - 1 else 0.0) for t in range(n)]
        g = [sum(gamma ** (s - t) * r[s] for s in range(t, n)) for t in range(n)]
        returns.append(g)
        flat += g
    mean, var = statistics.mean(flat), statistics.variance(flat)
    T = mask.shape[1]
    return [[(g[t] - mean) / math.sqrt(var + 1e-8) if t < len(g) else 0.0 for t in range(T)] for g in returns]


def verl_masked_whiten(values, mask):
    """verl `utils.torch_functional.masked_whiten`: masked mean, Bessel-corrected masked var, rsqrt(var + 1e-8)."""
    mean = (values * mask).sum() / (mask.sum() + 1e-8)
    var = ((values - mean) ** 2 * mask).sum() / (mask.sum() + 1e-8)
    var = var * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_reinforce_pp(token_level_rewards, response_mask, gamma):
    """verl `compute_reinforce_plus_plus_outcome_advantage`: running return reset after EOS, whitened, × mask."""
    returns = torch.zeros_like(token_level_rewards)
    running = 0
    for t in reversed(range(token_level_rewards.shape[1])):
        running = token_level_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * response_mask[:, t]
    return verl_masked_whiten(returns, response_mask) * response_mask, returns


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_paper_and_verl(gamma):
    mask, scores, kl, _ = random_batch()
    beta = 0.2
    out = run("reinforce_pp", mask=mask, scores=scores, kl=kl, kl_coef=beta, gamma=gamma, group_size=4)
    close(out.advantages, paper_reinforce_pp(scores, kl, mask, beta, gamma))
    # verl's token_level_rewards with use_kl_in_reward: score at the last token − β·KL (k1 from its kl_penalty)
    token_rewards = last_token_scores(scores, mask) - beta * kl * mask
    verl_adv, verl_returns = verl_reinforce_pp(token_rewards, mask.double(), gamma)
    close(out.advantages, verl_adv)
    close(out.returns, verl_returns * mask)


# ---------------------------------------------------------------------------------------------- reinforce_pp_baseline
def test_reinforce_pp_baseline_hand_computed():
    # G = 2, scores [1, 0 | 2, 2] -> centred [0.5, −0.5 | 0, 0]; rows have 2, 1, 2, 1 tokens.
    # The 6 tokens [.5, .5, −.5, 0, 0, 0]: mean 1/12, deviations 5/12 5/12 −7/12 −1/12 ×3,
    # Σ dev² = 102/144, unbiased var 102/720. Rows of the all-equal group stay 0 (verl: −(1/12)/std).
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    out = run("reinforce_pp_baseline", mask=mask, scores=torch.tensor([1.0, 0.0, 2.0, 2.0]), group_size=2)
    s = math.sqrt(102 / 720 + 1e-8)
    close(out.advantages, [[5 / 12 / s, 5 / 12 / s], [-7 / 12 / s, 0.0], [0.0, 0.0], [0.0, 0.0]])
    close(out.sequence, [5 / 12 / s, -7 / 12 / s, 0.0, 0.0])  # one value per completion


def test_reinforce_pp_baseline_keeps_a_row_equal_to_its_group_mean():
    # [0, 1, 2]: the middle row is centred to exactly 0 but its group is informative: it gets −mean/std
    out = run("reinforce_pp_baseline", mask=torch.ones(3, 1), scores=torch.tensor([0.0, 1.0, 2.0]), group_size=3)
    close(out.advantages.flatten(), [-1.0, 0.0, 1.0])  # centred −1, 0, 1: mean 0, unbiased var 1


def paper_reinforce_pp_baseline(scores, mask, G):
    """Hu 2025 (REINFORCE++-baseline): A = r − mean(group), then (A − mean)/std over every token of the batch."""
    centred = paper_grpo(scores.tolist(), G, std=False)
    flat = [centred[i] for i in range(len(centred)) for _ in range(int(mask[i].sum()))]
    mean, sd = statistics.mean(flat), math.sqrt(statistics.variance(flat) + 1e-8)
    T = mask.shape[1]
    return [[(c - mean) / sd if mask[i, t] else 0.0 for t in range(T)] for i, c in enumerate(centred)]


def verl_reinforce_pp_baseline(token_level_rewards, response_mask, index):
    """verl `compute_reinforce_plus_plus_baseline_outcome_advantage`: r − group mean, tiled, whitened, × mask."""
    scores = token_level_rewards.sum(-1).clone()
    for idx in set(index):
        rows = [i for i in range(len(index)) if index[i] == idx]
        scores[rows] = scores[rows] - scores[rows].mean()
    tiled = scores.unsqueeze(-1).tile([1, token_level_rewards.shape[1]]) * response_mask
    return verl_masked_whiten(tiled, response_mask) * response_mask


def test_reinforce_pp_baseline_matches_paper_and_verl():
    mask, scores, _, _ = random_batch()  # random scores: no all-equal group, where ours differs on purpose
    out = run("reinforce_pp_baseline", mask=mask, scores=scores, group_size=4)
    close(out.advantages, paper_reinforce_pp_baseline(scores, mask, 4))
    verl = verl_reinforce_pp_baseline(last_token_scores(scores, mask), mask.double(), [i // 4 for i in range(12)])
    close(out.advantages, verl)


# ---------------------------------------------------------------------------------------------- remax
def test_remax_hand_computed():
    # G = 2, greedy rewards 0.5 (prompt 0) and NaN (prompt 1): [1 − .5, 0 − .5, no baseline -> 0, 0]
    out = run("remax", mask=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]), scores=torch.tensor([1.0, 0.0, 1.0, 3.0]),
              baseline_scores=torch.tensor([0.5, 0.5, NAN, NAN]), group_size=2)
    close(out.advantages, [[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])


def verl_remax(token_level_rewards, reward_baselines, response_mask):
    """verl `compute_remax_outcome_advantage`: reverse-cumsum returns − baseline × mask."""
    returns = (token_level_rewards * response_mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    return returns - reward_baselines.unsqueeze(-1) * response_mask


def test_remax_matches_paper_and_verl():
    mask, scores, _, _ = random_batch()
    greedy = torch.randn(3, dtype=torch.float64).repeat_interleave(4)  # one greedy reward per prompt
    out = run("remax", mask=mask, scores=scores, baseline_scores=greedy, group_size=4)
    close(out.sequence, [r - b for r, b in zip(scores.tolist(), greedy.tolist())])  # Li et al. 2023: r(y) − r(ŷ)
    close(out.advantages, verl_remax(last_token_scores(scores, mask), greedy, mask.double()))


# ---------------------------------------------------------------------------------------------- gae
def test_gae_hand_computed():
    # score 1 at the last of 2 tokens, no KL, V = [0.5, 0.8], γ = λ = 1 (Monte Carlo):
    # A_1 = 1 − 0.8 = 0.2, A_0 = (0 + 0.8 − 0.5) + 0.2 = 0.5; returns = A + V = [1, 1]
    out = run("gae", mask=torch.ones(1, 2), scores=torch.tensor([1.0]), values=torch.tensor([[0.5, 0.8]]),
              gamma=1.0, lam=1.0, whiten=False)
    close(out.advantages, [[0.5, 0.2]])
    close(out.returns, [[1.0, 1.0]])


def paper_gae(rewards, values, mask, gamma, lam):
    """Schulman et al. 2016 eq. 16 as the sum Â_t = Σ_l (γλ)^l δ_{t+l}, V = 0 after the last token."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        v = [float(values[i, t]) for t in range(n)] + [0.0]
        delta = [float(rewards[i, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[i, t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
    return adv


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl `compute_gae_advantage_return`: the masked recursion, returns = A + V, then masked_whiten."""
    nextvalues, lastgaelam, out = 0, 0, []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        out.append(lastgaelam)
    advantages = torch.stack(out[::-1], dim=1)
    return verl_masked_whiten(advantages, response_mask), advantages + values


def test_gae_matches_paper_and_verl():
    mask, scores, kl, values = random_batch()
    beta, gamma, lam = 0.1, 0.95, 0.9
    out = run("gae", mask=mask, scores=scores, kl=kl, kl_coef=beta, values=values, gamma=gamma, lam=lam)
    token_rewards = last_token_scores(scores, mask) - beta * kl * mask
    raw = paper_gae(token_rewards, values, mask, gamma, lam)
    close(out.advantages, losses.masked_whiten(raw, mask).double())
    verl_adv, verl_returns = verl_gae(token_rewards, values, mask.double(), gamma, lam)
    close(out.advantages * mask, verl_adv * mask)
    close(out.returns, verl_returns * mask)
    # PPO's path: the caller shaped the token rewards itself; the same numbers
    shaped = run("gae", mask=mask, token_rewards=token_rewards, values=values, gamma=gamma, lam=lam)
    close(shaped.advantages, out.advantages)
