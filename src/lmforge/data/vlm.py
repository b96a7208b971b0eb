"""Image chat samples for a LLaVA model: conversations with images -> token ids, pixel values and labels.

Two formats, detected per record:
    OpenAI    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}},
                                                         {"type": "text", "text": ...}]}, ...]}
              a content list's parts joined by newlines, each image part becoming the `<image>` placeholder
    LLaVA     {"image": PATH (or a list), "conversations": [{"from": "human", "value": "<image>\\nQUESTION"},
                                                           {"from": "gpt", "value": ANSWER}]}
              one `<image>` in the text per image, in order
URLs and paths are read by vision/image.read_image_url: data URLs, or files relative to the data file's folder.

A sample is the chat rendered by the tokenizer's chat template (`<image>` is one special token there), each
placeholder then repeated image_seq_length times (as LlavaProcessor expands it), and labels as data/sft.py
makes them: the token on the assistant's replies, -100 elsewhere, and -100 on every image token. Images are
held resized as RGB bytes and normalised batch by batch (vision/image.py), so the pixel values equal the HF
processor's. Bad records (a missing image, a placeholder count that is not the image count, ...) are
DataErrors naming the file and line, skipped and counted with skip_bad.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import torch

from lmforge.data.formats import Record, check_messages, read_with, to_messages
from lmforge.data.sft import IGNORE_INDEX, SFTStats, labels_from_mask, pad
from lmforge.tokenizer import Tokenizer
from lmforge.vision.image import ImageError, ImageProcessorConfig, normalise, read_image_url, resize

IMAGE_TOKEN = "<image>"


@dataclass
class ImageSample:
    input_ids: list[int]  # the placeholders expanded: image_seq_length image tokens per image
    labels: list[int]  # aligned with input_ids (data/sft.py); -100 off the replies and on image tokens
    images: list[np.ndarray]  # each image resized, RGB bytes [size, size, 3]


def image_conversation(record: Record) -> tuple[list[dict], list[str]]:
    """A record of either format as (messages with `<image>` placeholders in their text, the image URLs)."""
    data = record.data
    if "messages" in data:
        urls: list[str] = []
        messages = record.get("messages", list)
        flat = [{**m, "content": _content_text(record, m.get("content"), i, urls)} if isinstance(m, dict) else m
                for i, m in enumerate(messages)]
        return check_messages(record, flat), urls
    if "conversations" not in data:
        raise record.error(f"cannot tell the image chat format from the fields {sorted(data)}; expected "
                           "'messages' (OpenAI content parts) or 'conversations' with 'image' (LLaVA)")
    images = data.get("image", data.get("images", []))
    urls = [images] if isinstance(images, str) else images
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise record.error("field 'image' should be a path or a list of paths")
    return to_messages(record, "sharegpt"), urls


def _content_text(record: Record, content, index: int, urls: list[str]):
    """An OpenAI message's content as text: a string as it is, a list of parts joined by newlines with each
    image part as `<image>` (its URL appended to `urls`)."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise record.error(f"messages[{index}]: an image_url part without a url")
            texts.append(IMAGE_TOKEN)
            urls.append(url)
        else:
            raise record.error(f"messages[{index}]: a content part that is neither text nor image_url: "
                               f"{str(part)[:60]}")
    return "\n".join(texts)


def tokenize_image_chat(tokenizer: Tokenizer, messages: list[dict], image_token_index: int, image_seq_length: int,
                        max_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): the rendered chat with each placeholder expanded, cut to max_len."""
    ids, mask = tokenizer.encode_chat(messages)
    expanded_ids, expanded_mask = [], []
    for token, keep in zip(ids, mask):
        if token == image_token_index:
            expanded_ids += [token] * image_seq_length
            expanded_mask += [0] * image_seq_length  # an image token is input, never a target
        else:
            expanded_ids.append(token)
            expanded_mask.append(keep)
    truncated = len(expanded_ids) > max_len
    ids, mask = expanded_ids[:max_len], expanded_mask[:max_len]
    return ids, labels_from_mask(ids, mask), truncated


@dataclass
class ImageChatDataset:
    """ImageSamples from image chat files (JSONL/Parquet, globs), read lazily; `stats` as SFTDataset's.
    A sample cut by max_len is dropped if the cut leaves no reply token or falls inside an image's tokens."""

    files: list[str] | str
    tokenizer: Tokenizer
    image_token_index: int
    image_seq_length: int
    image_size: int
    max_len: int = 1024
    skip_bad: bool = False
    stats: SFTStats = field(default_factory=SFTStats)

    def __iter__(self) -> Iterator[ImageSample]:
        self.stats = SFTStats()
        processor = ImageProcessorConfig(size=self.image_size)
        resized: dict[str, np.ndarray] = {}  # by path: a caption and a question about one image share it

        def convert(record: Record) -> tuple[ImageSample | None, bool]:
            messages, urls = image_conversation(record)
            if not any(m["role"] == "assistant" for m in messages):
                raise record.error("conversation has no assistant reply")
            placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages if isinstance(m.get("content"), str))
            if placeholders != len(urls):
                raise record.error(f"{placeholders} {IMAGE_TOKEN} placeholders for {len(urls)} images")
            try:
                ids, labels, truncated = tokenize_image_chat(self.tokenizer, messages, self.image_token_index,
                                                             self.image_seq_length, self.max_len)
            except jinja2.TemplateError as e:
                raise record.error(f"the chat template cannot render this conversation: {e}") from None
            images_kept = ids.count(self.image_token_index)
            if all(label == IGNORE_INDEX for label in labels) or images_kept != len(urls) * self.image_seq_length:
                return None, truncated
            base = Path(record.path).parent
            images = []
            for url in urls:
                # Files are read once (a caption and a question about one image share it); data URLs each time.
                key = None if url.startswith("data:") else str(base / url.removeprefix("file://"))
                if key is None or key not in resized:
                    try:
                        image = resize(read_image_url(url, base_dir=base), processor)
                    except (ImageError, FileNotFoundError) as e:
                        raise record.error(f"image: {' '.join(str(e).split())}") from None
                    if key is None:
                        images.append(image)
                        continue
                    resized[key] = image
                images.append(resized[key])
            return ImageSample(ids, labels, images), truncated

        for sample, truncated in read_with(self.files, convert, self.skip_bad, self.stats):
            self.stats.truncated += truncated
            if sample is None:
                self.stats.dropped += 1
                continue
            yield sample


def collate_images(samples: list[ImageSample], pad_id: int, image_size: int) -> dict[str, torch.Tensor]:
    """A padded batch: input_ids, labels (aligned, as data/sft.collate) and pixel_values [images, 3, H, W], the
    images in the order of their placeholders (row by row), as Llava.embed fills them in; no pixel_values when
    no sample has an image."""
    batch = {"input_ids": pad([s.input_ids for s in samples], pad_id),
             "labels": pad([s.labels for s in samples], IGNORE_INDEX)}
    images = [image for s in samples for image in s.images]
    if images:
        batch["pixel_values"] = normalise(images, ImageProcessorConfig(size=image_size))
    return batch
