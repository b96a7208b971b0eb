"""Decode steps in C (infer/cpu_decode.c) against the PyTorch forward pass they replace."""

import platform
from pathlib import Path

import pytest
import torch

from lmforge.config import preset
from lmforge.infer import cpu_decode
from lmforge.infer.cpu_decode import CPUDecoder, unsupported
from lmforge.model import KVCache, build_model
from lmforge.model.lora import LoraConfig, apply_lora

pytestmark = pytest.mark.skipif(CPUDecoder.create(build_model(preset("tiny"), seed=0)) is None,
                                reason="no C compiler: the decoder is not built")

CONFIGS = {
    "tiny": {},
    # GQA with a head_dim that is not hidden / heads, an untied output matrix, a sliding window
    "variant": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                    sliding_window=6),
    # an MLP width that is not a multiple of 16 (the last block of weight rows is a short one) nor of 32
    # (down_proj's input: the portable loops)
    "odd": dict(intermediate_size=520),
    # heads of 64 (a prefill's runs of tokens attend together, attend_run), 3 query heads per key/value head
    "heads of 64": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=64),
}
# 3 rows: dot products; 7 rows: AMX tiles where the CPU has them (one block of 16, padded)
LENGTHS = {"3 rows": [3, 9, 6], "7 rows": [3, 9, 6, 1, 12, 7, 4]}


def _prefilled(model, dtype, lengths):
    """Two caches holding the same right-padded prompts of different lengths (the padding is written
    past each prompt's end, once per position: repeated positions would make which write lands, and
    so the two caches, depend on PyTorch's scheduling; the decode steps overwrite it)."""
    torch.manual_seed(1)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    pos = torch.arange(T).expand(B, T)
    caches = [KVCache(model.config, B, 40, dtype=dtype) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, position_ids=pos, cache=cache, return_hidden=True)
    return caches


@pytest.mark.parametrize("rows", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS)
def test_decode_steps_match_pytorch(config, dtype, rows):
    model = build_model(preset("tiny", **CONFIGS[config]), seed=0).to(dtype).eval()
    decoder = CPUDecoder.create(model)
    assert decoder is not None
    lengths = LENGTHS[rows]
    ref_cache, c_cache = _prefilled(model, dtype, lengths)
    tokens, positions = torch.tensor([7, 300, 5000, 1, 2, 3, 4][:len(lengths)]), torch.tensor(lengths)
    for _ in range(12):  # past the sliding window
        with torch.no_grad():
            hidden = model(tokens[:, None], position_ids=positions[:, None], cache=ref_cache, return_hidden=True).hidden
            ref = model.logits(hidden[:, -1]).float()
        got = decoder(tokens, positions, c_cache)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        else:  # C keeps fp32 activations, PyTorch rounds each to bf16: compare at bf16's precision
            assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3
        tokens, positions = ref.argmax(-1), positions + 1
    for ref_layer, c_layer in zip(ref_cache.layers, c_cache.layers):
        for ref_buf, c_buf in zip(ref_layer, c_layer):  # the same keys and values, in the same places
            tol = 1e-5 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(c_buf.float(), ref_buf.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS)
