"""`lmforge grpo`: Group Relative Policy Optimization and its variants (Dr. GRPO, DAPO, GSPO) on the one
Trainer, with rollouts through the one Engine (train/rollout.py).

    lmforge grpo --config configs/grpo_tiny.yaml [--loss-type grpo --scale-rewards none --beta 0.04 ...]

Each optimizer step (Shao et al. 2024, DeepSeekMath §4.1.2; the formulas in train/policy.py):
1. num_generations completions of each of the step's prompts, sampled by the policy as it is now
2. rewards: the weighted sum of `reward_funcs` (exact_answer, format, length, a reward model's directory,
   module:function), and the advantage of each completion, its reward less its group's mean, divided by the
   group's std + 1e-4 (scale_rewards group), the batch's (batch), or not (none: Dr. GRPO)
3. the loss of each completion token, PPO's clipped surrogate -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A)
   with w = pi / pi_old per token (importance_sampling_level token) or per sequence (sequence: GSPO), plus
   beta * the k3 estimate of KL(pi || pi_ref) (beta 0: no reference model is made), aggregated by loss_type:
   grpo (mean of each sequence's token mean), bnpo (token mean of the micro-batch), dr_grpo (token sum /
   (sequences * max_completion_length)), dapo (token mean over the whole step's completions)
4. the same completions are trained on num_iterations times (pi_old: their log-probs when sampled)
With dynamic_sampling (DAPO), groups whose rewards are all equal (no signal) are dropped and more drawn.
Names and defaults are TRL's GRPOConfig's (loss_type dapo, beta 0, epsilon 0.2, num_generations 8, ...).
Held-out accuracy (greedy answers to --val-prompts, exact_answer) every eval_every steps; reward.png and
accuracy.png beside loss.png.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from lmforge.data.formats import DataStats
from lmforge.data.prompts import RLPrompt, read_prompts
from lmforge.data.sft import IGNORE_INDEX
from lmforge.infer.llm import encode_prompts
from lmforge.infer.sampling import SamplingParams
from lmforge.model.lora import LoraConfig
from lmforge.settings import check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.agent_rollout import AgentSampler, agent_messages
from lmforge.train.metrics import plot_series, read_metrics
from lmforge.train.objectives import DEFAULT_CHUNK, token_logps, with_router_aux_loss
from lmforge.train.policy import (
    LOSS_TYPES,
    aggregate,
    clipped_surrogate,
    group_advantages,
    kl_k3,
    masked_mean,
)
from lmforge.train.rewards import exact_answer
from lmforge.train.rollout import RewardSet, Rollouts, RolloutSettings, Sampler
from lmforge.train.sft import FreezeConfig, build, weights_saver
from lmforge.train.stage import stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer, TrainResult, setup_env


@dataclass
class RLConfig:
    """What every RL stage (grpo, rloo) reads: the policy, the prompts, the rewards, the sampling."""

    model: str = field(default="runs/sft/final", metadata={"help": "the policy: an HF model dir (an SFT model)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir (default: the model dir)"})
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "RL prompt files (jsonl, parquet, globs): {prompt|messages|question, answer}"})
    val_prompts: list[str] = field(default_factory=list, metadata={
        "help": "held-out prompt files: greedy exact-answer accuracy every eval_every steps"})
    max_val_prompts: int | None = field(default=500, metadata={"help": "use the first N held-out prompts", "min": 1})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad records instead of stopping"})
    reward_funcs: list[str] = field(default_factory=lambda: ["exact_answer"], metadata={
        "help": "exact_answer | format | length | a reward model's directory | module:function (TRL's signature)"})
    reward_weights: list[float] = field(default_factory=list, metadata={
        "help": "one weight per reward function (default: 1 each)"})
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (a group)", "min": 2})
    max_prompt_length: int = field(default=512, metadata={"help": "prompt tokens kept (the end)", "min": 1})
    max_completion_length: int = field(default=512, metadata={"help": "most tokens per completion", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "min": 0.01})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens (0 = off)", "min": 0})
    batch_size: int = field(default=8, metadata={
        "help": "completions per micro-batch per process (batch_size * grad_accum: whole groups)", "min": 1})
    epsilon: float = field(default=0.2, metadata={"help": "clip range below: ratios under 1 - epsilon are clipped",
                                                  "min": 0})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "clip range above (DAPO's clip-higher: 0.28); default: epsilon"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (0: no reference model is made)", "min": 0})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps on each generation (mu)", "min": 1})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "leave completions cut at max_completion_length out of the loss"})
    method: Literal["full", "lora", "dora", "freeze"] = field(default="full", metadata={"help": "what is trained"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    chunk_size: int = field(default=DEFAULT_CHUNK, metadata={"help": "tokens per chunk of the output layer",
                                                                        "min": 1})
    sandbox: bool = field(default=False, metadata={
        "help": "CodeAct episodes: the policy's python blocks run in a sandboxed session and their output comes back "
                "as a tool turn, masked out of the loss; the reward scores the final reply (train/agent_rollout.py)"})
    max_steps: int = field(default=4, metadata={"help": "sandbox: most code actions per episode", "min": 0})
    max_observation_chars: int = field(default=500, metadata={"help": "sandbox: an observation's most characters",
                                                              "min": 1})

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass
class GRPOConfig(RLConfig):
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = field(default="dapo", metadata={
        "help": "grpo | bnpo | dr_grpo | dapo: how token losses are averaged (module docstring)"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={
        "help": "divide advantages by the std of the group, of the batch, or not at all (Dr. GRPO)"})
    importance_sampling_level: Literal["token", "sequence"] = field(default="token", metadata={
        "help": "one ratio per token, or per sequence (GSPO)"})
    delta: float | None = field(default=None, metadata={"help": "cap ratios above at delta (two-sided clip)"})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "DAPO: drop groups whose rewards are all equal and draw more prompts"})
    max_sampling_rounds: int = field(default=4, metadata={"help": "dynamic sampling: most draws per step", "min": 1})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/grpo", steps=200, eval_every=50, save_every=100,
        optim=OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0, min_lr_ratio=0.0, schedule="linear")))


# -- shared by the RL stages ---------------------------------------------------------------------------------

def read_rl_prompts(files: list[str], skip_bad: bool, what: str, limit: int | None = None) -> list[RLPrompt]:
    stats = DataStats()
    prompts = list(read_prompts(files, skip_bad, stats))[:limit]
    if not prompts:
        raise ValueError(f"{what}: no prompt in {files} ({stats.summary()})")
    return prompts


def completion_labels(batch: dict) -> torch.Tensor:
    """The rows' tokens where the completion mask is on, -100 elsewhere (what token_logps scores)."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)


