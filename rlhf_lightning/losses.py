"""Pure tensor math for GRPO and PPO: advantages, KL estimators, clipped surrogates, GAE.

Nothing here knows about Lightning or models: every function takes tensors and returns tensors, so each
one can be read against its paper and unit-tested against hand-computed numbers (tests/test_losses.py).

Conventions
- Shapes: B = rows (completions), T = completion tokens, S = reasoning steps, V = vocabulary.
- Masks are binary (bool or 0/1) and have the shape of the values they mask. Values at masked-out
  positions are never read: they may hold garbage, even NaN or inf, without changing a result or a gradient.
- Everything is computed in float32, whatever the input dtype (bf16 log-probs lose too much precision in
  exp(logp - old_logp)); gradients flow back to the input in its own dtype through the cast.
- An empty mask gives 0, never NaN.

References
- DeepSeekMath (Shao et al. 2024), §4.1: GRPO, outcome and process supervision.
- DAPO (Yu et al. 2025): clip-higher, token-level loss aggregation, soft overlong punishment.
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no std scaling, constant normaliser.
- GSPO (Zheng et al. 2025): sequence-level importance ratio.
- Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"): KL penalty in the reward,
  adaptive KL controller.
- Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"), CleanRL: GAE, value clipping, whitening.
- Schulman, "Approximating KL Divergence" (2020 blog post): k1, k2, k3 estimators.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Dim = int | tuple[int, ...] | None

# exp(20) ~ 4.9e8 is finite in float32 and far beyond any ratio a clipped objective can use.
LOG_RATIO_CLAMP = 20.0

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_same_shape(x: Tensor, mask: Tensor, x_name: str = "x") -> None:
    if x.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {x_name} shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------------
# masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Sum of x where mask is set (float32). Uses `where`, not `x * mask`, so NaN/inf at masked-out
    positions neither leak into the value nor into the gradient."""
    _check_same_shape(x, mask)
    return torch.where(mask.bool(), x.float(), 0.0).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Mean of x over the masked entries (float32); 0 where the mask is empty, never NaN."""
    count = mask.bool().sum(dim=dim).clamp(min=1)
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of all masked entries of x (a scalar, float32).

    unbiased=True divides by n - 1 (Bessel). With fewer entries than that needs (n < 2 unbiased,
    n < 1 biased) the variance is undefined; we return 0 so callers never see NaN.
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    centered = torch.where(m, x.float() - mean, 0.0)
    n = m.sum()
    denom = (n - 1) if unbiased else n
    return centered.square().sum() / denom.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (unbiased) var over the masked entries only.

    shift_mean=False adds the mean back (scale only), as TRL/"N+ details" do for rewards.
    Masked-out positions are set to 0 so padding never carries a value downstream.
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0.0)


# ----------------------------------------------------------------------------------------------------
# GRPO advantages (DeepSeekMath §4.1.2 outcome supervision, §4.1.3 process supervision)


def _normalize_rows(x: Tensor, valid: Tensor, eps: float) -> Tensor:
    """Per row of x [N, M]: (x - row mean) / (row unbiased std + eps) over the valid entries.

    Rows whose valid entries are all equal, or that have fewer than 2 valid entries, give exactly 0
    (checked with max == min, not std == 0, because the float mean of equal numbers can be off by an ulp).
    Invalid entries give 0.
    """
    n = valid.sum(dim=1, keepdim=True)  # [N, 1]
    mean = torch.where(valid, x, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)  # [N, 1]
    centered = torch.where(valid, x - mean, 0.0)  # [N, M]
    std = (centered.square().sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # [N, 1]
    hi = torch.where(valid, x, -torch.inf).amax(dim=1, keepdim=True)
    lo = torch.where(valid, x, torch.inf).amin(dim=1, keepdim=True)
    degenerate = (hi == lo) | (n < 2)  # [N, 1]
    return torch.where(valid & ~degenerate, centered / (std + eps), 0.0)


def batch_std(x: Tensor, valid: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Unbiased std of the valid entries of x (0 with fewer than 2), from their count, sum and sum of squares.

    `all_reduce` (a sum over ranks) reduces those three numbers across ranks first, so under DDP / FSDP2 the std is
    the one of every rank's entries together: exactly what one process on the whole batch computes (float64, so
    the one-pass formula loses nothing against the two-pass one on rewards). A scalar, float32.
    """
    v = valid.bool()
    xs = torch.where(v, x.double(), 0.0)
    stats = torch.stack([v.sum().double(), xs.sum(), xs.square().sum()])  # [3] count, sum, sum of squares
    if all_reduce is not None:
        stats = all_reduce(stats)
    n, total, squares = stats.unbind()
    var = (squares - total * total / n.clamp(min=1)) / (n - 1).clamp(min=1)
    return var.clamp(min=0).sqrt().float()


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Group-relative advantages for outcome supervision (DeepSeekMath §4.1.2, eq. for Â_{i,t}).

    Consecutive rows form a group of `group_size` completions of the same prompt.
      scale="group": (r - group mean) / (group std + eps), the paper (unbiased sample std).
      scale="batch": (r - group mean) / (std of all valid rewards in the batch + eps); a batch-level std
                     keeps easy/hard prompts from being up-weighted (Dr. GRPO §3.1 discusses the bias). With
                     `all_reduce` (a sum over ranks) the batch is every rank's rows together (`batch_std`).
      scale="none":  r - group mean (Dr. GRPO).
    NaN rewards mean "no reward" (e.g. a verifier that abstained): they are left out of every mean and std
    and their advantage is 0. A group whose valid rewards are all equal, or that has fewer than 2 of them,
    has no learning signal: its advantages are exactly 0, never NaN.

    rewards: [B] -> advantages [B] (float32). The result carries no gradient.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"batch size {rewards.shape[0]} is not a multiple of group_size={group_size}")
    r = rewards.detach().float().view(-1, group_size)  # [B/G, G]
    valid = ~torch.isnan(r)  # [B/G, G]
    if scale == "group":
        return _normalize_rows(r, valid, eps).view(-1)

    n = valid.sum(dim=1, keepdim=True)  # [B/G, 1]
    mean = torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)  # [B/G, 1]
    hi = torch.where(valid, r, -torch.inf).amax(dim=1, keepdim=True)
    lo = torch.where(valid, r, torch.inf).amin(dim=1, keepdim=True)
    keep = valid & (hi != lo) & (n >= 2)  # [B/G, G]
    centered = r - mean  # [B/G, G]
    if scale == "batch":
        centered = centered / (batch_std(r, valid, all_reduce) + eps)
    return torch.where(keep, centered, 0.0).view(-1)


