"""`lmforge ppo`: Proximal Policy Optimization with a learned value model (Schulman et al. 2017) for language
models, as in RLHF (Ziegler et al. 2019; Ouyang et al. 2022, "InstructGPT", §3.5), on the one Trainer, with
rollouts through the one Engine (train/rollout.py).

    lmforge ppo --config configs/ppo_tiny.yaml [--kl-coef 0.05 --num-ppo-epochs 4 --value-model DIR ...]

Two networks train together: the policy (the language model) and a value model V, a body under a scalar
`score` head read at every token (TRL's value model is a sequence-classification model too): V at completion
token t is its estimate of the return from the state before token t. They are one module (PolicyAndValue, as
TRL's PolicyAndValueWrapper) under one optimizer; the Engine samples with the policy alone. Each rollout:
1. one completion (num_generations) of each of the step's prompts, sampled at `temperature` by the policy as
   it is now; its score from `reward_funcs` (a reward model's directory, or functions), minus
   missing_eos_penalty where the completion has no EOS (cut at max_completion_length)
2. without gradients: the log-probabilities of the sampling policy and of the reference (the starting
   policy) and the value model's values V_old, per completion token
3. the per-token reward (Ouyang et al. 2022, eq. 2, as TRL's PPOTrainer):
       r_t = -kl_coef * KL_t  (+ the score at the completion's last token)
   KL_t the k1 (log pi_old - log pi_ref) or k3 estimate of the KL to the reference (kl_estimator); with
   whiten_rewards the rewards are whitened (their mean kept)
4. advantages by GAE over the completion tokens (Schulman et al. 2016, §3 eq. 16; gamma, lam), V after the
   last token 0, returns = A + V_old; the advantages whitened over the process's rollout (TRL's local batch)
5. num_ppo_epochs optimizer steps on the same rollout, each over all its micro-batches (TRL's one mini-batch),
   minimising policy loss + vf_coef * value loss, each a token mean of a micro-batch (Schulman et al. 2017,
   §5 eq. 9, without the entropy bonus, as TRL):
       policy loss  -min(w A, clip(w, 1 - cliprange, 1 + cliprange) A), w = pi / pi_old per token   (§3 eq. 7)
       value loss   0.5 * max((V - R)^2, (V_old + clip(V - V_old, -cliprange_value, cliprange_value) - R)^2)
Names and defaults are TRL's PPOConfig's (num_ppo_epochs 4, kl_coef 0.05, cliprange 0.2, vf_coef 0.1, ...;
kl_coef, cliprange and num_ppo_epochs are the RL stages' beta, epsilon and num_iterations under TRL's names).
Where this differs from TRL's PPOTrainer: TRL adds the score one token after the EOS and keeps the value there
(its padding_mask_p1), here the score is the last completion token's reward and the return after it is 0;
approxkl and the ratio are means over completion tokens (TRL's over every position, padding's ratio 1); the
micro-batches are not reshuffled between epochs (with one mini-batch an epoch's step sees every sample anyway).
Logged as TRL logs them: objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward,
objective/scores, policy/approxkl_avg, policy/clipfrac_avg, policy/entropy_avg, loss/policy_avg,
loss/value_avg, val/clipfrac_avg, val/ratio; held-out accuracy (val_accuracy) and reward.png / accuracy.png.
A checkpoint is the policy's model directory (what `lmforge generate` loads) with the value model beside it
in value_model/, a `<Family>ForSequenceClassification` directory with one label, saved as `lmforge reward`
saves a reward model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from lmforge.checkpoint import model_from, save_model
from lmforge.model.reward import RewardModel
from lmforge.model.transformer import ModelOutput, Transformer
from lmforge.settings import check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.grpo import RLConfig, completion_labels, run_rl
from lmforge.train.objectives import token_logps, with_router_aux_loss
from lmforge.train.policy import clipped_surrogate, clipped_value_loss, gae, kl_k1, kl_k3, masked_mean, whiten
from lmforge.train.stage import stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, TrainResult, setup_env


@dataclass
class PPOConfig(RLConfig):
    ALIASES: ClassVar[dict[str, str]] = {"kl_coef": "beta", "cliprange": "epsilon", "num_ppo_epochs": "num_iterations",
                                         "response_length": "max_completion_length", "resume": "train.resume"}

    value_model: str | None = field(default=None, metadata={
        "help": "a reward/value model dir (one label) to start the value model from (default: the policy's body "
                "under a new score head)"})
    num_generations: int = field(default=1, metadata={"help": "completions per prompt", "min": 1})
    max_completion_length: int = field(default=53, metadata={"help": "most tokens per completion (TRL's "
                                                                     "response_length)", "min": 1})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature", "min": 0.01})
    beta: float = field(default=0.05, metadata={
        "help": "kl_coef: the per-token KL penalty in the reward (0: no reference model is made)", "min": 0})
    num_iterations: int = field(default=4, metadata={
        "help": "num_ppo_epochs: optimizer steps on each rollout", "min": 1})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={
        "help": "k1 (log pi - log pi_ref, unbiased) | k3 (exp(-d) + d - 1, unbiased, never negative)"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss", "min": 0})
    cliprange_value: float = field(default=0.2, metadata={"help": "clip range of the values about V_old", "min": 0})
    gamma: float = field(default=1.0, metadata={"help": "discount factor", "min": 0, "max": 1})
    lam: float = field(default=0.95, metadata={"help": "GAE's lambda", "min": 0, "max": 1})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the per-token rewards (mean kept)"})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "subtracted from the score of a completion without EOS (cut at max_completion_length)", "min": 0})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/ppo", steps=200, eval_every=50, save_every=100,
        optim=OptimConfig(lr=3e-6, warmup_steps=0, weight_decay=0.0, min_lr_ratio=0.0, schedule="linear")))


# -- the policy and its value model as one module --------------------------------------------------------

@dataclass
class PolicyValueOutput(ModelOutput):
    values: torch.Tensor | None = None  # [B, T] fp32, aligned with labels (token_values)


def token_values(value_model: RewardModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values [B, T] fp32, MoE aux loss): the score head at every position, shifted to align with labels as
    token_logps' log-probabilities are: values[:, t] is V of the tokens before t, the state in which token t
    was sampled (TRL's value[:, context - 1:-1]). Position 0 has none (0): it is never a completion token."""
    output = Transformer.forward(value_model, input_ids, return_hidden=True)  # the body, not RewardModel's pooling
    values = value_model.score(output.hidden).squeeze(-1).float()
    return torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1), output.aux_loss


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module (TRL's PolicyAndValueWrapper), so that one Trainer, one
    optimizer and DDP train both: forward runs both on the same tokens and returns the policy's output with
    the values. `config` and `output_weight` are the policy's (token_logps and the MoE aux loss read them)."""

    def __init__(self, policy: Transformer, value_model: RewardModel):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.config = policy.config

    @property
    def output_weight(self) -> torch.Tensor:
        return self.policy.output_weight

    def forward(self, input_ids: torch.Tensor, return_hidden: bool = False) -> PolicyValueOutput:
        output = self.policy(input_ids, return_hidden=return_hidden)
        values, value_aux = token_values(self.value_model, input_ids)
        aux = [a for a in (output.aux_loss, value_aux) if a is not None]
        return PolicyValueOutput(output.logits, output.hidden, sum(aux) if aux else None, values)


def build_value_model(cfg: PPOConfig, tokenizer: Tokenizer, device: torch.device) -> RewardModel:
    """value_model's directory (a reward model, or a causal LM whose body gets a new head), or by default the
    policy's own body under a new score head drawn with the run's seed (TRL starts it from a reward model or
    the SFT model alike)."""
    source = cfg.value_model or cfg.model
    model = model_from(source, device=device, seed=cfg.train.seed, reward=True, vocab_size=tokenizer.vocab_size,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"value_model: {source} has a vocabulary of {model.config.vocab_size} tokens, the "
                         f"policy's tokenizer {tokenizer.vocab_size}")
    model.config.pad_token_id = tokenizer.pad_id  # where a saved value model is read, as `lmforge reward` sets it
    return model


def saver_with_value_model(save_policy, tokenizer_dir: str):
    """Checkpoints: the policy as the usual model directory (or adapter), the value model in value_model/."""
    def save(model: PolicyAndValue, path: Path) -> None:
        save_policy(model.policy, path)  # first: it writes `path` anew
        save_model(model.value_model, Path(path) / "value_model", tokenizer_dir=tokenizer_dir)
    return save


# -- rollouts: rewards, values, advantages -----------------------------------------------------------------

@torch.no_grad()
def rollout_values(value_model: RewardModel, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """V_old [N, T] on the CPU: the value model's values when the rollout was sampled, batch_size rows at a time."""
    device = value_model.score.weight.device
    was_training = value_model.training
    value_model.eval()
    rows = [token_values(value_model, input_ids[i:i + batch_size].to(device))[0].cpu()
            for i in range(0, len(input_ids), batch_size)]
    value_model.train(was_training)
    return torch.cat(rows)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, non-score rewards) [N, T]: -kl_coef * KL per completion token, plus each row's score at its
    last completion token (Ouyang et al. 2022, eq. 2, spread over tokens as Ziegler et al. 2019 do)."""
    non_score = -kl_coef * kl * mask
    last = mask.cumsum(-1).argmax(-1)  # the first position where the count of completion tokens peaks
    at_last = torch.zeros_like(mask)
    at_last[torch.arange(len(mask)), last] = 1.0
    return non_score + scores[:, None] * at_last * mask, non_score


def ppo_advantages(cfg: PPOConfig, value_model: RewardModel):
    """advantages(rewards, batch) for Rollouts (module docstring, steps 2 to 4): per-token advantages [N, T],
    and the batch's values (V_old) and returns, which the micro-batches carry."""
    estimator = {"k1": kl_k1, "k3": kl_k3}[cfg.kl_estimator]

    def advantages(rewards: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        mask, old = batch["completion_mask"], batch["old_logps"]
        values = rollout_values(value_model, batch["input_ids"], cfg.batch_size) * mask
        scores = rewards.nan_to_num(0.0)  # a completion no reward function scored counts 0
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * batch["truncated"].float()
        kl = estimator(old, batch["ref_logps"]) * mask if "ref_logps" in batch else torch.zeros_like(old)
        per_token, non_score = token_rewards(scores, kl, mask, cfg.beta)
        if cfg.whiten_rewards:
            per_token = whiten(per_token, mask, shift_mean=False) * mask
        token_advantages, returns = gae(per_token, values, mask, cfg.gamma, cfg.lam)
        batch["values"], batch["returns"] = values, returns
        non_score_sum = non_score.sum(-1).mean().item()
        metrics = {"objective/kl": kl.sum(-1).mean().item(),
                   "objective/entropy": (-old * mask).sum(-1).mean().item(),
                   "objective/non_score_reward": non_score_sum, "objective/scores": scores.mean().item(),
                   "objective/rlhf_reward": non_score_sum + scores.mean().item()}
        return whiten(token_advantages, mask) * mask, metrics
    return advantages


# -- the loss ------------------------------------------------------------------------------------------------

def ppo_loss(model: nn.Module, batch: dict, cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """A micro-batch's policy loss + vf_coef * value loss (module docstring, step 5) and TRL's metrics."""
    mask, old = batch["completion_mask"], batch["old_logps"]
    logps, entropy, output = token_logps(model, batch["input_ids"], completion_labels(batch), cfg.chunk_size,
                                         cfg.temperature, with_entropy=True)
    per_token, clip = clipped_surrogate(logps, old, batch["advantages"], mask, cfg.epsilon, cfg.epsilon_upper)
    policy_loss = masked_mean(per_token, mask)
    value_loss, value_clipfrac = clipped_value_loss(output.values, batch["values"], batch["returns"], mask,
                                                    cfg.cliprange_value)
    loss = policy_loss + cfg.vf_coef * value_loss
    with torch.no_grad():
        log_ratio = logps.detach() - old
        metrics = {"policy/approxkl_avg": 0.5 * masked_mean(log_ratio ** 2, mask),
                   "policy/clipfrac_avg": clip["clip_ratio/region_mean"],
                   "policy/entropy_avg": masked_mean(entropy, mask),
                   "loss/policy_avg": policy_loss.detach(), "loss/value_avg": value_loss.detach(),
                   "val/clipfrac_avg": value_clipfrac, "val/ratio": masked_mean(log_ratio.exp(), mask)}
    metrics.update(batch.get("metrics", {}))
    return with_router_aux_loss(loss, output, model, metrics), metrics


# -- the stage -----------------------------------------------------------------------------------------------

def validate(cfg: PPOConfig) -> None:
    check_ranges(cfg)
    if cfg.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator: '{cfg.kl_estimator}' is not one of k1, k3 (k2 only serves for logging "
                         "in TRL)")
    if cfg.epsilon_high is not None and cfg.epsilon_high < 0:
        raise ValueError(f"epsilon_high: {cfg.epsilon_high} is negative")
    for option in ("activation_checkpointing", "compile"):
        if getattr(cfg.train, option):
            raise ValueError(f"train.{option}: not available for ppo (the Trainer applies it to a single "
                             "model's blocks; here two models train as one module)")


def run(cfg: PPOConfig) -> TrainResult:
    validate(cfg)
    if not cfg.prompts:
        raise ValueError("prompts: give one or more prompt files")
    tokenizer_dir = cfg.tokenizer or cfg.model
    value_model = build_value_model(cfg, Tokenizer.from_dir(tokenizer_dir), setup_env(cfg.train.device).device)
    return run_rl(cfg, ppo_advantages(cfg, value_model), ppo_loss, "bnpo",
                  {"old_logps": True, "carry": ("values", "returns")},
                  wrap=lambda policy, save_policy: (PolicyAndValue(policy, value_model),
                                                    saver_with_value_model(save_policy, tokenizer_dir)))


main = stage_main(PPOConfig, run, "lmforge ppo",
                  "PPO with a value model (RLHF): per-token KL penalty, GAE, clipped policy and value losses; "
                  "rewards from a reward model or functions, rollouts through the Engine.")
