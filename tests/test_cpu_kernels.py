"""The fused CPU kernels (model/cpu_kernels.c) and the bf16 CPU attention against the PyTorch ops they
replace: values and gradients, fp32 and bf16, NaN propagation, bad labels, and the fallback when no
compiler is available."""

import ctypes
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import preset
from lmforge.infer import cpu_decode
from lmforge.infer.cpu_decode import CPUDecoder
from lmforge.model import build_model, cpu_kernels
from lmforge.model.attention import CausalAttentionCPU
from lmforge.model.rope import apply_rope
from lmforge.train.environment import keep_freed_memory
from lmforge.train.objectives import causal_lm_loss

pytestmark = pytest.mark.skipif(not cpu_kernels.compiled(), reason="no C compiler: the kernels are not built")
DTYPES = [torch.float32, torch.bfloat16]


def _grads(fn, *inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


def _close(a, b, dtype):
    # fp32: summation order only; bf16: one rounding step of the result (2^-8 relative)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1 / 64)
    torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_transformers_formula(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 96).to(dtype), (1 + 0.1 * torch.randn(96)).to(dtype)
    dy = torch.randn(3, 5, 96).to(dtype)
    # LlamaRMSNorm: normalise in fp32, round to the input dtype, scale by the weight
    ref = lambda x, w: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    out, (gx, gw) = _grads(lambda x, w: cpu_kernels.rms_norm(x, w, 1e-6), x, w, grad_out=dy)
    ref_out, (rgx, rgw) = _grads(ref, x, w, grad_out=dy)
    _close(out, ref_out, dtype)
    _close(gx, rgx, dtype)
    # the weight gradient sums 15 rows: compare relative to its scale
    torch.testing.assert_close(gw.float(), rgw.float(), rtol=1e-5 if dtype == torch.float32 else 1 / 64,
                               atol=1e-4 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_equals_apply_rope_bit_for_bit(dtype):
    torch.manual_seed(0)
    B, T, H, D = 2, 7, 3, 16
    q, dy = torch.randn(B, T, H, D).to(dtype), torch.randn(B, T, H, D).to(dtype)
    freqs = torch.randn(B, T, D // 2)
    cos, sin = torch.cat([freqs, freqs], -1).cos().to(dtype), torch.cat([freqs, freqs], -1).sin().to(dtype)
    out, (g,) = _grads(lambda q: cpu_kernels.rope(q, cos, sin), q, grad_out=dy)
    ref, (rg,) = _grads(lambda q: apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2), q, grad_out=dy)
    assert torch.equal(out, ref) and torch.equal(g, rg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_silu_times_up(dtype):
    torch.manual_seed(0)
    g, u, dy = (4 * torch.randn(6, 300)).to(dtype), torch.randn(6, 300).to(dtype), torch.randn(6, 300).to(dtype)
    g[0, :4] = torch.tensor([-200.0, 200.0, -88.5, 89.0])  # where exp under/overflows
    out, (gg, gu) = _grads(lambda g, u: cpu_kernels.swiglu(torch.cat([g, u], -1)), g, u, grad_out=dy)
    ref, (rgg, rgu) = _grads(lambda g, u: F.silu(g) * u, g, u, grad_out=dy)
    for a, b in ((out, ref), (gg, rgg), (gu, rgu)):
        assert torch.isfinite(a).all()
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_and_its_gradient(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(9, 257)).to(dtype)
    labels = torch.randint(0, 257, (9,))
    labels[[2, 5]] = -100
    ref_loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    ref_grad = (logits.float().softmax(-1) - F.one_hot(labels.clamp(min=0), 257)) * (labels != -100)[:, None]
    grad = logits.clone()
    loss = cpu_kernels.cross_entropy_(grad, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    _close(grad, ref_grad.to(dtype), dtype)
    assert (grad[[2, 5]] == 0).all() and (loss[[2, 5]] == 0).all()
    with pytest.raises(IndexError, match="label 257 is outside the vocabulary of 257"):
        cpu_kernels.cross_entropy_(logits.clone(), torch.full((9,), 257))


def test_nan_propagates():
    """The Trainer's non-finite guard relies on NaN reaching the loss."""
    x = torch.randn(2, 8)
    x[0, 3] = float("nan")
    assert cpu_kernels.rms_norm(x, torch.ones(8), 1e-6)[0].isnan().all()
    assert cpu_kernels.swiglu(torch.cat([x, torch.ones(2, 8)], -1))[0, 3].isnan()
    assert cpu_kernels.cross_entropy_(x.clone(), torch.tensor([0, 1]))[0].isnan()


def test_causal_attention_cpu_matches_sdpa():
    torch.manual_seed(0)
    B, H, KV, T, D = 2, 4, 2, 24, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    dy = torch.randn(B, H, T, D)
    bf = [t.bfloat16() for t in (q, k, v)]
    out, grads = _grads(lambda q, k, v: CausalAttentionCPU.apply(q, k, v, D**-0.5), *bf, grad_out=dy.bfloat16())
    # reference: fp32 SDPA on the same bf16-rounded inputs
    ref, ref_grads = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                            *[t.float() for t in bf], grad_out=dy.bfloat16().float())
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=0.03, atol=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_step_with_and_without_kernels(dtype, monkeypatch):
    """A whole forward + backward (RMSNorm, RoPE, SwiGLU, attention, loss) agrees with the PyTorch path."""
    torch.manual_seed(0)
    model = build_model(preset("tiny"), seed=0).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)}

    def loss_and_grads():
        model.zero_grad()
        loss = causal_lm_loss(model, batch)[0]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    monkeypatch.setattr(cpu_kernels, "usable", lambda *t: False)
    monkeypatch.setattr("lmforge.model.attention.use_cpu_attention", lambda *a: False)
    ref_loss, ref_grads = loss_and_grads()
    tol = 1e-5 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name, g in grads.items():
        r = ref_grads[name].float()
        # relative to the tensor's scale: bf16 gradients differ by a few roundings along the way
        assert (g.float() - r).norm() <= (1e-4 if dtype == torch.float32 else 0.05) * r.norm() + 1e-8, name


def test_no_compiler_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="CPU kernels unavailable"):
        assert not cpu_kernels.compiled()
    x = torch.randn(2, 8, requires_grad=True)
    assert not cpu_kernels.usable(x)
    model = build_model(preset("tiny"), seed=0)
    out = model(torch.randint(0, 100, (1, 8)))
    assert torch.isfinite(out.logits).all()
    with pytest.warns(UserWarning, match="C decode unavailable"):
        assert CPUDecoder.create(model) is None  # the engine then decodes with PyTorch
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind


def test_kernels_compile_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    assert cpu_kernels.compiled()
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("tmp*"))


CPUINFO = """processor\t: {n}
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: {mhz}
bogomips\t: {bogomips}
flags\t\t: fpu sse2 avx2 {flags}
"""


def test_the_cache_key_follows_the_cpu_and_compiler_not_the_clock(monkeypatch, tmp_path):
    """With frequency scaling /proc/cpuinfo's `cpu MHz` changes from one read to the next: the
    library compiled for the CPU is found again all the same. Other feature flags or another
    compiler give another file."""
    def path(mhz="2100.000", flags="avx512f", cc="cc"):
        info = tmp_path / "cpuinfo"
        info.write_text("\n".join(CPUINFO.format(n=n, mhz=mhz, bogomips=float(mhz) * 2, flags=flags) for n in range(2)))
        monkeypatch.setattr(cpu_kernels, "CPUINFO", info)
        monkeypatch.setenv("CC", cc)
        return cpu_kernels.library_path(cpu_kernels._SOURCE, cpu_kernels.FLAGS)

    assert path(mhz="2100.000") == path(mhz="3391.998") == path(mhz="800.117")
    assert path(flags="avx512f") != path(flags="avx512f avx512_bf16")
    other_cc = tmp_path / "other-cc"
    other_cc.write_text("#!/bin/sh\necho 'cc (Other) 99.1'\n")
    other_cc.chmod(0o755)
    assert path() != path(cc=str(other_cc))


def _c_prototypes(source: Path) -> dict[str, tuple[str, list[str]]]:
    """The exported functions of a C file of lmforge: name -> (result type, parameter declarations).
    A per-dtype macro's functions (name_##S) are named without the suffix."""
    found = re.findall(r"^(void|int|long|const char \*)\s*(\w+?)(?:_##S)?\(([^)]*)\)", source.read_text(), re.M)
    return {name: (result, [] if params.strip() == "void" else params.replace("\\", "").split(","))
            for result, name, params in found}


def _ctype(declaration: str):
    """The ctypes type matching a C type or parameter declaration (lmforge's C files use only these)."""
    if "*" in declaration:
        return ctypes.c_char_p if "char" in declaration else ctypes.c_void_p
    return {"void": None, "int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float}[declaration.split()[0]]


def test_argument_types_match_the_c_prototypes():
    """What Python declares for each exported C function is what the C file says: a difference would
    pass arguments of the wrong size or in the wrong place, corrupting memory rather than raising."""
    kernels = _c_prototypes(cpu_kernels._SOURCE)
    assert set(kernels) == set(cpu_kernels.ARGTYPES)
    for name, argtypes in cpu_kernels.ARGTYPES.items():
        assert [_ctype(p) for p in kernels[name][1]] == argtypes, name
    decode = _c_prototypes(cpu_decode._SOURCE)
    assert set(decode) == {*cpu_decode.ARGTYPES, "decode_layout"}
    for name, (argtypes, restype) in cpu_decode.ARGTYPES.items():
        assert [_ctype(p) for p in decode[name][1]] == argtypes, name
        assert _ctype(decode[name][0]) == restype, name


def test_keep_freed_memory_applies_on_linux():
    assert keep_freed_memory() is True
