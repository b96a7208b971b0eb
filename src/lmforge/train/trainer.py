r"""The one training loop of lmforge: every training stage (pretraining, SFT with LoRA/DoRA, and the
post-training stages to come) runs through `Trainer`.

A stage supplies only what differs between stages:
    model       the nn.Module to train (parameters with requires_grad=False stay frozen)
    loss_fn     loss_fn(model, batch) -> (scalar loss, metrics dict); the mean over the batch: over its
                trained tokens (labels != -100) when the batch has "labels", as causal_lm_loss
    train_data  an iterator of batches (dicts of tensors) with state_dict()/load_state_dict(), so that
                resuming continues with the very next batch
    val_data    optional: a function returning a fresh, finite iterable of validation batches
and the Trainer does the rest, step by step (`fit`):
    1. lr from the schedule (a function of the step)
    2. grad_accum micro-batches: forward + loss under the precision's autocast, backward; gradients
       are all-reduced only on the last one (DDP no_sync / FSDP set_requires_gradient_sync). Batches
       with "labels" weigh by their trained tokens, so the step's loss is the mean over all trained
       tokens of all micro-batches and processes, as one batch would give (`_micro_weights`)
    3. gradient norm (clipped when optim.grad_clip > 0); a non-finite loss or norm stops the run, or
       skips the step with skip_nonfinite
    4. AdamW step (fused where available), with fp32 master weights for "bf16-pure"
    5. DeepSeek-V3's expert-bias update for MoE models that have the bias
    6. logging (progress, metrics.jsonl, TensorBoard, W&B), validation, checkpoints

Small data and fixed time (`fit`): `train.keep_best` makes RUN_DIR/final the model of the step with the lowest
validation loss rather than the last step's (RUN_DIR/final.json says which step); `train.max_minutes` stops
training when a wall-clock budget is spent, with the schedule fitted to it (schedule.TimeBudget); a run whose
planned steps go over its training set more than once says so, with the number of epochs (`repeat_warning`).

Checkpoints (train/checkpointing.py): RUN_DIR/checkpoint-NNNNNN/ is a Hugging Face model directory (or,
for LoRA, a PEFT adapter directory) with the training state beside the weights, as safetensors and JSON
(never a pickle); `resume: auto` takes the newest one that loads.

Distributed (train/environment.py; the commands are in the README's "Many processes, many machines"):
the Trainer joins the process group that torchrun describes (NCCL on GPUs, gloo on CPUs), each rank
reads its own part of the data, and only rank 0 logs (train/metrics.py) and writes files other than its
own shards of the training state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmforge.checkpoint import save_model
from lmforge.data.sft import IGNORE_INDEX
from lmforge.settings import OptionError, check_ranges
from lmforge.train.checkpointing import (
    CHECKPOINT_PREFIX,
    Checkpointer,
    OptimizerState,
    RNGState,
    TrainedWeights,
    best_dir,
    point_link_at,
    prune_best,
    warn,
)
from lmforge.train.environment import Env, setup_env
from lmforge.train.metrics import MetricsLogger
from lmforge.train.schedule import TimeBudget, lr_at
from lmforge.train.stage import TrainingSet, repeat_warning


@dataclass
class OptimConfig:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate", "min": 0})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the schedule's floor, as a fraction of lr", "min": 0,
                                                        "max": 1})
    schedule: Literal["cosine", "linear", "wsd"] = field(
        default="cosine", metadata={"help": "cosine | linear | wsd (warmup-stable-decay) after the warmup"})
    warmup_steps: int = field(default=100, metadata={"help": "steps of linear warmup from 0 to lr", "min": 0})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: fraction of the steps spent decaying", "min": 0,
                                                                     "max": 1})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay (never on norms, biases, embeddings)",
                                                                   "min": 0})
    # a beta of 1 would divide by zero in Adam's bias correction (1 - beta^t)
    beta1: float = field(default=0.9, metadata={"help": "AdamW's first-moment decay", "min": 0, "max": 0.9999})
    beta2: float = field(default=0.95, metadata={"help": "AdamW's second-moment decay", "min": 0, "max": 0.9999})
    eps: float = field(default=1e-8, metadata={"help": "AdamW's denominator floor", "min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 = off", "min": 0})


@dataclass
class TrainConfig:
    run_dir: str = field(default="runs/run", metadata={"help": "checkpoints, metrics.jsonl, logs, loss.png"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps (with max_minutes: at most this many)",
                                               "min": 1})
    max_minutes: float | None = field(default=None, metadata={
        "help": "stop training when this many minutes of it are spent (all runs of a resumed training together), "
                "the schedule's warmup and decay fitted to the budget from the measured step time; the final "
                "validation and checkpoint follow", "min": 0})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the training RNGs (dropout, shuffling)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda"})
    precision: Literal["fp32", "bf16", "bf16-pure", "fp16"] = field(
        default="fp32", metadata={"help": "fp32 | bf16 (autocast) | bf16-pure (bf16 weights, fp32 master "
                                          "weights and optimizer) | fp16 (autocast + grad scaler; for GPUs, "
                                          "slow on CPUs)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in backward"})
    distributed: Literal["ddp", "fsdp"] = field(
        default="ddp", metadata={"help": "under torchrun: ddp (replicas) | fsdp (FSDP2 sharding)"})
    eval_every: int = field(default=100, metadata={"help": "validate every N steps (and at the end); 0 = end only",
                                                                "min": 0})
    save_every: int = field(default=500, metadata={"help": "checkpoint every N steps (and at the end); 0 = end only",
                                                                "min": 0})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept (older ones are deleted)", "min": 1})
    keep_best: bool = field(default=False, metadata={
        "help": "keep the model of the step with the lowest validation loss (RUN_DIR/best-NNNNNN) and make it "
                "final; RUN_DIR/final.json says which step final is"})
    resume: str | None = field(default=None, metadata={"help": "auto (newest checkpoint in run_dir) or a "
                                                                 "checkpoint directory"})
    skip_nonfinite: bool = field(default=False, metadata={"help": "skip a step whose loss or gradient is not "
                                                                  "finite instead of stopping"})
    log_every: int = field(default=1, metadata={"help": "write metrics every N steps", "min": 1})
    progress: bool = field(default=True, metadata={"help": "show progress on standard error: a bar on a "
                                                            "terminal, else a plain line every 10 s"})
    peak_flops: float | None = field(default=None, metadata={"help": "accelerator peak FLOP/s for MFU "
                                                                      "(measured with a matmul if null)", "min": 1})
    expert_bias_rate: float = field(default=0.001, metadata={
        "help": "DeepSeek-V3 aux-loss-free balancing: bias update per step (MoE models with the bias)", "min": 0})
    tensorboard: bool = field(default=False, metadata={"help": "log to RUN_DIR/tensorboard"})
    wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases (WANDB_MODE=offline works)"})
    wandb_project: str = "lmforge"
    optim: OptimConfig = field(default_factory=OptimConfig)


class Batches(Protocol):
    """A resumable stream of training batches. `state_dict()` holds plain data (numbers, strings, lists,
    dicts, tensors), which checkpoints store as JSON and safetensors (checkpointing.save_state)."""

    def __next__(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm was NaN or infinite; the message names the step."""


