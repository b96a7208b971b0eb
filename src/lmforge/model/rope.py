"""Rotary position embedding (RoPE, Su et al. 2021) and its context-extension variants.

Each function returns the inverse frequencies for the rotated dimensions and a factor that
scales cos/sin (1.0 except for YaRN). The formulas match transformers'
`modeling_rope_utils.py`, which is what the checkpoints we load were trained against.
"""

from __future__ import annotations

import math

import torch

from lmforge.config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))


def _linear(inv_freq, s, cfg):
    # Position interpolation (Chen et al. 2023): positions divided by `factor`.
    return inv_freq / s["factor"], 1.0


def _llama3(inv_freq, s, cfg):
    # Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq, s, cfg):
    # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, ramp between,
    # and scale attention logits by `attention_factor` (applied to cos and sin).
    dim, theta = cfg.rope_dim, cfg.rope_theta
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / orig
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate, float(attention_factor)


_SCALINGS = {"linear": _linear, "llama3": _llama3, "yarn": _yarn}


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inv_freq(cfg.rope_theta, cfg.rope_dim)
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    return _SCALINGS[cfg.rope_type](inv_freq, cfg.rope_scaling, cfg)


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [B, T, dim] for integer positions [B, T] (computed in fp32, then cast)."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [B, H, T, dim] by cos/sin [B, T, dim].

    Llama-style checkpoints pair dimension i with i + dim/2 ("rotate half"). DeepSeek's pair
    neighbours (2i, 2i+1); with `interleaved` we rotate those pairs and write the result in
    rotate-half order, exactly as transformers does: q and k get the same permutation, so
    their dot products, and the model's output, are unchanged.
    """
    cos, sin = cos[:, None], sin[:, None]
    if interleaved:
        half = x.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return x * cos + _rotate_half(x) * sin
