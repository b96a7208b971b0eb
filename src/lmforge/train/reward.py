"""`lmforge reward`: a reward model trained on preference pairs (TRL's RewardTrainer), on the one Trainer.

    lmforge reward --config configs/reward_tiny.yaml [--center-rewards-coefficient 0.01 --method lora ...]

1. the model: an HF model directory, usually the SFT checkpoint: its body under a new scalar `score` head
   (its output layer left out; Ouyang et al. 2022, sec. 3.5), or a reward model to train on; a preset starts
   from random weights. What is trained is chosen as in `lmforge sft` (full, lora, dora, freeze); the head is
   always trained whole, also under LoRA (PEFT's modules_to_save, as TRL recommends)
2. the data: preference pairs as `lmforge dpo` reads them (data.preference), each rendered whole (prompt and
   reply) with the chat template, with an optional number `margin` (how much better the chosen reply is); a
   pair with a side longer than max_len is left out, as TRL filters it (cutting it would cut off the reply's
   end, where the score is read)
3. the objective, chosen and rejected as one batch of 2B in one forward:
       -log σ(r(chosen) - r(rejected) - margin)                      Bradley & Terry 1952, as in Ouyang et al.
       + center_rewards_coefficient * mean((r(chosen) + r(rejected))²)   Eisenstein et al. 2023, eq. 2
   The Bradley-Terry model says P(chosen ≻ rejected) = σ(r_c - r_r): the loss is its negative
   log-likelihood; rewards are only defined up to a constant, which the centering term pins near 0.
4. checkpoints: `<Family>ForSequenceClassification` directories (one label) that transformers'
   AutoModelForSequenceClassification loads and scores alike; under LoRA/DoRA, PEFT adapter directories
   (task SEQ_CLS) holding the head too.
Logged as TRL logs them: accuracy (the fraction of pairs ranked right; val_accuracy on held-out pairs),
margin (r_c - r_r), min_reward, mean_reward, max_reward.

Other commands and RL score with the trained model through `RewardScorer`:

    scorer = RewardScorer.load("runs/reward/final")
    scorer.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])  # -> [1.7]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from lmforge.checkpoint import CheckpointError, load_reward_model, model_from
from lmforge.config import load_config
from lmforge.data.formats import DataStats, Record, read_with
from lmforge.data.preference import PreferencePair, to_pair
from lmforge.data.sft import pad
from lmforge.files import read_json
from lmforge.model.lora import LoraConfig, apply_lora, load_adapter
from lmforge.model.reward import RewardModel
from lmforge.settings import check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.environment import setup_env
from lmforge.train.metrics import read_metrics
from lmforge.train.objectives import with_router_aux_loss
from lmforge.train.sft import FreezeConfig, freeze_except, index_batches, weights_saver
from lmforge.train.stage import EpochBatches, stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer, TrainResult

SIDES = ("chosen_input_ids", "rejected_input_ids")


@dataclass
class RewardConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}

    model: str = field(default="runs/sft/final", metadata={
        "help": "the HF model dir to start from: a causal LM (gets a new score head) or a reward model"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir (default: the model dir)"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "preference files (jsonl, parquet, globs); a record may give a number 'margin'"})
    val_data: list[str] = field(default_factory=list, metadata={"help": "held-out preference files"})
    val_fraction: float = field(default=0.0, metadata={
        "help": "without val_data: hold out this fraction of data's pairs (every k-th) for validation",
        "min": 0, "max": 0.5})
    center_rewards_coefficient: float | None = field(default=None, metadata={
        "help": "weight of mean((r_c + r_r)^2), which keeps rewards near 0 (Eisenstein et al. 2023; 0.01)",
        "min": 0})
    max_len: int = field(default=1024, metadata={"help": "tokens per prompt + reply (longer pairs are left out)",
                                                 "min": 2})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch per process", "min": 1})
    method: Literal["full", "lora", "dora", "freeze"] = field(default="full", metadata={
        "help": "what is trained besides the score head"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad records instead of stopping"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/reward", steps=200, eval_every=50, save_every=100,
        optim=OptimConfig(lr=1e-4, warmup_steps=0, weight_decay=0.0, schedule="linear", min_lr_ratio=0.0)))


# -- data ----------------------------------------------------------------------------------------------------

def to_scored_pair(record: Record) -> tuple[PreferencePair, float]:
    """(pair, margin) of one record: a preference pair (data.preference.to_pair) and its margin (0 if none)."""
    margin = record.get("margin", (int, float)) if "margin" in record.data else 0.0
    return to_pair(record), float(margin)


def read_samples(files: list[str], cfg: RewardConfig, tokenizer: Tokenizer, what: str) -> list[dict]:
    """The tokenized pairs of `files`: {"chosen_input_ids", "rejected_input_ids", "margin"}, each side the
    whole chat (prompt + reply) as the chat template renders it; pairs with a side over max_len left out."""
    stats, samples, too_long = DataStats(), [], 0
    for pair, margin in read_with(files, to_scored_pair, cfg.skip_bad, stats):
        # max_len + 1 tokens tell a side too long without tokenizing all of a huge one
        chosen, _ = tokenizer.encode_chat(pair.prompt + pair.chosen, max_tokens=cfg.max_len + 1)
        rejected, _ = tokenizer.encode_chat(pair.prompt + pair.rejected, max_tokens=cfg.max_len + 1)
        if max(len(chosen), len(rejected)) > cfg.max_len:
            too_long += 1
            continue
        samples.append({"chosen_input_ids": chosen, "rejected_input_ids": rejected, "margin": margin})
    if not samples:
        raise ValueError(f"{what}: no usable pair in {files} ({stats.summary()}; {too_long} longer than "
                         f"max_len {cfg.max_len})")
    if (stats.skipped or too_long) and setup_env(cfg.train.device).is_main:
        print(f"{what}: left out {too_long} pairs longer than max_len {cfg.max_len}; bad input: {stats.summary()}")
    return samples


def split_off(samples: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(training, held-out): every k-th pair held out, k = round(1 / fraction), so that held-out pairs come
    from all over the file, whatever its order."""
    every = round(1 / fraction)
    if len(samples) < every:
        raise ValueError(f"val_fraction: {fraction} holds out no pair of the {len(samples)} of data")
    return ([s for i, s in enumerate(samples) if i % every != every - 1],
            [s for i, s in enumerate(samples) if i % every == every - 1])


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """chosen_input_ids and rejected_input_ids [B, T], right-padded with `pad_id` to one length (so that they
    run as one batch of 2B), and margin [B]."""
    length = max(len(s[side]) for s in samples for side in SIDES)
    batch = {side: pad([s[side] for s in samples], pad_id, length) for side in SIDES}
    batch["margin"] = torch.tensor([s["margin"] for s in samples], dtype=torch.float32)
    return batch


