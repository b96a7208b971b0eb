"""`lmforge export`: a model directory as one GGUF file that llama.cpp runs, and a Modelfile for Ollama.

    lmforge export --model runs/sft --format gguf   --out model.gguf --type q8_0
    lmforge export --model runs/sft --format ollama --out model.gguf --type q4_0   # + Modelfile beside it
    ollama create my-model -f Modelfile && ollama run my-model

The file is written by the `gguf` package, llama.cpp's own Python writer, with the architecture, metadata
keys and tensor names that llama.cpp's convert_hf_to_gguf.py gives the same Hugging Face model (the names
come from `gguf`'s tables, not from here). What differs between families:
- llama (and mistral, which llama.cpp runs as llama): llama.cpp rotates adjacent pairs of q and k, where
  Hugging Face's layout rotates the two halves of each head, so the rows of q_proj and k_proj are reordered
  within each head (`permute_for_llama`); qwen2 and qwen3 rotate halves in llama.cpp too, and stay as they are.
- qwen2 has biases on q, k and v; qwen3 an RMSNorm on each head's q and k.
- MoE (mixtral, which llama.cpp runs as llama, qwen2_moe, qwen3_moe): each layer's experts are stacked into
  one [experts, out, in] tensor per projection (ffn_gate_exps, ffn_up_exps, ffn_down_exps), the router is
  ffn_gate_inp (kept f32, as llama.cpp keeps it); llama.cpp's graphs for them softmax the router and take the
  top k, renormalised (but qwen2_moe's, not), with a sigmoid-gated shared expert (qwen2_moe's only), in
  every layer, so a config that routes otherwise is refused.
- deepseek_v3 (llama.cpp's deepseek2): multi-head latent attention, whose kv_b_proj is split per head into
  k_b (transposed) and v_b, as llama.cpp attends over the compressed latent; its first_k_dense_replace dense
  layers, shared experts, sigmoid or softmax routing in groups with the score-correction bias and scaling.
Weights are written as --type says: f32, f16, bf16, q8_0 or q4_0 (blocks of 32 by `gguf.quants`); norms and
biases stay f32, a matrix whose rows are not whole blocks falls back to f16 (as convert_hf_to_gguf.py does),
and with q4_0 the token embedding (also the output layer when tied) is q8_0 (llama.cpp's own q4_0 files keep
it at 6 bits or more: it holds the whole vocabulary's logits). `gguf` has no quantizer for llama.cpp's
K-quants; q4_k_m, q5_k_m and q6_k are made by llama.cpp's own quantizer (llama_model_quantize, what its
llama-quantize tool runs, through llama-cpp-python: installed with lmforge's test extra, or on its own) from
the f32 file, with its mixes (q4_k_m: q6_K for half of the attention values and MLP down projections, and
for the output layer); a matrix whose rows are not whole 256-blocks gets a type it can hold.

The tokenizer goes in as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`): tokens, their types,
merges, the special ids, the chat template, and `tokenizer.ggml.pre`, the name of the pre-tokenizer regex
llama.cpp splits text with. lmforge's tokenizers (and Qwen2/3's) split with Qwen2's regex, llama.cpp's
"qwen2"; Llama 3's is "llama-bpe". A tokenizer that splits any other way is refused, as llama.cpp would
tokenize it differently from how the model was trained.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.files import temporary_beside
from lmforge.settings import parse_args
from lmforge.tokenizer import SPLIT_PATTERN, Tokenizer

K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.cpp's llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_K_M, ...
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", *K_QUANTS)
# model_type -> the architecture llama.cpp runs it as (gguf.MODEL_ARCH's member), and whether q/k are permuted
FAMILIES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "mixtral": ("LLAMA", True),
            "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False), "qwen2_moe": ("QWEN2MOE", False),
            "qwen3_moe": ("QWEN3MOE", False), "deepseek_v3": ("DEEPSEEK2", False)}

# The pre-tokenizer regexes llama.cpp knows, as tokenizer.json writes them, with the BPE model's ignore_merges
# (a word that is a token is taken whole; llama.cpp sets it with "llama-bpe" only): (regex, ignore_merges) -> name
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {(SPLIT_PATTERN, False): "qwen2", (LLAMA3_PATTERN, True): "llama-bpe"}


class ExportError(ValueError):
    """A model or tokenizer this exporter cannot write as llama.cpp would run it; the message says which part."""


# -- the tokenizer ------------------------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE, or ExportError."""
    import json

    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')} model" + (" with byte fallback" if model.get("byte_fallback") else "")
        raise ExportError(f"tokenizer: a {kind}; llama.cpp's gpt2 vocabulary is byte-level BPE")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # NFC (Qwen's): llama.cpp does not fold, the same ids for NFC text
        raise ExportError(f"tokenizer: its normalizer ({normalizer}) is one llama.cpp's gpt2 tokenizer does not apply")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regex = None
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space", False)):
        regex = (steps[0].get("pattern") or {}).get("Regex")
    name = PRE_TOKENIZERS.get((regex, bool(model.get("ignore_merges", False))))
    if name is None:
        known = ", ".join(f"'{n}'" for n in PRE_TOKENIZERS.values())
        raise ExportError(f"tokenizer: its pre-tokenizer ({json.dumps(pre)[:200]}) is none that this exporter "
                          f"maps to one of llama.cpp's ({known}); llama.cpp would split text differently")
    return name


