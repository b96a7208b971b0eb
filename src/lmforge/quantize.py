"""`lmforge quantize`: weight-only int8 and int4 by round-to-nearest, after AWQ's scales with `--method awq`
(awq.py), written in the compressed-tensors format.

What is quantised: every linear layer of the blocks (attention and MLP projections, experts), as the usual
recipes do (llm-compressor's W8A16 / W4A16): not the embeddings, not lm_head, not an MoE router, which are small
and whose errors reach every token.

1. int8: one scale per output channel, symmetric: scale = max|w_row| / 127.5, q = clamp(round(w / scale), -128, 127).
   int4: one scale per group of `group_size` inputs of a row, symmetric: scale = max|w_group| / 7.5, q in [-8, 7].
   These are compressed-tensors' own formulas (calculate_qparams: amax / (range / 2)), so a weight quantised here
   and one quantised by that package are the same integers, and |w - q * scale| <= scale / 2 for every weight
   (scales keep the source's dtype: a bf16 one, rounded, can leave a group's largest weight 0.53 steps off).
2. The directory is a Hugging Face model directory whose config.json carries compressed-tensors'
   `quantization_config` (quant_method "compressed-tensors", format "pack-quantized", one config group of
   `Linear` targets, `ignore` naming the rest). Each quantised layer's `weight` becomes three tensors:
   `weight_packed` (int32 words, 32 / bits values each, the first in the lowest bits, each stored as q + 2^(bits-1)),
   `weight_scale` ([out, 1] per channel, [out, in / group_size] per group, the source dtype) and
   `weight_shape` ([out, in]). This is what llm-compressor writes for weight-only int8 and int4 (the package
   infers pack-quantized for both) and what vLLM's WNA16 kernels and transformers (through compressed-tensors)
   load; the tests read our directories with that package and read its directories with ours.
3. Loading (`load_quantized`, which checkpoint.load_model calls for such a directory) unpacks each layer once into
   int8 and builds the model with QuantLinear in its place (asymmetric weights too, llm-compressor's W4A16_ASYM:
   `weight_zero_point`, packed along the output dim, and w = (q - zero_point) * scale); the Engine, generate,
   chat, serve and eval then run it unchanged. On a CPU the Engine's C decoder (infer/cpu_decode.py) runs the
   QuantLinear layers of an fp32 model directly, int8 as held here and int4 repacked two a byte, with integer dot
   products on activations rounded to int8 per block of 32 and an int8 copy of the output matrix (BENCHMARKS.md,
   "Quantised decode against llama.cpp"); `forward` below runs everything else (prefills C does not take, GPUs,
   eval's scoring).

The matmul, measured (batch 1, the `small` preset's shapes, 2 threads, a 2-core AVX-512 machine shared with
other jobs: best of 20 runs of 50, microseconds; benchmarks/quantize.py measures the whole decode):

    out x in     activations   F.linear   int8pack_mm   int8: matmul, scale   int4pack_mm   int4: dequantize, matmul
    512 x 512    fp32              9.4        80.6              25.0              613.8              43.5
    512 x 1408   fp32             22.9      2032.3              75.5             4395.3            1092.7
    512 x 512    bf16             31.3         9.2              56.7                9.0             257.3
    128 x 512    bf16             20.4         4.5              35.5                4.8              49.5
    1408 x 512   bf16             56.4        21.7             287.3               19.6             734.8
    512 x 1408   bf16             59.3        20.4             294.4               20.8             741.7

PyTorch's packed CPU kernels (_weight_int8pack_mm; _weight_int4pack_mm_for_cpu on
_convert_weight_to_int4pack_for_cpu's layout) are vectorised for bf16 activations only: there they beat even fp32
F.linear, while on fp32 activations they lose to dequantizing. So QuantLinear rounds a few rows of activations to
bf16 for them (as llama.cpp rounds them to 8 bits for its q8_0 dot products), and above KERNEL_ROWS (a long
prompt's prefill, where the kernels lose to one fp32 matmul) dequantizes and runs F.linear in the activations' dtype.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from lmforge.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    TOKENIZER_FILES,
    CheckpointError,
    _from_disk,
    _shards,
    _skip,
    check_weights,
    load_model,
    read_shapes,
    to_disk_name,
    weight_files,
)
from lmforge.config import ModelConfig
from lmforge.files import atomic_directory_write, read_json
from lmforge.model import Transformer, build_model
from lmforge.settings import parse_args

SCHEMES = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)
# Tensors that replace a quantised layer's `weight` on disk (compressed-tensors' names).
# Up to this many rows (decode, short prompts) QuantLinear runs PyTorch's packed kernels; above, dequantize then
# matmul, which at 128 rows was 2x faster than them (1408 x 512, 2 threads).
KERNEL_ROWS = 16
PACKED_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


# -- 1. round to nearest ------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None,
                    scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale [out, 1] or [out, in / group_size]) with weight ~ q * scale, symmetric.
    The scale is rounded to `scale_dtype` (what the file stores) before q is computed from it."""
    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    if in_features % group:
        raise ValueError(f"group size {group} does not divide the layer's input width {in_features}")
    w = weight.detach().float().reshape(out_features, in_features // group, group)
    half_range = (2**bits - 1) / 2  # 127.5, 7.5
    scale = (w.abs().amax(dim=-1) / half_range).to(scale_dtype)
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale)  # an all-zero row or group
    q = torch.round(w / scale.float().unsqueeze(-1)).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.to(torch.int8).reshape(out_features, in_features), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                      zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """(q - zero_point) * scale, each scale (and zero point) over its row's in / scale.shape[1] consecutive inputs."""
    out_features, in_features = q.shape
    groups = scale.shape[1]
    w = q.reshape(out_features, groups, in_features // groups).to(dtype)
    if zero_point is not None:
        w = w - zero_point.to(dtype).unsqueeze(-1)
    return (w * scale.to(dtype).unsqueeze(-1)).reshape(out_features, in_features)


# -- 2. compressed-tensors' packing -------------------------------------------------------------

def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values in [-2^(bits-1), 2^(bits-1)) -> int32 words along the last dim, 32 / bits per word, value j
    of a word in bits [j * bits, (j + 1) * bits), each stored as q + 2^(bits-1) (compressed-tensors'
    pack_to_int32; a row is padded with zeros to whole words)."""
    per_word = 32 // bits
    rows, cols = q.shape
    unsigned = q.to(torch.int64) + 2 ** (bits - 1)
    unsigned = F.pad(unsigned, (0, -cols % per_word)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (unsigned << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, as signed


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack`: int32 words -> int8 [rows, cols]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    unsigned = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return (unsigned.reshape(packed.shape[0], -1)[:, : shape[1]] - 2 ** (bits - 1)).to(torch.int8)


def quantization_config(bits: int, group_size: int | None, ignore: list[str], symmetric: bool = True) -> dict:
    """config.json's `quantization_config`, as compressed-tensors' ModelCompressor.update_config writes it."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "channel" if group_size is None else "group", "group_size": group_size}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}}


# -- 3. the quantised layer ---------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A linear layer with int8 weights (int4 values held one per byte), float scales and, for asymmetric
    weights (which lmforge reads but does not write: llm-compressor's W4A16_ASYM), int8 zero points."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", symmetric: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.symmetric = symmetric
        groups = 1 if group_size is None else in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8,
                                                                  device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None,
                    scale_dtype: torch.dtype) -> QuantLinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        q, scale = quantize_weight(w, bits, group_size, scale_dtype)
        layer.qweight.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.weight_scale, dtype or self.weight_scale.dtype,
                                 None if self.symmetric else self.weight_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # the int8 kernel has no zero points; the int4 one has (`_int4pack`). The int8 one reads inputs whose width
        # is not a multiple of 16 wrongly (torch 2.13: errors of 9x to 10^5x the result at widths 200 and 264)
        kernel = (self.symmetric and self.in_features % 16 == 0) or self.group_size is not None
        if x.device.type == "cpu" and rows <= KERNEL_ROWS and kernel:
            y = self._packed_matmul(x.reshape(rows, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        elif self.group_size is None and self.symmetric:  # a row's scale commutes with the matmul: scale the outputs
            y = F.linear(x, self.qweight.to(x.dtype)) * self.weight_scale.to(x.dtype).squeeze(1)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's CPU weight-packed kernels, on bf16 activations (their fp32 paths are 3-60x slower: see the
        table). int8: the kernel with unit scales, then the fp32 per-row scales; int4: its own packed layout and
        bf16 scales, made once (`_int4pack`)."""
        if self.group_size is None:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self._unit_scales())
            return y.to(x.dtype) * self.weight_scale.to(x.dtype).squeeze(1)
        packed, scales_and_zeros = self._int4pack()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, self.group_size,
                                                          scales_and_zeros).to(x.dtype)

    def _unit_scales(self) -> torch.Tensor:
        if getattr(self, "_ones", None) is None or self._ones.shape[0] != self.out_features:
            self._ones = torch.ones(self.out_features, dtype=torch.bfloat16)
        return self._ones

    def _int4pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weights as _convert_weight_to_int4pack_for_cpu packs q + 8, [groups, out, 2] bf16 scales and
        zeros): its kernel computes w = (u - 8) * scale + zero = q * scale + zero, so zero = 0 is our symmetric
        q * scale and zero = -zero_point * scale the asymmetric (q - zero_point) * scale. Made at the first call
        after the weights change (their version counters say so)."""
        key = (self.qweight._version, self.weight_scale._version, self.qweight.data_ptr())
        if getattr(self, "_int4_key", None) != key:
            unsigned = (self.qweight.to(torch.int32) + 8).contiguous()
            scales = self.weight_scale.t().float()
            zeros = torch.zeros_like(scales) if self.symmetric else -self.weight_zero_point.t().float() * scales
            self._int4 = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1),
                          torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).contiguous())
            self._int4_key = key
        return self._int4

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                + ("per channel" if self.group_size is None else f"group_size={self.group_size}")
                + ("" if self.symmetric else ", asymmetric"))