def process_advantages(
    step_rewards: Tensor, step_ends: Tensor, group_size: int, num_tokens: int, eps: float = 1e-4
) -> Tensor:
    """Token advantages from step rewards (DeepSeekMath §4.1.3, process supervision).

    step_rewards[b, s] is the reward of reasoning step s of completion b, and step_ends[b, s] the index of
    the completion token where that step ends (-1: no such step, padding). Invalid steps (end -1 or NaN
    reward) are ignored. Rewards are normalised over ALL valid steps of ALL completions of a group:
    r~ = (r - mean) / (unbiased std + eps), exactly 0 when they are all equal or fewer than 2. Then
        Â_{i,t} = sum over steps j with end(j) >= t of r~_{i,j}
    so a token is credited with the rewards of its own step and of every later step. Tokens after the last
    step end get 0.

    step_rewards, step_ends: [B, S] -> advantages [B, T] with T = num_tokens (float32, no gradient).
    """
    if step_rewards.shape != step_ends.shape or step_rewards.dim() != 2:
        raise ValueError(
            f"step_rewards {tuple(step_rewards.shape)} and step_ends {tuple(step_ends.shape)} must both be [B, S]"
        )
    B, S = step_rewards.shape
    if group_size < 1 or B % group_size != 0:
        raise ValueError(f"batch size {B} is not a multiple of group_size={group_size}")
    ends = step_ends.long()
    if ends.numel() and int(ends.max()) >= num_tokens:
        raise ValueError(f"step_ends holds index {int(ends.max())} >= num_tokens={num_tokens}")
    r = step_rewards.detach().float()
    valid = (ends >= 0) & ~torch.isnan(r)  # [B, S]
    norm = _normalize_rows(r.view(-1, group_size * S), valid.view(-1, group_size * S), eps).view(B, S)
    t = torch.arange(num_tokens, device=r.device)  # [T]
    covers = ends.unsqueeze(-1) >= t  # [B, S, T]: step s ends at or after token t
    return (norm.unsqueeze(-1) * covers).sum(dim=1)  # [B, T]


