"""Fused CPU kernels (cpu_kernels.c): RMSNorm, RoPE and SwiGLU as autograd Functions, the causal
softmax of CausalAttentionCPU, and the cross-entropy with its gradient.

On a CPU, a training step of a small model spends as much time in elementwise ops as in matmuls:
each PyTorch op is a pass over memory, and autograd runs about ten per RMSNorm. The C kernels
fuse each forward and each backward into one or two passes (measured in BENCHMARKS.md).

`build` compiles a C file of lmforge (this one, and infer/cpu_decode.c) on first use with the
system's C compiler (`$CC`, default `cc`; `-O3 -march=native -fopenmp` plus `$LMFORGE_CFLAGS`)
into `$LMFORGE_CACHE` (default `~/.cache/lmforge`)/kernels, and loads it with ctypes. The file's
name is a hash of what the compiled code depends on: the compiler's version, the flags, the source
and the headers it includes, and the CPU's model and feature flags (what `-march=native` reads;
not its clock, which changes under frequency scaling). It links the OpenMP runtime PyTorch itself
loaded, so both share one thread pool; calls use `torch.get_num_threads()` threads.

What a caller asks, from the most general to the most particular:
- `compiled()`: are the kernels built and loaded (compiling them on the first call)? False, after
  one warning, without a working compiler; False, silently, off x86-64/aarch64 Linux or with
  `LMFORGE_CPU_KERNELS=0`.
- `usable(*tensors)`: can a kernel take these tensors (all fp32 or all bf16, on the CPU, not
  under torch.compile, the kernels compiled)? The check every caller makes before a kernel.
- `fusable(*linears)`: a choice of the model code, not of C: should these projections of one
  input run as one matmul on their concatenated weights?
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # each C function exists once per dtype
_loaded: dict[Path, ctypes.CDLL | None] = {}  # per source: the library, or None if it could not be built
CPUINFO = Path("/proc/cpuinfo")
# The lines of /proc/cpuinfo that decide what -march=native generates, the CPU's model and feature
# flags (x86-64, aarch64); not "cpu MHz" or "BogoMIPS", which change with the clock.
_CPU_FIELDS = {"vendor_id", "cpu family", "model", "model name", "flags",
               "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features"}


def _cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"


# -fno-math-errno lets sqrtf be one instruction; -ffp-contract=off keeps a*b + c two roundings, as
# PyTorch's separate ops round; no -ffast-math, so NaN and inf behave.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def _cpu_identity() -> str:
    """The first processor's model and feature lines of /proc/cpuinfo ("" where there is none)."""
    if not CPUINFO.exists():
        return ""
    first = CPUINFO.read_text(errors="replace").split("\n\n")[0]
    return "\n".join(line for line in first.splitlines() if line.split(":")[0].strip() in _CPU_FIELDS)


@functools.cache
def _compiler_identity(cc: str) -> str:
    """`cc --version`'s output (the empty string from a "compiler" that prints none)."""
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout


def _command_flags(flags: list[str]) -> list[str]:
    return [*flags, *os.environ.get("LMFORGE_CFLAGS", "").split()]  # e.g. -mno-avx512bf16 to test a fallback


def library_path(source: Path, flags: list[str]) -> Path:
    """Where `build` keeps the library of `source` compiled with `flags` on this machine."""
    flags = _command_flags(flags)
    text = source.read_bytes()
    headers = [(source.parent / h.decode()).read_bytes() for h in re.findall(rb'#include "([^"]+)"', text)]
    parts = [_compiler_identity(os.environ.get("CC", "cc")).encode(), " ".join(flags).encode(), text, *headers,
             _cpu_identity().encode()]
    key = hashlib.sha256(b"".join(hashlib.sha256(part).digest() for part in parts)).hexdigest()[:16]
    return _cache_dir() / f"{source.stem}-{key}.so"


