"""`lmforge rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", §3.2; Kool et al. 2019)
on GRPO's rollouts (train/rollout.py) and the one Trainer.

    lmforge rloo --config configs/rloo_tiny.yaml [--num-generations 4 --beta 0.05 ...]

Each optimizer step, as TRL's RLOOTrainer (v1.16):
1. num_generations completions of each prompt from the policy as it is now, scored by `reward_funcs`
2. the KL folded into the reward: r_i - beta * sum_t (log pi_old - log pi_ref) over the completion's tokens
   (k1; beta 0: no reference model), optionally clipped to reward_clip_range before it
3. the advantage of each completion, its reward less the mean reward of the *other* completions of its
   prompt (the leave-one-out baseline: unbiased, no value model); normalize_advantages whitens them over the
   batch (REINFORCE++-like)
4. a sequence-level clipped surrogate, -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A) with
   w = exp(sum_t log pi - sum_t log pi_old), averaged over the completions
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.train.grpo import RLConfig, completion_labels, run_rl
from lmforge.train.objectives import token_logps, with_router_aux_loss
from lmforge.train.policy import global_nanstd, leave_one_out_advantages, masked_mean
from lmforge.train.stage import stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, TrainResult


@dataclass
class RLOOConfig(RLConfig):
    num_generations: int = field(default=2, metadata={"help": "completions per prompt (a group)", "min": 2})
    beta: float = field(default=0.05, metadata={
        "help": "KL coefficient, in the reward (0: no reference model is made)", "min": 0})
    normalize_advantages: bool = field(default=False, metadata={
        "help": "whiten the advantages over the batch (mean 0, std 1)"})
    reward_clip_range: list[float] = field(default_factory=list, metadata={
        "help": "LOW HIGH: clip rewards to this range before the KL term (default: no clipping)"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/rloo", steps=200, eval_every=50, save_every=100,
        optim=OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0, min_lr_ratio=0.0, schedule="linear")))


def rloo_advantages(cfg: RLOOConfig):
    """advantages(rewards, batch) of RLOO (module docstring, steps 2 and 3)."""
    def advantages(rewards: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        metrics = {}
        if cfg.reward_clip_range:
            rewards = rewards.clamp(*cfg.reward_clip_range)
        if cfg.beta > 0:
            per_token = (batch["old_logps"] - batch["ref_logps"]) * batch["completion_mask"]
            rewards = rewards - cfg.beta * per_token.sum(-1)
            metrics["kl"] = masked_mean(per_token, batch["completion_mask"]).item()
        values = leave_one_out_advantages(rewards, cfg.num_generations)
        if cfg.normalize_advantages:
            values = (values - values.mean()) / (global_nanstd(values) + 1e-4)
        return values, metrics
    return advantages


def rloo_loss(model: torch.nn.Module, batch: dict, cfg: RLOOConfig) -> tuple[torch.Tensor, dict]:
    """The micro-batch's RLOO loss (module docstring, step 4): a mean over its completions."""
    mask = batch["completion_mask"]
    logps, entropy, output = token_logps(model, batch["input_ids"], completion_labels(batch), cfg.chunk_size,
                                         cfg.temperature, with_entropy=True)
    ratio = ((logps * mask).sum(-1) - (batch["old_logps"] * mask).sum(-1)).exp()
    advantages = batch["advantages"]
    clipped = ratio.clamp(1 - cfg.epsilon, 1 + cfg.epsilon_upper)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    with torch.no_grad():
        low = ((ratio < 1 - cfg.epsilon) & (advantages < 0)).float()
        high = ((ratio > 1 + cfg.epsilon_upper) & (advantages > 0)).float()
    metrics = {"entropy": masked_mean(entropy, mask), "clip_ratio/low_mean": low.mean(),
               "clip_ratio/high_mean": high.mean(), "clip_ratio/region_mean": torch.max(low, high).mean()}
    metrics.update(batch.get("metrics", {}))
    return with_router_aux_loss(loss, output, model, metrics), metrics


def run(cfg: RLOOConfig) -> TrainResult:
    clip = cfg.reward_clip_range
    if clip and (len(clip) != 2 or clip[0] > clip[1]):
        raise ValueError(f"reward_clip_range: {cfg.reward_clip_range} is not LOW HIGH with LOW <= HIGH")
    return run_rl(cfg, rloo_advantages(cfg), rloo_loss, "sequence", {"old_logps": True})


main = stage_main(RLOOConfig, run, "lmforge rloo",
                  "RLOO: REINFORCE with a leave-one-out baseline, the KL in the reward; rollouts through the Engine.")