# ----------------------------------------------------------------------------------------------------
# KL and loss aggregation


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from samples of π_θ (Schulman 2020, "Approximating KL").

    With r = ref_logp - logp (log of π_ref/π_θ):
      k1 = -r = logp - ref_logp      unbiased, high variance, can be negative (PPO reward penalty)
      k2 = ½ r²                      biased, low variance
      k3 = exp(r) - r - 1            unbiased, always >= 0 (GRPO, DeepSeekMath eq. 4)
    k3 clamps r to [-20, 20] so exp never overflows. Shapes are preserved; output is float32.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")
    log_ratio = ref_logp.float() - logp.float()  # [...] = log π_ref/π_θ
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1.0


def aggregate(
    values: Tensor,
    mask: Tensor,
    agg: str,
    normalizer: float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce per-token losses [B, T] to a scalar. The three choices the literature uses:

      "token-mean" (DAPO eq. 8):       Σ_i Σ_t l_it / N        N default: number of mask tokens
      "seq-mean-token-mean" (GRPO):    Σ_i mean_t(l_it) / N    N default: sequences with >= 1 token
      "seq-mean-token-sum-norm" (Dr. GRPO): Σ_i (Σ_t l_it / max_len) / N
                                                              N default: B; max_len default: T
    Every form is a plain sum over rows divided by N, so a caller that passes N (and max_len) counted over
    the WHOLE optimizer step (all micro-batches, all ranks) can sum micro-batch losses and get exactly the
    full-batch loss and gradient. N is clamped to >= 1: an empty mask gives 0 with the graph intact.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    _check_same_shape(values, mask, "values")
    m = mask.bool()
    tokens_per_seq = m.sum(dim=1)  # [B]
    row_sums = masked_sum(values, m, dim=1)  # [B]
    if agg == "token-mean":
        total = row_sums.sum()
        default = tokens_per_seq.sum()
    elif agg == "seq-mean-token-mean":
        total = (row_sums / tokens_per_seq.clamp(min=1)).sum()
        default = (tokens_per_seq > 0).sum()
    else:
        length = mask.shape[1] if max_len is None else max_len
        if length <= 0:
            raise ValueError(f"max_len must be positive, got {length}")
        total = (row_sums / length).sum()
        default = torch.tensor(mask.shape[0])
    n = default if normalizer is None else normalizer
    n = torch.as_tensor(n, dtype=torch.float32, device=total.device).clamp(min=1.0)
    return total / n


# ----------------------------------------------------------------------------------------------------
# policy objective (PPO clip, GRPO, DAPO clip-higher, GSPO)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    level: str = "token",
    agg: str = "seq-mean-token-mean",
    normalizer: float | Tensor | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss, -min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A) per token, then `aggregate`.

    PPO (Schulman et al. 2017 eq. 7), GRPO (DeepSeekMath eq. 3), asymmetric ε (DAPO clip-higher, eq. 10).
      level="token":    ρ_t = π_θ(y_t)/π_old(y_t) = exp(logp_t - old_logp_t).
      level="sequence": GSPO (Zheng et al. 2025, eq. 7 and its GSPO-token form eq. 13):
                        s_i = exp(mean_t(logp - old_logp)) over the sequence's tokens, and the per-token
                        ratio sg[s_i]·exp(logp_t - sg[logp_t]) has value s_i and the sequence-level gradient.
                        GSPO clips far tighter than PPO (the paper uses ε ≈ 3e-4 / 4e-4).
    Log-ratios are clamped to [-20, 20]. old_logp is treated as a constant.

    logp, old_logp, mask: [B, T]; advantages: [B] (one per sequence) or [B, T].
    Returns (loss scalar float32, stats) with detached masked means over this batch:
      clip_frac_low (A<0 and ρ<1-ε_low), clip_frac_high (A>0 and ρ>1+ε_high),
      approx_kl (mean of (ρ-1) - log ρ, the k3 estimate of KL(π_old||π_θ)), ratio_mean.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    _check_same_shape(logp, mask, "logp")
    _check_same_shape(old_logp, mask, "old_logp")
    m = mask.bool()
    if advantages.shape == logp.shape[:1]:
        adv = advantages.float().unsqueeze(1).expand_as(logp)  # [B, T]
    elif advantages.shape == logp.shape:
        adv = advantages.float()  # [B, T]
    else:
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} must be [B] or [B, T] for logp {tuple(logp.shape)}"
        )
    # Sanitise padding so garbage there cannot reach values or gradients.
    adv = torch.where(m, adv.detach(), 0.0)  # [B, T]
    lp = torch.where(m, logp.float(), 0.0)  # [B, T]
    old = torch.where(m, old_logp.float().detach(), 0.0)  # [B, T]

    ratio, log_ratio = _importance_ratio(lp, old, m, level)  # [B, T] each
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [B, T]
    loss = aggregate(per_token, m, agg, normalizer=normalizer, max_len=max_len)
    return loss, _ratio_stats(ratio.detach(), log_ratio.detach(), adv, m, clip_low, clip_high)


