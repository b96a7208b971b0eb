"""Attention: grouped-query attention (MHA, GQA and MQA are its special cases) and DeepSeek's
multi-head latent attention (MLA), plus the KV cache both use during generation.

Both go through `F.scaled_dot_product_attention`, which picks a fused kernel where one exists,
except for bf16 causal training on a CPU, where `CausalAttentionCPU` is faster (see its docstring).
RMSNorm and RoPE use the fused C kernels of cpu_kernels.py on a CPU when they are available.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model import cpu_kernels
from lmforge.model.rope import apply_rope, yarn_mscale


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), normalising in fp32 as transformers' LlamaRMSNorm does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.usable(x, self.weight):  # one pass forward, one backward; same rounding
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class CausalAttentionCPU(torch.autograd.Function):
    """Causal grouped-query attention for bf16 training on a CPU, as batched matmuls.

    PyTorch's CPU flash-attention kernel runs its backward pass at a small fraction of the matmul
    peak; here the whole [T, T] score matrix is formed instead (T is short in CPU training), so
    that every step is one large bf16 matmul (AMX/AVX-512 where the CPU has them) or one softmax
    pass, which is faster than the flash kernel for CPU training's short sequences, forward plus
    backward (BENCHMARKS.md, train_step.py). GQA needs no copies of K and V: the G query heads that share a KV head
    are stacked as G*T rows against that head's T keys. The scale, the causal mask and the softmax
    are one pass of cpu_kernels.causal_softmax (fp32 inside); numerics are those of transformers'
    eager attention in bf16: bf16 scores, softmax in fp32 rounded to bf16.

    Backward (the standard softmax-attention gradients, e.g. FlashAttention-2, Dao 2023, alg. 2):
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),  dQ = scale dS K,  dK = scale dS^T Q.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, T, D = q.shape
        KV = k.shape[1]
        G = H // KV
        qg = q.reshape(B * KV, G * T, D)  # query heads h = kv * G + g, as transformers' repeat_kv
        k, v = k.reshape(B * KV, T, D), v.reshape(B * KV, T, D)
        p = cpu_kernels.causal_softmax(torch.bmm(qg, k.transpose(1, 2)), scale)  # fp32 inside, bf16 out
        ctx.save_for_backward(qg, k, v, p)
        ctx.scale, ctx.shape = scale, (B, H, T, D, KV)
        return torch.bmm(p, v).view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_out):
        qg, k, v, p = ctx.saved_tensors
        B, H, T, D, KV = ctx.shape
        grad_out = grad_out.reshape(B * KV, -1, D)
        grad_v = torch.bmm(p.transpose(1, 2), grad_out)
        grad_s = cpu_kernels.causal_softmax_backward_(torch.bmm(grad_out, v.transpose(1, 2)), p, ctx.scale)
        grad_q = torch.bmm(grad_s, k)
        grad_k = torch.bmm(grad_s.transpose(1, 2), qg)
        return grad_q.view(B, H, T, D), grad_k.view(B, KV, T, D), grad_v.view(B, KV, T, D), None


