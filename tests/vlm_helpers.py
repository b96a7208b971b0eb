"""What the vision-language inference tests share: a random llava directory and random pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmforge.config import ModelConfig
from lmforge.model.llava import LlavaConfig, build_llava
from lmforge.model.vision import VisionConfig
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.vision.checkpoint import add_image_token, save_llava


def tiny_llava_dir(root: Path) -> Path:
    """A random llava directory: 16 px images in 8 px patches (4 image tokens each), a 2-layer text model, a
    tokenizer with <image> and the ChatML template."""
    corpus = root / "corpus.txt"
    corpus.write_text("What colour is the square? It is red. Where is the star? On the left.\n" * 50)
    train_tokenizer([str(corpus)], vocab_size=300, out_dir=root / "plain", show_progress=False)
    image_id = add_image_token(root / "plain", root / "tokenizer")
    tokenizer = Tokenizer.from_dir(root / "tokenizer")
    text = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4)
    model = build_llava(LlavaConfig(text=text, vision=vision, image_token_index=image_id), seed=0)
    with torch.no_grad():  # a random projector of std 0.02 would leave the images almost without effect
        model.multi_modal_projector.linear_2.weight.mul_(50)
    return save_llava(model, root / "llava", tokenizer_dir=root / "tokenizer")


def picture(seed: int, size: int = 20) -> Image.Image:
    """Random RGB noise, `size` pixels a side."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
