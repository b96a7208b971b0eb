"""The vision encoder of a LLaVA model: a Vision Transformer with SigLIP's vision layout.

    pixels [B, 3, H, W] -> patch_embedding (a conv, stride = kernel = patch) + position_embedding
        -> [ x + attn(layer_norm1(x));  x + mlp(layer_norm2(x)) ] * L -> post_layernorm

A ViT (Dosovitskiy et al. 2021, sec. 3.1) as SigLIP trains it (Zhai et al. 2023, "Sigmoid Loss for
Language Image Pre-Training"): every patch is a token, with no class token and no layer norm before
the encoder; LayerNorm with biases, bidirectional attention with biases on q/k/v/out, an MLP with
GELU (the tanh approximation). Why SigLIP's layout rather than CLIP's: it has fewer parts (CLIP adds a
class token and a `pre_layrnorm`, and LLaVA must then drop the class token's feature), and SigLIP's
image processor resizes to a square without cropping, so nothing at an image's edge is lost, which
matters to questions about where a thing is.

Parameter names are those of transformers' `SiglipVisionModel` as the llava checkpoints on the Hub store
them (`vision_model.encoder.layers.0.self_attn.q_proj.weight`), so a state dict moves without conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class VisionConfigError(ValueError):
    """A vision config that lmforge cannot represent; the message names the field."""


@dataclass
class VisionConfig:
    """transformers' `SiglipVisionConfig` (model_type "siglip_vision_model"), field for field."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VisionConfigError(f"vision_config.{name}: {value!r:.40} is not a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise VisionConfigError(f"vision_config.num_attention_heads: {self.num_attention_heads} does not divide "
                                    f"hidden_size {self.hidden_size}")
        if self.image_size % self.patch_size:
            raise VisionConfigError(f"vision_config.patch_size: {self.patch_size} does not divide image_size "
                                    f"{self.image_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise VisionConfigError(f"vision_config.hidden_act: '{self.hidden_act}' is not supported; supported: "
                                    f"{', '.join(ACTIVATIONS)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, h, w]
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight  # row-major patches


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention: every patch sees every patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.config = cfg
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape

        def heads(t):
            return t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)

        drop = self.config.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           dropout_p=drop)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = nn.Module()  # the Hub checkpoints' "vision_model." prefix
        self.vision_model.embeddings = VisionEmbeddings(cfg)
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.vision_model.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        """transformers' `hidden_states`: the embeddings, then each layer's output (before post_layernorm),
        L + 1 tensors [B, patches, D]. `last`: stop after that many layers (LLaVA reads an earlier layer,
        so the later ones need not run)."""
        x = self.vision_model.embeddings(pixel_values)
        states = [x]
        for layer in self.vision_model.encoder.layers[:last]:
            x = layer(x)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The final features, post_layernorm applied (SigLIP's `last_hidden_state`)."""
        return self.vision_model.post_layernorm(self.hidden_states(pixel_values)[-1])

    @torch.no_grad()
    def init_weights(self) -> None:
        """SigLIP's initialisation (as transformers' SiglipPreTrainedModel): linear layers Xavier-uniform,
        the patch conv LeCun-normal, position embeddings ~ N(0, 1/sqrt(D)); biases 0, norm weights 1."""
        cfg = self.config
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                nn.init.trunc_normal_(module.weight, std=math.sqrt(1 / fan_in) / 0.87962566103423978)
                module.bias.zero_()
        self.vision_model.embeddings.position_embedding.weight.normal_(0.0, 1 / math.sqrt(cfg.hidden_size))