def make_reference(cfg: RLConfig, policy: torch.nn.Module) -> torch.nn.Module | None:
    """The reference policy for the KL term: a frozen copy of the starting policy (with a new LoRA adapter,
    whose B is 0, that is the base model; with an existing one, the model with it), or None at beta 0."""
    if cfg.beta == 0:
        return None
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return reference


def prompt_room(cfg: RLConfig, policy: torch.nn.Module) -> int:
    """The most prompt tokens kept (a prompt's end, as TRL keeps it): max_prompt_length, or less where the
    model's context must also hold max_completion_length new tokens."""
    context = policy.config.max_position_embeddings
    if context - cfg.max_completion_length < 1:
        raise ValueError(f"max_completion_length: {cfg.max_completion_length} leaves no room for a prompt in the "
                         f"model's context of {context} tokens")
    return min(cfg.max_prompt_length, context - cfg.max_completion_length)


def accuracy_fn(cfg: RLConfig, tokenizer: Tokenizer, val_prompts: list[RLPrompt], env, max_prompt_length: int):
    """val_fn for the Trainer: greedy answers to the held-out prompts (this process's share), the fraction
    right by exact_answer over every process, and their mean length."""
    mine = val_prompts[env.rank::env.world_size]
    messages = [agent_messages(p.messages) if cfg.sandbox else p.messages for p in mine]
    ids = [p[-max_prompt_length:] for p in encode_prompts(tokenizer, messages)]
    samplers: dict[int, Sampler] = {}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        if id(model) not in samplers:
            params = SamplingParams(max_tokens=cfg.max_completion_length, temperature=0.0)
            samplers[id(model)] = Sampler(model, tokenizer, params, max_batch_size=64,
                                          max_len=max_prompt_length + cfg.max_completion_length)
        if cfg.sandbox:  # greedy episodes, the sandbox in them
            agent = AgentSampler(samplers[id(model)], tokenizer, cfg.max_completion_length, cfg.max_steps,
                                 cfg.max_observation_chars)
            outputs = agent(messages, ids, [0] * len(ids), 1)
        else:
            outputs = samplers[id(model)](ids, [0] * len(ids))
        right = exact_answer([p.messages for p in mine], [o.text for o in outputs], [p.answer for p in mine])
        totals = torch.tensor([sum(right), float(len(mine)), float(sum(len(o.token_ids) for o in outputs))],
                              dtype=torch.float64)
        if env.distributed:
            dist.all_reduce(totals)
        return {"val_accuracy": (totals[0] / totals[1]).item(), "val_mean_length": (totals[2] / totals[1]).item()}

    return evaluate