def use_cpu_attention(q: torch.Tensor, mask, cache, dropout: float) -> bool:
    """CausalAttentionCPU's case: plain causal bf16 attention on a CPU, with gradients and no dropout, and the
    score matrices it keeps for backward (B * heads * T^2 bf16 per layer) at most 64 MB a layer; longer
    sequences take the flash kernel, whose memory grows with T, not T^2."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and mask is None and cache is None and not dropout
            and B * H * T * T <= 2**25 and torch.is_grad_enabled() and q.requires_grad and cpu_kernels.usable(q))


# what a KV cache stores: "auto", the weights' dtype (vLLM's name for it); "int8", Int8KVCache
KV_CACHE_DTYPES = ("auto", "int8")
KV_CACHE_HELP = ("keys and values the engine caches: auto (the weights' dtype) or int8 (a scale per head and block "
                 "of 32 positions: about half a bf16 cache's memory, a quarter of fp32's, for long contexts; "
                 "decoding then runs in PyTorch, not the C decoder)")


class KVCache:
    """Preallocated keys and values for every layer, for `batch_size` independent rows.

    Each row writes its new tokens at its own positions, so one cache serves prompts of
    different lengths and requests that join between decode steps (continuous batching):
    a row's stale entries beyond its current position are never attended, because the
    causal mask compares positions. For MLA the cache holds what MLA caches — the
    compressed latent and the shared RoPE key — not full per-head keys and values.
    """

    # positions that share a scale (Int8KVCache's); a row may be rewritten from any multiple of it
    block = 1
    pad_from: torch.Tensor | None = None  # Int8KVCache's (see there); entries here are only ever overwritten

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        # One tensor per kind (keys and values; MLA's latent and RoPE key) holds every layer: the
        # Engine moves a row of all layers at once (its prefix cache swaps rows) in one copy per kind
        # rather than one per layer, each an op with its own overhead (BENCHMARKS.md: the row swap, both ways).
        self.stores = [torch.zeros((cfg.num_hidden_layers, batch_size, *s), device=device, dtype=dtype)
                       for s in cache_shapes(cfg, max_len)]
        self.batch_size, self.max_len = batch_size, max_len
        self._bind()
        self._rows = self._positions = None
        self.length = 0

    def _bind(self) -> None:
        """The per-layer views of `stores` (cpu_decode.py reads them too)."""
        self.layers = [[store[layer] for store in self.stores] for layer in range(self.stores[0].shape[0])]

    @property
    def nbytes(self) -> int:
        return sum(store.numel() * store.element_size() for store in self.stores)

    def begin(self, position_ids: torch.Tensor) -> None:
        """Called once per forward: where this step's tokens go, and how far the keys reach."""
        if position_ids.shape[0] != self.batch_size:
            raise ValueError(f"batch of {position_ids.shape[0]} rows for a cache of {self.batch_size}")
        self.length = int(position_ids.max()) + 1
        if self.length > self.max_len:
            raise ValueError(f"position {self.length - 1} is past the cache's max_len {self.max_len}")
        self._rows = torch.arange(self.batch_size, device=position_ids.device)[:, None]
        self._positions = position_ids

    def update(self, layer: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Write new [B, heads, T, d] entries at this step's positions; return [B, heads, length, d] views."""
        buffers = self.layers[layer]
        for buf, t in zip(buffers, new):
            buf[self._rows, :, self._positions] = t.transpose(1, 2).to(buf.dtype)
        return [buf[:, :, : self.length] for buf in buffers]

    # -- rows (the Engine's: its batch views, prefix cache and row moves) --------------------------------

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop-1 of this one: the same memory, a smaller batch."""
        view = copy.copy(self)
        view.stores = [store[:, start:stop] for store in self.stores]
        view.batch_size = stop - start
        view._bind()
        return view

    def row(self, row: int, length: int) -> list[torch.Tensor]:
        """Views of everything that describes positions 0..length-1 of one row, every layer."""
        return [store[:, row, :, :length] for store in self.stores]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        for to, source in zip(self.row(dst, length), self.row(src, length)):
            to.copy_(source)

    def swap_rows(self, a: int, b: int, length: int) -> None:
        for part_a, part_b in zip(self.row(a, length), self.row(b, length)):
            held = part_a.clone()
            part_a.copy_(part_b)
            part_b.copy_(held)


def cache_shapes(cfg: ModelConfig, max_len: int) -> list[tuple[int, ...]]:
    """[heads, max_len, d] of each kind a layer caches: keys and values, or MLA's latent and RoPE key."""
    if cfg.is_mla:
        return [(1, max_len, cfg.kv_lora_rank), (1, max_len, cfg.qk_rope_head_dim)]
    return [(cfg.num_key_value_heads, max_len, cfg.head_dim)] * 2


class Int8KVCache(KVCache):
    """A KVCache holding int8 entries with one scale per (layer, row, head, block of `block` positions).

    Symmetric absmax quantisation: a block's fp entries x become q = round(x / s), s = absmax(x) / 127, so
    each dequantised entry q * s is within s / 2 = absmax / 254 of x. Keys and values both go per token
    block as the issue asks (KIVI, Liu et al. 2024, quantises keys per channel instead, against their
    outlier channels). A scale covers 32 positions, as KIVI's groups: its 4 bytes add 4 / (32 * head_dim) to
    the int8 entries' bytes (0.2% at head_dim 64), and a shorter block would fit the scale closer at more
    bytes and more requantisation work per step.

    The block a row's last written position falls in (its open block) is not complete: a new token may
    raise its absmax. Invariant: every block of a row before its open block holds its entries quantised
    once, from their fp values, with the block's final scale; the open block's entries are kept in full
    precision in `tails` (one block per row, layer and head: KIVI's full-precision residual of recent
    tokens) until the row writes past it, when it is quantised from there. Attention sees the dequantised
    complete blocks and the open block's fp entries, at every step the same values.

    Rows are written left to right: a step continues where the row's written positions end, or rewrites
    it from an earlier position. Rewriting from inside a complete block dequantises the entries before that
    position, which then round twice when the block is quantised again; the Engine avoids it (its prefix
    cache reuses complete blocks only, unless a prompt extends all that a row holds). `pad_from` [rows],
    set for a right-padded batch, is each row's first padding position: padding is never attended, so it
    does not make a block complete.
    """

    block = 32

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        n_blocks = -(-max_len // self.block)
        shapes = cache_shapes(cfg, n_blocks * self.block)
        layers, B = cfg.num_hidden_layers, self.block
        # stores: the int8 entries of each kind, their fp32 scales [heads, blocks], the open blocks' fp
        # entries [heads, block, d], and each row's open block (-1: none), [layers, rows] like the rest
        self.stores = ([torch.zeros((layers, batch_size, *s), device=device, dtype=torch.int8) for s in shapes]
                       + [torch.zeros((layers, batch_size, s[0], n_blocks), device=device) for s in shapes]
                       + [torch.zeros((layers, batch_size, s[0], B, s[2]), device=device, dtype=dtype)
                          for s in shapes]
                       + [torch.full((layers, batch_size), -1, device=device, dtype=torch.long)])
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        self._bind()
        self.length = 0

    def _bind(self) -> None:
        kinds = (len(self.stores) - 1) // 3
        self.values, self.scales = self.stores[:kinds], self.stores[kinds:2 * kinds]
        self.tails, self.open = self.stores[2 * kinds:3 * kinds], self.stores[-1]

    def row(self, row: int, length: int) -> list[torch.Tensor]:
        blocks = -(-length // self.block)
        return ([v[:, row, :, :length] for v in self.values] + [s[:, row, :, :blocks] for s in self.scales]
                + [t[:, row] for t in self.tails] + [self.open[:, row]])

    def begin(self, position_ids: torch.Tensor) -> None:
        """Plan this step's writes: each row's first block (its open block if the row continues right after
        it, so that it is quantised now that it is complete), its last written block, and how many blocks
        the widest row spans."""
        super().begin(position_ids)
        written = position_ids.amax(1)
        if self.pad_from is not None:
            written = torch.minimum(written, self.pad_from.to(written.device) - 1)
        first = position_ids.amin(1) // self.block
        open_block = self.open[0]  # every layer's is the same between steps
        self._first = torch.where((open_block == first - 1) & (first > 0), open_block, first)
        self._last = written // self.block
        self._span = int((self._last - self._first).max()) + 1
        # every position in its row's open block (31 of 32 decode steps): only the tails change
        self._in_tails = bool((position_ids // self.block == open_block[:, None]).all())

    def update(self, layer: int, *new: torch.Tensor) -> list[torch.Tensor]:
        out = [self._write(layer, kind, t) for kind, t in enumerate(new)]
        self.open[layer] = self._last  # after every kind: each reads the open block from before the step
        return out

    def _write(self, layer: int, kind: int, new: torch.Tensor) -> torch.Tensor:
        """Write new [R, heads, T, d] entries of one kind; return the dequantised [R, heads, length, d]."""
        B, rows = self.block, self._rows
        values, scales, tail = self.values[kind][layer], self.scales[kind][layer], self.tails[kind][layer]
        R, H, capacity, D = values.shape
        blocked = values.view(R, H, capacity // B, B, D)
        if not self._in_tails:
            self._quantise(blocked, scales, tail, self.open[layer], new)
        else:
            tail[rows, :, self._positions % B] = new.transpose(1, 2).to(self.dtype)
        # what attention reads: the complete blocks dequantised, each row's open block from its tail
        n_blocks = -(-self.length // B)
        out = blocked[:, :, :n_blocks] * scales[:, :, :n_blocks, None, None].to(self.dtype)
        out[rows[:, 0], :, self._last] = tail
        return out.view(R, H, n_blocks * B, D)[:, :, :self.length]

    def _quantise(self, blocked, scales, tail, open_block, new) -> None:
        """Write new entries where they span blocks: the blocks the rows wrote past are quantised, the last
        one each row wrote becomes its tail."""
        B, span, first, last, rows = self.block, self._span, self._first, self._last, self._rows
        R, H, capacity_blocks, _, D = blocked.shape
        # the blocks this step touches, [R, span] (clamped at the end: blocks past a row's last are left as they are)
        touched = (first[:, None] + torch.arange(span, device=first.device)).clamp_(max=capacity_blocks - 1)
        old_q, old_s = blocked[rows, :, touched], scales[rows, :, touched]  # [R, span, H, B, D], [R, span, H]
        # their fp entries, one more block to take padding that lies past the span
        work = torch.empty((R, span + 1, H, B, D), dtype=self.dtype, device=blocked.device)
        work[:, :span] = old_q * old_s[..., None, None].to(self.dtype)
        work[:, 0] = torch.where((open_block == first)[:, None, None, None], tail, work[:, 0])
        offset = (self._positions - first[:, None] * B).clamp_(max=span * B)  # [R, T] within `work`
        work[rows, offset // B, :, offset % B] = new.transpose(1, 2).to(self.dtype)
        work = work[:, :span]
        complete = (first[:, None] + torch.arange(span, device=first.device)) < last[:, None]  # [R, span]
        absmax = work.float().abs().amax(dim=(-2, -1))  # [R, span, H]
        scale = absmax / 127
        q = (work.float() / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None, None]).round_().to(torch.int8)
        blocked[rows, :, touched] = torch.where(complete[..., None, None, None], q, old_q)
        scales[rows, :, touched] = torch.where(complete[..., None], scale, old_s)
        tail.copy_(work[torch.arange(R, device=last.device), last - first])


class Attention(nn.Module):
    """Multi-head attention with n_kv <= n_heads key/value heads (GQA, Ainslie et al. 2023)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_proj_bias)
        if cfg.qk_norm:  # Qwen3: normalise each head's q and k, which keeps attention logits bounded
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.config = cfg  # the model's own (its attention_dropout, read at every forward)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        if cpu_kernels.fusable(self.q_proj, self.k_proj, self.v_proj) and cpu_kernels.usable(x):
            # On a CPU one matmul for q, k and v; q/k/v are then strided views of its output.
            qkv = F.linear(x, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                 self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        rope_kernel = cpu_kernels.usable(q, k, cos, sin)
        if rope_kernel:  # RoPE on the [B, T, heads, dim] layout, in one pass
            q, k = cpu_kernels.rope(q, cos, sin), cpu_kernels.rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if not rope_kernel:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        dropout = self.config.attention_dropout if self.training else 0.0
        if use_cpu_attention(q, mask, cache, dropout):
            y = CausalAttentionCPU.apply(q, k, v, self.head_dim**-0.5)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=mask is None and cache is None,
                                               enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1).

    Keys and values are rebuilt from a small shared latent c_kv (kv_lora_rank wide), so the
    cache stores only c_kv plus one RoPE key shared by all heads. RoPE cannot pass through the
    latent's up-projection, hence the "decoupled" split of each query/key head into a part
    without position (qk_nope_head_dim) and a rotated part (qk_rope_head_dim).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.rank = n, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * qk_dim, bias=False)
        else:  # queries get a low-rank bottleneck too (V3), which saves activation memory in training
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, n * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_dim, h, bias=False)
        self.q_lora = cfg.q_lora_rank is not None
        self.interleaved = cfg.rope_interleave
        self.scale = qk_dim**-0.5
        self.config = cfg  # the model's own (its attention_dropout, read at every forward)
        scaling = cfg.rope_scaling or {}
        if cfg.rope_type != "default" and scaling.get("mscale_all_dim"):
            # YaRN stretches the softmax: DeepSeek folds mscale(factor)^2 into the logit scale.
            self.scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, T, rank]
        q_rope = apply_rope(q_rope, cos, sin, self.interleaved)
        k_rope = apply_rope(k_rope[:, None], cos, sin, self.interleaved)  # [B, 1, T, rope]
        if cache is not None:
            latent, k_rope = cache.update(self.layer, latent, k_rope)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                                           dropout_p=self.config.attention_dropout if self.training else 0.0,
                                           scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
