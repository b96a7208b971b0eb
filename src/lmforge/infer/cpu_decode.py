"""Decode steps in C on a CPU (cpu_decode.c): the Engine's fast path for dense Llama-family models.

A decode step feeds each running sequence one token. Through PyTorch that is ~60 matrix-vector
products and ~150 small ops per token for the `small` preset, each a dispatch of microseconds;
`CPUDecoder` runs the whole step — embedding, every layer with its KV-cache writes and attention,
final norm, output projection — as one C call, one job for the C file's own thread pool
(BENCHMARKS.md has the speed-up). The same call prefills: many tokens, each with its own cache
row and position, logits only for the tokens asked for. The Engine uses that where it is as fast
as PyTorch's matmuls (`CPUDecoder.prefills`: fp32 with AVX-512, bf16 with AVX512-BF16, quantised
with AVX512-VNNI), which also leaves no OpenMP threads spinning on the cores the next decode step
needs.

A quantised model (`lmforge quantize`: quantize.QuantLinear projections, int8 per channel or int4
per group, symmetric or not) decodes here too, its weights read as they are stored: int8 as the
QuantLinear holds them, int4 repacked two a byte when the decoder is made (`_quantized`). The
activations are rounded to int8 per block of 32 for integer dot products (llama.cpp's q8_0 way), and
the output matrix (the tied embedding, which `quantize` keeps in full precision) gets an int8 copy,
one scale per row: the logits differ from the PyTorch forward's by those roundings, about 1% of the
largest (tests/test_cpu_decode_quant.py bounds them), for a quarter of the bytes read per token.

`CPUDecoder.create(model)` returns None — and the Engine keeps PyTorch's forward — when the model
or the machine does not fit (`unsupported` names why): not on the CPU, weights not all fp32 or all
bf16, MoE or MLA layers, biases, QK-norm, LoRA-wrapped projections, quantised projections in a bf16
model or beside plain ones, no C compiler, LMFORGE_CPU_KERNELS=0, or a CPU with neither AVX2 nor
AVX-512, where the C step was never measured faster than PyTorch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from lmforge.model import cpu_kernels
from lmforge.model.attention import Attention, KVCache
from lmforge.model.moe import MLP
from lmforge.model.rope import rope_cos_sin
from lmforge.model.transformer import Transformer
from lmforge.quantize import QuantLinear, quantize_weight

_SOURCE = Path(__file__).with_name("cpu_decode.c")
# Contracting a*b + c into one FMA is welcome here (dot products, no bit-exactness goal); its own
# thread pool (pthreads), OpenMP only for `omp simd`.
_FLAGS = [f for f in cpu_kernels.FLAGS if f not in ("-ffp-contract=off", "-fopenmp")] + [
    "-ffp-contract=fast", "-mprefer-vector-width=512", "-fopenmp-simd", "-pthread"]

# The interface with cpu_decode.c, whose decode_layout() returns the same string: checked when the
# library is loaded, so a change made on one side only is an error there, not wrong pointers in C.
# The pointer table is MODEL_SLOTS, then LAYER_SLOTS for each layer; `dims` one long per DIMS name.
# ABI is the C file's DECODE_ABI: bump both when an exported function's arguments change (ARGTYPES).
# A quantised matrix's slot points to a QMat: QMAT_FIELDS, 8 bytes each (`_quantized`).
ABI = 3
MODEL_SLOTS = ("embed", "norm", "head")
LAYER_WEIGHTS = ("in_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down")
LAYER_SLOTS = (*LAYER_WEIGHTS, "k_cache", "v_cache")  # a layer's two KV-cache buffers after its weights
DIMS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab", "max_len", "window")
QMAT_FIELDS = ("w", "scale", "offset", "group", "bits")
LAYOUT = (f"abi {ABI}; model: {' '.join(MODEL_SLOTS)}; layer: {' '.join(LAYER_SLOTS)}; dims: {' '.join(DIMS)}; "
          f"qmat: {' '.join(QMAT_FIELDS)}")
# decode_step's `kind`: the weights' type
FP32, BF16, QUANTIZED = 0, 1, 2
_p, _L, _f, _i = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
ARGTYPES = {  # name: (argument types, result type)
    "decode_step": ([_p, _p, _f, _f, _p, _p, _p, _L, _p, _p, _p, _L, _p, _p, _i, _i], None),
    "scratch_floats": ([_p, _L, _i], _L),
    "vector_isa": ([], _i),
    "fast_matvec": ([_i], _i),
    "bad_input": ([_L, _p, _L, _p, _L, _p, _L], _i),
}


def _declare(lib: ctypes.CDLL) -> None:
    """Check the library's layout against LAYOUT (raising on a difference), then declare ARGTYPES."""
    lib.decode_layout.argtypes, lib.decode_layout.restype = [], ctypes.c_char_p
    layout = lib.decode_layout().decode()
    if layout != LAYOUT:
        raise RuntimeError(f"{_SOURCE.name} and {Path(__file__).name} disagree on their interface: the C file "
                           f"has '{layout}', the Python file expects '{LAYOUT}'")
    for name, (argtypes, restype) in ARGTYPES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype


def _library() -> ctypes.CDLL | None:
    return cpu_kernels.load(_SOURCE, _FLAGS, _declare, "C decode")


def unsupported(model: Transformer) -> str | None:
    """Why `model` cannot decode in C (None if it can)."""
    cfg = model.config
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        return "not on the CPU"
    if params[0].dtype not in cpu_kernels.SUFFIX or any(p.dtype != params[0].dtype for p in params):
        return "weights are not all fp32 or all bf16"
    if cfg.is_mla or any(layer.is_moe for layer in model.model.layers):
        return "MLA or MoE layers"
    if cfg.qk_norm or cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias:
        return "QK-norm or biases"
    kinds = set()
    for layer in model.model.layers:
        if not isinstance(layer.self_attn, Attention) or not isinstance(layer.mlp, MLP):
            return "a layer of another kind"
        projections = _projections(layer)
        kinds |= {type(m) for m in projections}
        if any(type(m) not in (nn.Linear, QuantLinear) for m in projections):
            return "wrapped (LoRA) projections"
    if any(not p.is_contiguous() for p in params):
        return "non-contiguous weights"
    if QuantLinear in kinds:
        if len(kinds) > 1:
            return "quantised projections beside plain ones"
        if params[0].dtype != torch.float32:
            return "quantised projections in a model that is not fp32"
        if any(m.bits == 4 and m.in_features % 32 for layer in model.model.layers for m in _projections(layer)):
            return "int4 projections with an input width that is not a multiple of 32"
    return None