def test_prefill_of_packed_prompts_matches_pytorch(config, dtype):
    """Prompts of different lengths packed into one call, each into its own cache row (not in order):
    the logits of each prompt's last token, and every key and value written, equal PyTorch's forward."""
    model = build_model(preset("tiny", **CONFIGS[config]), seed=0).to(dtype).eval()
    decoder = CPUDecoder.create(model)
    lengths, rows = [5, 11, 1], [2, 0, 1]  # the 11-token prompt runs past the sliding window
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
               for n in lengths]
    ref_cache, c_cache = KVCache(model.config, 3, 16, dtype=dtype), KVCache(model.config, 3, 16, dtype=dtype)
    ref = torch.empty(3, model.config.vocab_size)
    with torch.no_grad():
        for prompt, row in zip(prompts, rows):
            one = KVCache(model.config, 1, 16, dtype=dtype)
            hidden = model(prompt[None], cache=one, return_hidden=True).hidden
            ref[rows.index(row)] = model.logits(hidden[0, -1]).float()
            for ref_layer, one_layer in zip(ref_cache.layers, one.layers):
                for ref_buf, one_buf in zip(ref_layer, one_layer):
                    ref_buf[row] = one_buf[0]
    got = decoder(torch.cat(prompts), torch.cat([torch.arange(n) for n in lengths]), c_cache,
                  rows=torch.cat([torch.full((n,), r) for n, r in zip(lengths, rows)]),
                  out=torch.tensor(lengths).cumsum(0) - 1)
    assert got.shape == (3, model.config.vocab_size)
    tol = 1e-4 if dtype == torch.float32 else 0.03 * ref.abs().max()
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    for ref_layer, c_layer in zip(ref_cache.layers, c_cache.layers):
        for ref_buf, c_buf in zip(ref_layer, c_layer):
            tol = 1e-5 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(c_buf.float(), ref_buf.float(), rtol=tol, atol=tol)
    # a prompt longer than the cache, rows or outputs out of range are refused before any write
    with pytest.raises(ValueError, match="max_len"):
        decoder(torch.ones(17, dtype=torch.long), torch.arange(17), c_cache, rows=torch.zeros(17),
                out=torch.tensor([16]))
    with pytest.raises(ValueError, match="cache row"):
        decoder(torch.ones(2, dtype=torch.long), torch.arange(2), c_cache, rows=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="increasing"):
        decoder(torch.ones(3, dtype=torch.long), torch.arange(3), c_cache, rows=torch.zeros(3),
                out=torch.tensor([2, 1]))


def test_bad_steps_are_refused():
    model = build_model(preset("tiny"), seed=0).eval()
    decoder = CPUDecoder.create(model)
    cache = KVCache(model.config, 2, 8)
    with pytest.raises(ValueError, match="vocabulary"):
        decoder(torch.tensor([1, model.config.vocab_size]), torch.tensor([0, 0]), cache)
    with pytest.raises(ValueError, match="vocabulary"):  # lists, as the Engine passes them
        decoder([1, -1], [0, 0], cache)
    torch.testing.assert_close(decoder([5, 6], [0, 0], KVCache(model.config, 2, 8)),
                               decoder(torch.tensor([5, 6]), torch.tensor([0, 0]), KVCache(model.config, 2, 8)))
    with pytest.raises(ValueError, match="max_len"):
        decoder(torch.tensor([1, 2]), torch.tensor([0, 8]), cache)
    with pytest.raises(ValueError, match="rows"):
        decoder(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]), cache)
    with pytest.raises(ValueError, match="KV cache"):
        decoder(torch.tensor([1, 2]), torch.tensor([0, 0]), KVCache(model.config, 2, 8, dtype=torch.bfloat16))



