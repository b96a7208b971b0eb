"""Images in the Engine's requests (a LLaVA model: model/llava.py): what `Engine.submit` makes of a prompt's
images, and the embeddings its prefill runs from.

    prompt with one <image> per image --image_prompt--> the placeholders expanded (image_seq_length each),
        the images' pixel values (SigLIP's preprocessing, vision/image.py) and the prefix cache's key
    a prefill batch --prefill_embeds--> embed_tokens(ids), each image's features in place of its tokens

The key is what the prefix cache compares instead of the token ids: the same ids, each image token replaced by
a negative number derived from its image's pixels, so a cached prefix never crosses a different image.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from lmforge.model.llava import Llava, expand_image_tokens
from lmforge.vision.image import ImageProcessorConfig, preprocess

if TYPE_CHECKING:
    from PIL import Image

    from lmforge.infer.request import Request


def image_prompt(vision: Llava | None, image_config: ImageProcessorConfig | None, prompt: list[int],
                 images: list[Image.Image]) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """(the prompt with each placeholder repeated image_seq_length times, as LlavaProcessor expands it; the
    images' pixel values; the prefix cache's key): the key is the expanded prompt with the k-th token of an
    image replaced by -1 - (64 bits of the SHA-256 of its pixel values, shifted to stay below 2^62) - k,
    so a cached prefix is reused only for the same images at the same places (vLLM hashes an image's
    content into its blocks' keys the same way); negative, the key never equals a token id. A model without
    a vision tower, or a count of placeholders that is not the count of images, is a ValueError."""
    if vision is None:
        raise ValueError(f"this model has no vision tower: it cannot take images ({len(images)} given)")
    cfg = vision.config
    placeholders = prompt.count(cfg.image_token_index)
    if placeholders != len(images):
        raise ValueError(f"the prompt has {placeholders} image placeholders (token {cfg.image_token_index}, "
                         f"<image>) for {len(images)} images")
    pixel_values = preprocess(images, image_config) if images else None
    expanded = expand_image_tokens(prompt, cfg)
    key = list(expanded)
    at = [i for i, token in enumerate(expanded) if token == cfg.image_token_index]
    n = cfg.image_seq_length
    for k, pixels in enumerate(pixel_values if images else []):
        digest = int.from_bytes(hashlib.sha256(pixels.numpy().tobytes()).digest()[:8], "little") >> 2
        for j in range(n):
            key[at[k * n + j]] = -1 - digest - j
    return expanded, pixel_values, key


def prefill_embeds(vision: Llava, batch: list[Request], start: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings [len(batch), width, hidden] of a prefill of `ids` (row i: request i's prompt from
    start[i] on, right-padded), each image's features in place of its placeholder tokens. The whole image goes
    through the tower even where a cached prefix ends inside it: its features are computed together."""
    embeds = vision.language_model.model.embed_tokens(ids)
    token = vision.config.image_token_index
    for i, request in enumerate(batch):
        if request.pixel_values is None:
            continue
        features = vision.image_features(request.pixel_values.to(embeds.device))  # the tower casts to its dtype
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # [images x their tokens, hidden]
        at = torch.tensor([p for p, t in enumerate(request.prompt) if t == token], device=embeds.device)
        keep = at >= start[i]
        embeds[i, at[keep] - start[i]] = features[keep]
    return embeds


__all__ = ["image_prompt", "prefill_embeds"]