def _merges(tokenizer: Tokenizer) -> list[str]:
    import json

    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]  # "a b" or ["a", "b"] (tokenizers >= 0.20)


def llama_cpp_template(template: str) -> str:
    """The chat template without `{% generation %}` ... `{% endgeneration %}`, transformers' marks of the
    assistant's tokens, which other Jinja engines (llama.cpp's, llama-cpp-python's) do not know. Each becomes
    an `{% if true %}` ... `{% endif %}` with the same whitespace control, so the text rendered is the same."""
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    import gguf

    if tokenizer.vocab_size > vocab_size:
        raise ExportError(f"tokenizer: {tokenizer.vocab_size} tokens, more than the model's vocab_size {vocab_size}")
    pre = pre_tokenizer_name(tokenizer)
    added = tokenizer.backend.get_added_tokens_decoder()
    id_to_token = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:  # rows of the embedding no token uses (a vocabulary padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    eos = tokenizer.eos_id
    # no BOS (ours, Qwen's): llama.cpp would default to id 11; name the eos instead, as Qwen's GGUFs do, unused
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else eos
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_pad_token_id(tokenizer.pad_id)
    one = tokenizer.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(tokenizer.bos_id is not None and one[:1] == [tokenizer.bos_id])
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(llama_cpp_template(tokenizer.chat_template))
        ends = [i for i in tokenizer.stop_ids if i != eos]
        if ends:  # the end of a turn (<|im_end|>, <|eot_id|>): llama.cpp stops generating there
            writer.add_eot_token_id(ends[0])


# -- the weights --------------------------------------------------------------------------------------------

def permute_for_llama(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q_proj / k_proj rows (or bias) reordered within each head from Hugging Face's rotate-half layout
    (dims i and i + d/2 rotate together) to llama.cpp's llama layout (dims 2i and 2i + 1 rotate together)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _quant_type(name: str, tensor: torch.Tensor, kind: str):
    """The GGML type a tensor is written in under --type `kind`."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if tensor.ndim == 1 or kind == "f32" or ".ffn_gate_inp" in name:  # a router: f32, as llama.cpp keeps it
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]
    if wanted == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        wanted = Q.Q8_0
    block = GGML_QUANT_SIZES[wanted][0]
    return wanted if tensor.shape[-1] % block == 0 else Q.F16


def hf_tensors(model):
    """(Hugging Face name, tensor) of each tensor the file holds: not a tied output layer; each MoE layer's
    experts stacked per projection, `model.layers.N.mlp.experts.gate_proj.weight` [experts, out, in], the name
    llama.cpp's converter maps to ffn_gate_exps."""
    cfg = model.config
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight" and cfg.tie_word_embeddings and cfg.model_type == "qwen2_moe":
            yield "lm_head.weight", tensor  # llama.cpp's qwen2moe has no fallback to the embedding
        expert = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if expert:
            experts.setdefault((expert[1], expert[3]), {})[int(expert[2])] = tensor
        elif name.endswith("kv_b_proj.weight"):  # MLA: split per head into k_b [heads, latent, nope], v_b
            heads = tensor.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k_b, v_b = heads.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            yield name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)
            yield name.replace("kv_b_proj", "v_b_proj"), v_b
        else:
            yield name.replace("e_score_correction_bias", "e_score_correction.bias"), tensor
    for (prefix, projection), each in experts.items():
        yield f"{prefix}.{projection}.weight", torch.stack([each[i] for i in range(len(each))])


