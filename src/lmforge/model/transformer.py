"""One decoder-only Transformer for every supported family, driven by ModelConfig.

    embed_tokens -> [ x + attn(norm(x));  x + mlp(norm(x)) ] * L -> norm -> lm_head

In training mode, dropout (Srivastava et al. 2014) where GPT-2 and nanoGPT put it: on the embeddings
(embd_pdrop), on the attention probabilities (attention_dropout) and on each attention and MLP output
before the residual add (resid_pdrop); all 0 by default, and off in eval mode.

Where the families differ (read top to bottom):
- attention: `Attention` (Llama, Mistral, Qwen; q/k/v bias for Qwen2, QK-norm for Qwen3,
  sliding window for Mistral) or `MLAttention` (DeepSeek-V3), in attention.py;
- feed-forward: a dense `MLP` or a `MoE` (Mixtral, Qwen-MoE, DeepSeek), in moe.py;
- RoPE frequencies: default, linear, Llama 3 or YaRN, in rope.py;
- tied or separate input and output embeddings.

Parameter names are the Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), so a
state dict moves between lmforge and transformers without a conversion step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.attention import KV_CACHE_DTYPES, Attention, Int8KVCache, KVCache, MLAttention, RMSNorm
from lmforge.model.moe import MLP, MoE
from lmforge.model.rope import rope_cos_sin, rope_frequencies


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab], None when called with return_hidden=True
    hidden: torch.Tensor  # final normalised hidden states [B, T, hidden]
    aux_loss: torch.Tensor | None  # mean MoE load-balancing loss over MoE layers (None if dense)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer) if cfg.is_mla else Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.config = cfg  # the model's own: a dropout rate set on it applies at the next forward

    def forward(self, x, cos, sin, mask, cache=None):
        drop = self.config.resid_pdrop
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache), drop, self.training)
        h = self.post_attention_layernorm(x)
        aux = None
        if self.is_moe:
            h, aux = self.mlp(h)
        else:
            h = self.mlp(h)
        return x + F.dropout(h, drop, self.training), aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # the HF "model." prefix
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models have no lm_head parameter at all: logits use the embedding matrix.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # RoPE frequencies stay fp32 whatever dtype the weights are cast to, so they are a plain
        # attribute rather than a buffer (`model.to(bfloat16)` would round a buffer).
        self.inv_freq, self.rope_scale = rope_frequencies(cfg)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, document_ids: torch.Tensor | None = None,
                return_hidden: bool = False, inputs_embeds: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput.

        position_ids [B, T]: each token's position (default 0..T-1). With a `cache`, the new
        tokens are written at these positions and attend to every cached position <= their own.
        document_ids [B, T]: for packed sequences, tokens attend only within their document.
        return_hidden: skip the output projection (the trainer's chunked loss does it itself).
        inputs_embeds [B, T, hidden]: the embeddings to use instead of input_ids' (a LLaVA model's, with
        image features in place of its placeholder tokens; model/llava.py).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = F.dropout(x, self.config.embd_pdrop, self.training)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, position_ids, x.dtype)
        if cache is not None:
            cache.begin(position_ids)
        mask = self.attention_mask(position_ids, cache, document_ids)
        aux_losses = []
        for layer in self.model.layers:
            x, aux = layer(x, cos, sin, mask, cache)
            if aux is not None:
                aux_losses.append(aux)
        x = self.model.norm(x)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        return ModelOutput(None if return_hidden else self.logits(x), x, aux_loss)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output_weight)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def attention_mask(self, position_ids, cache, document_ids) -> torch.Tensor | None:
        """A boolean [B, 1, T, S] mask (True = may attend), or None for plain causal attention."""
        window = self.config.sliding_window
        B, T = position_ids.shape
        if cache is None:
            if document_ids is None and (window is None or window >= T):
                return None  # SDPA's is_causal path
            idx = torch.arange(T, device=position_ids.device)
            allowed = (idx[None, :] <= idx[:, None])[None].expand(B, T, T)
            if document_ids is not None:
                allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
            if window is not None:
                allowed = allowed & (idx[:, None] - idx[None, :] < window)
            return (allowed | torch.eye(T, dtype=torch.bool, device=idx.device))[:, None]
        if B == 1 and T == 1 and (window is None or window >= cache.length):
            return None  # one new token sees the whole cache
        key_pos = torch.arange(cache.length, device=position_ids.device)
        q_pos = position_ids[:, :, None]
        allowed = key_pos[None, None, :] <= q_pos
        if window is not None:
            allowed = allowed & (q_pos - key_pos[None, None, :] < window)
        return allowed[:, None]

    # -- construction -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialisation for training from scratch.

        Every matrix ~ N(0, initializer_range) (0.02, as GPT-2 and LLaMA); the projections that
        write into the residual stream (o_proj, down_proj) are scaled down by sqrt(2 * layers)
        so the residual's variance does not grow with depth (GPT-2, Radford et al. 2019, sec. 2.3).
        Norm weights are 1, biases 0, the DeepSeek routing bias 0.
        """
        if seed is not None:
            torch.manual_seed(seed)
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias") or name.endswith("expert_load"):
                b.zero_()


    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  kv_cache_dtype: str = "auto") -> KVCache:
        """`kv_cache_dtype`: "auto" stores keys and values in `dtype` (default: the weights'), "int8" as int8
        with block scales (Int8KVCache; its most recent block per row in `dtype`)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: must be one of {', '.join(KV_CACHE_DTYPES)}")
        w = self.model.embed_tokens.weight
        cache = Int8KVCache if kv_cache_dtype == "int8" else KVCache
        return cache(self.config, batch_size, max_len, w.device, dtype or w.dtype)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                init: bool = True, seed: int | None = 0, model_class: type[Transformer] = Transformer) -> Transformer:
    """Build on the meta device (no memory, no wasted init), then allocate on `device` in `dtype`.
    With init=False the weights are left uninitialised for a checkpoint to fill. `model_class`: Transformer
    or a subclass with another head (model/reward.py's RewardModel)."""
    with torch.device("meta"):
        model = model_class(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if init:
        model.init_weights(seed)
    else:
        for name, b in model.named_buffers():
            if name.endswith("expert_load") or name.endswith("e_score_correction_bias"):
                b.zero_()
    return model


# -- sizes -------------------------------------------------------------------------------------

def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights multiplied per token: all linear layers with only the routed experts a token uses
    (plus shared experts), and the output projection; the embedding lookup costs nothing."""
    h = cfg.hidden_size
    if cfg.is_mla:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        n = cfg.num_attention_heads
        q = h * n * qk if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * n * qk
        attn = q + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
            + cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim) + n * cfg.v_head_dim * h
    else:
        attn = h * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    total = 0
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            mlp = 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
            mlp += 3 * h * cfg.shared_expert_intermediate_size + h * cfg.num_experts
        else:
            mlp = 3 * h * cfg.intermediate_size
        total += attn + mlp
    return total + h * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs per token: 2 per multiply-add forward, x3 with the backward pass, as in the PaLM
    paper's MFU (Chowdhery et al. 2022, appendix B): 6N + 12 * L * heads * head_dim * T for
    training (the second term is attention's QK^T and AV, counted without the causal saving)."""
    if cfg.is_mla:
        attn_dim = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
    else:
        attn_dim = cfg.num_attention_heads * cfg.head_dim
    forward = 2 * matmul_params_per_token(cfg) + 4 * cfg.num_hidden_layers * attn_dim * seq_len
    return 3 * forward if training else forward
