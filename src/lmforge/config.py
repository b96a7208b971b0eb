"""ModelConfig: the one description of a model, and its translation to and from the
`config.json` of a Hugging Face model directory.

Field names are Hugging Face's wherever a family has one, so a reader who knows
`LlamaConfig` or `DeepseekV3Config` knows these. `model_type` says which family's
config.json we write; the differences between families are listed in `_FAMILY` and
handled in `from_hf` / `to_hf` below, nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.files import read_json

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3",
)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
SEQUENCE_CLASSIFICATION = "ForSequenceClassification"  # a reward model's class: LlamaForSequenceClassification, ...


class ModelConfigError(ValueError):
    """A model's config.json that lmforge cannot represent or that is malformed; the message names the field.
    A command's own options are settings.OptionError's."""


# Integer fields and their smallest allowed value; _OPTIONAL_INTS may also be None (absent).
_INT_FIELDS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 0, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "max_position_embeddings": 1, "sliding_window": 1, "num_experts": 0,
    "num_experts_per_tok": 0, "moe_intermediate_size": 0, "n_group": 1, "topk_group": 1, "n_shared_experts": 0,
    "shared_expert_intermediate_size": 0, "first_k_dense_replace": 0, "decoder_sparse_step": 1,
    "kv_lora_rank": 1, "q_lora_rank": 1, "qk_rope_head_dim": 1, "qk_nope_head_dim": 0, "v_head_dim": 1,
    "num_labels": 1,
}
_OPTIONAL_INTS = {"head_dim", "sliding_window", "kv_lora_rank", "q_lora_rank", "num_labels"}
# Float fields: True where 0 is not allowed either.
_FLOAT_FIELDS = {"rms_norm_eps": True, "rope_theta": True, "routed_scaling_factor": True,
                 "router_aux_loss_coef": False, "initializer_range": False}
DROPOUTS = ("embd_pdrop", "attention_dropout", "resid_pdrop")  # probabilities in [0, 1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    # RoPE: theta, plus an optional scaling dict in HF's form ({"rope_type": "yarn", "factor": 4, ...}).
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    # Attention variants.
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2 always has it)
    o_proj_bias: bool = False  # bias on the output projection (Llama's attention_bias sets both)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral: each token sees the last `sliding_window` positions
    # Mixture of experts (num_experts == 0: dense).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    scoring_func: str = "softmax"  # "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3)
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # DeepSeek-V3 group-limited routing: experts in n_group groups,
    topk_group: int = 1  # tokens may only use experts of the best topk_group groups
    expert_score_bias: bool = False  # DeepSeek-V3 auxiliary-loss-free balancing bias
    n_shared_experts: int = 0  # DeepSeek style: an always-on MLP of n * moe_intermediate_size
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE style: always-on MLP with a sigmoid gate
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP (DeepSeek)
    mlp_only_layers: list[int] = field(default_factory=list)  # these layers keep a dense MLP (Qwen)
    decoder_sparse_step: int = 1  # MoE every k-th layer (Qwen)
    router_aux_loss_coef: float = 0.001
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank None: ordinary attention.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rope_interleave: bool = True
    # Token ids and init.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None  # a reward model scores each sequence at its last token that is not this one
    initializer_range: float = 0.02
    # Dropout in training (off in eval mode), with the names of HF's Phi / Phi-3 configs, the Llama-like
    # families that have all three (Llama's own config has only attention_dropout); `Transformer` reads
    # them at every forward, so setting them on a built model's config takes effect at once.
    embd_pdrop: float = 0.0  # on the token embeddings
    attention_dropout: float = 0.0  # on the attention probabilities
    resid_pdrop: float = 0.0  # on each attention and MLP output, before it is added to the residual stream
    # The head: None, a causal LM's output layer (`<Family>ForCausalLM`); 1, a reward model's scalar `score`
    # head (`<Family>ForSequenceClassification` with one label; model/reward.py).
    num_labels: int | None = None

    def __post_init__(self):
        self.validate_types()
        if self.kv_lora_rank is not None:  # MLA: HF's head_dim is the RoPE part of a head
            self.head_dim = self.qk_rope_head_dim
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def rope_dim(self) -> int:
        """How many dimensions of each head RoPE rotates."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        if self.num_experts == 0 or layer < self.first_k_dense_replace or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    @property
    def has_dense_layers(self) -> bool:
        """Whether any layer keeps a dense MLP (is_moe_layer False), without looping over the layers."""
        return (self.num_experts == 0 or self.first_k_dense_replace > 0 or self.decoder_sparse_step > 1
                or any(0 <= i < self.num_hidden_layers for i in self.mlp_only_layers))

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def validate_types(self) -> None:
        """Every field of the type and range it must have, before any size is computed from it (a config.json
        is input: `"hidden_size": "512"` or `-4` must be an error naming the field, not a TypeError)."""
        for name, low in _INT_FIELDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INTS:
                continue
            if not _is_int(value) or value < low:
                raise ModelConfigError(f"{name}: {value!r:.40} is not an integer >= {low}")
        for name, positive in _FLOAT_FIELDS.items():
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ModelConfigError(f"{name}: {value!r:.40} is not a {'positive' if positive else 'non-negative'} "
                                       "number")
        for name in DROPOUTS:
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise ModelConfigError(f"{name}: {value!r:.40} is not a dropout probability (from 0, below 1)")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(_is_int(i) for i in ids):
                raise ModelConfigError(f"{name}: {value!r:.40} is not a token id" + (" or a list of them" if
                                                                                     name == "eos_token_id" else ""))
        if not isinstance(self.mlp_only_layers, list) or not all(_is_int(i) for i in self.mlp_only_layers):
            raise ModelConfigError(f"mlp_only_layers: {self.mlp_only_layers!r:.40} is not a list of layer indices")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ModelConfigError(f"rope_scaling: {self.rope_scaling!r:.40} is not an object")
            for key, value in self.rope_scaling.items():
                numeric = key not in ("rope_type", "type", "truncate")
                if numeric and not (_is_number(value) and math.isfinite(value) and value > 0) and value is not None:
                    raise ModelConfigError(f"rope_scaling.{key}: {value!r:.40} is not a positive number")
            needed = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings"],
                      "yarn": ["original_max_position_embeddings"]}.get(self.rope_type, [])
            for key in needed:
                if not self.rope_scaling.get(key):
                    raise ModelConfigError(f"rope_scaling.{key}: missing (rope_type {self.rope_type} needs it)")

    def validate(self) -> None:
        def bad(name, why):
            raise ModelConfigError(f"{name}: {why}")

        if self.rope_dim % 2:
            bad("qk_rope_head_dim" if self.is_mla else "head_dim", f"{self.rope_dim}: RoPE rotates pairs of "
                "dimensions, so it must be even")
        if not self.is_mla and self.head_dim * self.num_attention_heads <= 0:
            bad("head_dim", f"{self.head_dim}: hidden_size {self.hidden_size} is smaller than num_attention_heads")
        if self.intermediate_size < 1 and self.has_dense_layers:
            bad("intermediate_size", f"{self.intermediate_size}: a dense MLP layer needs a positive width")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            bad("model_type", f"'{self.model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_scaling.rope_type", f"'{self.rope_type}' is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} does not divide num_attention_heads "
                f"{self.num_attention_heads}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                bad("num_experts_per_tok", f"{self.num_experts_per_tok} not in 1..{self.num_experts}")
            if self.scoring_func not in ("softmax", "sigmoid"):
                bad("scoring_func", f"'{self.scoring_func}' is not softmax or sigmoid")
            if self.num_experts % self.n_group or self.topk_group > self.n_group:
                bad("n_group", f"{self.num_experts} experts cannot form {self.n_group} groups "
                    f"with topk_group {self.topk_group}")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be positive for a MoE model")
        if self.num_labels not in (None, 1):
            bad("num_labels", f"{self.num_labels}: only a one-output score head (a reward model) is supported")


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

# What each family's config.json means where the families differ.
_FAMILY = {
    #               qkv bias         qk-norm  MoE style   MLA
    "llama":       {"qkv_bias": None, "qk_norm": False, "moe": None, "mla": False},
    "mistral":     {"qkv_bias": False, "qk_norm": False, "moe": None, "mla": False},
    "qwen2":       {"qkv_bias": True, "qk_norm": False, "moe": None, "mla": False},
    "qwen3":       {"qkv_bias": None, "qk_norm": True, "moe": None, "mla": False},
    "qwen2_moe":   {"qkv_bias": True, "qk_norm": False, "moe": "qwen", "mla": False},
    "qwen3_moe":   {"qkv_bias": None, "qk_norm": True, "moe": "qwen", "mla": False},
    "mixtral":     {"qkv_bias": False, "qk_norm": False, "moe": "mixtral", "mla": False},
    "deepseek_v3": {"qkv_bias": False, "qk_norm": False, "moe": "deepseek", "mla": True},
}

def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    """Both spellings: transformers 5's `rope_parameters` and the older `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(f"rope_scaling.rope_type: '{rope_type}' is not supported; supported: "
                               f"{', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelConfigError("partial_rotary_factor: only 1.0 is supported")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def from_hf(d: dict) -> ModelConfig:
    """Read a Hugging Face config.json dict. Raises ModelConfigError naming any field we cannot honour."""
    if not isinstance(d, dict):
        raise ModelConfigError(f"expected a JSON object, got {type(d).__name__}")
    try:
        return _from_hf(d)
    except KeyError as e:
        raise ModelConfigError(f"{e.args[0]}: missing from config.json") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ModelConfigError):
            raise
        raise ModelConfigError(f"a field has the wrong type: {e}") from None


def _from_hf(d: dict) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in _FAMILY:
        raise ModelConfigError(f"model_type: '{model_type}' is not supported; supported: "
                               f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    fam = _FAMILY[model_type]
    if d.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"hidden_act: '{d['hidden_act']}' is not supported (only silu)")
    if d.get("use_sliding_window"):
        raise ModelConfigError("use_sliding_window: per-layer sliding windows (Qwen) are not supported")
    rope_theta, rope_scaling = _rope_from_hf(d)
    unknown_moe = d.get("topk_method") not in (None, "noaux_tc", "greedy", "group_limited_greedy")
    if unknown_moe:
        raise ModelConfigError(f"topk_method: '{d['topk_method']}' is not supported")

    num_heads = d["num_attention_heads"]
    kw: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d.get("intermediate_size") or 0,
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=d.get("num_key_value_heads") or num_heads,
        head_dim=d.get("head_dim") or None,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=fam["qk_norm"],
        sliding_window=d.get("sliding_window") if model_type in ("mistral", "mixtral") else None,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        initializer_range=d.get("initializer_range", 0.02),
        num_labels=_num_labels(d),
        **{name: d.get(name) or 0.0 for name in DROPOUTS},
    )
    if fam["qkv_bias"] is None:  # Llama/Qwen3: one attention_bias for q, k, v and o
        kw["attention_bias"] = kw["o_proj_bias"] = bool(d.get("attention_bias", False))
    else:
        kw["attention_bias"] = bool(d.get("qkv_bias", fam["qkv_bias"]))

    moe = fam["moe"]
    if moe == "mixtral":
        kw.update(num_experts=d.get("num_local_experts", 8), num_experts_per_tok=d.get("num_experts_per_tok", 2),
                  moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True)
    elif moe == "qwen":
        kw.update(num_experts=d.get("num_experts") or d.get("num_local_experts", 0),
                  num_experts_per_tok=d.get("num_experts_per_tok", 2),
                  moe_intermediate_size=d.get("moe_intermediate_size", 0),
                  norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                  shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 0)
                  if model_type == "qwen2_moe" else 0,
                  mlp_only_layers=list(d.get("mlp_only_layers") or []),
                  decoder_sparse_step=d.get("decoder_sparse_step", 1),
                  router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001))
    elif moe == "deepseek":
        if d.get("attention_bias"):
            raise ModelConfigError("attention_bias: DeepSeek-V3 attention biases are not supported")
        if d.get("moe_layer_freq", 1) != 1:
            raise ModelConfigError("moe_layer_freq: only 1 is supported")
        if d.get("scoring_func", "sigmoid") not in ("sigmoid", "softmax"):
            raise ModelConfigError(f"scoring_func: '{d['scoring_func']}' is not supported")
        kw.update(num_experts=d.get("n_routed_experts") or d.get("num_local_experts", 0),
                  num_experts_per_tok=d.get("num_experts_per_tok", 8),
                  moe_intermediate_size=d.get("moe_intermediate_size", 0),
                  norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                  scoring_func=d.get("scoring_func", "sigmoid"),
                  routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                  n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
                  expert_score_bias=True,
                  n_shared_experts=d.get("n_shared_experts") or 0,
                  first_k_dense_replace=d.get("first_k_dense_replace", 0),
                  kv_lora_rank=d["kv_lora_rank"], q_lora_rank=d.get("q_lora_rank"),
                  qk_rope_head_dim=d["qk_rope_head_dim"], qk_nope_head_dim=d["qk_nope_head_dim"],
                  v_head_dim=d["v_head_dim"], rope_interleave=bool(d.get("rope_interleave", True)))
    return ModelConfig(**kw)


def _num_labels(d: dict) -> int | None:
    """A sequence classifier's outputs, counted as transformers counts them (its id2label, else num_labels,
    else 2); None for a causal LM."""
    architectures = d.get("architectures") or []
    if not any(str(name).endswith(SEQUENCE_CLASSIFICATION) for name in architectures):
        return None
    labels = d.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else d.get("num_labels", 2)


def architecture(cfg: ModelConfig) -> str:
    """The transformers class of cfg's model: `<Family>ForCausalLM`, or `<Family>ForSequenceClassification`."""
    causal = ARCHITECTURES[cfg.model_type]
    return causal.replace("ForCausalLM", SEQUENCE_CLASSIFICATION) if cfg.num_labels else causal