def _projections(layer: nn.Module) -> list[nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def _quantized(q: torch.Tensor, scale: torch.Tensor, bits: int, zero_point: torch.Tensor | None,
               keep: list[torch.Tensor]) -> torch.Tensor:
    """A QMat for cpu_decode.c (QMAT_FIELDS: 5 int64s, in a tensor so that its data_ptr() is the address the
    pointer table holds) of the weights (q - zero_point) * scale: q int8 [out, in], scale [out, groups]. int8: q
    itself; int4: q + 8 two a byte in the C file's layout (per 64 inputs 32 bytes, byte j holding input j in its low
    half and j + 32 in its high one; a last 32 inputs: j and j + 16). The offsets are what C subtracts from the
    stored values, fp32: the zero point (int8), 8 + the zero point (int4). The tensors C reads go into `keep`."""
    out_features, in_features = q.shape
    stored = q.contiguous()
    if bits == 4:
        unsigned = (q.to(torch.int16) + 8).to(torch.uint8)
        whole = in_features // 64 * 64
        blocks = unsigned[:, :whole].reshape(out_features, -1, 2, 32)
        tail = unsigned[:, whole:].reshape(out_features, -1, 2, 16)
        stored = torch.cat([(blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(out_features, -1),
                            (tail[:, :, 0] | tail[:, :, 1] << 4).reshape(out_features, -1)], dim=1).contiguous()
    scale = scale.float().contiguous()
    offset = None
    if zero_point is not None:
        offset = (zero_point.float() + (8 if bits == 4 else 0)).contiguous()
    keep += [stored, scale] + ([] if offset is None else [offset])
    group = in_features // scale.shape[1]
    return torch.tensor([stored.data_ptr(), scale.data_ptr(), 0 if offset is None else offset.data_ptr(), group,
                         bits], dtype=torch.int64)


def _int64s(values: torch.Tensor | list[int] | range, n: int) -> torch.Tensor | ctypes.Array:
    """n int64s for C: a contiguous tensor, or, for a list (the Engine's tokens and positions), a
    ctypes array, which costs a fraction of building a tensor."""
    if isinstance(values, torch.Tensor):
        return values.reshape(n).to(torch.int64).contiguous()
    return (ctypes.c_int64 * n)(*values)


def _address(values: torch.Tensor | ctypes.Array) -> int:
    return values.data_ptr() if isinstance(values, torch.Tensor) else ctypes.addressof(values)


def _model_weights(model: Transformer, keep: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The model's slots of the pointer table, in MODEL_SLOTS order. `keep` (a list) for a quantised model: the
    output matrix as int8, one scale per row (quantize_weight's rounding), its tensors kept there."""
    head = model.output_weight
    if keep is not None:
        head = _quantized(*quantize_weight(head, 8, None), 8, None, keep)
    by_slot = {"embed": model.model.embed_tokens.weight, "norm": model.model.norm.weight, "head": head}
    return [by_slot[slot] for slot in MODEL_SLOTS]


def _weight(linear: nn.Module, keep: list[torch.Tensor] | None) -> torch.Tensor:
    """An nn.Linear's weight, or a QuantLinear's QMat (its tensors kept in `keep`)."""
    if not isinstance(linear, QuantLinear):
        return linear.weight
    zero_point = None if linear.symmetric else linear.weight_zero_point
    return _quantized(linear.qweight, linear.weight_scale, linear.bits, zero_point, keep)


def _layer_weights(layer: nn.Module, keep: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """A layer's weights, in LAYER_WEIGHTS order (its two KV-cache buffers follow them)."""
    attn, mlp = layer.self_attn, layer.mlp
    by_slot = {"in_norm": layer.input_layernorm.weight, "q": _weight(attn.q_proj, keep),
               "k": _weight(attn.k_proj, keep), "v": _weight(attn.v_proj, keep), "o": _weight(attn.o_proj, keep),
               "post_norm": layer.post_attention_layernorm.weight, "gate": _weight(mlp.gate_proj, keep),
               "up": _weight(mlp.up_proj, keep), "down": _weight(mlp.down_proj, keep)}
    return [by_slot[slot] for slot in LAYER_WEIGHTS]


class CPUDecoder:
    """`decoder(tokens [B], positions [B], cache) -> fp32 logits [B, vocab]`: one decode step in C.

    Writes each token's key and value at its position in `cache` (token b in cache row b, or in
    `rows[b]`), exactly where the PyTorch forward pass would, so the two paths can alternate.
    With `rows` and `out`, the same call prefills: the tokens are whole prompts, packed (a prompt's
    tokens in order, in its row), and only the tokens at indices `out` (increasing) get logits.
    tokens, positions and rows may be tensors or lists of ints.
    """

    def __init__(self, model: Transformer, lib: ctypes.CDLL):
        cfg = model.config
        self.model, self.lib = model, lib
        self.dtype = next(model.parameters()).dtype
        quantized = isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
        self.kind = QUANTIZED if quantized else BF16 if self.dtype == torch.bfloat16 else FP32
        # Whether the Engine should prefill in C too: where the C matvecs are as fast as PyTorch's
        # matmuls for many rows: fp32 with AVX-512, bf16 with AVX512-BF16, quantised with AVX512-VNNI
        # (fast_matvec in the C file).
        kind = lib.fast_matvec(self.kind)
        self.prefills = kind > 0
        # The longest prompt the Engine prefills in C; beyond it PyTorch's attention, on matrix
        # units, wins over attend_run's vector products; sooner on a CPU with AMX tiles (kind 2),
        # which PyTorch's attention uses too (BENCHMARKS.md, "Long prompts").
        self.prefill_max_len = 256 if kind == 2 else 512
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim**-0.5
        self.window = cfg.sliding_window or 0
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per cache max_len
        self._dims: dict[int, ctypes.Array] = {}  # per cache max_len
        self._aranges: dict[int, ctypes.Array] = {}  # rows 0..B-1, a decode step's
        self._scratch = torch.empty(0)  # grown to the largest call so far
        # A quantised model's matrices as the C file reads them (the tensors behind its QMats), made once:
        # QuantLinear weights changed in place afterwards are not seen (int8 is read where the layer holds
        # it, int4 from a copy)
        self.quantized_weights: list[torch.Tensor] | None = [] if quantized else None
        self._weights = _model_weights(model, self.quantized_weights)
        self._layer_weights = [_layer_weights(layer, self.quantized_weights) for layer in model.model.layers]
        self._tables: dict[tuple, ctypes.Array] = {}

    @classmethod
    def create(cls, model: Transformer) -> CPUDecoder | None:
        """A decoder for `model`, or None where the Engine should keep PyTorch's forward: a model it
        does not handle (`unsupported`), no C compiler, or a CPU where the C file builds with neither
        AVX2 nor AVX-512 (aarch64 among them), where it was never measured against PyTorch. With
        either, the C step beat PyTorch eager and torch.compile in fp32 and bf16 at batch 1 and 16
        (tied with compile in fp32 at batch 16 on AVX2; BENCHMARKS.md, "Decode paths")."""
        if unsupported(model) is not None:
            return None
        lib = _library()
        return None if lib is None or lib.vector_isa() == 0 else cls(model, lib)

    def _table(self, cache: KVCache) -> ctypes.Array:
        """The pointer table of cpu_decode.c for this cache. Looked up by the current data pointers,
        so weights replaced or moved between steps (a trainer updating the policy in RL) are always
        the ones read; building the key costs ~100 data_ptr() calls (through `map`, several times
        faster than a Python generator, whose code is cold after the C step), the table is built
        once."""
        tensors = list(self._weights)
        for weights, buffers in zip(self._layer_weights, cache.layers):
            tensors += weights
            tensors += buffers
        key = tuple(map(torch.Tensor.data_ptr, tensors))
        if key not in self._tables:
            if len(self._tables) > 64:
                self._tables.clear()
            self._tables[key] = (ctypes.c_void_p * len(key))(*key)
        return self._tables[key]

    def _rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [length, head_dim] of positions 0..length-1, computed once: the C step indexes
        them by position (the same values rope_cos_sin gives for each position on its own)."""
        if length not in self._rope:
            cos, sin = rope_cos_sin(self.model.inv_freq, self.model.rope_scale, torch.arange(length)[None], self.dtype)
            self._rope[length] = cos[0].contiguous(), sin[0].contiguous()
        return self._rope[length]

    def __call__(self, tokens: torch.Tensor | list[int], positions: torch.Tensor | list[int], cache: KVCache,
                 rows: torch.Tensor | list[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.model.config
        B = len(tokens)
        tokens, positions = _int64s(tokens, B), _int64s(positions, B)
        if rows is None:
            if cache.batch_size != B:
                raise ValueError(f"batch of {B} rows for a cache of {cache.batch_size}")
            if B not in self._aranges:
                self._aranges[B] = _int64s(range(B), B)
            rows = self._aranges[B]
        else:
            rows = _int64s(rows, B)
        # the ids, rows and positions checked in C: a loop over B, where six PyTorch reductions
        # would cost more than the rest of this wrapper
        bad = self.lib.bad_input(B, _address(tokens), cfg.vocab_size, _address(rows), cache.batch_size,
                                 _address(positions), cache.max_len)
        if bad:
            raise ValueError(f"token id outside the vocabulary of {cfg.vocab_size}" if bad == 1 else
                             f"cache row outside the cache's {cache.batch_size} rows" if bad == 2 else
                             f"position outside the cache's max_len {cache.max_len}")
        if out is not None:
            out = out.reshape(-1).to(torch.int64).contiguous()
            if len(out) == 0 or int(out[0]) < 0 or int(out[-1]) >= B or bool((out.diff() <= 0).any()):
                raise ValueError(f"out: increasing token indices in [0, {B}) expected")
        if any(buf.dtype != self.dtype or buf.stride() != cache.layers[0][0].stride() for buf in cache.layers[0]):
            raise ValueError(f"the KV cache must be {self.dtype} like the weights")
        if cache.max_len not in self._dims:
            by_name = {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                       "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "inter": cfg.intermediate_size,
                       "vocab": cfg.vocab_size, "max_len": cache.max_len, "window": self.window}
            self._dims[cache.max_len] = (ctypes.c_long * len(DIMS))(*(by_name[name] for name in DIMS))
        dims = self._dims[cache.max_len]
        table = self._table(cache)
        cos, sin = self._rope_table(cache.max_len)
        threads = torch.get_num_threads()
        scratch = self._scratch  # a local reference: another thread may grow self._scratch meanwhile
        if len(scratch) < (need := self.lib.scratch_floats(dims, B, threads)):
            scratch = self._scratch = torch.empty(need, dtype=torch.float32)
        n_out = B if out is None else len(out)
        logits = torch.empty(n_out, cfg.vocab_size, dtype=torch.float32)
        self.lib.decode_step(table, dims, self.eps, self.scale, _address(tokens), _address(positions),
                             _address(rows), B, cos.data_ptr(), sin.data_ptr(), None if out is None else out.data_ptr(),
                             n_out, logits.data_ptr(), scratch.data_ptr(), self.kind, threads)
        return logits