def rope_metadata(writer, cfg) -> torch.Tensor | None:
    """RoPE scaling as llama.cpp reads it; Llama 3's scaling is a tensor of per-frequency factors (returned)."""
    import gguf

    scaling = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if key in scaling:
                add(scaling[key])
        if scaling.get("attention_factor") is not None:
            writer.add_rope_scaling_yarn_attn_factor(scaling["attention_factor"])
    elif kind == "llama3":
        # each frequency's divisor: 1 above the high-frequency wavelength, `factor` below the low, smooth between
        dim, factor = cfg.head_dim, scaling.get("factor", 8.0)
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old = scaling.get("original_max_position_embeddings", 8192)
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        factors = []
        for wavelength in (2 * math.pi / freqs).tolist():
            if wavelength < old / high:
                factors.append(1.0)
            elif wavelength > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelength - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return torch.tensor(factors, dtype=torch.float32)
    return None


def check_exportable(cfg, model_dir: Path) -> tuple[str, bool]:
    if cfg.model_type not in FAMILIES:
        raise ExportError(f"{model_dir}: model_type '{cfg.model_type}' has no GGUF export "
                          f"(exported: {', '.join(FAMILIES)})")
    if cfg.num_labels:
        raise ExportError(f"{model_dir}: a reward model (a score head); llama.cpp runs language models")
    if cfg.mlp_bias:
        raise ExportError(f"{model_dir}: mlp_bias is not exported (llama.cpp's {cfg.model_type} has no MLP biases)")
    if cfg.attention_bias != cfg.o_proj_bias and cfg.model_type in ("llama", "mistral"):
        raise ExportError(f"{model_dir}: q/k/v biases without an output bias is not a llama layout")
    if cfg.model_type == "deepseek_v3":
        if not cfg.rope_interleave:
            raise ExportError(f"{model_dir}: rope_interleave false: llama.cpp's deepseek2 rotates adjacent pairs")
        if cfg.mlp_only_layers or cfg.decoder_sparse_step != 1:
            raise ExportError(f"{model_dir}: dense layers other than the first first_k_dense_replace: llama.cpp's "
                              "deepseek2 has those only")
    elif cfg.num_experts:
        qwen2_moe = cfg.model_type == "qwen2_moe"
        routing = {"norm_topk_prob": (cfg.norm_topk_prob, not qwen2_moe),
                   "scoring_func": (cfg.scoring_func, "softmax"),
                   "routed_scaling_factor": (cfg.routed_scaling_factor, 1.0),
                   "dense layers": (cfg.has_dense_layers, False),
                   "DeepSeek's shared experts": (bool(cfg.n_shared_experts), False),
                   "a gated shared expert": (bool(cfg.shared_expert_intermediate_size), qwen2_moe)}
        for what, (value, wanted) in routing.items():
            if value != wanted:
                raise ExportError(f"{model_dir}: {what} {value}: llama.cpp's {cfg.model_type} has {wanted}")
    return FAMILIES[cfg.model_type]