@pytest.mark.parametrize("window", [None, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_prefill_runs_match_pytorch(dtype, window):
    """Prompts longer than a run (RUN_MAX = 16 tokens attend together), packed so that runs end at prompt
    boundaries inside a window of 16 tokens, with and without a sliding window: each prompt's last logits
    and its keys and values equal PyTorch's forward of that prompt alone."""
    model = build_model(preset("tiny", **CONFIGS["heads of 64"], sliding_window=window), seed=0).to(dtype).eval()
    decoder = CPUDecoder.create(model)
    lengths, rows = [37, 5, 20, 2], [3, 0, 1, 2]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
               for n in lengths]
    cache = KVCache(model.config, 4, 40, dtype=dtype)
    got = decoder(torch.cat(prompts), torch.cat([torch.arange(n) for n in lengths]), cache,
                  rows=torch.cat([torch.full((n,), r) for n, r in zip(lengths, rows)]),
                  out=torch.tensor(lengths).cumsum(0) - 1)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        one = KVCache(model.config, 1, 40, dtype=dtype)
        with torch.no_grad():
            ref = model.logits(model(prompt[None], cache=one, return_hidden=True).hidden[0, -1]).float()
        tol = 1e-4 if dtype == torch.float32 else 0.03 * ref.abs().max()
        torch.testing.assert_close(got[i], ref, rtol=tol, atol=tol)
        for c_layer, one_layer in zip(cache.layers, one.layers):
            for c_buf, one_buf in zip(c_layer, one_layer):
                tol = 1e-5 if dtype == torch.float32 else 0.05
                n = len(prompt)
                torch.testing.assert_close(c_buf[row, :, :n].float(), one_buf[0, :, :n].float(), rtol=tol, atol=tol)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tokens_logits_do_not_depend_on_its_batch(dtype):
    """A token decoded alone, beside two other rows, or as the last of a prefill (runs of 16 tokens attending
    together) gets bitwise the same logits where the C matvecs are the AVX-512 dot products (fp32; bf16 with
    AVX512-BF16 and no AMX), whose sums run through the same tree whatever the batch: then batching and the
    Engine's prefix cache change no result. The portable loops and AMX tiles (a prefill's many rows) round
    differently, and there the three agree to rounding."""
    model = build_model(preset("tiny", **CONFIGS["heads of 64"]), seed=0).to(dtype).eval()
    decoder = CPUDecoder.create(model)
    prompt = torch.randint(0, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    other = prompt[3:23]

    def prefill(cache, row, ids):
        return decoder(ids, list(range(len(ids))), cache, rows=[row] * len(ids), out=torch.tensor([len(ids) - 1]))

    whole = prefill(KVCache(model.config, 1, 40, dtype=dtype), 0, prompt)[0]
    one = KVCache(model.config, 1, 40, dtype=dtype)
    prefill(one, 0, prompt[:29])
    alone = decoder([prompt[29]], [29], one)[0]
    three = KVCache(model.config, 3, 40, dtype=dtype)
    for row, ids in enumerate([prompt[:29], other, other[:7]]):
        prefill(three, row, ids)
    beside = decoder([prompt[29], 5, 6], [29, 20, 7], three)[0]
    if decoder.lib.fast_matvec(int(dtype == torch.bfloat16)) == 1:
        assert torch.equal(alone, beside) and torch.equal(alone, whole)
    else:
        tol = 1e-4 if dtype == torch.float32 else 0.03 * whole.abs().max()
        torch.testing.assert_close(alone, beside, rtol=tol, atol=tol)
        torch.testing.assert_close(alone, whole, rtol=tol, atol=tol)


def test_models_it_does_not_handle_stay_on_pytorch():
    assert unsupported(build_model(preset("tiny"), seed=0)) is None
    assert unsupported(build_model(preset("tiny-moe"), seed=0)) == "MLA or MoE layers"
    assert unsupported(build_model(preset("tiny-mla"), seed=0)) == "MLA or MoE layers"
    assert unsupported(build_model(preset("tiny", attention_bias=True), seed=0)) == "QK-norm or biases"
    assert unsupported(build_model(preset("tiny"), seed=0).to(torch.float16)) is not None
    lora = build_model(preset("tiny"), seed=0)
    apply_lora(lora, LoraConfig(r=4, target_modules=["q_proj"]))
    assert unsupported(lora) == "wrapped (LoRA) projections"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86 flag")
@pytest.mark.parametrize("flag, dtype", [("-mno-avx512bf16", torch.bfloat16), ("-mno-avx512f", torch.float32),
                                         ("-mno-amx-tile", torch.bfloat16)])
def test_portable_paths(monkeypatch, tmp_path, flag, dtype):
    """The C matvecs of CPUs without AVX512-BF16 or AVX-512 (portable loops) or AMX (bf16 dot
    products at any batch), built here with those instructions off."""
    from lmforge.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_loaded", {})  # build again, with the flags below
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("LMFORGE_CFLAGS", flag)
    test_decode_steps_match_pytorch("variant", dtype, "7 rows")
    test_prefill_of_packed_prompts_matches_pytorch("variant", dtype)
    assert len(list((tmp_path / "kernels").glob("cpu_decode-*.so"))) == 1
    # the Engine prefills in C only with the AVX-512 matvecs (fp32) or AVX512-BF16 dot products (bf16)
    decoder = CPUDecoder.create(build_model(preset("tiny"), seed=0).to(dtype))
    cpu_flags = Path("/proc/cpuinfo").read_text().split()
    needed = "avx512f" if dtype == torch.float32 else "avx512_bf16"
    assert decoder.prefills == (needed in cpu_flags and flag not in ("-mno-avx512f", "-mno-avx512bf16"))
    assert decoder.prefill_max_len == 512  # 256 only for bf16 on AMX tiles, where PyTorch's attention wins sooner


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86 flag")
def test_no_c_decoder_without_avx2(monkeypatch, tmp_path):
    """Built with neither AVX2 nor AVX-512 (as on aarch64 or an older x86), the C step was never
    measured faster than PyTorch: create returns None, and the Engine decodes with PyTorch."""
    from lmforge.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("LMFORGE_CFLAGS", "-mno-avx2")
    assert CPUDecoder.create(build_model(preset("tiny"), seed=0)) is None
    assert list((tmp_path / "kernels").glob("cpu_decode-*.so"))  # it compiled; the rule said no


def test_steps_from_several_threads_at_once():
    """The decoder's thread pool runs one step at a time: steps called together from different threads
    (two engines in one process) give the same logits as steps run one after another."""
    import threading

    model = build_model(preset("tiny"), seed=0).eval()
    decoder = CPUDecoder.create(model)
    tokens = [torch.tensor([3, 40]), torch.tensor([900, 7])]

    def run(i, out):
        cache = KVCache(model.config, 2, 64)
        out[i] = torch.stack([decoder(tokens[i], torch.tensor([p, p]), cache) for p in range(30)])

    alone = [None, None]
    for i in range(2):
        run(i, alone)
    together = [None, None]
    threads = [threading.Thread(target=run, args=(i, together)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_one_decoder_for_caches_of_different_lengths():
    """The scratch space depends on the cache's length: a longer cache after a shorter one still matches."""
    model = build_model(preset("tiny"), seed=0).eval()
    decoder = CPUDecoder.create(model)
    decoder(torch.tensor([1]), torch.tensor([0]), KVCache(model.config, 1, 8))
    ref_cache, c_cache = KVCache(model.config, 1, 600), KVCache(model.config, 1, 600)
    ids = torch.randint(0, model.config.vocab_size, (1, 500), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for cache in (ref_cache, c_cache):
            model(ids, cache=cache, return_hidden=True)
        hidden = model(torch.tensor([[9]]), position_ids=torch.tensor([[500]]), cache=ref_cache,
                       return_hidden=True).hidden
        ref = model.logits(hidden[:, -1]).float()
    torch.testing.assert_close(decoder(torch.tensor([9]), torch.tensor([500]), c_cache), ref, rtol=1e-4, atol=1e-4)


def test_a_c_file_of_another_layout_is_refused_at_load(monkeypatch, tmp_path):
    """The pointer table's order, the dims and the ABI version are checked when the library is loaded:
    a C file whose layer slots are in another order than cpu_decode.py builds them in (q and k swapped,
    which would silently read each weight as the other) is an error naming both layouts."""
    from lmforge.model import cpu_kernels

    source = cpu_decode._SOURCE.read_text()
    swapped = source.replace("X(q) X(k)", "X(k) X(q)")
    assert swapped != source
    (tmp_path / "infer").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "infer" / "cpu_decode.c").write_text(swapped)
    header = cpu_decode._SOURCE.parent.parent / "model" / "cpu_common.h"
    (tmp_path / "model" / "cpu_common.h").write_text(header.read_text())
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_decode, "_SOURCE", tmp_path / "infer" / "cpu_decode.c")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="layer: in_norm k q v"):
        CPUDecoder.create(build_model(preset("tiny"), seed=0))
