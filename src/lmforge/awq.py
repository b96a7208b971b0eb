"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", arXiv 2306.00978, sec. 3), for `lmforge quantize --method awq`.

A few input channels carry much larger activations than the rest; their weights matter most. Scaling such a
column of W up by s before round-to-nearest and the activation down by s (folded into the op before: an RMSNorm's
weight, or the rows of the linear that produces the input) keeps the model's function and shrinks that column's
relative rounding error (sec. 3.2). Per decoder layer, in order (as AutoAWQ and llm-compressor's AWQModifier do):

1. Run the layer in full precision on the calibration activations that reach it, capturing each linear's input.
   The activations that reach the next layer are this fp output, computed before anything here changes the layer
   (AutoAWQ's choice): every layer is calibrated on the fp model's activations, not the quantised model's.
2. For each group of linears that share one input (`scale_groups`): grid-search alpha in {0, 1/20, ..., 19/20}
   with s = mean|x|^alpha per input channel, normalised by sqrt(max s * min s) (AutoAWQ), the loss the MSE of
   the group's module output (the attention, the MLP, or the linear itself) with quantise(W * s) / s against fp
   (sec. 3.2, eq. 5; the paper's s_X^alpha, not AutoAWQ's default "duo" scaling that also divides by a weight
   statistic). All groups are searched on the layer as it was; then the best s are folded in.
3. Clipping (AutoAWQ's auto_clip, which the paper's released code runs after the scales): per output row and
   weight group, the max |w| that the group's quantiser uses is searched over (1 - i/20) * max|w|, i < 10, the
   loss the MSE of that group's partial dot products with the (now scaled) inputs. Not for the linears whose
   outputs become attention scores (q, k and MLA's projections), whose errors the softmax amplifies (AutoAWQ skips
   them too). The clipped weights are written into the fp model; `quantize_model` then rounds them to nearest.

Families: dense attention and SwiGLU MLPs in full. o_proj is scaled through v_proj only where v_proj's output is
o_proj's input (no GQA: with grouped KV heads one v channel feeds several heads' o_proj inputs, which a per-input
scale cannot follow), as AutoAWQ does; with GQA o_proj is only clipped. MoE: every expert's and shared expert's
gate/up with the router scaled alongside (it stays fp), the loss on the MoE output; each expert's down_proj
through its up_proj on the tokens routed to it (an expert no calibration token reached: round to nearest).
MLA: q_proj (or q_a_proj) and kv_a_proj_with_mqa through input_layernorm, q_b_proj and kv_b_proj through their
RMSNorms; o_proj is not scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.data.formats import iter_text_pieces
from lmforge.data.pretrain import is_held_out_piece
from lmforge.eval.loglik import BUILTIN_VAL_FRACTION
from lmforge.model import Transformer
from lmforge.model.attention import Attention, MLAttention
from lmforge.model.moe import MoE
from lmforge.model.rope import rope_cos_sin
from lmforge.model.transformer import Block
from lmforge.quantize import dequantize_weight, quantize_weight
from lmforge.tokenizer import Tokenizer

N_GRID = 20  # alpha in {0, 1/20, ..., 19/20} (AutoAWQ's n_grid)
CLIP_STEPS = 10  # shrink max|w| by up to 10/20 (AutoAWQ's max_shrink 0.5 on its 20-point grid)
CLIP_TOKENS = 512  # the clip search's tokens, evenly spaced over the calibration tokens (AutoAWQ's n_sample_token)
# linears whose outputs become attention scores: no clipping (AutoAWQ skips q_ and k_)
NO_CLIP = ("q_proj", "k_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
BUILTIN = ("builtin", "builtin:shakespeare")


def calibration_tokens(tokenizer: Tokenizer, source: str, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] token ids of `source`, a text file (or JSONL / Parquet with a `text` field, as `prepare`
    reads them) or `builtin` (the built-in Shakespeare less the pieces `prepare` holds out for validation, which
    eval's builtin:shakespeare scores): `samples` evenly spaced pieces of the text, each contributing up to an
    equal share of tokens (EOS after a piece that ends within it), the stream cut into rows. Fewer rows if the
    text is short; an error if it is shorter than one row."""
    if source in BUILTIN:  # cut as prepare cuts this corpus (64 KB pieces): the same pieces held out
        pieces = [p.text for i, p in enumerate(iter_text_pieces("builtin:shakespeare"))
                  if not is_held_out_piece(i, BUILTIN_VAL_FRACTION)]
    else:
        pieces = [p.text for p in iter_text_pieces(source)]
    chosen = pieces[:: max(1, len(pieces) // samples)][:samples]
    share = -(-samples * seq_len // max(1, len(chosen)))  # tokens per piece, rounded up
    stream: list[int] = []
    for text in chosen:  # a token is rarely more than 16 characters: encode only the start of a long piece
        stream += (tokenizer.encode(text[: share * 16]) + [tokenizer.eos_id])[:share]
    rows = min(samples, len(stream) // seq_len)
    if rows == 0:
        raise ValueError(f"calibration text {source}: {len(stream)} tokens, fewer than one sample of {seq_len}")
    return torch.tensor(stream[: rows * seq_len]).reshape(rows, seq_len)


@dataclass
class ScaleGroup:
    """Linears that read one input: its channels are divided by s at `prev` (an RMSNorm's weight or a linear's
    rows), the `linears`' columns multiplied by s, and the loss measured on `inspect`'s output."""
    prev: str  # names within the block
    linears: list[str]  # quantised in the search
    inspect: str  # the module whose input is the group's input and whose output the loss compares
    also: tuple[str, ...] = ()  # fp readers of the same input (MoE routers), scaled so the function stays


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Round to nearest and back (quantize.py's formulas), in fp32."""
    q, scale = quantize_weight(weight, bits, group_size)
    return dequantize_weight(q, scale)


def scale_groups(block: Block) -> list[ScaleGroup]:
    """The groups of `block` that AWQ scales (see the module's docstring for each family)."""
    attn, groups = block.self_attn, []
    if isinstance(attn, MLAttention):
        first = "self_attn.q_a_proj" if attn.q_lora else "self_attn.q_proj"
        groups.append(ScaleGroup("input_layernorm", [first, "self_attn.kv_a_proj_with_mqa"], "self_attn"))
        if attn.q_lora:
            groups.append(ScaleGroup("self_attn.q_a_layernorm", ["self_attn.q_b_proj"], "self_attn.q_b_proj"))
        groups.append(ScaleGroup("self_attn.kv_a_layernorm", ["self_attn.kv_b_proj"], "self_attn.kv_b_proj"))
    else:
        qkv = [f"self_attn.{p}_proj" for p in "qkv"]
        groups.append(ScaleGroup("input_layernorm", qkv, "self_attn"))
        if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: v's channels are o's inputs
            groups.append(ScaleGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
    mlp = block.mlp
    if isinstance(mlp, MoE):
        mlps = {f"mlp.experts.{e}": expert for e, expert in enumerate(mlp.experts)}
        for name in ("shared_experts", "shared_expert"):
            if hasattr(mlp, name):
                mlps[f"mlp.{name}"] = getattr(mlp, name)
        also = ("mlp.gate",) + (("mlp.shared_expert_gate",) if hasattr(mlp, "shared_expert_gate") else ())
        readers = [f"{p}.{proj}" for p in mlps for proj in ("gate_proj", "up_proj")]
        groups.append(ScaleGroup("post_attention_layernorm", readers, "mlp", also))
    else:
        mlps = {"mlp": mlp}
        groups.append(ScaleGroup("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"))
    # each SwiGLU's down_proj reads silu(gate) * up: its channels are up_proj's rows
    return groups + [ScaleGroup(f"{p}.up_proj", [f"{p}.down_proj"], f"{p}.down_proj") for p in mlps]


def _run(module: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A group's `inspect` module on its input: attention needs RoPE (causal, no cache); a MoE returns (out, aux)."""
    if isinstance(module, (Attention, MLAttention)):
        return module(x, cos, sin, None)
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_inputs(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   names: set[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: the input of each named submodule in one forward of `block` on x}, the block's output). A module
    run several times (never here) or not at all (an expert no token reached) keeps its last input or is absent."""
    inputs, hooks = {}, []
    for name in names:
        def hook(module, args, name=name):
            inputs[name] = args[0].detach()
        hooks.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        out, _ = block(x, cos, sin, None)
    finally:
        for h in hooks:
            h.remove()
    return inputs, out


@torch.no_grad()
def search_scale(block: Block, group: ScaleGroup, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 bits: int, group_size: int | None) -> tuple[torch.Tensor, float, list[float]]:
    """(best s [in], its alpha, the loss at each grid point) for one group on its input x (sec. 3.2, eq. 5)."""
    inspect = block.get_submodule(group.inspect)
    linears = [block.get_submodule(n) for n in group.linears]
    originals = [lin.weight.detach().clone() for lin in linears]
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    reference = _run(inspect, x, cos, sin)
    losses, best = [], (float("inf"), None, 0.0)
    try:
        for step in range(N_GRID):
            alpha = step / N_GRID
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.data.copy_(fake_quantize(w.float() * s, bits, group_size) / s)
            loss = float((_run(inspect, x, cos, sin) - reference).float().pow(2).mean())
            losses.append(loss)
            if loss < best[0]:
                best = (loss, s, alpha)
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data.copy_(w)
    return best[1], best[2], losses


@torch.no_grad()
def fold_scale(block: Block, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the group's input channels by s where they are made (`prev`) and multiply the readers' columns by s:
    the block computes the same function (up to rounding)."""
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):  # its output rows are the readers' input channels
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # an RMSNorm
        prev.weight.div_(s.to(prev.weight.dtype))
    for name in (*group.linears, *group.also):
        reader = block.get_submodule(name)
        reader.weight.mul_(s.to(reader.weight.dtype)[None, :])


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """The max |w| per output row and weight group [out, groups] that minimises the MSE of the group's partial
    dot products with the inputs x [tokens, in] after quantisation (AutoAWQ's auto_clip)."""
    out_features, in_features = weight.shape
    group = group_size or in_features
    w = weight.float().reshape(out_features, -1, group)
    x = x.float().reshape(x.shape[0], -1, group)
    reference = torch.einsum("ogk,ngk->ong", w, x)
    full = w.abs().amax(dim=-1)  # [out, groups]
    best_max, best_err = full.clone(), torch.full_like(full, float("inf"))
    for step in range(CLIP_STEPS):
        max_val = full * (1 - step / N_GRID)
        clipped = torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None])
        quantized = fake_quantize(clipped.reshape(out_features, in_features), bits, group_size)
        out = torch.einsum("ogk,ngk->ong", quantized.reshape(w.shape), x)
        err = (out - reference).pow(2).mean(dim=1)
        better = err < best_err
        best_err, best_max = torch.where(better, err, best_err), torch.where(better, max_val, best_max)
    return best_max


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor) -> None:
    """Clamp each row's groups of weights to +-max_val [out, groups], in place."""
    w = linear.weight.data
    bound = max_val.to(w.dtype).repeat_interleave(w.shape[1] // max_val.shape[1], dim=1)
    w.copy_(torch.maximum(torch.minimum(w, bound), -bound))


@torch.no_grad()
def awq_block(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bits: int,
              group_size: int | None, clip: bool, quantized: list[str]) -> tuple[torch.Tensor, list[dict]]:
    """Steps 1-3 of the module's docstring on one layer, in place: (the fp layer's output on x, a record per
    group: its names, the alpha chosen, the loss at alpha 0 (round to nearest) and at the best alpha)."""
    groups = scale_groups(block)
    inputs, out = capture_inputs(block, x, cos, sin, {g.inspect for g in groups})
    chosen, records = [], []
    for g in groups:
        if g.inspect not in inputs:  # an expert that no calibration token reached
            continue
        s, alpha, losses = search_scale(block, g, inputs[g.inspect], cos, sin, bits, group_size)
        chosen.append((g, s))
        records.append({"prev": g.prev, "linears": g.linears, "alpha": alpha, "rtn_loss": losses[0],
                        "awq_loss": min(losses)})
    for g, s in chosen:
        fold_scale(block, g, s)
    if clip:
        names = [n for n in quantized if not n.endswith(NO_CLIP)]
        inputs, _ = capture_inputs(block, x, cos, sin, set(names))  # the scaled inputs, after folding
        for name in names:
            if name in inputs:
                tokens = inputs[name].reshape(-1, inputs[name].shape[-1])
                tokens = tokens[:: max(1, tokens.shape[0] // CLIP_TOKENS)]
                apply_clip(block.get_submodule(name), search_clip(block.get_submodule(name).weight, tokens, bits,
                                                                  group_size))
    return out, records


@torch.no_grad()
def apply_awq(model: Transformer, tokens: torch.Tensor, bits: int, group_size: int | None,
              clip: bool = True) -> list[dict]:
    """AWQ on an fp model, in place: each layer's scales folded into the fp weights and, with `clip`, its weights
    clipped, ready for `quantize_model`; `tokens` [samples, seq_len] the calibration. Returns a record per group
    and layer (awq_block's)."""
    from lmforge.quantize import quantizable  # quantize.py calls this module

    names = list(quantizable(model))
    embed = model.model.embed_tokens
    x = embed(tokens.to(embed.weight.device))
    positions = torch.arange(tokens.shape[1], device=x.device).expand(tokens.shape[0], -1)
    cos, sin = rope_cos_sin(model.inv_freq.to(x.device), model.rope_scale, positions, x.dtype)
    records = []
    for i, block in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        quantized = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]
        x, layer_records = awq_block(block, x, cos, sin, bits, group_size, clip, quantized)
        records += [{"layer": i, **r} for r in layer_records]
    return records