def quantizable(model: Transformer) -> dict[str, nn.Linear]:
    """The linear layers of the blocks, by in-memory name, less MoE routers (`mlp.gate`, `shared_expert_gate`)."""
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and name.startswith("model.layers.")
            and not name.endswith((".mlp.gate", ".shared_expert_gate"))}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_model(model: Transformer, bits: int, group_size: int | None,
                   scale_dtype: torch.dtype = torch.float32) -> Transformer:
    """Replace every `quantizable` layer by its QuantLinear, in place; returns the model."""
    with torch.no_grad():
        for name, linear in quantizable(model).items():
            _replace(model, name, QuantLinear.from_linear(linear, bits, group_size, scale_dtype))
    return model


# -- 4. saving and loading ----------------------------------------------------------------------

def save_quantized(model: Transformer, source: Path, path: Path, note: dict | None = None) -> Path:
    """Write a quantised model as a compressed-tensors directory at `path` (atomically): config.json is
    `source`'s with `quantization_config` added; generation and tokenizer files are copied from `source`.
    `note` (how the weights were chosen: AWQ's calibration) goes in quantization_config["lmforge"], a key
    compressed-tensors' QuantizationConfig ignores (extra="ignore"), as do vLLM and transformers through it."""
    cfg = model.config
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    first = next(iter(layers.values()))
    tensors = {}
    for name, t in model.state_dict().items():  # in-memory names; on disk, the family's (to_disk_name)
        t = t.detach().contiguous().cpu()
        module, _, leaf = name.rpartition(".")
        prefix = to_disk_name(f"{module}.weight", cfg).removesuffix(".weight")
        if module in layers and leaf == "qweight":
            tensors[f"{prefix}.weight_packed"] = pack(t, layers[module].bits)
            tensors[f"{prefix}.weight_shape"] = torch.tensor(t.shape)
        elif module in layers and leaf == "weight_zero_point":  # packed along the output dim (packed_dim=0)
            tensors[f"{prefix}.{leaf}"] = pack(t.t(), layers[module].bits).t().contiguous()
        elif module in layers:  # weight_scale, bias
            tensors[f"{prefix}.{leaf}"] = t
        else:
            tensors[to_disk_name(name, cfg)] = t
    # `Linear` targets match every linear layer in the loaders (transformers, vLLM): name the ones left as they
    # were, as HF builds them (lm_head, tied or not; MoE routers, which lmforge holds as plain weights)
    kept = [name.removesuffix(".weight") for name, p in model.named_parameters()
            if name.startswith("model.layers.") and name.endswith(".weight") and p.dim() == 2
            and name.removesuffix(".weight") not in layers]
    ignore = ["lm_head", *sorted(to_disk_name(f"{n}.weight", cfg).removesuffix(".weight") for n in kept)]
    hf_config = read_json(source / "config.json", CheckpointError)
    hf_config["quantization_config"] = quantization_config(first.bits, first.group_size, ignore, first.symmetric)
    if note:
        hf_config["quantization_config"]["lmforge"] = note

    def write(tmp: Path):
        shards = _shards(tensors, DEFAULT_MAX_SHARD_BYTES)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)

    return atomic_directory_write(path, write)