def epoch_batches(samples: list[dict], cfg: RewardConfig, pad_id: int, rank: int, world_size: int, shuffle: bool):
    return index_batches(len(samples), cfg.batch_size, cfg.train.seed, shuffle, rank, world_size,
                         lambda indices: collate([samples[i] for i in indices], pad_id))


# -- the objective -------------------------------------------------------------------------------------------

def reward_loss(model, batch: dict[str, torch.Tensor], center_rewards_coefficient: float | None = None
                ) -> tuple[torch.Tensor, dict]:
    """The Bradley-Terry loss of a pair batch (see the module docstring), and TRL's metrics."""
    output = model(torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]))
    chosen, rejected = output.rewards.float().chunk(2)
    loss = -F.logsigmoid(chosen - rejected - batch["margin"]).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    rewards = output.rewards.detach().float()
    metrics = {"accuracy": (chosen > rejected).float().mean().detach(), "margin": (chosen - rejected).detach().mean(),
               "min_reward": rewards.min(), "mean_reward": rewards.mean(), "max_reward": rewards.max(),
               # The Trainer weighs validation batches by "tokens": here the pairs, so that val_accuracy is the
               # fraction of all held-out pairs ranked right, not a mean over batches of unequal sizes.
               "tokens": torch.tensor(chosen.shape[0])}
    return with_router_aux_loss(loss, output, model, metrics), metrics


# -- the model -----------------------------------------------------------------------------------------------

