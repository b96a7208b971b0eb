"""A LLaVA model: a vision encoder, a projector into the language model's embedding space, and any
language model lmforge supports (Liu et al. 2023, "Visual Instruction Tuning", sec. 4.1; the 2-layer
MLP projector of LLaVA-1.5, Liu et al. 2024, "Improved Baselines with Visual Instruction Tuning", sec. 3).

    pixels -> vision_tower (model/vision.py, SigLIP's layout) -> one layer's patch features
           -> multi_modal_projector: linear_1 -> GELU -> linear_2        [images, patches, text hidden]
    input_ids with `image_token_index` repeated once per patch (the placeholder `<image>`, expanded)
           -> embed_tokens, the placeholders' embeddings replaced by the image features, in order
           -> language_model (model/transformer.py) -> logits

The config is Hugging Face's `llava` config.json (`LlavaConfig`: text_config, vision_config,
image_token_index, vision_feature_layer, vision_feature_select_strategy, projector_hidden_act,
multimodal_projector_bias), and parameter names are those of the llava checkpoints on the Hub
(`language_model.model.layers.0...`, `language_model.lm_head.weight`, `vision_tower.vision_model...`,
`multi_modal_projector.linear_1.weight`), which `LlavaForConditionalGeneration` reads; saving and
loading are in vision/checkpoint.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from lmforge.config import ModelConfig, ModelConfigError, from_hf, preset, to_hf
from lmforge.model.transformer import ModelOutput, Transformer
from lmforge.model.vision import ACTIVATIONS, VisionConfig, VisionConfigError, VisionTower

VISION_MODEL_TYPE = "siglip_vision_model"
SELECT_STRATEGIES = ("full", "default")  # "default" drops each image's first feature (CLIP's class token)


@dataclass
class LlavaConfig:
    text: ModelConfig
    vision: VisionConfig
    image_token_index: int
    # Which hidden states of the vision tower feed the projector: an index into its L + 1 hidden states
    # (0 the patch embeddings, -1 the last layer), or a list of them, concatenated along the features.
    # LLaVA-1.5 reads the penultimate layer (-2) of a pretrained CLIP; a tower trained from scratch, the last.
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"  # SigLIP has no class token: keep every patch
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    def __post_init__(self):
        layers = self.vision_feature_layer if isinstance(self.vision_feature_layer, list) else [
            self.vision_feature_layer]
        depth = self.vision.num_hidden_layers
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and -depth - 1 <= i <= depth
                                 for i in layers):
            raise ModelConfigError(f"vision_feature_layer: {self.vision_feature_layer!r:.40} is not a layer index "
                                   f"(or a list of them) of a {depth}-layer vision tower")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ModelConfigError(f"vision_feature_select_strategy: '{self.vision_feature_select_strategy}' is "
                                   f"not one of {', '.join(SELECT_STRATEGIES)}")
        if self.projector_hidden_act not in ACTIVATIONS:
            raise ModelConfigError(f"projector_hidden_act: '{self.projector_hidden_act}' is not supported; "
                                   f"supported: {', '.join(ACTIVATIONS)}")
        index = self.image_token_index
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.text.vocab_size:
            raise ModelConfigError(f"image_token_index: {index!r:.40} is not a token id below text_config.vocab_size "
                                   f"{self.text.vocab_size}")

    @property
    def feature_layers(self) -> list[int]:
        """vision_feature_layer as non-negative indices into the tower's L + 1 hidden states."""
        layers = self.vision_feature_layer if isinstance(self.vision_feature_layer, list) else [
            self.vision_feature_layer]
        return [i % (self.vision.num_hidden_layers + 1) for i in layers]

    @property
    def image_seq_length(self) -> int:
        """How many placeholder tokens stand for one image (as LlavaProcessor expands `<image>`)."""
        return self.vision.num_patches - (self.vision_feature_select_strategy == "default")


# ---------------------------------------------------------------------------------------------
# Hugging Face's llava config.json <-> LlavaConfig
# ---------------------------------------------------------------------------------------------

def llava_from_hf(d: dict) -> LlavaConfig:
    """Read a `llava` config.json dict. Raises ModelConfigError naming any field we cannot honour."""
    if not isinstance(d, dict) or d.get("model_type") != "llava":
        raise ModelConfigError(f"model_type: {d.get('model_type') if isinstance(d, dict) else d!r:.40} is not llava")
    text, vision = d.get("text_config"), d.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ModelConfigError("text_config and vision_config: a llava config.json needs both, as objects")
    if vision.get("model_type") != VISION_MODEL_TYPE:
        raise ModelConfigError(f"vision_config.model_type: '{vision.get('model_type')}' is not supported; "
                               f"supported: {VISION_MODEL_TYPE} (SigLIP's vision tower)")
    try:
        text_cfg = from_hf({"model_type": "llama", **text})  # LlavaConfig's default text model
    except ModelConfigError as e:
        raise ModelConfigError(f"text_config.{e}") from None
    if "tie_word_embeddings" in d:  # LlavaConfig's own field wins over text_config's
        text_cfg.tie_word_embeddings = bool(d["tie_word_embeddings"] or text.get("tie_word_embeddings"))
    names = {f.name for f in fields(VisionConfig)}
    try:
        vision_cfg = VisionConfig(**{k: v for k, v in vision.items() if k in names})
    except VisionConfigError as e:
        raise ModelConfigError(str(e)) from None
    return LlavaConfig(
        text=text_cfg, vision=vision_cfg, image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
        vision_feature_layer=d.get("vision_feature_layer", -2),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)))