def llama_cpp_quantize(source: Path, out: Path, kind: str) -> Path:
    """llama.cpp's own quantizer (llama-quantize's llama_model_quantize) from the GGUF `source` to `out`."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"--type {kind}: llama.cpp's K-quants are made by llama.cpp itself, through "
                          "llama-cpp-python, which is not installed (pip install llama-cpp-python)") from None
    import logging

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[kind]
    params.nthread = os.cpu_count() or 1
    log = logging.getLogger("llama-cpp-python")  # llama.cpp's log goes through it: only errors, not every tensor
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if failed:
        raise ExportError(f"--type {kind}: llama.cpp's quantizer failed on {source}")
    return out


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "f32") -> Path:
    """Write the HF model directory `model_dir` (weights, config.json, tokenizer) as the GGUF file `out`."""
    model_dir, out = Path(model_dir), Path(out)
    if kind not in TYPES:
        raise ExportError(f"--type: '{kind}' is not one of {', '.join(TYPES)}")
    if kind in K_QUANTS:
        source = temporary_beside(out.with_name(out.name + ".f32"))
        try:
            write_gguf(model_dir, source, "f32")
            tmp = temporary_beside(out)
            llama_cpp_quantize(source, tmp, kind)
            os.replace(tmp, out)
        finally:
            source.unlink(missing_ok=True)
            temporary_beside(out).unlink(missing_ok=True)
        return out
    return write_gguf(model_dir, out, kind)


def write_gguf(model_dir: Path, out: Path, kind: str) -> Path:
    """`export_gguf` for the types the gguf package writes itself."""
    import gguf

    from lmforge.checkpoint import load_model
    from lmforge.merge import base_dtype

    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model: no model directory '{model_dir}'")
    from lmforge.config import load_config

    cfg = load_config(model_dir)
    arch_name, permute = check_exportable(cfg, model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    pre_tokenizer_name(tokenizer)  # refused before the weights are read
    model = load_model(model_dir, dtype=base_dtype(model_dir))  # as stored: each tensor goes to fp32 on its own
    arch = getattr(gguf.MODEL_ARCH, arch_name)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out)
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # `<arch>.<key>` in the file: the GGUF key (its GGUFWriter.add_<key>) and the config.json value
        hparams = {"vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
                   "embedding_length": cfg.hidden_size, "block_count": cfg.num_hidden_layers,
                   "feed_forward_length": cfg.intermediate_size, "head_count": cfg.num_attention_heads,
                   "head_count_kv": cfg.num_key_value_heads, "key_length": cfg.head_dim,
                   "value_length": cfg.head_dim, "rope_dimension_count": cfg.head_dim,
                   "rope_freq_base": cfg.rope_theta, "layer_norm_rms_eps": cfg.rms_norm_eps}
        if cfg.num_experts:
            hparams.update(expert_count=cfg.num_experts, expert_used_count=cfg.num_experts_per_tok,
                           expert_feed_forward_length=cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            hparams.update(expert_shared_feed_forward_length=cfg.shared_expert_intermediate_size)
        if cfg.is_mla:  # llama.cpp's deepseek2 attends over the compressed latent: one "kv head" of that width
            hparams.update(head_count_kv=1, kv_lora_rank=cfg.kv_lora_rank,
                           key_length=cfg.kv_lora_rank + cfg.qk_rope_head_dim, value_length=cfg.kv_lora_rank,
                           key_length_mla=cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                           value_length_mla=cfg.v_head_dim, rope_dimension_count=cfg.qk_rope_head_dim,
                           leading_dense_block_count=cfg.first_k_dense_replace if cfg.num_experts else
                           cfg.num_hidden_layers,
                           q_lora_rank=cfg.q_lora_rank or 0)  # 0: q_proj whole (llama.cpp reads the key unless
                                                              # the layer count is a "lite" model's)
            if "mscale_all_dim" in (cfg.rope_scaling or {}):
                hparams.update(rope_scaling_yarn_log_mul=0.1 * cfg.rope_scaling["mscale_all_dim"])
        if cfg.model_type == "deepseek_v3" and cfg.num_experts:
            hparams.update(expert_shared_count=cfg.n_shared_experts, expert_weights_scale=cfg.routed_scaling_factor,
                           expert_weights_norm=cfg.norm_topk_prob, expert_group_count=cfg.n_group,
                           expert_group_used_count=cfg.topk_group,
                           expert_gating_func=gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                           else gguf.ExpertGatingFuncType.SOFTMAX)
        for key, value in hparams.items():
            getattr(writer, f"add_{key}")(value)
        rope_freqs = rope_metadata(writer, cfg)
        if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
            print(f"note: sliding_window {cfg.sliding_window}: llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} attends "
                  "to every earlier position, as this model does within its window", file=sys.stderr)
        add_tokenizer(writer, tokenizer, cfg.vocab_size)

        names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)

        def tensors():
            """(GGUF name, fp32 tensor as llama.cpp lays it out), one at a time."""
            extra = [] if rope_freqs is None else [("rope_freqs.weight", rope_freqs)]
            for hf_name, tensor in [*hf_tensors(model), *extra]:
                name = hf_name if extra and hf_name == extra[0][0] else names.get_name(
                    hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ExportError(f"{model_dir}: tensor '{hf_name}' has no name in llama.cpp's "
                                      f"{gguf.MODEL_ARCH_NAMES[arch]}")
                tensor = tensor.detach().float()
                if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    tensor = permute_for_llama(tensor, cfg.num_attention_heads)
                elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    tensor = permute_for_llama(tensor, cfg.num_key_value_heads)
                yield name, tensor, _quant_type(name, tensor, kind)

        # the tensors' table first (names, types, sizes), then each tensor converted and written in turn, so
        # memory holds the model and one converted tensor, not a second copy of the model
        for name, tensor, qtype in tensors():
            shape = gguf.quants.quant_shape_to_byte_shape(tuple(tensor.shape), qtype)
            writer.add_tensor_info(name, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor, qtype in tensors():
            writer.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(tensor.numpy()), qtype))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


# -- Ollama ------------------------------------------------------------------------------------------------

# lmforge's ChatML (CHATML_TEMPLATE without tools) in Ollama's Go template: the system prompt, then each turn,
# then the assistant's opening when the last message is not the assistant's (Qwen2.5's Ollama template's shape).
CHATML_OLLAMA = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def modelfile(gguf_name: str, tokenizer: Tokenizer, context: int, temperature: float = 0.7, top_p: float = 0.9) -> str:
    """An Ollama Modelfile for the GGUF `gguf_name` (a path relative to the Modelfile): FROM, TEMPLATE (for
    ChatML templates; any other is left to Ollama, which reads the GGUF's own chat template), stop tokens,
    sampling PARAMETERs, and a context of `context` tokens (at most 4096: Ollama allocates its KV cache whole)."""
    lines = [f"FROM ./{gguf_name}", ""]
    if tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template:
        lines += [f'TEMPLATE """{CHATML_OLLAMA}"""', ""]
    for i in tokenizer.stop_ids:
        lines.append(f'PARAMETER stop "{tokenizer.backend.id_to_token(i)}"')
    lines += [f"PARAMETER temperature {temperature}", f"PARAMETER top_p {top_p}",
              f"PARAMETER num_ctx {min(context, 4096)}"]
    return "\n".join(lines) + "\n"


# -- the command --------------------------------------------------------------------------------------------

@dataclass
class ExportConfig:
    model: str = field(default="", metadata={"help": "the HF model directory to export"})
    format: Literal["gguf", "ollama"] = field(
        default="gguf", metadata={"help": "gguf: one .gguf file; ollama: the .gguf and a Modelfile beside it"})
    out: str = field(default="", metadata={"help": "the .gguf file to write"})
    type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] = field(
        default="f16", metadata={"help": "weights: f32, f16, bf16, or blocks of 32 with a scale, q8_0 (8 bits) or "
                                         "q4_0 (4 bits; its embedding q8_0); or llama.cpp's K-quant mixes, made by "
                                         "llama.cpp's own quantizer (needs llama-cpp-python); norms, biases f32"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(ExportConfig, argv, prog="lmforge export", description=__doc__)
    for name in ("model", "out"):
        if not getattr(args, name):
            print(f"lmforge export: error: --{name} is required", file=sys.stderr)
            return 2
    out = export_gguf(args.model, args.out, args.type)
    print(out)
    if args.format == "ollama":
        from lmforge.config import load_config

        text = modelfile(out.name, Tokenizer.from_dir(args.model), load_config(args.model).max_position_embeddings)
        (out.parent / "Modelfile").write_text(text, encoding="utf-8")
        print(out.parent / "Modelfile")
    return 0
