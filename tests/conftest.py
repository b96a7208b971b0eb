"""Fixtures the tests share: a tiny corpus (tokenizer and pretraining shards), a model directory with its
tokenizer, arithmetic conversations, and one torch thread for tiny models (`one_thread`, which a module
asks for with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_corpus, tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def base_model(corpus, tmp_path_factory):
    """A tiny HF model dir with the corpus tokenizer (vocab 300) and its chat template."""
    from lmforge.checkpoint import save_model

    tokenizer, _ = corpus
    path = tmp_path_factory.mktemp("base") / "model"
    save_model(tiny_model(vocab_size=300, max_position_embeddings=128), path, tokenizer_dir=tokenizer)
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Arithmetic conversations in OpenAI's messages format, for SFT."""
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            a, b = rng.randrange(10), rng.randrange(10)
            messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}"},
                        {"role": "assistant", "content": str(a + b)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="session")
def tasks(tmp_path_factory):
    """The built-in arithmetic tasks, small: 24 training problems (their SFT, preference and RL files), 8 held out."""
    from lmforge.data.arithmetic import write_tasks

    out = tmp_path_factory.mktemp("tasks")
    write_tasks(out, train=24, test=8)
    return out


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine its waits dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