def _scheme(qconfig: dict, config_file: Path) -> tuple[int, int | None, bool]:
    """(bits, group_size, symmetric) of a compressed-tensors quantization_config this loader reads, or a
    CheckpointError naming what it does not: one group of int weights, 4 or 8 bits, per channel or per group."""
    def unsupported(what: str) -> CheckpointError:
        return CheckpointError(f"{config_file}: quantization_config: {what} is not supported (lmforge reads "
                               "compressed-tensors pack-quantized int4/int8 weights, per channel or group)")

    if qconfig.get("quant_method") != "compressed-tensors":
        raise unsupported(f"quant_method {qconfig.get('quant_method')!r}")
    groups = list((qconfig.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise unsupported(f"{len(groups)} config groups")
    group = groups[0]
    weights = group.get("weights") or {}
    fmt = group.get("format") or qconfig.get("format")
    if fmt != "pack-quantized":
        raise unsupported(f"format {fmt!r}")
    if group.get("input_activations") or group.get("output_activations"):
        raise unsupported("activation quantization")
    if weights.get("type") != "int" or weights.get("num_bits") not in (4, 8):
        raise unsupported(f"weights {weights.get('type')} {weights.get('num_bits')} bits")
    if weights.get("strategy") not in ("channel", "group"):
        raise unsupported(f"strategy {weights.get('strategy')!r}")
    group_size = weights.get("group_size") if weights["strategy"] == "group" else None
    return weights["num_bits"], group_size, bool(weights.get("symmetric", True))


def load_quantized(path: Path, cfg: ModelConfig, qconfig: dict, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Transformer:
    """A compressed-tensors directory (see the module's docstring) as a Transformer with QuantLinear layers."""
    bits, group_size, symmetric = _scheme(qconfig, path / "config.json")
    shapes = read_shapes(weight_files(path))
    plain = {n: s for n, s in shapes.items() if n.rpartition(".")[2] not in PACKED_NAMES}
    packed = {n.removesuffix(".weight_packed"): file for n, (file, _) in shapes.items()
              if n.endswith(".weight_packed")}
    for prefix in packed:  # what each packed layer needs beside its weight_packed
        for leaf in ("weight_scale", "weight_shape") + (() if symmetric else ("weight_zero_point",)):
            if f"{prefix}.{leaf}" not in shapes:
                raise CheckpointError(f"{path}: '{prefix}.weight_packed' without '{prefix}.{leaf}'")
    layer_shapes = {}
    for prefix, file in packed.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            layer_shapes[prefix] = tuple(int(d) for d in f.get_tensor(f"{prefix}.weight_shape"))
        plain[f"{prefix}.weight"] = (file, layer_shapes[prefix])
    check_weights(cfg, plain, path)  # the skeleton's names and shapes, as for a plain checkpoint
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    names = {}
    for prefix, (out_features, in_features) in layer_shapes.items():
        name = next(_from_disk(f"{prefix}.weight", None, cfg))[0].removesuffix(".weight")
        linear = model.get_submodule(name)
        _replace(model, name, QuantLinear(in_features, out_features, bits, group_size, linear.bias is not None,
                                          dtype=dtype, device=device, symmetric=symmetric))
        names[prefix] = name
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for file in sorted({file for file, _ in shapes.values()}):
        with safe_open(str(file), framework="pt", device="cpu") as f, torch.no_grad():
            for disk_name in f.keys():
                prefix, _, leaf = disk_name.rpartition(".")
                if leaf == "weight_packed":
                    q = unpack(f.get_tensor(disk_name), bits, layer_shapes[prefix])
                    params[f"{names[prefix]}.qweight"].copy_(q)
                elif leaf == "weight_zero_point" and not symmetric:  # packed along the output dim
                    out_features = layer_shapes[prefix][0]
                    groups = f.get_tensor(disk_name).shape[1]
                    zero_point = unpack(f.get_tensor(disk_name).t().contiguous(), bits, (groups, out_features)).t()
                    params[f"{names[prefix]}.weight_zero_point"].copy_(zero_point)
                elif leaf == "weight_scale":
                    scale = f.get_tensor(disk_name)
                    target = params[f"{names[prefix]}.weight_scale"]
                    if scale.shape != target.shape:
                        raise CheckpointError(f"{file}: '{disk_name}' has shape {tuple(scale.shape)}, the "
                                              f"quantization_config implies {tuple(target.shape)}")
                    target.copy_(scale)
                elif leaf not in PACKED_NAMES and not _skip(disk_name, cfg):
                    for name, get in _from_disk(disk_name, lambda n=disk_name: f.get_tensor(n), cfg):
                        params[name].copy_(get())
    return model


# -- 5. the command -----------------------------------------------------------------------------

def quantize(model_dir: str | Path, scheme: str, out: str | Path, group_size: int = 128, method: str = "rtn",
             calibration: str = "builtin", calibration_samples: int = 32, calibration_seq_len: int = 512) -> Path:
    """Quantise the model directory `model_dir` with `scheme` (int8: per channel; int4: groups of `group_size`)
    and write the compressed-tensors directory `out`. `method` awq first searches AWQ's scales (and clipping) on
    `calibration_samples` rows of `calibration_seq_len` tokens of `calibration` (awq.py) and folds them into the
    fp weights, which are then rounded to nearest as with rtn: the directory's format is the same."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme '{scheme}': one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size}: one of {', '.join(map(str, GROUP_SIZES))}")
    if method not in ("rtn", "awq"):
        raise ValueError(f"unknown method '{method}': rtn or awq")
    source = Path(model_dir)
    if (source / "config.json").is_file() and "quantization_config" in read_json(source / "config.json"):
        raise ValueError(f"{source}: already quantised (its config.json has a quantization_config)")
    hf_config = read_json(source / "config.json")
    # the source's dtype stays: its unquantised tensors and the scales (as compressed-tensors keeps them)
    saved_dtype = DTYPES.get(hf_config.get("dtype") or hf_config.get("torch_dtype"), torch.float32)
    # AWQ searches and folds in fp32, then the model is cast back (its folded norms rounded as a bf16 model's are)
    model = load_model(source, dtype=torch.float32 if method == "awq" else saved_dtype)
    bits = SCHEMES[scheme]
    group = None if scheme == "int8" else group_size
    for name, linear in quantizable(model).items():
        if group is not None and linear.in_features % group:
            raise ValueError(f"group size {group} does not divide the input width {linear.in_features} of {name}")
    note = None
    if method == "awq":
        from lmforge.awq import apply_awq, calibration_tokens  # awq.py imports this module's quantiser
        from lmforge.tokenizer import Tokenizer

        tokens = calibration_tokens(Tokenizer.from_dir(source), calibration, calibration_samples,
                                    calibration_seq_len)
        apply_awq(model, tokens, bits, group)
        model.to(saved_dtype)
        note = {"method": "awq", "calibration": calibration, "calibration_tokens": list(tokens.shape)}
    quantize_model(model, bits, group, scale_dtype=saved_dtype)
    return save_quantized(model, source, Path(out), note)


@dataclass
class QuantizeConfig:
    model: str = field(default="", metadata={"help": "a Hugging Face model directory (fp32, bf16 or fp16)"})
    scheme: Literal["int8", "int4"] = field(default="int8", metadata={
        "help": "int8: one scale per output channel; int4: one per group of --group-size inputs"})
    group_size: int = field(default=128, metadata={"help": "int4's group: 32, 64 or 128"})
    method: Literal["rtn", "awq"] = field(default="rtn", metadata={
        "help": "rtn: round to nearest; awq: first fold activation-aware scales (and clipping) searched on "
                "--calibration text into the weights (AWQ, Lin et al. 2023), then round to nearest"})
    calibration: str = field(default="builtin", metadata={
        "help": "awq's text: a .txt/.jsonl/.parquet file, or builtin (the built-in Shakespeare less the 5% "
                "that prepare holds out for validation)"})
    calibration_samples: int = field(default=32, metadata={"help": "awq's calibration rows", "min": 1})
    calibration_seq_len: int = field(default=512, metadata={"help": "tokens per calibration row", "min": 2})
    out: str = field(default="", metadata={"help": "the directory to write"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(QuantizeConfig, argv, prog="lmforge quantize", description=__doc__.split("\n\n")[0])
    for name in ("model", "out"):
        if not getattr(args, name):
            print(f"lmforge quantize: error: --{name} is required", file=sys.stderr)
            return 2
    print(quantize(args.model, args.scheme, args.out, args.group_size, args.method, args.calibration,
                   args.calibration_samples, args.calibration_seq_len))
    return 0