def plot_rl_curves(run_dir, reward_names: list[str]) -> None:
    """reward.png (the reward and each function's mean) and accuracy.png (held-out) beside loss.png."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_series(rows, [("reward", "reward", "-")] + [(f"rewards/{n}/mean", n, "-") for n in reward_names],
                run_dir / "reward.png", "mean reward of the step's completions")
    plot_series(rows, [("val_accuracy", "held-out accuracy", "o-")], run_dir / "accuracy.png",
                "exact-match accuracy (greedy)")


def run_rl(cfg: RLConfig, advantages, loss_fn, loss_type: str, settings_extra: dict, wrap=None) -> TrainResult:
    """The RL stages' run: the policy, its reference, the rollouts, validation and the Trainer. `wrap(policy,
    save_policy) -> (module, save_weights)`: what the Trainer trains when it is more than the policy (PPO: the
    policy and its value model as one module), and how its checkpoints are written; rollouts and validation
    still sample from the policy."""
    check_ranges(cfg)
    if not cfg.prompts:
        raise ValueError("prompts: give one or more prompt files")
    env = setup_env(cfg.train.device)
    if env.distributed and cfg.train.distributed == "fsdp":
        raise ValueError("train.distributed: fsdp cannot generate rollouts (each process samples with its whole "
                         "policy); use ddp")
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    policy = build(cfg, tokenizer, env.device)
    reference = make_reference(cfg, policy)
    rewards = RewardSet(cfg.reward_funcs, cfg.reward_weights, cfg.max_completion_length)
    prompts = read_rl_prompts(cfg.prompts, cfg.skip_bad, "prompts")
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    settings = RolloutSettings(
        num_generations=cfg.num_generations, batch_size=cfg.batch_size, grad_accum=cfg.train.grad_accum,
        num_iterations=cfg.num_iterations, max_completion_length=cfg.max_completion_length, sampling=sampling,
        seed=cfg.train.seed, chunk_size=cfg.chunk_size, mask_truncated_completions=cfg.mask_truncated_completions,
        sandbox=cfg.sandbox, max_steps=cfg.max_steps, max_observation_chars=cfg.max_observation_chars,
        **settings_extra)
    room = prompt_room(cfg, policy)
    train = Rollouts(prompts, tokenizer, policy, reference, rewards, advantages, settings, env, room, loss_type)
    val_fn = None
    if cfg.val_prompts:
        val_fn = accuracy_fn(cfg, tokenizer, read_rl_prompts(cfg.val_prompts, cfg.skip_bad, "val_prompts",
                                                             cfg.max_val_prompts), env, room)
    adapters = cfg.method in ("lora", "dora")
    model, save_weights = policy, weights_saver(adapters, cfg.model, tokenizer_dir)
    if wrap is not None:
        model, save_weights = wrap(policy, save_weights)
        if val_fn is not None:
            val_fn = policy_val_fn(val_fn, policy)
    trainer = Trainer(cfg.train, model, lambda m, batch: loss_fn(m, batch, cfg), train, val_fn=val_fn,
                      save_weights=save_weights, log_config={k: v for k, v in asdict(cfg).items() if k != "train"})
    result = trainer.fit()
    if env.is_main:
        plot_rl_curves(result.run_dir, rewards.names)
    return result


def policy_val_fn(val_fn, policy: torch.nn.Module):
    """val_fn run on the policy, whatever module the Trainer hands it."""
    return lambda _trained: val_fn(policy)


# -- GRPO ----------------------------------------------------------------------------------------------------

def grpo_advantages(cfg: GRPOConfig):
    def advantages(rewards: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)[0], {}
    return advantages


def grpo_loss(model: torch.nn.Module, batch: dict, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """The micro-batch's GRPO loss (module docstring, step 3) and its metrics (TRL's names)."""
    mask = batch["completion_mask"]
    logps, entropy, output = token_logps(model, batch["input_ids"], completion_labels(batch), cfg.chunk_size,
                                         cfg.temperature, with_entropy=True)
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # num_iterations 1: on-policy, w = 1
    per_token, metrics = clipped_surrogate(logps, old, batch["advantages"], mask, cfg.epsilon, cfg.epsilon_upper,
                                           cfg.importance_sampling_level, cfg.delta)
    if cfg.beta > 0:
        kl = kl_k3(logps, batch["ref_logps"])
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, cfg.loss_type, cfg.max_completion_length)
    metrics["entropy"] = masked_mean(entropy, mask)
    metrics.update(batch.get("metrics", {}))
    return with_router_aux_loss(loss, output, model, metrics), metrics


def validate(cfg: GRPOConfig) -> None:
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: '{cfg.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
    if cfg.epsilon_high is not None and cfg.epsilon_high < 0:
        raise ValueError(f"epsilon_high: {cfg.epsilon_high} is negative")


def run(cfg: GRPOConfig) -> TrainResult:
    validate(cfg)
    return run_rl(cfg, grpo_advantages(cfg), grpo_loss, cfg.loss_type,
                  {"dynamic_sampling": cfg.dynamic_sampling, "max_sampling_rounds": cfg.max_sampling_rounds,
                   "old_logps": cfg.num_iterations > 1})


main = stage_main(GRPOConfig, run, "lmforge grpo",
                  "GRPO and its variants (Dr. GRPO, DAPO, GSPO): group-relative policy optimisation with rewards "
                  "from functions or a reward model, rollouts through the Engine.")
