"""Policy-gradient objectives for language models: advantages, KL estimators, the clipped surrogate and the
loss aggregations of GRPO and its variants, RLOO's sequence-level loss, and PPO's GAE and value loss.

Pure functions of tensors, each the formula of TRL's documentation and source (v1.16), so that each is
checked on groups small enough to work out by hand. Notation: logps [B, T] the policy's log-probability of
each completion token (aligned with `mask`, 1 on completion tokens), old_logps those of the policy that
sampled them, ref_logps the reference model's, A the advantages ([B] per sequence or [B, T] per token).

    GRPO (Shao et al. 2024, DeepSeekMath §4.1): A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)
    Dr. GRPO (Liu et al. 2025): no std (scale_rewards none), a constant normaliser (dr_grpo)
    DAPO (Yu et al. 2025): clip-higher (epsilon_high), token-level mean over the batch (dapo), dynamic sampling
    GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its tokens'
    RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the other samples of its group
    PPO (Schulman et al. 2017) with GAE (Schulman et al. 2016)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# What each loss type's micro-batch loss is a mean over (the Trainer weighs micro-batches by it, so that
# accumulation and data parallelism give what one big batch gives, as TRL's normalisers do):
#   grpo     mean over sequences of each sequence's token mean (length-biased, as its docs say)
#   bnpo     token mean of the micro-batch: each micro-batch weighs the same
#   dr_grpo  sum over tokens / (sequences * max_completion_length): weighed by sequences
#   dapo     sum over tokens / the tokens of the whole step (all micro-batches, all processes)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The sample standard deviation (Bessel's n - 1) ignoring NaNs, as TRL's `nanstd`."""
    mean = values.nanmean(dim=dim, keepdim=True) if dim is not None else values.nanmean()
    squares = ((values - mean) ** 2).nanmean(dim=dim, keepdim=keepdim) if dim is not None else \
        ((values - mean) ** 2).nanmean()
    count = (~values.isnan()).sum(dim=dim, keepdim=keepdim) if dim is not None else (~values.isnan()).sum()
    return (squares * count / (count - 1)).sqrt()


def global_nanstd(values: torch.Tensor) -> torch.Tensor:
    """nanstd over the values of every process (a batch's std, when each process holds part of the batch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return nanstd(values)
    valid = ~values.isnan()
    stats = torch.stack([valid.sum().double(), values[valid].double().sum()])
    dist.all_reduce(stats)
    mean = stats[1] / stats[0]
    squares = ((values[valid].double() - mean) ** 2).sum()
    dist.all_reduce(squares)
    return (squares / (stats[0] - 1)).sqrt().to(values.dtype)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, zero_std) of GRPO: each reward less its group's mean, divided by std + 1e-4 of its group
    (scale "group"), of the whole batch of every process ("batch"), or not divided ("none"). Groups are
    `group_size` consecutive rewards. NaN rewards (unscorable) are left out of the means and stds and get
    advantage 0. zero_std [B]: whether the sample's group (or batch) had no spread, for frac_reward_zero_std."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)).view(-1)
    if scale == "batch":
        std = global_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif group_size > 1:
        std = nanstd(grouped, dim=1).repeat_interleave(group_size)
    else:
        std = torch.zeros_like(rewards)
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages.nan_to_num(0.0), torch.isclose(std, torch.zeros_like(std))


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward less the mean of the other scorable rewards of its group (NaN ones left out; a
    sample with no scorable sibling, or unscorable itself, gets 0)."""
    grouped = rewards.view(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    scorable = (~grouped.isnan()).sum(dim=1, keepdim=True)
    baseline = (grouped.nansum(dim=1, keepdim=True) - grouped) / (scorable - 1)
    return (grouped - baseline).view(-1).nan_to_num(0.0)


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref per token: unbiased for KL(pi || pi_ref) under pi's samples, can be negative."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token (Schulman 2020, "Approximating KL divergence"):
    unbiased, never negative; GRPO's KL term."""
    delta = ref_logps - logps
    return delta.exp() - delta - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      epsilon_low: float, epsilon_high: float, level: str = "token",
                      delta: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-token loss [B, T], clip metrics) of PPO's clipped objective, -min(w A, clip(w, 1 - eps_low,
    1 + eps_high) A), with w = exp(logps - old_logps) per token ("token"), or per sequence, exp of the mean
    log-ratio of its tokens ("sequence": GSPO). `delta` caps w from above first (INTELLECT-2's two-sided clip).
    Metrics as TRL logs them: the fractions of ratios clipped below (with A < 0), above (A > 0), either."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = logps - old_logps
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    per_token = -torch.min(ratio * advantages, clipped * advantages).expand_as(mask)
    with torch.no_grad():
        ratio_full = log_ratio.exp().expand_as(mask)
        low = ((ratio_full < 1 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio_full > 1 + epsilon_high) & (advantages > 0)).float()
        metrics = {"clip_ratio/low_mean": masked_mean(low, mask), "clip_ratio/high_mean": masked_mean(high, mask),
                   "clip_ratio/region_mean": masked_mean(torch.max(low, high), mask)}
    return per_token, metrics


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """The micro-batch's loss under `loss_type` (LOSS_TYPES), a mean over what num_items counts."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    if loss_type in ("bnpo", "dapo"):
        return masked_mean(per_token, mask)
    raise ValueError(f"loss_type: '{loss_type}' is not one of {', '.join(LOSS_TYPES)}")


def num_items(loss_type: str, mask: torch.Tensor) -> torch.Tensor:
    """What a micro-batch's loss is a mean over (LOSS_TYPES' comment; "sequence" for RLOO's mean over
    sequences): the Trainer weighs micro-batches by it (batch["num_items"]), so that the step's loss is TRL's
    over the whole accumulated, distributed batch."""
    if loss_type in ("grpo", "dr_grpo", "sequence"):
        return torch.tensor(float(mask.shape[0]))
    if loss_type == "bnpo":
        return torch.tensor(1.0)
    if loss_type == "dapo":
        return mask.sum().float()
    raise ValueError(f"loss_type: '{loss_type}' is not one of {', '.join(LOSS_TYPES)}")


# -- PPO -------------------------------------------------------------------------------------------------

def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries (unbiased variance, as TRL's masked_whiten); the mean
    added back when not shift_mean (how PPO whitens rewards without moving them)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = (((values - mean) ** 2) * mask).sum() / count.clamp(min=1.0) * count / (count - 1).clamp(min=1.0)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by generalised advantage estimation (Schulman et al. 2016, eq. 16):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, over each row's masked tokens
    (the completion; V after the last one is 0); returns = A + V. Zero outside the mask."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # a masked position (padding after the end) passes nothing back
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipped fraction) of PPO's value function: 0.5 * mean of max((V - R)^2, (V_clipped - R)^2), with
    V_clipped = old V + clamp(V - old V, -clip, clip), over the masked tokens (TRL's PPO)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask)