def llava_to_hf(cfg: LlavaConfig) -> dict:
    """The config.json `LlavaForConditionalGeneration` reads (with SigLIP's pooling head off: LLaVA reads
    the patch features, so the head would be unused weights)."""
    text = to_hf(cfg.text)
    text.pop("architectures")
    vision = {"model_type": VISION_MODEL_TYPE, **{f.name: getattr(cfg.vision, f.name) for f in fields(VisionConfig)},
              "vision_use_head": False}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": cfg.image_token_index,
        "image_seq_length": cfg.image_seq_length,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Projector(nn.Module):
    """LLaVA-1.5's projector: two linear layers with a GELU between, from the vision tower's width (times
    the number of feature layers) to the language model's."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        width = cfg.vision.hidden_size * len(cfg.feature_layers)
        hidden = cfg.text.hidden_size
        self.linear_1 = nn.Linear(width, hidden, bias=cfg.multimodal_projector_bias)
        self.linear_2 = nn.Linear(hidden, hidden, bias=cfg.multimodal_projector_bias)
        self.act = ACTIVATIONS[cfg.projector_hidden_act]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = Transformer(cfg.text)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [images, 3, H, W] -> [images, image_seq_length, text hidden]: the chosen hidden
        states of the tower (its later layers are not run), concatenated, projected."""
        layers = self.config.feature_layers
        states = self.vision_tower.hidden_states(pixel_values, last=max(layers))
        features = torch.cat([states[i] for i in layers], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The language model's input embeddings [B, T, D], each image's features in place of its placeholder
        tokens: the n-th placeholder run (in row-major order over the batch) gets the n-th image."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        placeholders = input_ids == self.config.image_token_index
        count = int(placeholders.sum())
        if pixel_values is None:
            if count:
                raise ValueError(f"{count} image placeholder tokens but no image")
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)
        if count != features.shape[0] * features.shape[1]:
            raise ValueError(f"{count} image placeholder tokens for {features.shape[0]} images of "
                             f"{features.shape[1]} tokens each")
        return embeds.masked_scatter(placeholders[..., None], features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        """input_ids [B, T] with the images' placeholder tokens, pixel_values [images, 3, H, W] (None: text only);
        the other keyword arguments are the language model's (position_ids, cache, document_ids, return_hidden)."""
        return self.language_model(input_ids, inputs_embeds=self.embed(input_ids, pixel_values), **kwargs)

    @property
    def output_weight(self) -> torch.Tensor:
        """The language model's output matrix, which the chunked losses (train/objectives.py) read."""
        return self.language_model.output_weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The language model as Transformer.init_weights, the tower as SigLIP's, the projector ~ N(0, 0.02)
        with zero biases (LLaVA's initializer_range)."""
        if seed is not None:
            torch.manual_seed(seed)
        self.language_model.init_weights()
        self.vision_tower.init_weights()
        for linear in (self.multi_modal_projector.linear_1, self.multi_modal_projector.linear_2):
            linear.weight.normal_(0.0, self.config.text.initializer_range)
            if linear.bias is not None:
                linear.bias.zero_()


def build_llava(cfg: LlavaConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                init: bool = True, seed: int | None = 0) -> Llava:
    """As transformer.build_model: built on the meta device, allocated on `device`, initialised unless a
    checkpoint will fill it (init=False)."""
    with torch.device("meta"):
        model = Llava(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if init:
        model.init_weights(seed)
    return model


def expand_image_tokens(ids: list[int], cfg: LlavaConfig) -> list[int]:
    """Token ids with each image placeholder repeated image_seq_length times, as LlavaProcessor expands
    `<image>` in the text before tokenizing."""
    out: list[int] = []
    for i in ids:
        out.extend([i] * cfg.image_seq_length if i == cfg.image_token_index else [i])
    return out


# ---------------------------------------------------------------------------------------------
# Presets: a vision tower for each text preset, for training from scratch
# ---------------------------------------------------------------------------------------------

LLAVA_PRESETS: dict[str, dict] = {
    # 64 px images in 8 px patches: 64 image tokens, a 0.4M-parameter tower, with the `tiny` text model.
    "tiny-llava": dict(text="tiny", vision=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                                                num_hidden_layers=2, num_attention_heads=4)),
    # 128 px in 16 px patches: 64 image tokens, a 5.0M-parameter tower, with the `small` text model.
    "small-llava": dict(text="small", vision=dict(image_size=128, patch_size=16, hidden_size=256,
                                                  intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4)),
}


def llava_preset(name: str, image_token_index: int, **text_overrides) -> LlavaConfig:
    """A preset's config; `text_overrides` as config.preset's (the tokenizer's vocab_size, its token ids)."""
    if name not in LLAVA_PRESETS:
        raise KeyError(f"unknown preset '{name}'; vision-language presets: {', '.join(LLAVA_PRESETS)}")
    spec = LLAVA_PRESETS[name]
    return LlavaConfig(text=preset(spec["text"], **text_overrides), vision=VisionConfig(**spec["vision"]),
                       image_token_index=image_token_index)


__all__ = ["LLAVA_PRESETS", "Llava", "LlavaConfig", "Projector", "build_llava", "expand_image_tokens",
           "llava_from_hf", "llava_preset", "llava_to_hf"]
