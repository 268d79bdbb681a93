"""Advantage estimators: pure functions with one signature, registered by name.

Every estimator is `estimator(inputs: AdvantageInputs) -> AdvantageOutputs`. A module picks one with
`advantage_estimator: <name>`; the setting is validated against `ESTIMATORS` (one line listing the names).

    name                    baseline / normalisation                          KL          paper
    grpo                    group mean, / group (or batch) std                in the loss DeepSeekMath §4.1.2
    dr_grpo                 group mean, no std                                in the loss Dr. GRPO §3.1
    rloo                    mean of the OTHER G-1 rewards of the group        in the loss Ahmadian et al. 2024
    reinforce_pp            none; return-to-go of -β·KL_t + score, whitened   in reward   REINFORCE++ (Hu 2025)
    reinforce_pp_baseline   group mean, then batch whitening                  in the loss REINFORCE++-baseline
    remax                   the reward of the prompt's greedy completion      in the loss ReMax (Li et al. 2023)
    gae                     critic V(s_t), GAE(γ, λ), whitened                in reward   GAE; PPO ("N+ details")

Conventions (as in `losses.py`): N rows (completions), T completion tokens; consecutive rows
i·G … i·G+G−1 share a prompt (G = group_size). Masks are binary; masked-out values are never read.
A NaN score means "no reward": that row's advantage is exactly 0 and it is left out of every mean, std and
whitening statistic. A group whose valid scores are all equal (or has fewer than 2) has no signal: 0, never
NaN. Results are float32 and carry no gradient.

Checked against verl (`verl/trainer/ppo/core_algos.py`) and OpenRLHF (`experience_maker.py`) on the same
float64 inputs (tests/test_advantages.py writes their formulas out as references). Where ours differs on
purpose, the estimator's docstring says so.

Adding an estimator = one function + one registration + one test:

    @register_estimator("my_est")
    def my_est(inputs: AdvantageInputs) -> AdvantageOutputs:
        seq = ...                                   # [N] one advantage per completion
        return AdvantageOutputs(broadcast(seq, inputs.mask), sequence=seq)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses

GRPO_EPS = 1e-4  # the std epsilon of `losses.group_advantages` (verl and OpenRLHF use 1e-6 / 1e-9)


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. Each estimator uses the fields its docstring names; the rest stay None.

    scores: [N] one score per completion (NaN = no reward). None only with `token_rewards` (PPO shaped them).
    mask: [N, T] the completion tokens (1 up to and including EOS).
    group_size: G, rows per prompt (1 = no groups).
    scale: grpo's std scaling, `group` | `batch` | `none`.
    kl, kl_coef: [N, T] per-token KL to the reference and its weight β, for estimators that put KL in the reward.
    values, gamma, lam: [N, T] critic values V(s_t) and GAE's γ, λ (gae); gamma also discounts reinforce_pp.
    baseline_scores: [N] a score per row to subtract (remax: the greedy completion's reward, NaN = none).
    token_rewards: [N, T] per-token rewards already shaped by the caller (gae; PPO whitens them first).
    whiten: whiten the advantages over the batch (gae; "N+ details" / verl / OpenRLHF do).
    all_reduce: a sum over ranks (grpo's `batch` scale: the std of every rank's scores together).
    """

    mask: Tensor
    scores: Tensor | None = None
    group_size: int = 1
    scale: str = "group"
    kl: Tensor | None = None
    kl_coef: float = 0.0
    values: Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95
    baseline_scores: Tensor | None = None
    token_rewards: Tensor | None = None
    whiten: bool = True
    all_reduce: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.mask.dim() != 2:
            raise ValueError(f"mask must be [N, T], got shape {tuple(self.mask.shape)}")
        N = self.mask.shape[0]
        for name in ("scores", "baseline_scores"):
            x = getattr(self, name)
            if x is not None and x.shape != (N,):
                raise ValueError(f"{name} shape {tuple(x.shape)} must be [N] = ({N},) for mask "
                                 f"{tuple(self.mask.shape)}")
        for name in ("kl", "values", "token_rewards"):
            x = getattr(self, name)
            if x is not None and x.shape != self.mask.shape:
                raise ValueError(f"{name} shape {tuple(x.shape)} must match mask {tuple(self.mask.shape)}")
        if self.group_size < 1 or N % self.group_size != 0:
            raise ValueError(f"batch size {N} is not a multiple of group_size={self.group_size}")

    def require(self, *names: str) -> None:
        """One-line error naming the input an estimator needs and did not get."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this advantage estimator needs {', '.join(missing)}")


@dataclass(frozen=True)
class AdvantageOutputs:
    """advantages: [N, T] per token, 0 at masked positions and on rows without a score.
    returns: [N, T] the critic's targets (gae) or the discounted returns-to-go (reinforce_pp); else None.
    sequence: [N] one advantage per completion, for estimators that have one (advantages is it broadcast)."""

    advantages: Tensor
    returns: Tensor | None = None
    sequence: Tensor | None = None


EstimatorFn = Callable[[AdvantageInputs], AdvantageOutputs]


@dataclass(frozen=True)
class Estimator:
    """A registered estimator and what the training loop must give it.

    kl_in_reward: the KL to the reference shapes the reward (inputs.kl, before advantages), so the loss adds
        no KL term. Otherwise the KL (if β > 0) is in the loss, as in GRPO.
    needs_values: needs a critic (PPO). needs_baseline: needs inputs.baseline_scores (ReMax's greedy reward).
    """

    name: str
    fn: EstimatorFn
    kl_in_reward: bool = False
    needs_values: bool = False
    needs_baseline: bool = False


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, *, kl_in_reward: bool = False, needs_values: bool = False,
                       needs_baseline: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: `@register_estimator("name")` makes `advantage_estimator: name` select the function."""

    def decorator(fn: EstimatorFn) -> EstimatorFn:
        if name in ESTIMATORS and ESTIMATORS[name].fn is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered ({ESTIMATORS[name].fn.__qualname__})")
        ESTIMATORS[name] = Estimator(name, fn, kl_in_reward, needs_values, needs_baseline)
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    """The registered estimator `name`, or a one-line error listing the names there are."""
    if name not in ESTIMATORS:
        raise ValueError(f"advantage_estimator must be one of {'|'.join(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name]


# ----------------------------------------------------------------------------------------------------
# helpers


def broadcast(sequence: Tensor, mask: Tensor) -> Tensor:
    """One value per row [N] -> the same value at every real token [N, T], 0 elsewhere."""
    return torch.where(mask.bool(), sequence.detach().float().unsqueeze(1), 0.0)


def _valid_counts(scores: Tensor, group_size: int) -> Tensor:
    """Number of non-NaN scores in each row's group, per row. [N]"""
    valid = ~torch.isnan(scores.view(-1, group_size))  # [N/G, G]
    return valid.sum(dim=1).repeat_interleave(group_size).float()  # [N]


def _scored_mask(inputs: AdvantageInputs) -> Tensor:
    """The mask restricted to rows that have a score. [N, T] bool"""
    return inputs.mask.bool() & ~torch.isnan(inputs.scores).unsqueeze(1)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = r_t + γ·G_{t+1} over the real tokens (REINFORCE's discounted return-to-go).

    Masked positions are skipped: their rewards are never read, they get 0, and the return flows past them
    (a hole, e.g. a tool's output tokens, does not cut the credit of the tokens before it; verl resets the
    running return there). With right padding, as everywhere today, this equals verl's and OpenRLHF's.
    rewards, mask: [N, T] -> returns [N, T] (float32).
    """
    m = mask.bool()
    r = torch.where(m, rewards.float(), 0.0)  # [N, T]
    returns = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], device=r.device)  # [N]  G_{t+1}
    for t in reversed(range(r.shape[1])):
        g = r[:, t] + gamma * running
        running = torch.where(m[:, t], g, running)
        returns[:, t] = torch.where(m[:, t], g, 0.0)
    return returns


# ----------------------------------------------------------------------------------------------------
# estimators


@register_estimator("grpo")
@torch.no_grad()
def grpo(inputs: AdvantageInputs) -> AdvantageOutputs:
    """GRPO outcome supervision (DeepSeekMath §4.1.2): Â_i = (r_i − mean(r_group)) / (std(r_group) + ε).

    `losses.group_advantages` with inputs.scale (`group`: the paper, `batch`: the batch std over all ranks via
    inputs.all_reduce, `none`: Dr. GRPO). Reads scores, group_size, scale, mask, all_reduce. verl's
    `compute_grpo_outcome_advantage` agrees except ε (1e-6 there, 1e-4 here) and zero-std groups (0 here exactly;
    verl gives 0 up to float rounding).
    """
    inputs.require("scores")
    seq = losses.group_advantages(inputs.scores, inputs.group_size, scale=inputs.scale, eps=GRPO_EPS,
                                  all_reduce=inputs.all_reduce)  # [N]
    return AdvantageOutputs(broadcast(seq, inputs.mask), sequence=seq)


@register_estimator("dr_grpo")
@torch.no_grad()
def dr_grpo(inputs: AdvantageInputs) -> AdvantageOutputs:
    """Dr. GRPO (Liu et al. 2025, §3.1): Â_i = r_i − mean(r_group), no division by the std.

    The other half of Dr. GRPO is the loss normaliser: pair with `loss_agg: seq-mean-token-sum-norm`.
    verl: `compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=False)`; OpenRLHF: `dr_grpo`.
    """
    inputs.require("scores")
    seq = losses.group_advantages(inputs.scores, inputs.group_size, scale="none")  # [N]
    return AdvantageOutputs(broadcast(seq, inputs.mask), sequence=seq)


@register_estimator("rloo")
@torch.no_grad()
def rloo(inputs: AdvantageInputs) -> AdvantageOutputs:
    """RLOO (Ahmadian et al. 2024, eq. 6): Â_i = r_i − 1/(n−1) Σ_{j≠i} r_j, the leave-one-out baseline.

    Equal to n/(n−1)·(r_i − mean(r_group)), n = the group's valid scores, which is how it is computed (so
    NaN rows drop out of the baseline and all-equal groups give exactly 0). verl `compute_rloo_outcome_advantage`
    and OpenRLHF `rloo` compute the same; they have no NaN rows (all G count).
    """
    inputs.require("scores")
    centered = losses.group_advantages(inputs.scores, inputs.group_size, scale="none")  # [N]
    n = _valid_counts(inputs.scores, inputs.group_size)  # [N]
    seq = torch.where(n > 1, centered * n / (n - 1).clamp(min=1), 0.0)
    return AdvantageOutputs(broadcast(seq, inputs.mask), sequence=seq)


@register_estimator("reinforce_pp", kl_in_reward=True)
@torch.no_grad()
def reinforce_pp(inputs: AdvantageInputs) -> AdvantageOutputs:
    """REINFORCE++ (Hu 2025, eqs. for r_t and the normalised advantage): no baseline, no critic.

        r_t = −β·KL_t  (+ the score at the last real token)     (`losses.ppo_token_rewards`)
        G_t = Σ_{s ≥ t} γ^{s−t} r_s                              (`returns_to_go`)
        Â_t = (G_t − mean(G)) / sqrt(var(G) + 1e-8)               over every real token of the batch

    Reads scores, mask, kl (None = no KL), kl_coef, gamma. Rows without a score get 0 and stay out of the
    statistics. Whitening is `losses.masked_whiten` (unbiased var), exactly verl's `masked_whiten` in
    `compute_reinforce_plus_plus_outcome_advantage`; OpenRLHF uses the biased var and clamp(var, 1e-8) instead of
    var + 1e-8 (a relative difference of 1/n). The statistics are this rank's rollout (under DDP, per rank).
    """
    inputs.require("scores")
    m = _scored_mask(inputs)  # [N, T]
    kl = inputs.kl if inputs.kl is not None else torch.zeros_like(m, dtype=torch.float32)
    rewards = losses.ppo_token_rewards(torch.nan_to_num(inputs.scores), kl, m, inputs.kl_coef)  # [N, T]
    returns = returns_to_go(rewards, m, inputs.gamma)  # [N, T]
    return AdvantageOutputs(losses.masked_whiten(returns, m), returns=returns)


@register_estimator("reinforce_pp_baseline")
@torch.no_grad()
def reinforce_pp_baseline(inputs: AdvantageInputs) -> AdvantageOutputs:
    """REINFORCE++-baseline (Hu 2025, §"REINFORCE++-Baseline"): the group mean as baseline, then batch whitening.

        A_i = r_i − mean(r_group);   Â_{i,t} = (A_i − mean(A)) / sqrt(var(A) + 1e-8)   over the batch's real tokens

    The KL goes in the loss (as in GRPO). Reads scores, group_size, mask. Same as verl's
    `compute_reinforce_plus_plus_baseline_outcome_advantage` except on purpose: a group whose scores are all
    equal gets exactly 0 (verl gives it −mean/std, a batch-wide shift that says nothing about those rows); its
    tokens still count in the statistics, as in verl. Rows without a score get 0 and stay out of them. The
    statistics are this rank's rollout (under DDP, per rank).
    """
    inputs.require("scores")
    centered = losses.group_advantages(inputs.scores, inputs.group_size, scale="none")  # [N]
    m = _scored_mask(inputs)  # [N, T]
    whitened = losses.masked_whiten(broadcast(centered, m), m)  # [N, T]
    G = inputs.group_size
    # all-equal groups are exactly 0 after centring; any other group has a nonzero entry
    informative = (centered.view(-1, G) != 0).any(dim=1).repeat_interleave(G).unsqueeze(1)  # [N, 1]
    advantages = torch.where(informative, whitened, 0.0)  # [N, T], one value per row
    return AdvantageOutputs(advantages, sequence=losses.masked_mean(advantages, m, dim=1))


@register_estimator("remax", needs_baseline=True)
@torch.no_grad()
def remax(inputs: AdvantageInputs) -> AdvantageOutputs:
    """ReMax (Li et al. 2023, Algorithm 1): Â_i = r(x, y_i) − r(x, ŷ), ŷ the greedy completion of the prompt.

    Reads scores, baseline_scores (the greedy rewards, one per row), mask. A row whose own or greedy score is
    NaN gets 0. The KL goes in the loss. verl's `compute_remax_outcome_advantage` subtracts the baseline from the
    token returns, which equal the score when the KL is not in the reward (verl's default): the same numbers.
    """
    inputs.require("scores", "baseline_scores")
    diff = inputs.scores.float() - inputs.baseline_scores.float()  # [N]
    seq = torch.nan_to_num(diff, nan=0.0)
    return AdvantageOutputs(broadcast(seq, inputs.mask), sequence=seq)


@register_estimator("gae", kl_in_reward=True, needs_values=True)
@torch.no_grad()
def gae(inputs: AdvantageInputs) -> AdvantageOutputs:
    """PPO's GAE (Schulman et al. 2016, eq. 16) over the real tokens, returns = A + V, then optional whitening.

    Per-token rewards are inputs.token_rewards when the caller shaped them (PPO: −β·KL_t + score, maybe
    whitened), else −β·KL_t + score at the last token built here from scores/kl/kl_coef. Reads values, gamma,
    lam, whiten, mask. The returns are taken before whitening ("N+ details", verl `compute_gae_advantage_return`).
    """
    inputs.require("values")
    if inputs.token_rewards is not None:
        m, rewards = inputs.mask.bool(), inputs.token_rewards
    else:
        inputs.require("scores")
        m = _scored_mask(inputs)
        kl = inputs.kl if inputs.kl is not None else torch.zeros_like(m, dtype=torch.float32)
        rewards = losses.ppo_token_rewards(torch.nan_to_num(inputs.scores), kl, m, inputs.kl_coef)
    advantages, returns = losses.gae(rewards, inputs.values, m, gamma=inputs.gamma, lam=inputs.lam)
    if inputs.whiten:
        advantages = losses.masked_whiten(advantages, m)
    return AdvantageOutputs(advantages, returns=returns)
