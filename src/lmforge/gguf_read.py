"""A GGUF file read back into an lmforge model and tokenizer: what `lmforge eval --model FILE.gguf` scores.

    model, tokenizer = load_gguf("model.q4_0.gguf")

The inverse of export.py, for the families it writes (llama, mistral and mixtral as llama.cpp's llama, qwen2,
qwen3, qwen2_moe, qwen3_moe, deepseek_v3 as deepseek2), whoever wrote the file: the same tables of the `gguf`
package (llama.cpp's own Python side) name the tensors both ways, so a file from llama.cpp's
convert_hf_to_gguf.py reads as one from `lmforge export`.
- The config comes from the file's `<arch>.*` metadata and which tensors it holds (biases, q/k norms, an output
  layer or a tied one); the tensors' shapes are then checked against it (checkpoint.check_weights) before any
  memory is allocated.
- Each weight is dequantised to fp32 by `gguf.quants` (every type llama.cpp writes, K-quants included) and put
  back into Hugging Face's layout: llama's q/k rows un-permuted (llama.cpp rotates adjacent pairs), stacked
  experts split, MLA's k_b / v_b joined into kv_b_proj. So a quantised file is scored with the weights llama.cpp
  holds, in fp32 arithmetic (llama.cpp also rounds activations to 8 bits for its quantised dot products: its
  logits differ from these by about that much).
- The tokenizer is rebuilt as the byte-level BPE that llama.cpp's gpt2 vocabulary is (tokens, merges, control
  and user-defined tokens, bos/eos/pad, the chat template), splitting text with the regex of the file's
  `tokenizer.ggml.pre` ("qwen2": lmforge's and Qwen's; "llama-bpe": Llama 3's); any other pre-tokenizer, and
  SentencePiece vocabularies, are refused by name rather than tokenised differently from llama.cpp.

A GGUF file is a download like any other: before the gguf package parses it, `check_header` walks its
metadata and refuses counts and lengths no real model has (a few bytes claiming a billion array items would
otherwise become a billion Python objects); the weights are memory-mapped and each tensor's size is bounded by
the file's.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from lmforge.checkpoint import CheckpointError
from lmforge.config import ModelConfig, ModelConfigError
from lmforge.export import FAMILIES, LLAMA3_PATTERN, hf_tensors
from lmforge.model import Transformer, build_model
from lmforge.tokenizer import SPLIT_PATTERN, Tokenizer

# llama.cpp architecture -> lmforge model_type (llama with experts is mixtral; mistral is written as llama)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                 "qwen3moe": "qwen3_moe", "deepseek2": "deepseek_v3"}
# tokenizer.ggml.pre -> (split regex, BPE ignore_merges), export.PRE_TOKENIZERS the other way
PRE_TOKENIZERS = {"qwen2": (SPLIT_PATTERN, False), "llama-bpe": (LLAMA3_PATTERN, True)}
MAX_KV = 65_536  # metadata entries (real files: a few dozen)
MAX_ARRAY = 1 << 22  # items of one metadata array (vocabularies and merges: under a million)
MAX_STRING = 1 << 24  # bytes of one string (a chat template: a few KiB)
MAX_TENSORS = 1 << 20


class GGUFError(ValueError):
    """A GGUF file lmforge cannot read as one of its model families; the message names the file and the key."""


# -- the header -----------------------------------------------------------------------------------------------

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def check_header(path: Path) -> None:
    """Walk the file's metadata without building it, refusing what would take unbounded memory or time to
    parse (GGUFError): more than MAX_KV entries, an array over MAX_ARRAY items, a string over MAX_STRING."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)

        def read(fmt: str):
            raw = f.read(struct.calcsize(fmt))
            if len(raw) < struct.calcsize(fmt):
                raise GGUFError(f"{path}: ends inside its metadata (truncated?)")
            return struct.unpack(fmt, raw)[0]

        def string(what: str) -> int:
            n = read("<Q")
            if n > MAX_STRING or f.tell() + n > size:
                raise GGUFError(f"{path}: {what}: a string of {n} bytes")
            f.seek(n, 1)
            return n

        def value(kind: int, what: str) -> None:
            if kind in _SCALARS:
                f.seek(_SCALARS[kind], 1)
            elif kind == _STRING:
                string(what)
            elif kind == _ARRAY:
                item, n = read("<I"), read("<Q")
                if n > MAX_ARRAY or item == _ARRAY:
                    raise GGUFError(f"{path}: {what}: an array of {n} items" if n > MAX_ARRAY else
                                    f"{path}: {what}: an array of arrays")
                if item in _SCALARS:
                    f.seek(n * _SCALARS[item], 1)
                else:
                    for _ in range(n):
                        value(item, what)
            else:
                raise GGUFError(f"{path}: {what}: unknown value type {kind}")
            if f.tell() > size:
                raise GGUFError(f"{path}: ends inside its metadata (truncated?)")

        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
        version, tensors, entries = read("<I"), read("<Q"), read("<Q")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} (versions 2 and 3 are read)")
        if tensors > MAX_TENSORS or entries > MAX_KV:
            raise GGUFError(f"{path}: {tensors} tensors and {entries} metadata entries: not a model file")
        for _ in range(entries):
            start = f.tell()
            string("a key")
            end = f.tell()
            f.seek(start + 8)
            key = f.read(end - start - 8).decode("utf-8", "replace")
            value(read("<I"), key)


