"""Quantised models (quantize.QuantLinear: int8 per channel, int4 per group, symmetric or not) through the C
decoder (infer/cpu_decode.c) against QuantLinear's PyTorch forward.

Two references: the PyTorch forward itself (its fp32 path: dequantised weights, fp32 activations and output matrix),
which the C logits match to about 1% of the largest logit, with the same greedy tokens; and the same forward with
what C rounds rounded alike (every projection's input to int8 per block of 32, the output matrix to int8 per row),
which they match to float rounding: a wrong scale, offset or nibble anywhere would show there.
"""

import platform

import pytest
import torch
from torch.nn import functional as F

from lmforge import quantize
from lmforge.config import preset
from lmforge.infer.cpu_decode import CPUDecoder, unsupported
from lmforge.model import KVCache, build_model
from lmforge.quantize import QuantLinear, dequantize_weight, quantize_model, quantize_weight

pytestmark = pytest.mark.skipif(CPUDecoder.create(build_model(preset("tiny"), seed=0)) is None,
                                reason="no C compiler: the decoder is not built")

WIDE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32)  # groups of 128 fit
SCHEMES = {  # name: (bits, group_size, symmetric, config)
    "int8": (8, None, True, {}),
    "int8 asymmetric": (8, None, False, {}),
    # an MLP width that is not a multiple of 64 (down_proj: the portable loops, a last block of 8 inputs)
    "int8 odd width": (8, None, True, dict(intermediate_size=520)),
    "int4 g32": (4, 32, True, {}),
    "int4 g64": (4, 64, True, {}),
    "int4 g128": (4, 128, True, WIDE),
    "int4 g32 asymmetric": (4, 32, False, {}),
    "int4 g128 asymmetric": (4, 128, False, WIDE),
    # 160 inputs: 64-input blocks and a last one of 32 (the portable loops)
    "int4 g32 odd width": (4, 32, True, dict(hidden_size=160, num_attention_heads=5, num_key_value_heads=1)),
}