def build(cfg: RewardConfig, tokenizer: Tokenizer, device: torch.device) -> RewardModel:
    model = model_from(cfg.model, device=device, seed=cfg.train.seed, reward=True, vocab_size=tokenizer.vocab_size,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    # The score is read at the last token that is not the pad id: the batches' padding (TRL sets it so too),
    # saved in config.json for transformers to read the same token.
    model.config.pad_token_id = tokenizer.pad_id
    if cfg.method in ("lora", "dora"):
        # the new head trained whole beside the adapters, and saved with them (PEFT's modules_to_save)
        apply_lora(model, replace(cfg.lora, use_dora=cfg.method == "dora" or cfg.lora.use_dora,
                                  modules_to_save=sorted({*cfg.lora.modules_to_save, "score"})))
    elif cfg.method == "freeze":
        freeze_except(model, cfg.freeze.layers, [*cfg.freeze.modules, "score"])
    return model


# -- the stage -----------------------------------------------------------------------------------------------

def run(cfg: RewardConfig) -> TrainResult:
    check_ranges(cfg)
    if not cfg.data:
        raise ValueError("data: give one or more preference files")
    env = setup_env(cfg.train.device)
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model = build(cfg, tokenizer, env.device)
    samples = read_samples(cfg.data, cfg, tokenizer, "data")
    if cfg.val_data:
        val_samples = read_samples(cfg.val_data, cfg, tokenizer, "val_data")
    else:
        samples, val_samples = split_off(samples, cfg.val_fraction) if cfg.val_fraction else (samples, [])
    pad_id = tokenizer.pad_id
    train = EpochBatches(epoch_batches(samples, cfg, pad_id, env.rank, env.world_size, shuffle=True))
    val_data = None
    if val_samples:
        val_data = lambda: epoch_batches(val_samples, cfg, pad_id, env.rank, env.world_size, False)(0)
    base_dir = cfg.model if Path(cfg.model).is_dir() else None
    save_weights = weights_saver(cfg.method in ("lora", "dora"), base_dir, tokenizer_dir)
    trainer = Trainer(cfg.train, model, lambda m, batch: reward_loss(m, batch, cfg.center_rewards_coefficient),
                      train, val_data=val_data, save_weights=save_weights,
                      log_config={k: v for k, v in asdict(cfg).items() if k != "train"})
    result = trainer.fit()
    if val_samples and env.is_main:
        held_out = [row for row in read_metrics(result.run_dir / "metrics.jsonl") if "val_accuracy" in row][-1]
        print(f"held-out pair accuracy {held_out['val_accuracy']:.3f} ({len(val_samples)} pairs, step "
              f"{held_out['step']})")
    return result


# -- scoring -------------------------------------------------------------------------------------------------

class RewardScorer:
    """A trained reward model as a scoring function, for the commands that rank generations and for RL:

        scorer = RewardScorer.load("runs/reward/final")
        scorer.score(items) -> [float, ...]

    An item is a chat (its messages, prompt and reply), rendered with the chat template as training rendered
    the pairs, or a text, scored as its tokens (no template). Items run in batches of similar lengths, without
    gradients; padding does not change a score (model/reward.py), so each is what the model gives it alone."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        if model.config.pad_token_id is None:  # a downloaded reward model may have none; rows are padded with it
            model.config.pad_token_id = tokenizer.pad_id

    @classmethod
    def load(cls, path: str | Path, *, tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = 16) -> RewardScorer:
        """A reward model directory (what `lmforge reward` writes, or a downloaded one), or a PEFT adapter of
        one (its score head saved beside the adapters) on the base model its adapter_config.json names; and
        its tokenizer (the base model's, for an adapter)."""
        path = Path(path)
        if (path / "adapter_config.json").is_file():
            base = read_json(path / "adapter_config.json").get("base_model_name_or_path")
            if not isinstance(base, str) or not Path(base).is_dir():
                raise CheckpointError(f"{path / 'adapter_config.json'}: base_model_name_or_path {base!r:.60} is not "
                                      "a model directory")
            model = load_adapter(load_reward_model(base, dtype=dtype, device=device), path)
            return cls(model, Tokenizer.from_dir(tokenizer or base), batch_size)
        if load_config(path).num_labels is None:
            raise CheckpointError(f"{path}: a language model, not a reward model (lmforge reward trains one)")
        return cls(load_reward_model(path, dtype=dtype, device=device), Tokenizer.from_dir(tokenizer or path),
                   batch_size)

    def encode(self, item: str | list[dict]) -> list[int]:
        return self.tokenizer.encode(item) if isinstance(item, str) else self.tokenizer.encode_chat(item)[0]

    def score(self, items: list[str | list[dict]]) -> list[float]:
        return self.score_ids([self.encode(item) for item in items])

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        """The scores of prompt + completion: TRL's reward-function signature (train/rewards.py), so that a
        reward model serves wherever a reward function does. Chats (lists of messages) are joined into one
        chat, texts into one text."""
        for index, (prompt, completion) in enumerate(zip(prompts, completions)):
            if isinstance(prompt, str) != isinstance(completion, str):
                raise ValueError(f"completion {index}: a prompt and its completion should both be chats or both "
                                 "texts")
        return self.score([prompt + completion for prompt, completion in zip(prompts, completions)])

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]]) -> list[float]:
        """The score of each row of token ids."""
        for index, row in enumerate(rows):
            if not row:
                raise ValueError(f"item {index}: no tokens to score")
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: little padding
        scores = [0.0] * len(rows)
        device = self.model.score.weight.device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = pad([rows[i] for i in chunk], self.model.config.pad_token_id).to(device)
            for i, value in zip(chunk, self.model(batch).rewards.float().tolist()):
                scores[i] = value
        return scores


main = stage_main(RewardConfig, run, "lmforge reward",
                  "Reward modelling: a scalar score head trained on preference pairs (Bradley-Terry, TRL's loss).")