class Metadata:
    """The file's key/value metadata, read as the types the config needs, each error naming the key."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path
        self.arch = self.get("general.architecture", str)

    def get(self, key: str, kind: type = int, default=...):
        key = key.format(arch=getattr(self, "arch", ""))
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.path}: no metadata key '{key}'")
            return default
        value = field.contents()
        ok = (isinstance(value, str) if kind is str else isinstance(value, list) if kind is list else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, bool) if kind is bool else isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise GGUFError(f"{self.path}: metadata '{key}' is {type(value).__name__}, not {kind.__name__}")
        return value


# -- the config -----------------------------------------------------------------------------------------------

def _rope_scaling(meta: Metadata, model_type: str) -> dict | None:
    kind = meta.get("{arch}.rope.scaling.type", str, "none")
    if kind in ("none", ""):
        return None
    factor = meta.get("{arch}.rope.scaling.factor", float)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise GGUFError(f"{meta.path}: rope scaling '{kind}' is not read (linear and yarn are)")
    scaling = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": meta.get("{arch}.rope.scaling.original_context_length")}
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                      ("yarn_attn_factor", "attention_factor")):
        value = meta.get(f"{{arch}}.rope.scaling.{key}", float, None)
        if value is not None:
            scaling[name] = value
    log_mul = meta.get("{arch}.rope.scaling.yarn_log_multiplier", float, None)
    if model_type == "deepseek_v3" and log_mul:  # llama.cpp keeps 0.1 * mscale_all_dim, and mscale equal to it
        scaling["mscale"] = scaling["mscale_all_dim"] = log_mul / 0.1
    return scaling


def _moe_fields(meta: Metadata, model_type: str, names: set[str]) -> dict:
    experts = meta.get("{arch}.expert_count", int, 0)
    if not experts:
        return {}
    fields = dict(num_experts=experts, num_experts_per_tok=meta.get("{arch}.expert_used_count"))
    if model_type == "llama":  # mixtral: its experts are feed_forward_length wide
        width = meta.get("{arch}.expert_feed_forward_length", int, 0) or meta.get("{arch}.feed_forward_length")
        return {**fields, "model_type": "mixtral", "moe_intermediate_size": width}
    fields["moe_intermediate_size"] = meta.get("{arch}.expert_feed_forward_length")
    if model_type == "qwen2_moe":
        fields.update(norm_topk_prob=False,
                      shared_expert_intermediate_size=meta.get("{arch}.expert_shared_feed_forward_length", int, 0))
    if model_type == "deepseek_v3":
        gating = meta.get("{arch}.expert_gating_func", int, 1)  # llama.cpp: 1 softmax, 2 sigmoid
        fields.update(n_shared_experts=meta.get("{arch}.expert_shared_count", int, 0),
                      first_k_dense_replace=meta.get("{arch}.leading_dense_block_count", int, 0),
                      routed_scaling_factor=meta.get("{arch}.expert_weights_scale", float, 1.0),
                      norm_topk_prob=meta.get("{arch}.expert_weights_norm", bool, False),
                      n_group=meta.get("{arch}.expert_group_count", int, 1),
                      topk_group=meta.get("{arch}.expert_group_used_count", int, 1),
                      scoring_func="sigmoid" if gating == 2 else "softmax",
                      expert_score_bias=any(n.endswith("exp_probs_b.bias") for n in names))
    return fields


def _mla_fields(meta: Metadata) -> dict:
    rope = meta.get("{arch}.rope.dimension_count")
    return dict(kv_lora_rank=meta.get("{arch}.attention.kv_lora_rank"),
                q_lora_rank=meta.get("{arch}.attention.q_lora_rank", int, 0) or None, qk_rope_head_dim=rope,
                qk_nope_head_dim=meta.get("{arch}.attention.key_length_mla") - rope,
                v_head_dim=meta.get("{arch}.attention.value_length_mla"), rope_interleave=True,
                num_key_value_heads=meta.get("{arch}.attention.head_count"))


def gguf_config(meta: Metadata, names: set[str], shapes: dict[str, tuple[int, ...]],
                special: dict[str, int | list[int] | None]) -> ModelConfig:
    """The ModelConfig the file's metadata and tensors describe (the inverse of export.write_gguf's)."""
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{meta.path}: per-frequency RoPE factors (rope_freqs, Llama 3.1's scaling) are not read")
    model_type = ARCHITECTURES[meta.arch]
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{meta.path}: no token_embd.weight tensor")
    heads = meta.get("{arch}.attention.head_count")
    fields = dict(
        model_type=model_type, vocab_size=shapes["token_embd.weight"][0],
        hidden_size=meta.get("{arch}.embedding_length"), num_hidden_layers=meta.get("{arch}.block_count"),
        intermediate_size=meta.get("{arch}.feed_forward_length", int, 0), num_attention_heads=heads,
        num_key_value_heads=meta.get("{arch}.attention.head_count_kv", int, heads),
        max_position_embeddings=meta.get("{arch}.context_length"),
        rms_norm_eps=meta.get("{arch}.attention.layer_norm_rms_epsilon", float),
        rope_theta=meta.get("{arch}.rope.freq_base", float, 10000.0),
        rope_scaling=_rope_scaling(meta, model_type), tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names, o_proj_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, **special)
    if model_type == "deepseek_v3":
        fields.update(_mla_fields(meta))
    else:
        fields["head_dim"] = meta.get("{arch}.attention.key_length", int, fields["hidden_size"] // heads)
    fields.update(_moe_fields(meta, model_type, names))
    if fields["model_type"] == "deepseek_v3" and not fields.get("num_experts"):
        fields["first_k_dense_replace"] = 0
    try:
        return ModelConfig(**fields)
    except (ModelConfigError, TypeError) as e:
        raise GGUFError(f"{meta.path}: its metadata is not a model lmforge can build: {e}") from None


# -- the tokenizer --------------------------------------------------------------------------------------------

def gguf_tokenizer(meta: Metadata) -> Tokenizer:
    """llama.cpp's gpt2 (byte-level BPE) vocabulary as a `tokenizers` tokenizer that splits text as llama.cpp
    does (GGUFError for another vocabulary or pre-tokenizer)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise GGUFError(f"{meta.path}: tokenizer.ggml.model '{kind}': only byte-level BPE ('gpt2') is read")
    pre = meta.get("tokenizer.ggml.pre", str, "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.pre '{pre}' is not read (known: {', '.join(PRE_TOKENIZERS)})")
    pattern, ignore_merges = PRE_TOKENIZERS[pre]
    tokens, types = meta.get("tokenizer.ggml.tokens", list), meta.get("tokenizer.ggml.token_type", list)
    merges = meta.get("tokenizer.ggml.merges", list)
    if len(types) != len(tokens):
        raise GGUFError(f"{meta.path}: {len(tokens)} tokens but {len(types)} token types")
    # every token but the unused rows of a padded vocabulary (gguf.TokenType.UNUSED): the special ones are in a
    # trained BPE's vocabulary too, and adding them below keeps their ids
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != 5}
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise GGUFError(f"{meta.path}: tokenizer.ggml.merges holds an entry that is not two tokens")
    try:
        backend = Backend(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    except Exception as e:  # tokenizers raises plain Exceptions for merges of unknown tokens
        raise GGUFError(f"{meta.path}: its vocabulary and merges do not form a BPE tokenizer ({e})") from None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # added tokens in id order, each at its own id (control: special; user-defined: not)
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (3, 4):  # gguf.TokenType.CONTROL, USER_DEFINED
            backend.add_tokens([AddedToken(token, special=kind == 3, normalized=False)])
            if backend.token_to_id(token) != i:
                raise GGUFError(f"{meta.path}: token {i} ({token[:40]!r}) would not keep its id")

    def token(key: str) -> str | None:
        i = meta.get(key, int, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token", bool, False) else None
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return Tokenizer(backend, eos_token=token("tokenizer.ggml.eos_token_id"), bos_token=bos,
                     pad_token=token("tokenizer.ggml.padding_token_id"),
                     chat_template=meta.get("tokenizer.chat_template", str, None))


# -- the weights ----------------------------------------------------------------------------------------------

def unpermute_for_llama(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """export.permute_for_llama undone: llama.cpp's adjacent-pair rows back to Hugging Face's rotate-half."""
    shape = weight.shape
    return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _dequantized(tensor) -> torch.Tensor:
    """One ReaderTensor as an fp32 torch tensor in its logical shape (outermost dimension first)."""
    from gguf import quants

    shape = tuple(reversed([int(d) for d in tensor.shape]))
    data = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(data.reshape(shape).copy())


def _gguf_names(model: Transformer, arch: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """export's (Hugging Face name -> GGUF name, shape) for this model, from a skeleton on the meta device."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, FAMILIES[model.config.model_type][0]),
                                     model.config.num_hidden_layers)
    table = {}
    for hf_name, tensor in hf_tensors(model):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"tensor '{hf_name}' has no name in llama.cpp's {arch}")
        table[hf_name] = (name, tuple(tensor.shape))
    return table


def _to_model_layout(hf_name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One of export's tensors (a stacked expert projection, a permuted q, ...) as the model's tensors; MLA's
    k_b / v_b come back as halves of kv_b_proj (`_join_kv_b`)."""
    if FAMILIES[cfg.model_type][1] and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return [(hf_name, unpermute_for_llama(tensor, cfg.num_attention_heads))]
    if FAMILIES[cfg.model_type][1] and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return [(hf_name, unpermute_for_llama(tensor, cfg.num_key_value_heads))]
    stacked = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\w+)\.weight$", hf_name)
    if stacked:
        return [(f"{stacked[1]}.{e}.{stacked[2]}.weight", t) for e, t in enumerate(tensor.unbind(0))]
    if hf_name.endswith("e_score_correction.bias"):
        return [(hf_name.replace("e_score_correction.bias", "e_score_correction_bias"), tensor)]
    return [(hf_name, tensor)]


def _join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """MLA's kv_b_proj [heads * (nope + v), latent] from export's k_b [heads, latent, nope] and v_b
    [heads, v, latent]."""
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).flatten(0, 1)


def _bound_sizes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Sizes the metadata claims that no tensor has (block_count 10^9) refused before a skeleton is built."""
    largest = max((max(shape, default=1) for shape in shapes.values()), default=0)
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "num_experts", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank"):
        value = getattr(cfg, name)
        if value is not None and value > largest:
            raise GGUFError(f"{path}: {name} {value} exceeds every dimension of its tensors ({largest})")
    blocks = 1 + max((int(m[1]) for n in shapes if (m := re.match(r"blk\.(\d+)\.", n))), default=-1)
    if cfg.num_hidden_layers > blocks:
        raise GGUFError(f"{path}: block_count {cfg.num_hidden_layers}, but its tensors hold {blocks} blocks")


def _check_tensors(table: dict, shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, path: Path) -> None:
    """Every tensor the model needs, in the shape its metadata implies, and no other."""
    for hf_name, (name, shape) in table.items():
        if name not in shapes:
            raise CheckpointError(f"{path}: no tensor '{name}' ({hf_name}) for a {cfg.model_type} model "
                                  "with this metadata")
        if [d for d in shapes[name] if d != 1] != [d for d in shape if d != 1]:  # llama.cpp drops ones
            raise CheckpointError(f"{path}: '{name}' has shape {shapes[name]}, its metadata implies {shape}")
    extra = set(shapes) - {name for name, _ in table.values()}
    if extra:
        raise CheckpointError(f"{path}: tensors a {cfg.model_type} model with this metadata does not have: "
                              f"{', '.join(sorted(extra)[:5])}")


def read_gguf(path: Path):
    """The gguf package's reader on a file whose header `check_header` passed (GGUFError otherwise)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"model: no GGUF file '{path}'")
    check_header(path)
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer a GGUF file holds, its weights dequantised (GGUFError / CheckpointError for a
    file that is not one of lmforge's families, or whose tensors do not fit its metadata)."""
    path = Path(path)
    reader = read_gguf(path)
    meta = Metadata(reader, path)
    if meta.arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture '{meta.arch}' is not one lmforge runs ({', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(reversed([int(d) for d in t.shape])) for name, t in tensors.items()}
    tokenizer = gguf_tokenizer(meta)
    eos = [i for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if (i := meta.get(key, int, None)) is not None]
    special = dict(eos_token_id=(eos[0] if len(set(eos)) == 1 else sorted(set(eos))) if eos else None,
                   bos_token_id=tokenizer.bos_id, pad_token_id=meta.get("tokenizer.ggml.padding_token_id", int, None))
    cfg = gguf_config(meta, set(tensors), shapes, special)
    _bound_sizes(cfg, shapes, path)
    with torch.device("meta"):
        skeleton = Transformer(cfg)
    table = _gguf_names(skeleton, meta.arch)
    if cfg.model_type == "qwen2_moe" and cfg.tie_word_embeddings:
        table.pop("lm_head.weight", None)
    _check_tensors(table, shapes, cfg, path)
    model = build_model(cfg, dtype=dtype, init=False)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    k_b: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for hf_name, (name, shape) in table.items():
            tensor = _dequantized(tensors[name]).reshape(shape)
            if hf_name.endswith(("k_b_proj.weight", "v_b_proj.weight")):
                kv_b = hf_name[:-len("k_b_proj.weight")] + "kv_b_proj.weight"
                if kv_b not in k_b:
                    k_b[kv_b] = tensor
                    continue
                first = k_b.pop(kv_b)
                pair = (first, tensor) if hf_name.endswith("v_b_proj.weight") else (tensor, first)
                state[kv_b].copy_(_join_kv_b(*pair))
                continue
            for model_name, part in _to_model_layout(hf_name, tensor, cfg):
                state[model_name].copy_(part)
    return model.eval(), tokenizer
