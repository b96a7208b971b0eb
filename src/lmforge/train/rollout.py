"""Rollouts for reinforcement learning (GRPO, RLOO): prompts in, scored completions out, through the one
Engine with the policy's current weights; and the Trainer's resumable stream of batches made of them.

Each generation (one per num_iterations optimizer steps):
1. prompts: the step's prompts, batch_size * grad_accum * processes / num_generations of them, in a seeded
   order epoch after epoch; prompt k of a step goes to process k % processes (sft.epoch_order), so each
   process holds whole groups and a group's advantages need no other process
2. samples: num_generations completions of each prompt through the Engine (sharing one prefill), with the
   policy's weights as they are now; prompt i's samples are seeded by (seed, generation, prompt index), so a
   sample does not depend on the process that drew it nor on what else was batched with it
3. rewards: every reward function on every sample, weighted and summed (TRL: nansum of weight * value; a
   sample every function declined to score, None, is NaN and gets advantage 0)
4. log-probabilities, without gradients: the sampling policy's (old_logps: for num_iterations > 1, and
   RLOO's and PPO's KL-in-reward) and the reference model's (ref_logps, with beta > 0)
5. the stage's advantages (GRPO's group-normalised, RLOO's leave-one-out, PPO's per-token GAE), and any
   per-sample tensors the stage adds for its loss (`carry`: PPO's old values and returns)
6. grad_accum micro-batches of batch_size samples, served num_iterations times (one per optimizer step)
The stream's state is its place in the prompts, the number of generations, and the micro-batches not yet
served (tensors), so that a run resumed after a kill trains on exactly what the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from lmforge.data.prompts import RLPrompt
from lmforge.data.sft import pad
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.infer.llm import encode_prompts
from lmforge.infer.request import Output
from lmforge.tokenizer import Tokenizer
from lmforge.train.agent_rollout import AgentSampler, agent_messages
from lmforge.train.objectives import token_logps
from lmforge.train.policy import nanstd, num_items
from lmforge.train.rewards import RewardFunction, load_reward_function, score
from lmforge.train.sft import index_batches
from lmforge.train.stage import EpochBatches


class Sampler:
    """Completions of prompts through the one Engine, over a model whose weights change between calls: the
    Engine reads the weights' current values at every forward, and keeps no prefix cache, whose keys and
    values would be stale after an update (it drops them when the weights' version counters move, which
    fused AdamW's in-place step does not do). Made at the first call, when the Trainer has placed and cast
    the model. The model is in eval mode while it generates, and back in its former mode after."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, params: SamplingParams, max_batch_size: int,
                 max_len: int):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.max_batch_size, self.max_len = max_batch_size, max_len
        self.engine: Engine | None = None

    def __call__(self, prompts: list[list[int]], seeds: list[int]) -> list[Output]:
        """params.n outputs of each prompt, prompt by prompt; prompt i's sample j is seeded seeds[i] + j."""
        return self.complete(prompts, [replace(self.params, seed=s) for s in seeds])

    def complete(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Output]:
        """Each prompt's params.n outputs under its own params, all batched, prompt by prompt."""
        was_training = self.model.training
        try:
            if self.engine is None:
                context = min(self.model.config.max_position_embeddings, self.max_len)
                self.engine = Engine(self.model, self.tokenizer, max_batch_size=self.max_batch_size, max_len=context,
                                     prefix_cache=False)
            self.model.eval()
            requests = [self.engine.submit(p, q) for p, q in zip(prompts, params)]
            for request in requests:
                for _ in request:  # steps the engine, which runs every submitted request batched
                    pass
            return [output for request in requests for output in request.outputs]
        finally:
            self.model.train(was_training)


