"""Shared pieces of the tests: a tiny model, a resumable stream of random token batches, a tiny corpus
(their fixtures are in conftest.py)."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.model import build_model

VOCAB = 96


def tiny_config(**overrides) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides):
    return build_model(tiny_config(**overrides), seed=seed)


class RandomBatches:
    """Batch i of the global stream is `global_batch` rows of seeded tokens with a learnable pattern
    (each row counts up from a random start, mod VOCAB); rank r of `world` takes rows r::world. `prompts`:
    each row's first 0..seq_len-1 labels are -100 (a different number per row), as SFT masks prompts, so
    rows, micro-batches and ranks train on unequal numbers of tokens."""

    def __init__(self, global_batch: int = 4, seq_len: int = 16, seed: int = 0, rank: int = 0, world: int = 1,
                 prompts: bool = False):
        self.global_batch, self.seq_len, self.seed, self.rank, self.world = global_batch, seq_len, seed, rank, world
        self.prompts = prompts
        self.index = 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        start = torch.randint(0, VOCAB, (self.global_batch, 1), generator=g)
        noise = torch.randint(0, 3, (self.global_batch, self.seq_len + 1), generator=g)
        tokens = (start + torch.arange(self.seq_len + 1) + noise) % VOCAB
        labels = tokens[:, 1:].clone()
        if self.prompts:
            masked = (index * self.global_batch + torch.arange(self.global_batch)) * 7 % self.seq_len
            labels[torch.arange(self.seq_len) < masked[:, None]] = -100
        return {"input_ids": tokens[self.rank::self.world, :-1], "labels": labels[self.rank::self.world]}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.index += 1
        return self.batch(self.index - 1)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def validation(self, batches: int = 2):
        """A fixed validation set (a seed the training stream never uses)."""
        def make():
            val = RandomBatches(self.global_batch, self.seq_len, self.seed + 7919, self.rank, self.world)
            return [val.batch(i) for i in range(batches)]
        return make


def make_corpus(directory, chars: int = 120_000):
    """A tokenizer (vocab 300) and pretraining shards from the first `chars` characters of Shakespeare."""
    from lmforge.data.formats import builtin_shakespeare
    from lmforge.data.pretrain import prepare
    from lmforge.tokenizer import train_tokenizer

    text_file = directory / "corpus.txt"
    text_file.write_text(builtin_shakespeare()[0].read_text(encoding="utf-8")[:chars], encoding="utf-8")
    train_tokenizer([str(text_file)], vocab_size=300, out_dir=directory / "tokenizer", show_progress=False)
    prepare(directory / "tokenizer", [str(text_file)], directory / "data", val_fraction=0.1, workers=1,
            piece_bytes=4096, show_progress=False)
    return directory / "tokenizer", directory / "data"


def memorize(model, ids: list[int], mask: list[int], steps: int, lr: float):
    """Train `model` on one tokenized chat's masked tokens (an assistant's turns) until it repeats them. One
    thread: these are module fixtures, set up before the one_thread fixture, and tiny steps lose to a second
    thread's waits on a shared machine."""
    import torch

    x, labels = torch.tensor([ids[:-1]]), torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x).logits[0], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