def build(source: Path, flags: list[str] = FLAGS) -> ctypes.CDLL:
    """Compile a C file of lmforge (once per compiler, flags, source and CPU; cached) and load it."""
    target = library_path(source, flags)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a temporary name and rename: processes starting together (DDP ranks, test
        # workers) never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [os.environ.get("CC", "cc"), *_command_flags(flags), str(source), "-o", tmp]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def _platform_allows() -> bool:
    """Linux on x86-64 or aarch64 (what the C files are written and tested for), and not switched
    off with LMFORGE_CPU_KERNELS=0."""
    return (os.environ.get("LMFORGE_CPU_KERNELS", "1") != "0" and sys.platform == "linux"
            and platform.machine() in ("x86_64", "aarch64"))


def load(source: Path, flags: list[str], declare: Callable[[ctypes.CDLL], None], what: str) -> ctypes.CDLL | None:
    """`build` once per process, then `declare(lib)` (the functions' argument types; a check that
    the library is the one the caller expects, raising if not). None, after one warning naming
    `what`, when it cannot be built (no compiler, no OpenMP, a read-only cache...): the callers then
    use PyTorch."""
    if source not in _loaded:
        lib = None
        if _platform_allows():
            try:
                lib = build(source, flags)
            except Exception as e:
                warnings.warn(f"lmforge: {what} unavailable, using PyTorch ops ({e})", stacklevel=3)
                lib = None
            if lib is not None:
                declare(lib)
        _loaded[source] = lib
    return _loaded[source]


_p, _L, _f, _i = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
ARGTYPES = {  # each for both dtypes' function, `name_f32` and `name_bf16`
    "rmsnorm_fwd": [_p, _p, _p, _p, _L, _L, _f, _i],
    "rmsnorm_bwd": [_p, _p, _p, _p, _p, _p, _L, _L, _i],
    "rope": [_p, _L, _p, _p, _p, _L, _L, _L, _f, _i],
    "swiglu_fwd": [_p, _p, _p, _L, _L, _L, _i],
    "swiglu_bwd": [_p, _p, _p, _p, _p, _L, _L, _L, _i],
    "cross_entropy": [_p, _p, _p, _L, _L, _L, _i],
    "causal_softmax_fwd": [_p, _p, _L, _L, _f, _i],
    "causal_softmax_bwd": [_p, _p, _L, _L, _f, _i],
}


def _declare(lib: ctypes.CDLL) -> None:
    for name, argtypes in ARGTYPES.items():
        for suffix in SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").argtypes = argtypes


def _library() -> ctypes.CDLL | None:
    return load(_SOURCE, FLAGS, _declare, "CPU kernels")


def compiled() -> bool:
    """Whether the kernels are compiled and loaded (compiling them on the first call)."""
    return _library() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """True when a kernel can take these tensors: on the CPU, all fp32 or all bf16, not being
    traced by torch.compile (which fuses these ops itself), and the kernels compiled."""
    dtype = tensors[0].dtype
    return (dtype in SUFFIX and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and not torch.compiler.is_compiling() and compiled())


def fusable(*linears: torch.nn.Module) -> bool:
    """Whether these projections of one input should run as one matmul on their concatenated weights:
    plain bias-free nn.Linear layers (a LoRA-wrapped one is not), in training (with gradients), and
    not under torch.compile. Callers fuse only on a CPU, where one larger matmul runs closer to the
    peak. Inference does not fuse: decoding is bound by reading the weights, and the concatenation
    would copy them at every token. (It asks nothing of the C kernels.)"""
    return (torch.is_grad_enabled() and all(type(m) is torch.nn.Linear and m.bias is None for m in linears)
            and not torch.compiler.is_compiling())


def _call(name: str, dtype: torch.dtype, *args) -> None:
    lib = _library()
    if lib is None:
        raise RuntimeError("lmforge's CPU kernels are not available (see the warning above)")
    fn = getattr(lib, f"{name}_{SUFFIX[dtype]}")
    fn(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args], torch.get_num_threads())


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32)
        _call("rmsnorm_fwd", x.dtype, x, weight.contiguous(), y, rstd, rows, dim, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        rows, dim = rstd.numel(), x.shape[-1]
        dx = torch.empty_like(x)
        partial = torch.zeros(torch.get_num_threads(), dim, dtype=torch.float32)
        _call("rmsnorm_bwd", x.dtype, dy, x, weight.contiguous(), rstd, dx, partial, rows, dim)
        return dx, partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * round(x * rsqrt(mean(x^2) + eps)) over the last dimension (x and weight of one dtype)."""
    return RMSNormFunction.apply(x, weight, eps)


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        B, T, _, D = x.shape
        cos, sin = cos.expand(B, T, D).contiguous(), sin.expand(B, T, D).contiguous()
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope(dy, cos, sin, -1.0), None, None


def _rope(x, cos, sin, sign):
    B, T, H, D = x.shape
    # Rows (b, t) may be any fixed distance apart, as in a slice of a fused q/k/v projection's output.
    if not (x.stride(3) == 1 and x.stride(2) == D and x.stride(0) == T * x.stride(1)):
        x = x.contiguous()
    y = torch.empty(B, T, H, D, dtype=x.dtype)
    _call("rope", x.dtype, x, x.stride(1), cos, sin, y, B * T, H, D, sign)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, heads, dim] (heads before dim, as a projection's output is laid
    out) with cos/sin [B, T, dim]. Equals rope.apply_rope on x.transpose(1, 2), transposed back."""
    return RopeFunction.apply(x, cos, sin)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate_up = gate_up.contiguous()
        n = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :n], gate_up[..., n:]
        y = torch.empty(*gate.shape, dtype=gate.dtype)
        _call("swiglu_fwd", gate.dtype, gate, up, y, gate.numel() // n, n, 2 * n)
        ctx.save_for_backward(gate_up)
        return y

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        n = gate_up.shape[-1] // 2
        grad = torch.empty_like(gate_up)  # written whole: [d gate, d up] side by side
        _call("swiglu_bwd", gate_up.dtype, dy.contiguous(), gate_up[..., :n], gate_up[..., n:], grad[..., :n],
              grad[..., n:], gate_up.numel() // (2 * n), n, 2 * n)
        return grad


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate, up] concatenated on the last dimension (one fused
    projection), rounded as `F.silu(gate) * up` rounds."""
    return SwiGLUFunction.apply(gate_up)


def cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross-entropy [rows] (fp32) of logits [rows, V] against labels [rows]; overwrites
    `logits` with the gradient of the summed loss: softmax - onehot, zero rows where ignored."""
    if not logits.is_contiguous():
        raise ValueError("cross_entropy_ works in place: logits must be contiguous")
    rows, vocab = logits.shape
    labels = labels.to(torch.int64).contiguous()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise IndexError(f"label {int(labels[bad][0])} is outside the vocabulary of {vocab}")
    loss = torch.empty(rows, dtype=torch.float32)
    _call("cross_entropy", logits.dtype, logits, labels, loss, rows, vocab, ignore_index)
    return loss


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores) with a causal mask, scores [..., G*T, T] whose rows are query positions
    0..T-1 repeated G times (keys beyond the query position get probability 0)."""
    p = torch.empty_like(scores)
    _call("causal_softmax_fwd", scores.dtype, scores.contiguous(), p, scores.numel() // scores.shape[-1],
          scores.shape[-1], scale)
    return p


def causal_softmax_backward_(grad_p: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient with respect to the scores of causal_softmax, given that of p; written into grad_p."""
    if not grad_p.is_contiguous():
        raise ValueError("causal_softmax_backward_ works in place: grad_p must be contiguous")
    _call("causal_softmax_bwd", p.dtype, grad_p, p.contiguous(), p.numel() // p.shape[-1], p.shape[-1], scale)
    return grad_p
