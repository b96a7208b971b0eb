"""Checkpoints are Hugging Face model directories:

    config.json                     the family's own config (see config.to_hf)
    model.safetensors               or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json
    tokenizer.json, tokenizer_config.json, ...   copied when the model has a tokenizer

Parameter names are already the HF names, so saving and loading only translate where a
family's on-disk names differ from its in-memory ones: Mixtral's experts (w1/w3/w2 under
`block_sparse_moe`), and experts stored fused as 3-D tensors (`experts.gate_up_proj`).

A reward model (model/reward.py) is saved as `<Family>ForSequenceClassification` with one label, its head
`score.weight`, and no generation_config.json (transformers writes none for such a model); `load_model`
reads causal LMs only, `load_reward_model` reward models, or a causal LM's body under a new head.

Saves are atomic: everything is written to a temporary directory beside the target, which
then replaces the target by rename. A crash at any moment leaves the previous checkpoint
loadable (files.replace_directory, files.recover_directory).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.config import PRESETS, ModelConfig, architecture, load_config, preset, to_hf
from lmforge.files import atomic_directory_write, read_json, recover_directory
from lmforge.model import Transformer, build_model
from lmforge.model.reward import RewardModel

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config.json's names

# Mixtral's expert MLP names on disk, in the order (gate, up, down).
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the tensor."""


# -- names on disk <-> names in memory ----------------------------------------------------------

def to_disk_name(name: str, cfg: ModelConfig) -> str:
    """A parameter's name in a saved file (the in-memory name, except Mixtral's experts)."""
    if cfg.model_type == "mixtral" and ".mlp." in name:
        name = name.replace(".mlp.", ".block_sparse_moe.")
        name = re.sub(r"\.(gate_proj|up_proj|down_proj)\.", lambda m: f".{_MIXTRAL[m.group(1)]}.", name)
    return name


def _from_disk(name: str, tensor_fn, cfg: ModelConfig):
    """Yield (in-memory name, tensor loader) pairs for one on-disk tensor."""
    if cfg.model_type == "mixtral" and ".block_sparse_moe." in name:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        for ours, theirs in _MIXTRAL.items():
            name = name.replace(f".{theirs}.", f".{ours}.")
    fused = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
    if fused is None:
        yield name, tensor_fn
        return
    # Experts stored as one [E, ...] tensor (transformers' in-memory layout): split per expert.
    prefix, kind = fused.groups()
    full = tensor_fn()
    for e in range(full.shape[0]):
        if kind == "down_proj":
            yield f"{prefix}.{e}.down_proj.weight", (lambda t=full[e]: t)
        else:
            gate, up = full[e].chunk(2, dim=0)
            yield f"{prefix}.{e}.gate_proj.weight", (lambda t=gate: t)
            yield f"{prefix}.{e}.up_proj.weight", (lambda t=up: t)


