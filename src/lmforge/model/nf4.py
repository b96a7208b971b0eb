"""NF4: the 4-bit NormalFloat weights of QLoRA, in plain PyTorch.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3) fine-tunes LoRA adapters on a frozen base
whose linear weights are stored in 4 bits:

* **The code.** Pretrained weights are roughly normal, so the 16 levels are quantiles of N(0, 1),
  scaled to [-1, 1]. To have an exact 0 the code is asymmetric: 8 levels from the quantiles of the
  positive half, 7 from the negative half, and 0 between them. The quantile points run from 0.5 to
  an offset of 1 - (1/32 + 1/30) / 2 = 0.9677083 (bitsandbytes' `create_normal_map`), and all are
  divided by the largest, so the levels span [-1, 1]. `NF4_CODE` is computed from that definition below (torch's ndtri
  is the normal quantile function); the test compares it with bitsandbytes' published table
  (`get_4bit_type("nf4")` in bitsandbytes/functional.py: -1.0, -0.6961928009986877, ..., 1.0).
* **Blockwise absmax.** The flattened weight is cut into blocks of 64 values; each block is divided
  by its largest magnitude (kept in fp32) and every value stored as the index of the nearest level,
  two indices a byte: 4 bits + 32/64 bits of scale = 4.5 bits a weight. The bytes are bitsandbytes':
  its `quantize_4bit(w, blocksize=64, quant_type="nf4")` (0.50.2, CPU) stores the same codes and absmax.
* **Double quantisation** (optional): the fp32 scales, less their mean, are themselves quantised to
  int8 in blocks of 256 with one fp32 scale each, 8/64 + 32/(64*256) bits a weight: 4.127 in all.
  (The paper stores them as 8-bit floats; symmetric int8 is used here, a simpler code with the same
  cost.)

`NF4Linear` replaces an `nn.Linear` whose weight is frozen: the weight is dequantised on the fly in
forward to the compute dtype (the autocast dtype, else the input's), and again in backward for the
input's gradient, so no dequantised weight is kept between the two (bitsandbytes' MatMul4Bit does
the same). LoRA/DoRA adapters wrap it (model/lora.py) in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64
SCALE_BLOCK_SIZE = 256  # double quantisation: fp32 scales per this many int8 block scales
_OFFSET = 1 - (1 / 32 + 1 / 30) / 2  # 0.9677083: where the outermost quantile is taken


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels, ascending, from the definition (QLoRA section 3; bitsandbytes' create_normal_map)."""
    positive = torch.special.ndtri(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels > 0
    negative = -torch.special.ndtri(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


NF4_CODE = nf4_code()


@dataclass
class NF4Weight:
    """A weight in NF4: packed 4-bit codes and blockwise scales (double-quantised or not)."""

    codes: torch.Tensor  # uint8 [padded numel / 2]: two level indices a byte, the first in the high nibble
    absmax: torch.Tensor  # fp32 [blocks], or int8 [blocks] when double-quantised
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE
    scale_scale: torch.Tensor | None = None  # double quantisation: fp32 [ceil(blocks / 256)]
    scale_mean: torch.Tensor | None = None  # double quantisation: fp32 scalar, the scales' mean

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.scale_scale is not None:
            out |= {"scale_scale": self.scale_scale, "scale_mean": self.scale_mean}
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (dequantised when double-quantised)."""
        if self.scale_scale is None:
            return self.absmax
        blocks = self.absmax.numel()
        q = F.pad(self.absmax.float(), (0, (-blocks) % SCALE_BLOCK_SIZE)).view(-1, SCALE_BLOCK_SIZE)
        return (q * self.scale_scale[:, None]).flatten()[:blocks] + self.scale_mean


def _blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = weight.detach().float().flatten()
    return F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = False) -> NF4Weight:
    """Blockwise absmax NF4 of `weight` (any shape): each value becomes its block's nearest level."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size: must be a positive even number, got {block_size}")
    blocks = _blocks(weight, block_size)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = NF4_CODE.to(weight.device)
    index = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8).flatten()
    packed = (index[0::2] << 4) | index[1::2]
    result = NF4Weight(packed, absmax, tuple(weight.shape), block_size)
    if double_quant:
        mean = absmax.mean()
        centred = F.pad(absmax - mean, (0, (-absmax.numel()) % SCALE_BLOCK_SIZE)).view(-1, SCALE_BLOCK_SIZE)
        scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q = torch.round(centred / scale[:, None]).clamp(-127, 127).to(torch.int8).flatten()[:absmax.numel()]
        result.absmax, result.scale_scale, result.scale_mean = q, scale, mean
    return result


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight that `q` stores, in `dtype`."""
    index = torch.stack([q.codes >> 4, q.codes & 0xF], dim=1).flatten().long()
    values = NF4_CODE.to(q.codes.device)[index].view(-1, q.block_size) * q.scales()[:, None]
    numel = 1
    for size in q.shape:
        numel *= size
    return values.flatten()[:numel].view(q.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantised in forward and again in backward: only the 4-bit weight is kept."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantised on the fly.

    The 4-bit tensors are non-persistent buffers: they are derived from the model directory's weights, so a
    training checkpoint leaves them out as it leaves out every frozen weight."""

    def __init__(self, linear: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype  # the dtype the weight came in (what a merge would write)
        self.block_size = block_size
        q = quantize_nf4(linear.weight, block_size, double_quant)
        for name, tensor in q.tensors().items():
            self.register_buffer(name, tensor, persistent=False)
        self.double_quant = double_quant
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def quantized(self) -> NF4Weight:
        return NF4Weight(self.codes, self.absmax, (self.out_features, self.in_features), self.block_size,
                         getattr(self, "scale_scale", None), getattr(self, "scale_mean", None))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias, in the autocast dtype when autocast is on, else in x's."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _NF4Matmul.apply(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block_size={self.block_size}"
                + (", double_quant" if self.double_quant else ""))


def quantize_linears_nf4(model: nn.Module, block_size: int = BLOCK_SIZE, double_quant: bool = False) -> nn.Module:
    """Replace every nn.Linear in the blocks (model.layers.*) by an NF4Linear, in place. The embeddings, norms,
    output head and MoE routers (model/moe.py's Router, not a Linear) stay as they are."""
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and type(m) is nn.Linear]
    if not names:
        raise ValueError("quant nf4: the model has no linear layers in its blocks to quantise")
    for name in names:
        parent, child = name.rsplit(".", 1)
        module = model.get_submodule(parent)
        setattr(module, child, NF4Linear(getattr(module, child), block_size, double_quant))
    return model
