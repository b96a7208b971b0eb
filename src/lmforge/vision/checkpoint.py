"""LLaVA model directories: Hugging Face's `llava` format, written and read.

    config.json                 model_type "llava": text_config, vision_config, image_token_index, ...
    model.safetensors           (or shards + index) with the Hub's llava names:
                                language_model.model.*, language_model.lm_head.weight (untied),
                                vision_tower.vision_model.*, multi_modal_projector.*
    generation_config.json
    tokenizer.json, tokenizer_config.json       with `<image>` as a special token (add_image_token)
    preprocessor_config.json    SiglipImageProcessor's settings (vision/image.py)
    processor_config.json       LlavaProcessor's: patch_size, image_token, vision_feature_select_strategy

`LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load such a directory.
Reading also accepts the other spellings transformers has written: `model.language_model.*` with a top-level
`lm_head.weight` (4.52 and later), `vision_tower.*` without `vision_model.` (5.x); SigLIP's pooling head
(`vision_use_head`), which LLaVA never uses, is skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import AddedToken

from lmforge.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointError,
    _disk_shapes,
    _dtype_name,
    _from_disk,
    _skip,
    copy_tokenizer,
    read_shapes,
    to_disk_name,
    weight_files,
    write_weights,
)
from lmforge.config import ModelConfigError
from lmforge.files import atomic_directory_write, read_json, recover_directory
from lmforge.model.llava import Llava, LlavaConfig, build_llava, llava_from_hf, llava_to_hf
from lmforge.tokenizer import Tokenizer
from lmforge.vision.image import ImageProcessorConfig

IMAGE_TOKEN = "<image>"
TEXT_PREFIX = "language_model."


def add_image_token(tokenizer_dir: str | Path, out_dir: str | Path) -> int:
    """Copy a tokenizer directory to `out_dir` with `<image>` added as a special token (kept if it is
    there already); returns its id, the model's image_token_index."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer.token_to_id(IMAGE_TOKEN) is None:
        tokenizer.backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer.save(out_dir)
    return tokenizer.token_to_id(IMAGE_TOKEN)


def processor_files(model: Llava) -> dict[str, dict]:
    """preprocessor_config.json and processor_config.json, which AutoProcessor reads."""
    cfg = model.config
    return {
        "preprocessor_config.json": {**ImageProcessorConfig(size=cfg.vision.image_size).to_hf(),
                                     "processor_class": "LlavaProcessor"},
        "processor_config.json": {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN,
                                  "patch_size": cfg.vision.patch_size, "num_additional_image_tokens": 0,
                                  "vision_feature_select_strategy": cfg.vision_feature_select_strategy},
    }