def _asymmetric(model, bits: int, group_size: int | None):
    """Replace every quantizable layer by an asymmetric QuantLinear (min/max round to nearest, zero point in the
    signed range, as llm-compressor's W4A16_ASYM); lmforge reads such layers but does not write them."""
    with torch.no_grad():
        for name, linear in quantize.quantizable(model).items():
            w = linear.weight.float()
            out_features, in_features = w.shape
            group = in_features if group_size is None else group_size
            g = w.reshape(out_features, in_features // group, group)
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
            zero_point = (torch.round(-lo / scale) - 2 ** (bits - 1)).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            q = (torch.round(g / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1)).clamp(-(2 ** (bits - 1)),
                                                                                       2 ** (bits - 1) - 1)
            layer = QuantLinear(in_features, out_features, bits, group_size, False, symmetric=False)
            layer.qweight.copy_(q.reshape(out_features, in_features).to(torch.int8))
            layer.weight_scale.copy_(scale)
            layer.weight_zero_point.copy_(zero_point.to(torch.int8))
            quantize._replace(model, name, layer)
    return model


def _model(scheme: str):
    bits, group_size, symmetric, config = SCHEMES[scheme]
    model = build_model(preset("tiny", **config), seed=0).eval()
    return quantize_model(model, bits, group_size) if symmetric else _asymmetric(model, bits, group_size)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x as C rounds a matvec's input: int8 per block of 32 of the last dim (a last block may be shorter), scale
    max|x| / 127, x * (127 / max|x|) rounded to nearest even."""
    n = x.shape[-1]
    pad = -n % 32
    blocks = F.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    return (q * (amax / 127)).reshape(*x.shape[:-1], -1)[..., :n]


class _Reference:
    """The model's PyTorch forward on its fp32 path (QuantLinear dequantises: quantize.KERNEL_ROWS = 0, also
    where PyTorch's packed int8 kernel reads past an input width of 520); `rounded`: with C's roundings."""

    def __init__(self, model, rounded: bool, monkeypatch):
        monkeypatch.setattr(quantize, "KERNEL_ROWS", 0)
        self.model, self.rounded = model, rounded
        head = model.output_weight
        self.head = dequantize_weight(*quantize_weight(head, 8, None)) if rounded else head
        self.hooks = []
        if rounded:
            for module in model.modules():
                if isinstance(module, QuantLinear):
                    self.hooks.append(module.register_forward_pre_hook(lambda _, args: (_rounded(args[0]),)))

    def __call__(self, ids, positions, cache, **kwargs) -> torch.Tensor:
        """Logits of every token of ids [B, T]."""
        with torch.no_grad():
            hidden = self.model(ids, position_ids=positions, cache=cache, return_hidden=True, **kwargs).hidden
            return F.linear(_rounded(hidden) if self.rounded else hidden, self.head).float()

    def close(self):
        for hook in self.hooks:
            hook.remove()


def _copy(cache: KVCache, source: KVCache):
    for layer, source_layer in zip(cache.layers, source.layers):
        for buf, source_buf in zip(layer, source_layer):
            buf.copy_(source_buf)


def _decode_steps(model, decoder, reference, steps: int, batch: int, resync: bool = False):
    """(C logits, reference logits) of `steps` greedy decode steps of `batch` rows after prompts of different
    lengths, prefilled by the reference (the C decoder's cache a copy), each step fed the reference's tokens.
    `resync`: the C decoder's cache a copy of the reference's before each step too, so that each step's difference
    is its own (one input rounded the other way stays in the keys and values of every later step)."""
    torch.manual_seed(1)
    lengths = [3, 9, 6, 1, 12, 7, 4][:batch]
    T = max(lengths)
    ids = torch.randint(0, model.config.vocab_size, (batch, T))
    ref_cache, c_cache = KVCache(model.config, batch, 64), KVCache(model.config, batch, 64)
    reference(ids, torch.arange(T).expand(batch, T), ref_cache)
    _copy(c_cache, ref_cache)
    tokens, positions = torch.tensor([7, 300, 5000, 1, 2, 3, 4][:batch]), torch.tensor(lengths)
    got, want = [], []
    for _ in range(steps):
        if resync:
            _copy(c_cache, ref_cache)
        ref = reference(tokens[:, None], positions[:, None], ref_cache)[:, -1]
        got.append(decoder(tokens, positions, c_cache))
        want.append(ref)
        tokens, positions = ref.argmax(-1), positions + 1
    return torch.stack(got), torch.stack(want)


def _assert_rounded_match(got: torch.Tensor, want: torch.Tensor, matching: float = 0.75):
    """C's logits against the reference with C's roundings, per token (the last dim): at least `matching` of the
    tokens to float rounding; now and then an input rounds to the other int8 neighbour, where the two sides' sums
    differ in their last bit next to a rounding boundary, and moves its token's logits (and, through its keys and
    values, those of the later tokens of its prompt) by up to ~0.5% of the largest: all within 1%."""
    scale = want.abs().max()
    err = (got - want).abs().amax(-1).flatten() / scale
    assert err.max() <= 0.01, f"{err.max():.4f} of the largest logit"
    assert (err <= 1e-4).float().mean() >= matching, f"only {(err <= 1e-4).float().mean():.2f} of tokens match"


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantised_decode_steps_match_pytorch(scheme, batch, monkeypatch):
    model = _model(scheme)
    assert unsupported(model) is None
    decoder = CPUDecoder.create(model)
    reference = _Reference(model, rounded=True, monkeypatch=monkeypatch)
    _assert_rounded_match(*_decode_steps(model, decoder, reference, 8, batch, resync=True))
    reference.close()
    got, want = _decode_steps(model, decoder, _Reference(model, rounded=False, monkeypatch=monkeypatch), 8, batch)
    # against the plain forward: int8 activations and output matrix cost about 1% of the largest logit, and the
    # same greedy token wherever the reference's best two are further apart than that
    bound = 0.02 * want.abs().max()
    assert (got - want).abs().max() <= bound
    top2 = want.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * bound
    assert clear.float().mean() >= 0.5
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.parametrize("scheme", ["int8", "int4 g32", "int4 g128 asymmetric"])
def test_quantised_greedy_tokens_equal_pytorch(scheme, monkeypatch):
    """32 greedy tokens from one prompt, each side feeding its own: the same tokens."""
    model = _model(scheme)
    decoder = CPUDecoder.create(model)
    reference = _Reference(model, rounded=False, monkeypatch=monkeypatch)
    prompt = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    ref_cache, c_cache = KVCache(model.config, 1, 64), KVCache(model.config, 1, 64)
    ref_tokens, c_tokens = [], []
    ref_logits = reference(prompt, torch.arange(10)[None], ref_cache)[:, -1]
    c_logits = decoder(prompt[0], torch.arange(10), c_cache, rows=torch.zeros(10), out=torch.tensor([9]))
    for step in range(32):
        ref_tokens.append(int(ref_logits.argmax()))
        c_tokens.append(int(c_logits.argmax()))
        position = torch.tensor([[10 + step]])
        ref_logits = reference(torch.tensor([[ref_tokens[-1]]]), position, ref_cache)[:, -1]
        c_logits = decoder(torch.tensor(c_tokens[-1:]), position[0], c_cache)
    assert c_tokens == ref_tokens


@pytest.mark.parametrize("scheme", ["int8", "int4 g32 asymmetric", "int4 g32 odd width"])
def test_quantised_prefill_of_packed_prompts_matches_pytorch(scheme, monkeypatch):
    """Prompts packed into one call, each into its own cache row: every token's logits, with C's roundings."""
    model = _model(scheme)
    decoder = CPUDecoder.create(model)
    reference = _Reference(model, rounded=True, monkeypatch=monkeypatch)
    lengths, rows = [5, 11, 1], [2, 0, 1]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
               for n in lengths]
    want = torch.cat([reference(prompt[None], torch.arange(len(prompt))[None], KVCache(model.config, 1, 16))[0]
                      for prompt in prompts])
    got = decoder(torch.cat(prompts), torch.cat([torch.arange(n) for n in lengths]), KVCache(model.config, 3, 16),
                  rows=torch.cat([torch.full((n,), r) for n, r in zip(lengths, rows)]))
    _assert_rounded_match(got, want, matching=0)  # an input rounded the other way reaches the prompt's later tokens


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86 flag")
@pytest.mark.parametrize("flag", ["-mno-avx512vnni", "-mno-avx512f"])
def test_quantised_portable_paths(monkeypatch, tmp_path, flag):
    """The quantised matvecs of CPUs without AVX512-VNNI (AVX2's, and the portable loops for widths they do not
    take), built here with it off, for every kind of matrix: the reference with C's roundings, as with VNNI."""
    from lmforge.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_loaded", {})  # build again, with the flag below
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("LMFORGE_CFLAGS", flag)
    for scheme in ("int8 asymmetric", "int8 odd width", "int4 g32", "int4 g128 asymmetric"):
        model = _model(scheme)
        decoder = CPUDecoder.create(model)
        assert not decoder.prefills  # the portable loops are not used for prompts
        _assert_rounded_match(*_decode_steps(model, decoder, _Reference(model, True, monkeypatch), 6, 3, resync=True))


def test_quantised_models_it_does_not_handle_stay_on_pytorch():
    bf16 = quantize_model(build_model(preset("tiny"), seed=0).to(torch.bfloat16), 8, None,
                          scale_dtype=torch.bfloat16)
    assert unsupported(bf16) == "quantised projections in a model that is not fp32"
    mixed = build_model(preset("tiny"), seed=0)
    layer = mixed.model.layers[0].mlp
    layer.up_proj = QuantLinear.from_linear(layer.up_proj, 8, None, torch.float32)
    assert unsupported(mixed) == "quantised projections beside plain ones"
