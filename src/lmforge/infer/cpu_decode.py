"""Decode steps in C on a CPU (cpu_decode.c): the Engine's fast path for dense Llama-family models.

A decode step feeds each running sequence one token. Through PyTorch that is ~60 matrix-vector
products and ~150 small ops per token for the `small` preset, each a dispatch of microseconds;
`CPUDecoder` runs the whole step — embedding, every layer with its KV-cache writes and attention,
final norm, output projection — as one C call, one job for the C file's own thread pool
(BENCHMARKS.md has the speed-up). The same call prefills: many tokens, each with its own cache
row and position, logits only for the tokens asked for. The Engine uses that where it is as fast
as PyTorch's matmuls (`CPUDecoder.prefills`: fp32 with AVX-512, bf16 with AVX512-BF16), which also leaves
no OpenMP threads spinning on the cores the next decode step needs.

`CPUDecoder.create(model)` returns None — and the Engine keeps PyTorch's forward — when the model
or the machine does not fit: not on the CPU, weights not all fp32 or all bf16, MoE or MLA layers,
biases, QK-norm, LoRA-wrapped projections, no C compiler, or LMFORGE_CPU_KERNELS=0.
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

_SOURCE = Path(__file__).with_name("cpu_decode.c")
# Contracting a*b + c into one FMA is welcome here (dot products, no bit-exactness goal); its own
# thread pool (pthreads), OpenMP only for `omp simd`.
_FLAGS = [f for f in cpu_kernels.FLAGS if f not in ("-ffp-contract=off", "-fopenmp")] + [
    "-ffp-contract=fast", "-mprefer-vector-width=512", "-fopenmp-simd", "-pthread"]
_p, _L, _f, _i = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int


def _library() -> ctypes.CDLL | None:
    lib = cpu_kernels.load(_SOURCE, _FLAGS,
                           {"decode_step": [_p, _p, _f, _f, _p, _p, _p, _L, _p, _p, _p, _L, _p, _p, _i]}, "C decode")
    if lib is not None:
        lib.scratch_floats.argtypes, lib.scratch_floats.restype = [_p, _L, _i], _L
        lib.fast_matvec.argtypes, lib.fast_matvec.restype = [_i], _i
        lib.bad_input.argtypes, lib.bad_input.restype = [_L, _p, _L, _p, _L, _p, _L], _i
    return lib


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
    for layer in model.model.layers:
        if not isinstance(layer.self_attn, Attention) or not isinstance(layer.mlp, MLP):
            return "a layer of another kind"
        if any(type(m) is not nn.Linear for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                   layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)):
            return "wrapped (LoRA) projections"
    if any(not p.is_contiguous() for p in params):
        return "non-contiguous weights"
    return None


def _int64s(values: torch.Tensor | list[int] | range, n: int) -> torch.Tensor | ctypes.Array:
    """n int64s for C: a contiguous tensor, or, for a list (the Engine's tokens and positions), a
    ctypes array - ~0.3 us where building a tensor takes ~5 (more with the caches cold after a step)."""
    if isinstance(values, torch.Tensor):
        return values.reshape(n).to(torch.int64).contiguous()
    return (ctypes.c_int64 * n)(*values)


def _address(values: torch.Tensor | ctypes.Array) -> int:
    return values.data_ptr() if isinstance(values, torch.Tensor) else ctypes.addressof(values)


def _layer_weights(layer: nn.Module) -> list[torch.Tensor]:
    """A layer's weights in cpu_decode.c's order (its two KV-cache buffers follow them)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
            attn.o_proj.weight, layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
            mlp.down_proj.weight]


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
        self.step = getattr(lib, f"decode_step_{cpu_kernels.SUFFIX[self.dtype]}")
        # Whether the Engine should prefill in C too: where the C matvecs are as fast as PyTorch's
        # matmuls for many rows: fp32 with AVX-512, bf16 with AVX512-BF16 (fast_matvec in the C file
        # has the measurements).
        kind = lib.fast_matvec(int(self.dtype == torch.bfloat16))
        self.prefills = kind > 0
        # The longest prompt the Engine prefills in C; beyond it PyTorch's attention, on matrix
        # units, wins over attend_run's vector products. `small`, one prompt, C / PyTorch ms: AMD
        # Zen 4, bf16: 512 tokens 86 / 121, 2048 tokens 495 / 817; fp32: 178 / 208, 928 / 1134.
        # Intel with AMX (kind 2), before attend_run: bf16 512 tokens 64 / 49, 2000 tokens 640 / 230;
        # fp32 151 / 152 and 990 / 700.
        self.prefill_max_len = 256 if kind == 2 else 512
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim**-0.5
        self.window = cfg.sliding_window or 0
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per cache max_len
        self._dims: dict[int, ctypes.Array] = {}  # per cache max_len
        self._aranges: dict[int, ctypes.Array] = {}  # rows 0..B-1, a decode step's
        self._scratch = torch.empty(0)  # grown to the largest call so far
        self._weights = [model.model.embed_tokens.weight, model.model.norm.weight, model.output_weight]
        self._layer_weights = [_layer_weights(layer) for layer in model.model.layers]
        self._tables: dict[tuple, ctypes.Array] = {}

    @classmethod
    def create(cls, model: Transformer) -> CPUDecoder | None:
        if unsupported(model) is not None:
            return None
        lib = _library()
        return None if lib is None else cls(model, lib)

    def _table(self, cache: KVCache) -> ctypes.Array:
        """The pointer table of cpu_decode.c for this cache. Looked up by the current data pointers,
        so weights replaced or moved between steps (a trainer updating the policy in RL) are always
        the ones read; building the key costs ~100 data_ptr() calls (through `map`: a Python
        generator took ~40 us a step, its code cold after the C step), the table is built once."""
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
        # cost ~20 us a step
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
            self._dims[cache.max_len] = (ctypes.c_long * 9)(
                cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cache.max_len, self.window)
        dims = self._dims[cache.max_len]
        table = self._table(cache)
        cos, sin = self._rope_table(cache.max_len)
        threads = torch.get_num_threads()
        scratch = self._scratch  # a local reference: another thread may grow self._scratch meanwhile
        if len(scratch) < (need := self.lib.scratch_floats(dims, B, threads)):
            scratch = self._scratch = torch.empty(need, dtype=torch.float32)
        n_out = B if out is None else len(out)
        logits = torch.empty(n_out, cfg.vocab_size, dtype=torch.float32)
        self.step(table, dims, self.eps, self.scale, _address(tokens), _address(positions), _address(rows), B,
                  cos.data_ptr(), sin.data_ptr(), None if out is None else out.data_ptr(), n_out, logits.data_ptr(),
                  scratch.data_ptr(), threads)
        return logits