def _importance_ratio(lp: Tensor, old: Tensor, m: Tensor, level: str) -> tuple[Tensor, Tensor]:
    """(ratio with its gradient, log-ratio for the stats) [B, T]: per token, or GSPO's sequence ratio."""
    if level == "token":
        log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
        return torch.exp(log_ratio), log_ratio
    seq_log_ratio = masked_mean(lp - old, m, dim=1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B]
    seq_ratio = torch.exp(seq_log_ratio)  # [B], carries the sequence-level gradient
    ratio = seq_ratio.detach().unsqueeze(1) * torch.exp(lp - lp.detach())  # [B, T], value s_i
    return ratio, seq_log_ratio.detach().unsqueeze(1).expand_as(lp)


@torch.no_grad()
def _ratio_stats(r: Tensor, log_ratio: Tensor, adv: Tensor, m: Tensor, clip_low: float,
                 clip_high: float) -> dict[str, Tensor]:
    return {
        "clip_frac_low": masked_mean(((adv < 0) & (r < 1.0 - clip_low)).float(), m),
        "clip_frac_high": masked_mean(((adv > 0) & (r > 1.0 + clip_high)).float(), m),
        "approx_kl": masked_mean((r - 1.0) - log_ratio, m),
        "ratio_mean": masked_mean(r, m),
    }


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    coef: float,
    agg: str,
    normalizer: float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """The entropy term of the loss: -coef * aggregate(entropy), aggregated like the policy loss. [B, T] -> scalar

    Added to the loss, it rewards a spread-out policy (coef > 0), which keeps a collapsing policy exploring;
    with the same `agg` / `normalizer` / `max_len` as the surrogate, micro-batches add up exactly as the
    surrogate's do. coef = 0 gives an exact 0 (with the graph intact).
    """
    return -float(coef) * aggregate(entropy.float(), mask, agg, normalizer=normalizer, max_len=max_len)


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to each completion's reward. [B] -> [B]

        R_length(y) = 0                                   |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                    = -1                                  L_max < |y|

    times `factor` (verl's `overlong_buffer.penalty_factor`). L_max = max_len (max_new_tokens), L_cache =
    buffer_len; |y| counts the completion's real tokens, EOS included. buffer_len = 0 is off (all zeros).
    """
    if buffer_len < 0 or buffer_len > max_len:
        raise ValueError(f"buffer_len must be in [0, max_len={max_len}], got {buffer_len}")
    if buffer_len == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    expected = max_len - buffer_len
    return ((expected - lengths.float()) / buffer_len).clamp(min=-1.0, max=0.0) * float(factor)


# ----------------------------------------------------------------------------------------------------
# PPO pieces


def ppo_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """Per-token PPO reward (Ziegler et al. 2019 eq. 2; "N+ details" §"reward"):
    r_t = -β·KL_t at every real token, plus the sequence score at the LAST real token; 0 at padding.

    scores: [B], kl: [B, T] (usually k1), mask: [B, T] right-padded -> rewards [B, T] (float32, no grad).
    A row with no real token gets no score.
    """
    _check_same_shape(kl, mask, "kl")
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores shape {tuple(scores.shape)} must be [B] for mask {tuple(mask.shape)}")
    m = mask.bool()
    T = m.shape[1]
    rewards = torch.where(m, -kl_coef * kl.detach().float(), 0.0)  # [B, T]
    positions = torch.arange(T, device=m.device).expand_as(m)  # [B, T]
    last = torch.where(m, positions, -1).amax(dim=1)  # [B], -1 for empty rows
    at_last = positions == last.unsqueeze(1)  # [B, T], all False for empty rows
    return rewards + torch.where(at_last, scores.detach().float().unsqueeze(1), 0.0)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16), as in CleanRL / "N+ details".

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   returns_t = A_t + V_t
    The episode ends after the last real token: V after it counts as 0. Positions where mask is 0 are
    skipped (their rewards and values are never read, they get A = returns = 0), which covers right
    padding and would also step over holes.

    rewards, values, mask: [B, T] -> (advantages [B, T], returns [B, T]), float32, no gradient.
    """
    _check_same_shape(rewards, mask, "rewards")
    _check_same_shape(values, mask, "values")
    m = mask.bool()
    r = torch.where(m, rewards.float(), 0.0)  # [B, T]
    v = torch.where(m, values.float(), 0.0)  # [B, T]
    B, T = r.shape
    advantages = torch.zeros_like(r)  # [B, T]
    next_value = torch.zeros(B, device=r.device)  # [B]  V_{t+1}, 0 past the end
    next_adv = torch.zeros(B, device=r.device)  # [B]  A_{t+1}
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        real = m[:, t]
        advantages[:, t] = torch.where(real, adv_t, 0.0)
        next_adv = torch.where(real, adv_t, next_adv)
        next_value = torch.where(real, v[:, t], next_value)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ("N+ details" / CleanRL / TRL): 0.5·max((v - R)², (v_clip - R)²) with
    v_clip = old + clip(v - old, -c, c), token-mean aggregated (normalizer as in `aggregate`).
    clip_range=None gives the plain 0.5·(v - R)².

    values, old_values, returns, mask: [B, T]. stats: value_clip_frac, the masked fraction of tokens where
    the clipped term is the larger one (so its gradient is the one used).
    """
    if clip_range is not None and clip_range < 0:
        raise ValueError(f"clip_range must be >= 0 or None, got {clip_range}")
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check_same_shape(x, mask, name)
    m = mask.bool()
    v = torch.where(m, values.float(), 0.0)  # [B, T]
    R = torch.where(m, returns.float().detach(), 0.0)  # [B, T]
    loss_unclipped = (v - R).square()  # [B, T]
    if clip_range is None:
        per_token = 0.5 * loss_unclipped
        clip_frac = torch.zeros((), device=v.device)
    else:
        old = torch.where(m, old_values.float().detach(), 0.0)  # [B, T]
        v_clipped = old + (v - old).clamp(-clip_range, clip_range)  # [B, T]
        loss_clipped = (v_clipped - R).square()  # [B, T]
        per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
        clip_frac = masked_mean((loss_clipped > loss_unclipped).float(), m).detach()
    loss = aggregate(per_token, m, "token-mean", normalizer=normalizer)
    return loss, {"value_clip_frac": clip_frac}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - v) / Var(R) over the masked entries: 1 is a perfect critic, 0 no better than a constant,
    negative worse than one. When Var(R) is 0 (or fewer than 2 entries) the ratio is undefined and we return
    0 ("no information") instead of NaN or -inf. Scalar float32, no gradient.
    """
    _check_same_shape(values, mask, "values")
    _check_same_shape(returns, mask, "returns")
    m = mask.bool()
    R = torch.where(m, returns.float(), 0.0)
    var_r = masked_var(R, m)
    var_err = masked_var(R - torch.where(m, values.float(), 0.0), m)
    return torch.where(var_r > 0, 1.0 - var_err / torch.where(var_r > 0, var_r, 1.0), 0.0)