def to_hf(cfg: ModelConfig) -> dict:
    """The config.json transformers expects for cfg.model_type (with both RoPE spellings, so that
    transformers 4 and 5, vLLM and llama.cpp's converter all read it)."""
    fam = _FAMILY[cfg.model_type]
    rope_parameters = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type, **(cfg.rope_scaling or {})}
    d: dict[str, Any] = {
        "architectures": [architecture(cfg)],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(rope_parameters) if cfg.rope_scaling else None,
        "rope_parameters": rope_parameters,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "attention_dropout": cfg.attention_dropout,
        **{name: getattr(cfg, name) for name in ("embd_pdrop", "resid_pdrop") if getattr(cfg, name)},  # when used
        "use_cache": True,
    }
    if d["rope_scaling"]:
        d["rope_scaling"].pop("rope_theta")
    if cfg.num_labels:  # as transformers writes them; it counts the labels from id2label
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}

    def unsupported(name, value):
        raise ModelConfigError(f"{name}: {value!r} cannot be written as model_type '{cfg.model_type}'")

    # Attention options the family can express.
    if fam["qkv_bias"] is None:
        if cfg.attention_bias != cfg.o_proj_bias:
            unsupported("o_proj_bias", cfg.o_proj_bias)
        d["attention_bias"] = cfg.attention_bias
    elif cfg.model_type == "qwen2_moe":
        d["qkv_bias"] = cfg.attention_bias
    elif cfg.attention_bias != fam["qkv_bias"] or cfg.o_proj_bias:
        unsupported("attention_bias", cfg.attention_bias)
    if cfg.qk_norm != fam["qk_norm"]:
        unsupported("qk_norm", cfg.qk_norm)
    if cfg.mlp_bias and cfg.model_type != "llama":
        unsupported("mlp_bias", cfg.mlp_bias)
    if cfg.model_type == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type in ("mistral", "mixtral"):
        d["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window:
        unsupported("sliding_window", cfg.sliding_window)
    if cfg.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        d["use_sliding_window"] = False
    if cfg.is_mla != fam["mla"]:
        unsupported("kv_lora_rank", cfg.kv_lora_rank)

    # Mixture of experts.
    moe = fam["moe"]
    if moe is None and cfg.num_experts:
        unsupported("num_experts", cfg.num_experts)
    if moe == "mixtral":
        mixtral_like = cfg.norm_topk_prob and cfg.scoring_func == "softmax"
        if not mixtral_like or cfg.moe_intermediate_size != cfg.intermediate_size:
            unsupported("norm_topk_prob/scoring_func/moe_intermediate_size", "Mixtral routing")
        d.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 router_aux_loss_coef=cfg.router_aux_loss_coef)
    elif moe == "qwen":
        if cfg.scoring_func != "softmax" or cfg.n_shared_experts or cfg.first_k_dense_replace:
            unsupported("scoring_func/n_shared_experts/first_k_dense_replace", "Qwen MoE routing")
        if cfg.model_type == "qwen3_moe" and cfg.shared_expert_intermediate_size:
            unsupported("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size)
        d.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                 mlp_only_layers=list(cfg.mlp_only_layers), decoder_sparse_step=cfg.decoder_sparse_step,
                 router_aux_loss_coef=cfg.router_aux_loss_coef)
        if cfg.model_type == "qwen2_moe":
            d["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    elif moe == "deepseek":
        if cfg.scoring_func != "sigmoid" or not cfg.expert_score_bias or cfg.mlp_only_layers:
            unsupported("scoring_func/expert_score_bias/mlp_only_layers", "DeepSeek-V3 routing")
        if cfg.shared_expert_intermediate_size or cfg.decoder_sparse_step != 1:
            unsupported("shared_expert_intermediate_size/decoder_sparse_step", "DeepSeek-V3 layout")
        d.update(n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                 routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
                 topk_group=cfg.topk_group, n_shared_experts=cfg.n_shared_experts,
                 first_k_dense_replace=cfg.first_k_dense_replace, topk_method="noaux_tc",
                 scoring_func="sigmoid", kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
                 qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
                 v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave,
                 head_dim=cfg.qk_rope_head_dim, num_nextn_predict_layers=0)
    return d


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json (is this a model directory?)")
    d = read_json(file, ModelConfigError)
    try:
        return from_hf(d)
    except ModelConfigError as e:
        raise ModelConfigError(f"{file}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Presets: fresh models for training from scratch
# ---------------------------------------------------------------------------------------------

def _swiglu_hidden(hidden: int, multiple: int = 64) -> int:
    """SwiGLU width 8/3 * hidden rounded up (LLaMA, MiniMind), so the MLP costs what a 4x GELU MLP does."""
    return multiple * math.ceil(hidden * 8 / 3 / multiple)


PRESETS: dict[str, dict] = {
    # ~2.8M parameters: trains on the built-in corpus in minutes on 2 CPU cores.
    "tiny": dict(model_type="llama", vocab_size=6400, hidden_size=192, intermediate_size=_swiglu_hidden(192),
                 num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                 max_position_embeddings=2048, rope_theta=1e6),
    "tiny-moe": dict(model_type="qwen3_moe", vocab_size=6400, hidden_size=192,
                     intermediate_size=_swiglu_hidden(192), num_hidden_layers=4, num_attention_heads=6,
                     num_key_value_heads=2, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=256, norm_topk_prob=True, max_position_embeddings=2048,
                     rope_theta=1e6),
    "tiny-mla": dict(model_type="deepseek_v3", vocab_size=6400, hidden_size=192, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6, kv_lora_rank=64,
                     q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, n_shared_experts=1,
                     first_k_dense_replace=1, scoring_func="sigmoid", expert_score_bias=True,
                     max_position_embeddings=2048, rope_theta=1e6),
    # MiniMind2-small: hidden 512, 8 layers, 8 heads, 2 KV heads, vocab 6400 -> ~26M parameters.
    "small": dict(model_type="llama", vocab_size=6400, hidden_size=512, intermediate_size=_swiglu_hidden(512),
                  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1e6),
    # The same size with 8 experts, 2 active, each half as wide: about the dense model's active compute.
    "small-moe": dict(model_type="qwen3_moe", vocab_size=6400, hidden_size=512,
                      intermediate_size=_swiglu_hidden(512), num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, qk_norm=True, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=704, norm_topk_prob=True, max_position_embeddings=32768,
                      rope_theta=1e6),
    # DeepSeek-V3 layout at the small size: MLA attention, dense first layer, 8 routed + 1 shared expert.
    "small-mla": dict(model_type="deepseek_v3", vocab_size=6400, hidden_size=512,
                      intermediate_size=_swiglu_hidden(512), num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, kv_lora_rank=128, q_lora_rank=None, qk_rope_head_dim=32,
                      qk_nope_head_dim=64, v_head_dim=64, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=352, n_shared_experts=1, first_k_dense_replace=1,
                      scoring_func="sigmoid", expert_score_bias=True, routed_scaling_factor=1.0,
                      max_position_embeddings=32768, rope_theta=1e6),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], "tie_word_embeddings": True, **overrides})