def _disk_shapes(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The (in-memory name, shape) pairs `_from_disk` makes of an on-disk tensor of this shape."""
    fused = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
    if fused is None or len(shape) != 3:
        return [(next(_from_disk(name, None, cfg))[0], shape)]
    prefix, kind = fused.groups()
    if kind == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", shape[1:]) for e in range(shape[0])]
    half = (shape[1] // 2, shape[2])
    return [(f"{prefix}.{e}.{part}.weight", half) for e in range(shape[0]) for part in ("gate_proj", "up_proj")]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# -- saving -------------------------------------------------------------------------------------

def state_dict_for_saving(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[to_disk_name(name, cfg)] = t.contiguous().cpu()
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current]


def save_model(model: Transformer, path: str | Path, *, tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               generation_config: dict | None = None) -> Path:
    """Write `model` as a Hugging Face model directory at `path`, atomically.

    dtype: cast floating weights on the way out (default: as they are in memory).
    tokenizer_dir: a directory whose tokenizer files are copied beside the weights.
    """
    cfg = model.config
    tensors = state_dict_for_saving(model, dtype)
    saved_dtype = dtype or model.model.embed_tokens.weight.dtype
    hf_config = {**to_hf(cfg), "dtype": _dtype_name(saved_dtype), "torch_dtype": _dtype_name(saved_dtype)}
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
           **(generation_config or {})}

    def write(tmp: Path):
        write_weights(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if not cfg.num_labels:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)

    return atomic_directory_write(path, write)


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most max_shard_bytes and their index, as transformers writes them."""
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer(tokenizer_dir: str | Path, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, directory / name)


# -- loading ------------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Each tensor's file and shape, from the safetensors headers alone: no tensor is read. A truncated
    or malformed file is an error naming it (safetensors checks that the data covers the header)."""
    shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the index but missing")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    shapes[name] = (file, tuple(f.get_slice(name).get_shape()))
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return shapes


# Sizes in config.json that are dimensions of some weight (of MoE and MLA models only, the second and third):
# none can exceed the weights' largest dimension.
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
_MOE_SIZE_FIELDS = ("moe_intermediate_size", "shared_expert_intermediate_size", "num_experts")
_MLA_SIZE_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def check_weights(cfg: ModelConfig, shapes: dict[str, tuple[Path, tuple[int, ...]]], path: Path,
                  new: tuple[str, ...] = ()) -> None:
    """That the weights' headers hold exactly the tensors config.json implies, with its shapes, before any
    memory is allocated: a config.json that is wrong (`hidden_size: 1e9`, one layer too many) is named
    rather than ending in an allocator error, or in a model built around the wrong sizes. `new`: tensors the
    caller initialises itself (a new reward head), which the files need not hold."""
    config_file = path / "config.json"
    largest = max((max(shape, default=1) for _, shape in shapes.values()), default=0)
    fields = _SIZE_FIELDS + (_MOE_SIZE_FIELDS if cfg.num_experts else ()) + (_MLA_SIZE_FIELDS if cfg.is_mla else ()) \
        + (("intermediate_size",) if cfg.has_dense_layers else ())
    for field in fields:  # first, bounds that keep building the skeleton below cheap
        value = getattr(cfg, field)
        if value is not None and value > largest:
            raise CheckpointError(f"{config_file}: {field} {value} exceeds every dimension of the weights "
                                  f"(the largest is {largest})")
    layers = 1 + max((int(m.group(1)) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n))), default=-1)
    if cfg.num_hidden_layers > layers:
        raise CheckpointError(f"{config_file}: num_hidden_layers {cfg.num_hidden_layers}, but the weights hold "
                              f"{layers} layers")
    experts = max([1 + int(m.group(1)) for n in shapes if (m := re.search(r"\.experts\.(\d+)\.", n))]
                  + [shape[0] for n, (_, shape) in shapes.items() if re.search(r"\.experts\.gate_up_proj$", n)],
                  default=0)
    if cfg.num_experts > experts:
        raise CheckpointError(f"{config_file}: num_experts {cfg.num_experts}, but the weights hold {experts} experts")
    with torch.device("meta"):  # no memory: only the names and shapes
        model_class = RewardModel if cfg.num_labels else Transformer
        expected = {name: tuple(t.shape) for name, t in model_class(cfg).state_dict().items()}
    found: set[str] = set()
    for disk_name, (file, shape) in shapes.items():
        if _skip(disk_name, cfg):
            continue
        for name, part in _disk_shapes(disk_name, shape, cfg):
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor '{disk_name}' for a {cfg.model_type} model "
                                      f"with this config")
            if part != expected[name]:
                raise CheckpointError(f"{file}: '{disk_name}' has shape {shape}, {config_file.name} implies "
                                      f"{expected[name]}")
            found.add(name)
    missing = sorted(set(expected) - found - set(new))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               linear_hook: Callable[[nn.Linear], nn.Module] | None = None) -> Transformer:
    """Load any supported HF causal LM directory (whatever wrote it; sharded or not; fp32/bf16/fp16). The config
    and the weights' headers are checked against each other before anything is allocated (`check_weights`).
    `linear_hook`: each linear layer of the blocks is built alone from its file tensor and replaced by what
    the hook makes of it (QLoRA's NF4Linear), so the full-precision weights are never all in memory at once."""
    path = Path(path)
    recover_directory(path)
    cfg = load_config(path)
    if cfg.num_labels:
        raise CheckpointError(f"{path}: a reward model ({architecture(cfg)}), not a language model; "
                              "load_reward_model loads it")
    quantization = read_json(path / "config.json", CheckpointError).get("quantization_config")
    if quantization is not None:  # packed integer weights (compressed-tensors): quantize.py reads them
        from lmforge.quantize import load_quantized

        return load_quantized(path, cfg, quantization, dtype=dtype, device=device)
    shapes = read_shapes(weight_files(path))
    check_weights(cfg, shapes, path)
    if linear_hook is not None:
        return _load_by_layer(cfg, shapes, dtype, device, linear_hook)
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    _copy_weights(model, shapes)
    return model


def _load_by_layer(cfg: ModelConfig, shapes: dict, dtype: torch.dtype, device, hook) -> Transformer:
    """load_model with `linear_hook`: the blocks' linear layers are left weightless when the model is allocated,
    and each gets its weight (from the file, in `dtype`) only to be handed to the hook, which replaces it."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    pending = {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and type(m) is nn.Linear}
    for linear in pending.values():
        del linear.weight
        linear.register_parameter("weight", None)
    model = model.to_empty(device=device)
    for name, b in model.named_buffers():
        if name.endswith("expert_load") or name.endswith("e_score_correction_bias"):
            b.zero_()
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, get in _file_tensors(shapes, cfg):
        module = name.removesuffix(".weight")
        with torch.no_grad():
            if module in pending:
                linear = pending.pop(module)
                linear.weight = nn.Parameter(get().to(device, dtype), requires_grad=False)
                parent, child = module.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, hook(linear))
                linear.weight = None  # the hook's module holds what it needs of it
            else:
                params[name].copy_(get())
    return model


def load_reward_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      seed: int | None = 0) -> RewardModel:
    """A reward model directory (`<Family>ForSequenceClassification`, one label), or a causal LM directory
    whose body starts a new reward model (TRL's usual start: the SFT model): its output layer is left out and
    the `score` head drawn with `seed` (RewardModel.init_score), as AutoModelForSequenceClassification does."""
    path = Path(path)
    recover_directory(path)
    cfg = load_config(path)
    new_head = cfg.num_labels is None
    cfg = replace(cfg, num_labels=1)
    shapes = read_shapes(weight_files(path))
    check_weights(cfg, shapes, path, new=("score.weight",) if new_head else ())
    model = build_model(cfg, device=device, dtype=dtype, init=False, model_class=RewardModel)
    _copy_weights(model, shapes)
    if new_head:
        model.init_score(seed)
    return model


def _copy_weights(model: Transformer, shapes: dict[str, tuple[Path, tuple[int, ...]]]) -> None:
    """Fill a model built with init=False from the checked files (`shapes`, from read_shapes)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for name, get in _file_tensors(shapes, model.config):
        with torch.no_grad():
            params[name].copy_(get())


def _file_tensors(shapes: dict[str, tuple[Path, tuple[int, ...]]], cfg: ModelConfig):
    """(in-memory name, loader) of every tensor the checked files hold that the model uses, file by file; a
    loader reads its tensor only when called, while its file is open."""
    for file in sorted({file for file, _ in shapes.values()}):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for disk_name in f.keys():
                if not _skip(disk_name, cfg):
                    yield from _from_disk(disk_name, lambda n=disk_name: f.get_tensor(n), cfg)


def model_from(name: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int | None = 0, reward: bool = False, **preset_overrides) -> Transformer:
    """What a command's `--model` names: a model directory's weights (`load_model`), or a preset (`tiny`,
    `small`, ...) freshly initialised with `seed`, its config given `preset_overrides` (the vocabulary of the
    tokenizer it will use, its token ids). A directory of that name wins over a preset. `reward`: a
    RewardModel instead (`load_reward_model`, or the preset with a score head)."""
    if Path(name).is_dir():
        if reward:
            return load_reward_model(name, dtype=dtype, device=device, seed=seed)
        return load_model(name, dtype=dtype, device=device)
    if str(name) in PRESETS:
        cfg = preset(str(name), **preset_overrides, **({"num_labels": 1} if reward else {}))
        return build_model(cfg, device=device, dtype=dtype, seed=seed,
                           model_class=RewardModel if reward else Transformer)
    raise FileNotFoundError(f"model: '{name}' is neither a model directory nor a preset ({', '.join(PRESETS)})")


def _skip(name: str, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that this model does not use."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if name == "lm_head.weight" and (cfg.tie_word_embeddings or cfg.num_labels):  # a reward model has no lm_head
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    # DeepSeek-V3 ships its multi-token-prediction module as extra layers past num_hidden_layers.
    return bool(m and int(m.group(1)) >= cfg.num_hidden_layers)
