"""`lmforge dpo`: preference optimisation, DPO and its family (TRL's names and defaults), on the one Trainer.

    lmforge dpo --config configs/dpo_tiny.yaml [--loss-type sigmoid sft --loss-weights 1 0.2 --beta 0.1 ...]

1. the model: an HF model directory (usually an SFT checkpoint), trained whole, through a new LoRA/DoRA
   adapter, in chosen layers (as `lmforge sft`), or through an existing adapter (`--adapter DIR`) that
   training continues
2. the data: preference pairs, {"prompt", "chosen", "rejected"} or {"chosen", "rejected"} chats
   (data.preference); for `kto`, unpaired completions with a boolean `label` (desirable or not)
3. the reference: what the *starting* model gives every completion (its summed log-probabilities), computed
   once before training, without gradients, and kept in RUN_DIR/reference_logps.safetensors for a resumed
   run to read again. No reference model is held while training. The starting model is the reference in
   every case: a new LoRA/DoRA adapter starts as the identity (B = 0), so it is the base model; an existing
   adapter is part of the starting model, so the reference is the model *with* that adapter (not the bare
   base, which other tools take by disabling adapters)
4. the objective: `objectives.pair_loss` for each of `loss_type` (weighted by `loss_weights`), or
   `objectives.kto_loss`; chosen and rejected completions run as one batch of 2B in one forward.
Logged as TRL logs them: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (reward =
beta * log π/π_ref; reference-free losses: beta * the average log-probability), logps/chosen, logps/rejected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import model_from
from lmforge.data.formats import DataStats
from lmforge.data.preference import collate_pairs, read_kto, read_pairs, tokenize_completion, tokenize_pair
from lmforge.data.sft import IGNORE_INDEX, pad
from lmforge.model.lora import LoraConfig, load_adapter
from lmforge.settings import check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import resume_candidates
from lmforge.train.environment import setup_env
from lmforge.train.objectives import (
    DEFAULT_CHUNK,
    PAIR_LOSSES,
    kto_loss,
    pair_loss,
    sequence_logps,
    with_router_aux_loss,
)
from lmforge.train.sft import FreezeConfig, build, index_batches, weights_saver
from lmforge.train.stage import EpochBatches, stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer, TrainResult

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class DPOConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}

    model: str = field(default="runs/sft/final", metadata={"help": "the HF model directory to start from"})
    adapter: str | None = field(default=None, metadata={
        "help": "an existing LoRA/DoRA adapter of the model to train on (the reference is the model with it)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir (default: the model dir)"})
    data: list[str] = field(default_factory=list, metadata={"help": "preference files (jsonl, parquet, globs)"})
    val_data: list[str] = field(default_factory=list, metadata={"help": "held-out preference files"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "sigmoid | robust | ipo | hinge | sigmoid_norm | sft (combinable, with loss_weights); simpo, "
                "cpo, orpo (reference-free); kto (unpaired data, alone)"})
    loss_weights: list[float] = field(default_factory=list, metadata={"help": "one per loss_type (default 1 each)"})
    beta: float = field(default=0.1, metadata={"help": "the KL strength (IPO's tau, ORPO's lambda)", "min": 0})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "the chance a pair's labels are flipped (sigmoid: conservative DPO; robust)", "min": 0, "max": 0.49})
    simpo_gamma: float = field(default=0.5, metadata={"help": "simpo: the target reward margin"})
    desirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of desirable samples", "min": 0})
    undesirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of undesirable samples", "min": 0})
    max_len: int = field(default=1024, metadata={"help": "tokens per prompt + completion (longer are cut)", "min": 2})
    batch_size: int = field(default=4, metadata={"help": "pairs (kto: samples) per micro-batch per process",
                                                 "min": 1})
    method: Literal["full", "lora", "dora", "freeze"] = field(default="full", metadata={
        "help": "what is trained (with --adapter: that adapter)"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad records instead of stopping"})
    chunk_size: int = field(default=DEFAULT_CHUNK, metadata={"help": "tokens per chunk of the output layer",
                                                                        "min": 1})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/dpo", steps=200, eval_every=50, save_every=100,
        optim=OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0, schedule="linear", min_lr_ratio=0.0)))

    @property
    def kto(self) -> bool:
        return self.loss_type == ["kto"]

    @property
    def needs_reference(self) -> bool:
        return self.kto or any(PAIR_LOSSES[t] for t in self.loss_type)

    def validate(self) -> None:
        if "kto" in self.loss_type and not self.kto:
            raise ValueError("loss_type: kto trains on unpaired data and cannot be combined with other losses")
        unknown = [t for t in self.loss_type if t not in PAIR_LOSSES and t != "kto"]
        if unknown or not self.loss_type:
            raise ValueError(f"loss_type: {unknown[0] if unknown else 'none'} is not one of "
                             f"{', '.join([*PAIR_LOSSES, 'kto'])}")
        if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss types")
        if self.adapter and self.method not in ("lora", "dora", "full"):
            raise ValueError("adapter: an existing adapter is trained as it is; method freeze cannot apply")


# -- data ----------------------------------------------------------------------------------------------------

def read_samples(files: list[str], cfg: DPOConfig, tokenizer: Tokenizer, what: str) -> list[dict]:
    """The tokenized pairs (or, for kto, completions with the mismatched completion of the next sample, for
    KTO's reference point) of `files`; samples cut so far that a completion has no token left are dropped."""
    stats = DataStats()
    if cfg.kto:
        records = list(read_kto(files, cfg.skip_bad, stats))
        samples = []
        for i, record in enumerate(records):
            mismatched = records[(i + 1) % len(records)]  # TRL cycles completions by one within its batch
            own = tokenize_completion(tokenizer, record.prompt, record.completion, cfg.max_len)
            other = tokenize_completion(tokenizer, record.prompt, mismatched.completion, cfg.max_len)
            if own is not None and other is not None:
                samples.append({"input_ids": own[0], "labels": own[1], "kl_input_ids": other[0],
                                "kl_labels": other[1], "desirable": record.label})
    else:
        samples = [s for s in (tokenize_pair(tokenizer, p, cfg.max_len)
                               for p in read_pairs(files, cfg.skip_bad, stats)) if s is not None]
    if not samples:
        raise ValueError(f"{what}: no usable sample in {files} ({stats.summary()})")
    if stats.skipped and setup_env(cfg.train.device).is_main:
        print(f"{what}: skipped bad input: {stats.summary()}")
    return samples


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A pair batch (data.preference.collate_pairs), or a kto batch: input_ids/labels, kl_input_ids/kl_labels,
    desirable; with each sample's reference log-probabilities where they were computed."""
    if "desirable" in samples[0]:
        batch = {key: pad([s[key] for s in samples], IGNORE_INDEX if "labels" in key else pad_id)
                 for key in ("input_ids", "labels", "kl_input_ids", "kl_labels")}
        batch["desirable"] = torch.tensor([s["desirable"] for s in samples])
    else:
        batch = collate_pairs(samples, pad_id)
    for key in samples[0]:
        if key.startswith("ref_"):
            batch[key] = torch.tensor([s[key] for s in samples])
    return batch


def epoch_batches(samples: list[dict], cfg: DPOConfig, pad_id: int, rank: int, world_size: int, shuffle: bool):
    return index_batches(len(samples), cfg.batch_size, cfg.train.seed, shuffle, rank, world_size,
                         lambda indices: collate([samples[i] for i in indices], pad_id))


# -- the reference -------------------------------------------------------------------------------------------

def _scored(samples: list[dict]) -> list[tuple[str, str]]:
    """(input ids key, labels key) of each sequence a sample's reference log-probability is kept for."""
    if "desirable" in samples[0]:
        return [("input_ids", "labels"), ("kl_input_ids", "kl_labels")]
    return [("chosen_input_ids", "chosen_labels"), ("rejected_input_ids", "rejected_labels")]


@torch.no_grad()
def reference_logps(model: torch.nn.Module, samples: list[dict], cfg: DPOConfig, pad_id: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The model's summed log-probability of every scored sequence of every sample, {key: [N]}: each process
    scores every world_size-th sample, and the processes add up what they found (zeros elsewhere)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    found = {f"ref_{ids[:-len('input_ids')]}logps": torch.zeros(len(samples), dtype=torch.float64, device=device)
             for ids, _ in _scored(samples)}
    mine = list(range(rank, len(samples), world))
    for start in range(0, len(mine), 2 * cfg.batch_size):
        rows = mine[start:start + 2 * cfg.batch_size]
        for ids_key, labels_key in _scored(samples):
            ids = pad([samples[i][ids_key] for i in rows], pad_id).to(device)
            labels = pad([samples[i][labels_key] for i in rows], IGNORE_INDEX).to(device)
            sums, _, _ = sequence_logps(model, ids, labels, cfg.chunk_size)
            found[f"ref_{ids_key[:-len('input_ids')]}logps"][rows] = sums.double()
    if world > 1:
        for values in found.values():
            dist.all_reduce(values)
    model.train(was_training)
    return {key: values.float().cpu() for key, values in found.items()}


def attach_reference(model, samples: list[dict], cfg: DPOConfig, pad_id: int, env) -> None:
    """Give every sample its reference log-probabilities: read from RUN_DIR/reference_logps.safetensors when
    the run resumes (the model given is then no longer the starting one), else computed now and written."""
    path = Path(cfg.train.run_dir) / REFERENCE_FILE
    resuming = bool(resume_candidates(cfg.train.resume, Path(cfg.train.run_dir)))
    if resuming:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a resumed run reads the reference log-probabilities its "
                                    "start computed")
        found = load_file(str(path))
        if any(len(values) != len(samples) for values in found.values()):
            raise ValueError(f"{path}: computed for other data ({len(next(iter(found.values())))} samples, "
                             f"this run has {len(samples)})")
    else:
        found = reference_logps(model, samples, cfg, pad_id, env.device)
        if env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(found, str(path))
    for key, values in found.items():
        for sample, value in zip(samples, values.tolist()):
            sample[key] = value


# -- the objective -------------------------------------------------------------------------------------------

def preference_loss(model, batch: dict[str, torch.Tensor], cfg: DPOConfig) -> tuple[torch.Tensor, dict]:
    """The loss of a pair batch (see the module docstring) and TRL's metrics."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    sums, counts, output = sequence_logps(model, ids, labels, cfg.chunk_size)
    logps, lengths = sums.chunk(2), counts.chunk(2)
    ref = (batch["ref_chosen_logps"], batch["ref_rejected_logps"]) if "ref_chosen_logps" in batch else None
    weights = cfg.loss_weights or [1.0] * len(cfg.loss_type)
    loss = sum(weight * pair_loss(kind, logps, lengths, ref, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma).mean()
               for kind, weight in zip(cfg.loss_type, weights))
    if ref is not None:
        rewards = [cfg.beta * (logp - r).detach() for logp, r in zip(logps, ref)]
    else:  # reference-free losses reward the average log-probability (TRL's CPO/ORPO trainers)
        rewards = [cfg.beta * (logp / n.clamp(min=1)).detach() for logp, n in zip(logps, lengths)]
    metrics = {"rewards/chosen": rewards[0].mean(), "rewards/rejected": rewards[1].mean(),
               "rewards/margins": (rewards[0] - rewards[1]).mean(),
               "rewards/accuracies": (rewards[0] > rewards[1]).float().mean(),
               "logps/chosen": logps[0].detach().mean(), "logps/rejected": logps[1].detach().mean()}
    return with_router_aux_loss(loss, output, model, metrics), metrics


def kto_batch_loss(model, batch: dict[str, torch.Tensor], cfg: DPOConfig) -> tuple[torch.Tensor, dict]:
    """The loss of a KTO batch: the completions and their mismatched completions in one forward."""
    width = max(batch["input_ids"].shape[1], batch["kl_input_ids"].shape[1])
    ids = torch.cat([_widen(batch["input_ids"], width, 0), _widen(batch["kl_input_ids"], width, 0)])
    labels = torch.cat([_widen(batch["labels"], width, IGNORE_INDEX), _widen(batch["kl_labels"], width, IGNORE_INDEX)])
    sums, _, output = sequence_logps(model, ids, labels, cfg.chunk_size)
    logps, kl_logps = sums.chunk(2)
    desirable = batch["desirable"]
    losses, z = kto_loss(logps, batch["ref_logps"], kl_logps, batch["ref_kl_logps"], desirable, cfg.beta,
                         cfg.desirable_weight, cfg.undesirable_weight)
    rewards = cfg.beta * (logps - batch["ref_logps"]).detach()
    metrics = {"kl": z, "rewards/chosen": _mean_where(rewards, desirable),
               "rewards/rejected": _mean_where(rewards, ~desirable)}
    return with_router_aux_loss(losses.mean(), output, model, metrics), metrics


def _widen(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _mean_where(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


# -- the stage -----------------------------------------------------------------------------------------------

def build_model(cfg: DPOConfig, tokenizer: Tokenizer, device: torch.device):
    """The starting model: as `lmforge sft` builds it, or the base model with an existing adapter to train on."""
    if not cfg.adapter:
        return build(cfg, tokenizer, device)
    model = model_from(cfg.model, device=device)
    load_adapter(model, cfg.adapter)  # its LoRA weights trainable, the base frozen
    return model


def run(cfg: DPOConfig) -> TrainResult:
    check_ranges(cfg)
    cfg.validate()
    if not cfg.data:
        raise ValueError("data: give one or more preference files")
    env = setup_env(cfg.train.device)
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model = build_model(cfg, tokenizer, env.device)
    samples = read_samples(cfg.data, cfg, tokenizer, "data")
    val_samples = read_samples(cfg.val_data, cfg, tokenizer, "val_data") if cfg.val_data else []
    if cfg.needs_reference:
        attach_reference(model, samples + val_samples, cfg, tokenizer.pad_id, env)
    loss_fn = kto_batch_loss if cfg.kto else preference_loss
    train = EpochBatches(epoch_batches(samples, cfg, tokenizer.pad_id, env.rank, env.world_size, shuffle=True))
    val_data = None
    if val_samples:
        val_data = lambda: epoch_batches(val_samples, cfg, tokenizer.pad_id, env.rank, env.world_size, False)(0)
    adapters = bool(cfg.adapter) or cfg.method in ("lora", "dora")
    trainer = Trainer(cfg.train, model, lambda m, batch: loss_fn(m, batch, cfg), train, val_data=val_data,
                      save_weights=weights_saver(adapters, cfg.model, tokenizer_dir),
                      log_config={k: v for k, v in asdict(cfg).items() if k != "train"})
    return trainer.fit()


main = stage_main(DPOConfig, run, "lmforge dpo",
                  "Preference optimisation: DPO and its family (TRL's losses), or KTO on unpaired data.")