class RewardSet:
    """Several reward functions with weights (TRL's reward_funcs and reward_weights), each logged on its own."""

    def __init__(self, specs: list[str], weights: list[float] | None, max_completion_length: int):
        if not specs:
            raise ValueError("reward_funcs: give at least one reward function")
        if weights and len(weights) != len(specs):
            raise ValueError(f"reward_weights: {len(weights)} weights for {len(specs)} reward functions")
        self.functions: list[RewardFunction] = [load_reward_function(s, max_completion_length) for s in specs]
        self.weights = torch.tensor(weights or [1.0] * len(specs), dtype=torch.float32)
        names = [s if ":" not in s else s.rsplit(":", 1)[1] for s in specs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def __call__(self, prompts: list[list[dict]], texts: list[str], completion_ids: list[list[int]],
                 columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """(total [N], per function [N, F]): NaN where a function declined (None); total NaN where all did."""
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        per_function = torch.tensor([
            [float("nan") if v is None else v
             for v in score(f, prompts, completions, {**columns, "completion_ids": completion_ids})]
            for f in self.functions], dtype=torch.float32).T.reshape(len(texts), len(self.functions))
        total = (per_function * self.weights).nansum(dim=1)
        total[per_function.isnan().all(dim=1)] = float("nan")
        return total, per_function

    def metrics(self, total: torch.Tensor, per_function: torch.Tensor) -> dict[str, float]:
        out = {"reward": total.nanmean().item(), "reward_std": nanstd(total).nan_to_num(0.0).item()}
        for name, column in zip(self.names, per_function.T):
            out[f"rewards/{name}/mean"] = column.nanmean().item()
            out[f"rewards/{name}/std"] = nanstd(column).nan_to_num(0.0).item()
        return out


@dataclass
class RolloutSettings:
    num_generations: int
    batch_size: int  # samples per micro-batch
    grad_accum: int
    num_iterations: int
    max_completion_length: int
    sampling: SamplingParams  # temperature, top_p, top_k (max_tokens and n are set from the above)
    seed: int
    chunk_size: int
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, and draw more
    max_sampling_rounds: int = 4  # dynamic sampling's most generations per step
    old_logps: bool = False  # compute the sampling policy's log-probs (num_iterations > 1, RLOO, PPO)
    carry: tuple[str, ...] = ()  # per-sample tensors the stage's advantages put into the batch, served with
    # the micro-batches (PPO: the value model's values when sampled, and the returns)
    sandbox: bool = False  # CodeAct episodes (agent_rollout.py): actions run in a sandbox, observations masked
    max_steps: int = 4  # actions per episode
    max_observation_chars: int = 500


Advantages = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


class Rollouts:
    """The Trainer's stream of RL micro-batches (module docstring). `advantages(rewards, batch)` gives each
    sample's advantage ([N], or [N, T] per token) and its metrics, the batch's old_logps and ref_logps at hand
    (for a KL in the reward); the tensors it adds to the batch under settings.carry's names travel with it;
    `loss_type` says what a micro-batch's loss is a mean over (policy.num_items), for the Trainer."""

    def __init__(self, prompts: list[RLPrompt], tokenizer: Tokenizer, policy: torch.nn.Module,
                 reference: torch.nn.Module | None, rewards: RewardSet, advantages: Advantages,
                 settings: RolloutSettings, env, max_prompt_length: int, loss_type: str):
        s = settings
        per_step = s.batch_size * s.grad_accum
        if per_step % s.num_generations:
            raise ValueError(f"batch_size * grad_accum ({s.batch_size} * {s.grad_accum}) is not a multiple of "
                             f"num_generations ({s.num_generations}): each process holds whole groups")
        self.prompts, self.tokenizer, self.policy, self.reference = prompts, tokenizer, policy, reference
        self.rewards, self.advantages, self.s, self.env = rewards, advantages, settings, env
        self.loss_type = loss_type
        self.messages = [agent_messages(p.messages) if s.sandbox else p.messages for p in prompts]
        self.prompt_ids = [ids[-max_prompt_length:] for ids in
                           encode_prompts(tokenizer, self.messages)]  # TRL keeps a prompt's end
        self.prompts_per_step = per_step // s.num_generations
        self.order = EpochBatches(index_batches(len(prompts), self.prompts_per_step, s.seed, True, env.rank,
                                                env.world_size, lambda indices: indices))
        params = replace(s.sampling, max_tokens=s.max_completion_length, n=s.num_generations)
        self.sampler = Sampler(policy, tokenizer, params, max_batch_size=per_step,
                               max_len=max_prompt_length + s.max_completion_length)
        self.agent = AgentSampler(self.sampler, tokenizer, s.max_completion_length, s.max_steps,
                                  s.max_observation_chars) if s.sandbox else None
        self.generations, self.buffer, self.served = 0, [], 0

    # -- one generation ------------------------------------------------------------------------------------
    def sample(self, indices: list[int]) -> dict:
        """Samples of these prompts, scored: rows, completion mask, rewards, truncation, metrics' raw values."""
        s = self.s
        seeds = [int(np.random.default_rng([s.seed, self.generations, i]).integers(2**31)) for i in indices]
        if self.agent is not None:  # episodes: the observations' tokens are in the completion, masked out
            outputs = self.agent([self.messages[i] for i in indices], [self.prompt_ids[i] for i in indices], seeds,
                                 s.num_generations)
            masks = [o.mask for o in outputs]
        else:
            outputs = self.sampler([self.prompt_ids[i] for i in indices], seeds)
            masks = [[1] * len(o.token_ids) for o in outputs]
        group = [i for i in indices for _ in range(s.num_generations)]
        completion_ids = [o.token_ids for o in outputs]
        total, per_function = self.rewards(
            [self.prompts[i].messages for i in group], [o.text for o in outputs], completion_ids,
            {"answer": [self.prompts[i].answer for i in group]})
        rows = [self.prompt_ids[i] + ids for i, ids in zip(group, completion_ids)]
        mask = [[0] * len(self.prompt_ids[i]) + m for i, m in zip(group, masks)]
        return {"input_ids": pad(rows, self.tokenizer.pad_id), "completion_mask": pad(mask, 0).float(),
                "rewards": total, "per_function": per_function,
                "truncated": torch.tensor([o.finish_reason == "length" for o in outputs]),
                "lengths": torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float32)}

    def draw(self) -> dict:
        """The step's samples: one generation, or with dynamic sampling, as many as it takes (at most
        max_sampling_rounds) to fill the step with groups whose rewards differ."""
        s = self.s
        rounds, kept, drawn = 0, [], []
        while True:
            batch = self.sample(next(self.order))
            rounds += 1
            drawn.append(batch)
            if not s.dynamic_sampling:
                kept = [batch]
                break
            grouped = batch["rewards"].view(-1, s.num_generations)
            spread = ~torch.isclose(nanstd(grouped, dim=1).nan_to_num(0.0), torch.zeros(()))
            if spread.any():
                kept.append(select_groups(batch, spread, s.num_generations))
            if sum(len(b["rewards"]) for b in kept) >= self.prompts_per_step * s.num_generations \
                    or rounds >= s.max_sampling_rounds:
                break
        if not kept:  # no group with a spread: train on the last draw (its advantages are 0)
            kept = [drawn[-1]]
        batch = concat_samples(kept, self.tokenizer.pad_id)
        batch = {k: v[:self.prompts_per_step * s.num_generations] for k, v in batch.items()}
        batch["stats"] = concat_samples(drawn, self.tokenizer.pad_id)  # every drawn sample, for the metrics
        batch["stats"]["rounds"] = rounds
        return batch

    @torch.no_grad()
    def log_probs(self, batch: dict) -> None:
        """old_logps (the sampling policy's) and ref_logps, [N, T] aligned with completion_mask, in place."""
        device = next(self.policy.parameters()).device
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100).to(device)
        ids = batch["input_ids"].to(device)
        temperature = self.s.sampling.temperature or 1.0
        for key, model, wanted in (("old_logps", self.policy, self.s.old_logps),
                                   ("ref_logps", self.reference, self.reference is not None)):
            if wanted:
                was_training = model.training
                model.eval()
                rows = [token_logps(model, ids[i:i + self.s.batch_size], labels[i:i + self.s.batch_size],
                                    self.s.chunk_size, temperature)[0].cpu()
                        for i in range(0, len(ids), self.s.batch_size)]
                model.train(was_training)
                batch[key] = torch.cat(rows)

    def generate(self) -> list[dict]:
        """One generation's micro-batches (module docstring, steps 1 to 6)."""
        s = self.s
        batch = self.draw()
        stats = batch.pop("stats")
        self.generations += 1
        if s.mask_truncated_completions:
            batch["completion_mask"] = batch["completion_mask"] * ~batch["truncated"][:, None]
        self.log_probs(batch)
        advantages, metrics = self.advantages(batch["rewards"], batch)
        stats = gather_stats(stats)  # the metrics are those of every process's samples, the same on each
        metrics.update(self.rewards.metrics(stats["rewards"], stats["per_function"]))
        spread = nanstd(stats["rewards"].view(-1, s.num_generations), dim=1).nan_to_num(0.0)
        lengths, truncated = stats["lengths"], stats["truncated"]
        metrics.update({
            "frac_reward_zero_std": torch.isclose(spread, torch.zeros_like(spread)).float().mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": truncated.float().mean().item(),
            "completions/mean_terminated_length": lengths[~truncated].mean().nan_to_num(0.0).item()})
        if s.dynamic_sampling:
            metrics["sampling/rounds"] = float(stats["rounds"])
        batch["advantages"] = advantages
        keys = ["input_ids", "completion_mask", "advantages", "old_logps", "ref_logps", *s.carry]
        count = len(batch["rewards"])
        size = max(1, -(-count // s.grad_accum))  # batch_size, or less when dynamic sampling fell short
        micro = [{k: batch[k][i:i + size] for k in keys if k in batch} for i in range(0, count, size)]
        for m in micro:  # the last micro-batch of a dynamic step may be short; none is empty
            m["metrics"] = dict(metrics)
            m["num_items"] = num_items(self.loss_type, m["completion_mask"])
        while len(micro) < s.grad_accum:  # fewer samples than micro-batches (dynamic sampling): the last again,
            # weighing nothing (every process runs grad_accum forwards, as DDP needs)
            micro.append({**micro[-1], "completion_mask": torch.zeros_like(micro[-1]["completion_mask"]),
                          "num_items": torch.tensor(0.0)})
        return micro

    # -- the Trainer's Batches protocol --------------------------------------------------------------------
    def __next__(self) -> dict:
        s = self.s
        if self.served == len(self.buffer) * s.num_iterations:
            self.buffer, self.served = self.generate(), 0
        batch = self.buffer[self.served % len(self.buffer)]
        self.served += 1
        return batch

    def state_dict(self) -> dict:
        buffer = [{k: v for k, v in m.items() if k != "metrics"} for m in self.buffer]
        metrics = [m["metrics"] for m in self.buffer]
        return {**self.order.state_dict(), "generations": self.generations, "served": self.served,
                "buffer": buffer, "metrics": metrics}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.generations, self.served = state["generations"], state["served"]
        self.buffer = [{**m, "metrics": metrics} for m, metrics in zip(state["buffer"], state["metrics"])]


def gather_stats(stats: dict) -> dict:
    """The rewards, lengths and truncation of the samples of every process (all_gather), for the metrics."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    keys = ("rewards", "per_function", "lengths", "truncated")
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: stats[k] for k in keys})
    return {**stats, **{k: torch.cat([p[k] for p in parts]) for k in keys}}


def select_groups(batch: dict, keep: torch.Tensor, group_size: int) -> dict:
    """The samples of the groups where `keep` [groups] is true."""
    rows = keep.repeat_interleave(group_size)
    return {k: v[rows] for k, v in batch.items()}


def concat_samples(batches: list[dict], pad_id: int) -> dict:
    """Sample batches joined along the samples (rows padded to the longest)."""
    if len(batches) == 1:
        return dict(batches[0])
    width = max(b["input_ids"].shape[1] for b in batches)

    def widen(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    out = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if k not in ("input_ids", "completion_mask")}
    out["input_ids"] = torch.cat([widen(b["input_ids"], pad_id) for b in batches])
    out["completion_mask"] = torch.cat([widen(b["completion_mask"], 0.0) for b in batches])
    return out