def save_llava(model: Llava, path: str | Path, *, tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               generation_config: dict | None = None) -> Path:
    """Write `model` as a `llava` model directory at `path`, atomically (as checkpoint.save_model). The
    tokenizer in `tokenizer_dir`, if given, must have `<image>` at the model's image_token_index."""
    cfg = model.config
    if tokenizer_dir is not None:
        image_id = Tokenizer.from_dir(tokenizer_dir).token_to_id(IMAGE_TOKEN)
        if image_id != cfg.image_token_index:
            raise CheckpointError(f"{tokenizer_dir}: {IMAGE_TOKEN} has id {image_id}, the model's "
                                  f"image_token_index is {cfg.image_token_index} (add_image_token adds it)")
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith(TEXT_PREFIX):
            name = TEXT_PREFIX + to_disk_name(name[len(TEXT_PREFIX):], cfg.text)
        t = t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
        tensors[name] = t.contiguous().cpu()
    saved_dtype = _dtype_name(dtype or model.language_model.model.embed_tokens.weight.dtype)
    hf_config = {**llava_to_hf(cfg), "dtype": saved_dtype, "torch_dtype": saved_dtype}
    text = cfg.text
    gen = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
           **(generation_config or {})}

    def write(tmp: Path):
        write_weights(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name, content in processor_files(model).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
            template = Tokenizer.from_dir(tokenizer_dir).chat_template
            if template:  # AutoProcessor's apply_chat_template reads the template from its own file
                (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")

    return atomic_directory_write(path, write)


def _our_name(disk_name: str, cfg: LlavaConfig) -> str | None:
    """A tensor's name in Llava from any of the spellings transformers has written; None: not used."""
    name = disk_name.removeprefix("model.")
    if name == "lm_head.weight":
        return TEXT_PREFIX + name
    if name.startswith(TEXT_PREFIX) and not name.startswith((TEXT_PREFIX + "model.", TEXT_PREFIX + "lm_head.")):
        name = TEXT_PREFIX + "model." + name[len(TEXT_PREFIX):]  # model.language_model.layers.0 ... (4.52+)
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name[len("vision_tower."):]  # transformers 5's SiglipVisionModel
    if name.startswith("vision_tower.vision_model.head."):
        return None  # SigLIP's attention-pooling head: LLaVA reads the patch features instead
    if name.startswith(TEXT_PREFIX) and _skip(name[len(TEXT_PREFIX):], cfg.text):
        return None
    return name


def _parts(disk_name: str, shape: tuple[int, ...], cfg: LlavaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(our name, shape) of each tensor one on-disk tensor holds (a fused experts tensor holds several)."""
    name = _our_name(disk_name, cfg)
    if name is None:
        return []
    if not name.startswith(TEXT_PREFIX):
        return [(name, shape)]
    return [(TEXT_PREFIX + n, s) for n, s in _disk_shapes(name[len(TEXT_PREFIX):], shape, cfg.text)]


def is_llava_dir(path: str | Path) -> bool:
    """Whether `path` is a model directory whose config.json says model_type "llava"."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = read_json(config_file, CheckpointError)
    return isinstance(config, dict) and config.get("model_type") == "llava"


def read_image_config(path: str | Path, model: Llava) -> ImageProcessorConfig:
    """The directory's preprocessor_config.json (SigLIP's image processor), or, where there is none, SigLIP's
    defaults at the vision tower's image size. A file that asks for what the processor does not do is an
    ImageError naming the field."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return ImageProcessorConfig(size=model.config.vision.image_size)
    image_config = ImageProcessorConfig.from_hf(read_json(file, CheckpointError))
    if image_config.size != model.config.vision.image_size:
        raise CheckpointError(f"{file}: size {image_config.size} is not the vision tower's image_size "
                              f"{model.config.vision.image_size}")
    return image_config


def load_llava(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Llava:
    """Load a `llava` model directory (whatever wrote it). The weights' names and shapes are checked
    against config.json before anything is allocated; an unexpected, missing or misshapen tensor is a
    CheckpointError naming it."""
    path = Path(path)
    recover_directory(path)
    config_file = path / "config.json"
    try:
        cfg = llava_from_hf(read_json(config_file, CheckpointError))
    except ModelConfigError as e:
        raise ModelConfigError(f"{config_file}: {e}") from None
    shapes = read_shapes(weight_files(path))
    _check_weights(cfg, shapes, path)
    model = build_llava(cfg, device=device, dtype=dtype, init=False)
    params = model.state_dict(keep_vars=True)
    for file in sorted({file for file, _ in shapes.values()}):
        with safe_open(str(file), framework="pt", device="cpu") as f, torch.no_grad():
            for disk_name in f.keys():
                name = _our_name(disk_name, cfg)
                if name is None:
                    continue
                if not name.startswith(TEXT_PREFIX):
                    params[name].copy_(f.get_tensor(disk_name))
                    continue
                for inner, get in _from_disk(name[len(TEXT_PREFIX):], lambda n=disk_name: f.get_tensor(n), cfg.text):
                    params[TEXT_PREFIX + inner].copy_(get())
    return model


def _check_weights(cfg: LlavaConfig, shapes: dict[str, tuple[Path, tuple[int, ...]]], path: Path) -> None:
    """That the weights hold exactly the tensors config.json implies, with its shapes (as
    checkpoint.check_weights): the layer counts first, so that a wrong config.json is named before even
    a skeleton of the model is built from it."""
    config_file = path / "config.json"
    names = [n for disk_name in shapes for n, _ in _parts(disk_name, shapes[disk_name][1], cfg)]
    for prefix, depth in (("language_model.model.layers.", cfg.text.num_hidden_layers),
                          ("vision_tower.vision_model.encoder.layers.", cfg.vision.num_hidden_layers)):
        found = {m.group(1) for n in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))}
        if depth > len(found):
            raise CheckpointError(f"{config_file}: {prefix}N: {depth} layers in config.json, {len(found)} in the "
                                  "weights")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llava(cfg).state_dict().items()}
    seen = set()
    for disk_name, (file, shape) in shapes.items():
        for name, part in _parts(disk_name, shape, cfg):
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor '{disk_name}' for this llava config")
            if part != expected[name]:
                raise CheckpointError(f"{file}: '{disk_name}' has shape {shape}, config.json implies {expected[name]}")
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