@dataclass
class TrainResult:
    steps: int
    run_dir: Path
    model_dir: Path  # the final model (RUN_DIR/final links to it): an HF model dir or a PEFT adapter dir
    val_loss: float | None  # the final model's
    val_bpb: float | None
    loss_curve: Path | None
    skipped_steps: int
    history: list[dict]  # the training rows of metrics.jsonl of this process's run
    val: dict = field(default_factory=dict)  # the final model's validation row (val_loss, val_accuracy, ...)
    final_step: int = 0  # the step whose model `final` is: the last, or with keep_best the best
    last_val: dict = field(default_factory=dict)  # the last step's validation row (= val without keep_best)


# -- precision ---------------------------------------------------------------------------------------

def _autocast(env: Env, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(env.device.type, dtype=dtype)
    return contextlib.nullcontext()


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights and biases (1-D) and embeddings are not decayed (as in GPT-2/nanoGPT and LLaMA)."""
    return param.ndim < 2 or "embed_tokens" in name


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig,
                    foreach_only: bool = False) -> torch.optim.AdamW:
    decay = [p for n, p in named_params if not _no_decay(n, p)]
    no_decay = [p for n, p in named_params if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if not foreach_only:
        # One fused kernel for all parameters where the device supports it (CUDA, and CPU since torch 2.4).
        with contextlib.suppress(RuntimeError, TypeError):
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


# -- the Trainer ----------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, loss_fn: LossFn, train_data: Batches, *,
                 val_data: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
                 bytes_per_token: float | None = None, flops_per_token: float | None = None,
                 save_weights: Callable[[nn.Module, Path], Any] | None = None,
                 log_config: dict | None = None,
                 val_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 training_set: TrainingSet | None = None):
        """model: built on any device; the Trainer moves, casts, wraps (DDP/FSDP) and compiles it.
        bytes_per_token: UTF-8 bytes per token of the validation data, for bits per byte.
        flops_per_token: training FLOPs per token (lmforge.model.flops_per_token), for MFU.
        save_weights(model, dir): writes a checkpoint's weights (default: lmforge.checkpoint.save_model).
        log_config: the stage's whole config, recorded in run_dir/config.json and W&B.
        val_fn(model) -> {"val_<name>": value}: a stage's own validation in place of val_data's loss (RL: the
        held-out accuracy of greedy answers), called on every process with the unwrapped model in eval mode.
        training_set: the size of the training data, for the warning when the run would repeat it."""
        self.cfg, self.loss_fn, self.train_data, self.val_data = cfg, loss_fn, train_data, val_data
        self.val_fn, self.training_set = val_fn, training_set
        self.bytes_per_token, self.flops_per_token = bytes_per_token, flops_per_token
        self.save_weights = save_weights or (lambda m, path: save_model(m, path))
        self.log_config = log_config or {}
        self.env = setup_env(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        if cfg.precision == "fp16" and self.env.device.type == "cpu" and self.env.is_main:
            # It works (that is how the tests check the grad scaler), but CPUs multiply fp16 slowly.
            print("warning: precision fp16 on a CPU is slow (fp16 matmuls); bf16 is the CPU's half precision",
                  file=sys.stderr)
        check_ranges(cfg)
        if cfg.max_minutes is not None and not (math.isfinite(cfg.max_minutes) and cfg.max_minutes > 0):
            raise OptionError(f"train.max_minutes: {cfg.max_minutes} is not a positive number of minutes")
        if cfg.keep_best and val_data is None and val_fn is None:
            raise OptionError("train.keep_best: this run has no validation data to choose the best step by")
        self.fsdp = self.env.distributed and cfg.distributed == "fsdp"
        self.inner = self._prepare_model(model)
        params = [(n, p) for n, p in self.inner.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        # bf16-pure outside FSDP: the model computes in bf16, the optimizer updates fp32 copies (masters)
        # that are rounded back into the model after every step (Micikevicius et al. 2018, "Mixed
        # Precision Training"). Under FSDP the same is FSDP's MixedPrecisionPolicy (see _prepare_model).
        self.masters: list[tuple[nn.Parameter, nn.Parameter]] = []
        if cfg.precision == "bf16-pure" and not self.fsdp:
            for i, (name, p) in enumerate(params):
                if p.dtype == torch.bfloat16:
                    master = nn.Parameter(p.detach().float().clone())
                    self.masters.append((p, master))
                    params[i] = (name, master)
        self.optim_params = [p for _, p in params]
        self.optimizer = build_optimizer(params, cfg.optim, foreach_only=self.fsdp)
        # fp16's narrow range: the loss is scaled up so small gradients do not flush to zero; a step whose
        # gradients overflowed is skipped and the scale halved (Micikevicius et al. 2018; torch.amp).
        self.scaler = torch.amp.GradScaler(self.env.device.type) if cfg.precision == "fp16" else None
        self.step, self.tokens_seen, self.skipped = 0, 0, 0
        self.planned = cfg.steps  # the schedule's length: train.steps, or what a time budget holds
        self.best: dict | None = None  # keep_best: the validation row of the best step so far
        self.seconds_before, self.started = 0.0, None  # training time of the runs resumed; this run's start
        self.moe_layers = [m for m in self.inner.modules() if hasattr(m, "update_score_bias")
                           and hasattr(getattr(m, "gate", None), "e_score_correction_bias")]
        # What a checkpoint holds (train/checkpointing.py); a stage with more state adds an entry here.
        self.checkpointer = Checkpointer(
            self.run_dir, self.env, self.fsdp, cfg.keep_last, self._write_weights,
            shared={"model": TrainedWeights(self.inner, self.masters), "optimizer": OptimizerState(self.optimizer)},
            per_rank={"rng": RNGState(), "data": train_data}, progress=self)
        random.seed(cfg.seed + self.env.rank)
        np.random.seed(cfg.seed + self.env.rank)
        torch.manual_seed(cfg.seed + self.env.rank)

    # -- model preparation --------------------------------------------------------------------------
    def _prepare_model(self, model: nn.Module) -> nn.Module:
        cfg, env = self.cfg, self.env
        model = model.to(env.device)
        if self.fsdp:
            # A skeleton of the unsharded model, for writing full checkpoints from rank 0.
            self._skeleton = copy.deepcopy(model).to("meta") if env.is_main else None
        if cfg.precision == "bf16-pure" and not self.fsdp:
            # The model's own weights; LoRA adapters stay fp32, as PEFT keeps them (they are small).
            for name, p in model.named_parameters():
                if p.dtype == torch.float32 and "lora_" not in name:
                    p.data = p.data.to(torch.bfloat16)
        blocks = _blocks(model)
        if cfg.activation_checkpointing:
            for block in blocks:
                _checkpoint_block(block)
        if cfg.compile:
            for block in blocks:
                block.compile()
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if cfg.precision == "bf16-pure" else MixedPrecisionPolicy()
            for block in blocks:
                fully_shard(block, mp_policy=mp)
            # The root keeps its weights gathered after forward: the chunked loss reads the output
            # matrix outside the model's forward.
            fully_shard(model, mp_policy=mp, reshard_after_forward=False)
            self.model = model
        elif env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        else:
            self.model = model
        return model

    # -- one optimizer step -------------------------------------------------------------------------
    def _sync_context(self, last: bool):
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.env.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _micro_weights(self, batches: list[dict]) -> list[float]:
        """Each micro-batch's share of the step's loss, over all micro-batches of all processes (they sum
        to 1). With "labels": its trained tokens / all trained tokens, so that accumulation and data
        parallelism give the mean over every trained token, as one big batch would. Micro-batches of
        unequal token counts (SFT's masked prompts and padding) otherwise weigh each token unequally:
        the accumulation bug transformers fixed with `num_items_in_batch` (v4.46). A batch with "num_items"
        says itself what its loss is a mean over (RL: sequences, or completion tokens, or 1 for a mean per
        micro-batch), and weighs by that. Other batches: equal shares."""
        env = self.env
        if all(torch.is_tensor(b.get("num_items")) for b in batches):
            counts = torch.stack([b["num_items"].reshape(()) for b in batches]).double()
        elif all(torch.is_tensor(b.get("labels")) for b in batches):
            counts = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in batches]).double()
        else:
            return [1.0 / (len(batches) * env.world_size)] * len(batches)
        total = counts.sum()
        if env.distributed:
            dist.all_reduce(total)
        return (counts / total.clamp(min=1)).tolist()

    def train_step(self) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        lr = lr_at(self.step, self.planned, cfg.optim.lr, cfg.optim.lr * cfg.optim.min_lr_ratio,
                   cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=env.device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        expert_load = [torch.zeros_like(m.expert_load) for m in self.moe_layers]
        batches = [self._to_device(next(self.train_data)) for _ in range(cfg.grad_accum)]
        weights = self._micro_weights(batches)
        for micro, (batch, weight) in enumerate(zip(batches, weights)):
            with self._sync_context(micro == cfg.grad_accum - 1), _autocast(env, cfg.precision):
                loss, metrics = self.loss_fn(self.model, batch)
            # DDP and FSDP average the gradients over the processes: hence * world_size
            scaled = loss * (weight * env.world_size)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float() * weight
            for k, v in metrics.items():
                v = torch.as_tensor(v, dtype=torch.float32, device=env.device).detach()
                metric_sums[k] = metric_sums.get(k, 0) + (v if k == "tokens" else v * weight)
            tokens += sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))  # DPO: chosen_, rejected_
            for total, m in zip(expert_load, self.moe_layers):
                total += m.expert_load
        if self.masters:
            for p, master in self.masters:
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.optim_params, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        # Loss and metrics: weighted sums over the ranks (the weights of all ranks sum to 1), tokens
        # summed: every rank takes the same decision below.
        keys = sorted(k for k in metric_sums if k != "tokens")
        stats = torch.stack([loss_sum, *(metric_sums[k] for k in keys)])
        stats = torch.cat([stats, torch.tensor([float(tokens)], device=env.device)])
        if env.distributed:
            dist.all_reduce(stats)
        loss_value, *metric_values, step_tokens = stats.tolist()
        step_tokens, grad_norm_value = int(step_tokens), grad_norm.item()
        finite = math.isfinite(loss_value) and (math.isfinite(grad_norm_value) or self.scaler is not None)
        row = {"step": self.step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value}
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if not cfg.skip_nonfinite:
                raise NonFiniteError(f"step {self.step + 1}: non-finite loss {loss_value} or gradient norm "
                                     f"{grad_norm_value}; stopping (set train.skip_nonfinite to skip such steps)")
            self.skipped += 1
            row["skipped"] = 1
        else:
            if self.scaler:
                self.scaler.step(self.optimizer)  # skipped if the gradients overflowed
                self.scaler.update()
                row["loss_scale"] = self.scaler.get_scale()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.masters:
                with torch.no_grad():
                    for p, master in self.masters:
                        p.copy_(master)
            if self.moe_layers and cfg.expert_bias_rate > 0:
                self._update_expert_bias(expert_load)
        self.step += 1
        self.tokens_seen += step_tokens
        row["tokens"] = self.tokens_seen
        row.update(zip(keys, metric_values))
        return row

    @torch.no_grad()
    def _update_expert_bias(self, expert_load: list[torch.Tensor]) -> None:
        """DeepSeek-V3's bias update from the load of the whole step (all micro-batches, all ranks)."""
        for total, m in zip(expert_load, self.moe_layers):
            if self.env.distributed:
                dist.all_reduce(total)
            m.expert_load.copy_(total)
            m.update_score_bias(self.cfg.expert_bias_rate)

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over every validation batch (weighed by the tokens trained on), its
        perplexity, bits per byte: loss / ln 2 / (bytes per token) (as in nanochat's evaluate_bpb),
        comparable across tokenizers, and the loss function's other metrics as `val_<name>`, averaged the
        same way (a preference stage's held-out reward accuracy, say). Or the stage's own val_fn's metrics."""
        self.model.eval()
        if self.val_fn is not None:
            with torch.no_grad():
                out = {"step": self.step, **self.val_fn(self.inner)}
            self.model.train()
            return out
        sums: dict[str, torch.Tensor] = {}
        batches = iter(self.val_data())
        while True:
            batch = next(batches, None)
            if self.env.distributed:
                # Every rank runs the same number of forwards (FSDP and DDP communicate in each): stop
                # as soon as one rank has no batch left.
                more = torch.tensor(float(batch is not None), device=self.env.device)
                dist.all_reduce(more, op=dist.ReduceOp.MIN)
                if not more.item():
                    break
            elif batch is None:
                break
            batch = self._to_device(batch)
            with _autocast(self.env, self.cfg.precision):
                loss, metrics = self.loss_fn(self.model, batch)
            weight = float(metrics.get("tokens", 1))
            cross_entropy = "ce" in metrics  # a language model's loss, whose exp is a perplexity
            values = {"loss": metrics.get("ce", loss), "weight": torch.ones(()),
                      **{k: v for k, v in metrics.items() if k not in ("ce", "tokens", "loss", "weight")}}
            for key, value in values.items():
                value = torch.as_tensor(value, dtype=torch.float64, device=self.env.device).detach() * weight
                sums[key] = sums.get(key, 0) + value
        keys = sorted(sums)  # the same on every rank: the same loss function
        totals = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, device=self.env.device)
        if self.env.distributed and keys:
            dist.all_reduce(totals)
        self.model.train()
        means = {k: (total / max(totals[keys.index("weight")].item(), 1)).item() for k, total in zip(keys, totals)}
        loss = means.get("loss", 0.0)
        out = {"step": self.step, "val_loss": loss}
        if keys and cross_entropy:
            out["val_ppl"] = math.exp(min(loss, 50.0))
        out.update({f"val_{k}": v for k, v in means.items() if k not in ("loss", "weight")})
        if self.bytes_per_token:
            out["val_bpb"] = loss / math.log(2) / self.bytes_per_token
        return out

    # -- checkpoints --------------------------------------------------------------------------------
    def _full_model(self) -> nn.Module | None:
        """The model with all weights on this process (rank 0); None on other ranks under FSDP."""
        if not self.fsdp:
            return self.inner
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        model = self._skeleton.to_empty(device="cpu")
        model.load_state_dict(full)
        return model

    def _write_weights(self, directory: Path) -> None:
        """The checkpoint's model directory (rank 0 writes it; under FSDP every rank takes part in gathering)."""
        model = self._full_model()
        if self.env.is_main:
            self.save_weights(model, directory)

    def state_dict(self) -> dict:
        """The run's counters, in trainer_state.json: the same on every rank (torch.amp agrees on overflows
        across them), with the fp16 grad scaler's state, keep_best's best step so far (its validation row) and
        the training seconds spent (a time budget counts them across resumes)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped": self.skipped,
                "precision": self.cfg.precision, "grad_scaler": self.scaler.state_dict() if self.scaler else None,
                "best": self.best, "train_seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        best, seconds = state.get("best"), state.get("train_seconds", 0.0)
        if best is not None and not (isinstance(best, dict) and isinstance(best.get("step"), int)
                                     and isinstance(best.get("val_loss"), (int, float))):
            raise ValueError("field 'best' should be null or a validation row with 'step' and 'val_loss'")
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError("field 'train_seconds' should be a non-negative number")
        self.step, self.tokens_seen, self.skipped = state["step"], state["tokens_seen"], state["skipped"]
        self.best, self.seconds_before = best, float(seconds)
        if self.scaler and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def seconds(self) -> float:
        """Training seconds of this run (so far) and of the runs it resumed."""
        return self.seconds_before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        resumed = self.checkpointer.resume(cfg.resume)
        self.started = time.perf_counter()
        budget = None if cfg.max_minutes is None else \
            TimeBudget(cfg.max_minutes, cfg.steps, self.seconds, time.perf_counter)
        log = MetricsLogger(self, resume_step=self.step if resumed else None, clock=time.perf_counter)
        if cfg.keep_best and env.is_main:
            prune_best(self.run_dir, self.best and self.best["step"])  # what a killed run wrote past its checkpoint
        history: list[dict] = []
        last_eval: dict[str, float] = {}
        last_saved = self.step if resumed else -1
        start_step = self.step
        validates = self.val_data is not None or self.val_fn is not None
        if budget is None:  # a budget's steps are known once it is fitted
            self._warn_if_repeating()
        warned = budget is None
        try:
            while self.step < self.planned:
                t0, tokens_before = time.perf_counter(), self.tokens_seen
                row = self.train_step()
                row["tokens_per_s"] = (self.tokens_seen - tokens_before) / max(time.perf_counter() - t0, 1e-9)
                if budget is not None:
                    self.planned = self._agree(budget.update(self.step))
                    if budget.fitted and not warned:
                        warned = self._warn_if_repeating(budget)
                history.append(row)
                log.train(row)
                if validates and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.planned:
                    last_eval = self._validate(log, budget)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.planned:
                    self._save()
                    last_saved = self.step
            if validates:
                last_eval = self._validate(log, budget)
            checkpoint = self._save() if last_saved != self.step else \
                self.run_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
            final, final_eval = self._point_final(checkpoint, last_eval)
        finally:
            log.close()
        curve = log.loss_curve() if env.is_main else None
        if env.is_main and self.step > start_step:
            self._summary(time.perf_counter() - self.started, self.step - start_step, final, final_eval, last_eval)
        return TrainResult(steps=self.step, run_dir=self.run_dir, model_dir=final,
                           val_loss=final_eval.get("val_loss"), val_bpb=final_eval.get("val_bpb"),
                           loss_curve=curve, skipped_steps=self.skipped, history=history, val=final_eval,
                           final_step=final_eval.get("step", self.step), last_val=last_eval)

    def _agree(self, steps: int) -> int:
        """The fewest of the processes' planned steps (their clocks differ), so that all stop together."""
        if not self.env.distributed:
            return steps
        value = torch.tensor(float(steps), device=self.env.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return int(value.item())

    def _warn_if_repeating(self, budget: TimeBudget | None = None) -> bool:
        """Warn (from rank 0) when the planned steps go over the training set more than once."""
        message = self.training_set and repeat_warning(self.planned, self.training_set, self.cfg.keep_best,
                                                       budget and self.cfg.max_minutes)
        if message and self.env.is_main:
            warn(message)
        return True

    def _validate(self, log: MetricsLogger, budget: TimeBudget | None) -> dict[str, float]:
        """Evaluate and log; with keep_best, keep the model when its validation loss is the lowest so far (the
        row records the best step so far). Its time is what a time budget keeps back for the final one."""
        started = time.perf_counter()
        row = self.evaluate()
        if self.cfg.keep_best:
            if "val_loss" not in row:
                raise OptionError(f"train.keep_best: this stage's validation gives no val_loss to choose the best "
                                  f"step by (it gives {', '.join(k for k in row if k != 'step')})")
            if math.isfinite(row["val_loss"]) and (self.best is None or row["val_loss"] < self.best["val_loss"]):
                self.best = dict(row)
                self.checkpointer.save_model(best_dir(self.run_dir, self.step))
                if self.env.is_main:
                    prune_best(self.run_dir, self.step)
            if self.best is not None:
                row.update(best_step=self.best["step"], best_val_loss=self.best["val_loss"])
        log.write(row)
        if budget is not None:
            budget.reserve = time.perf_counter() - started
        return row

    def _save(self) -> Path:
        checkpoint = self.checkpointer.save()
        if self.cfg.keep_best and self.env.is_main:  # best directories only older checkpoints named can go
            prune_best(self.run_dir, self.best and self.best["step"])
        return checkpoint

    def _point_final(self, checkpoint: Path, last_eval: dict) -> tuple[Path, dict]:
        """RUN_DIR/final -> the last checkpoint, or with keep_best the best step's model; RUN_DIR/final.json
        records which step that is, its validation and the last step's."""
        final, final_eval = checkpoint, last_eval
        if self.cfg.keep_best and self.best is not None:
            best = best_dir(self.run_dir, self.best["step"])
            if best.is_dir():
                final, final_eval = best, self.best
            elif self.env.is_main:
                warn(f"{best}: missing (removed?); final is the last step's model")
        if self.env.is_main:
            point_link_at(final)
            record = {"model": final.name, "step": final_eval.get("step", self.step), "last_step": self.step,
                      **{k: v for k, v in final_eval.items() if k.startswith("val_")},
                      **{f"last_{k}": v for k, v in last_eval.items() if k.startswith("val_")}}
            (self.run_dir / "final.json").write_text(json.dumps(record, indent=2))
        return final, final_eval

    def _summary(self, seconds: float, steps: int, final: Path, final_eval: dict, last_eval: dict) -> None:
        """`trained N steps in Ts -> DIR; val loss L, B bits/byte`, and with keep_best which step final is:
        `final = step 600 (best val loss 1.2340); last step 1000 had 1.3010`."""
        def loss_text(row: dict) -> str:
            return f"{row['val_loss']:.4f}" + (f", {row['val_bpb']:.4f} bits/byte" if "val_bpb" in row else "")

        summary = f"trained {steps} steps in {seconds:.1f}s -> {final}"
        if "val_loss" not in last_eval:
            pass
        elif not self.cfg.keep_best:
            summary += f"; val loss {loss_text(last_eval)}"
        elif final_eval["step"] == self.step:
            summary += f"\nfinal = step {self.step}, the last (best val loss {loss_text(final_eval)})"
        else:
            summary += (f"\nfinal = step {final_eval['step']} (best val loss {loss_text(final_eval)}); "
                        f"last step {self.step} had {loss_text(last_eval)}")
        print(summary)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks that FSDP shards, activation checkpointing recomputes and compile compiles one by
    one: a text model's, or a llava model's language model's (its vision tower goes with the root)."""
    text = getattr(model, "language_model", model)
    return list(getattr(getattr(text, "model", None), "layers", []))


def _checkpoint_block(block: nn.Module) -> None:
    """Recompute this block's activations in the backward pass instead of keeping them (Chen et al.
    2016, arXiv 1604.06174): one block's worth of activations at a time, for one extra forward."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed
