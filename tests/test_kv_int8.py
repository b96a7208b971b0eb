"""The int8 KV cache (Int8KVCache): its bytes, its rounding, and the Engine's features running on it.

Every model is a tiny random one (dense, MoE, MLA, or with a sliding window) as test_engine.py builds them,
seeded; nothing is timed.
"""

import random

import pytest
import torch
from test_engine import CONFIGS as ENGINE_CONFIGS
from test_engine import SIZES, TEXT, tokenizer  # noqa: F401  (a fixture)

from lmforge.checkpoint import save_model
from lmforge.cli import main as cli
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.model import Int8KVCache, KVCache, build_model

# and a sliding window, which the attention mask applies to what either cache holds
CONFIGS = {**ENGINE_CONFIGS, "window": ("tiny", dict(model_type="mistral", sliding_window=20))}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)


def config(kind="dense", vocab_size=300):
    name, extra = CONFIGS[kind]
    return preset(name, vocab_size=vocab_size, **{**SIZES, **extra})


def make_model(tokenizer, kind="dense"):  # noqa: F811
    return build_model(config(kind, tokenizer.vocab_size), seed=0).eval()


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_cache_bytes_are_about_half_of_bf16(kind):
    """Per layer, row and kind cached (keys, values; MLA's latent, RoPE key) of H heads and width d, for S
    positions rounded up to whole blocks of B: S*H*d int8 entries + S/B*H fp32 scales + B*H*d entries of the
    open block in the cache's dtype (2 bytes in bf16); and per layer and row one int64, the open block's index."""
    cfg = config(kind)
    layers, rows, max_len = cfg.num_hidden_layers, 3, 1000
    bf16 = KVCache(cfg, rows, max_len, dtype=torch.bfloat16)
    int8 = Int8KVCache(cfg, rows, max_len, dtype=torch.bfloat16)
    B = int8.block
    S = -(-max_len // B) * B
    kinds = [(1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim)] if kind == "mla" else [
        (cfg.num_key_value_heads, cfg.head_dim)] * 2
    expected = sum(layers * rows * H * (S * d + S // B * 4 + B * d * 2) for H, d in kinds) + layers * rows * 8
    assert int8.nbytes == expected
    assert bf16.nbytes == sum(layers * rows * H * max_len * d * 2 for H, d in kinds)
    assert 0.5 < int8.nbytes / bf16.nbytes < 0.56


@pytest.mark.parametrize("kind", ["dense", "mla"])
@pytest.mark.parametrize("steps", ["prefill", "decode", "chunks"])
def test_entries_round_once_within_absmax_over_254(kind, steps):
    """Whatever the steps that wrote them (one prefill, one token at a time, uneven chunks), what attention
    reads is, in each complete block, the fp entry within absmax/254 of that block and head, and in the open
    block the fp entry itself: the open block is quantised once, when the row writes past it."""
    cfg = config(kind)
    torch.manual_seed(0)
    rows, length = 2, 150
    cache = Int8KVCache(cfg, rows, 200)
    B = cache.block
    kinds = [(1, cfg.kv_lora_rank), (1, cfg.qk_rope_head_dim)] if kind == "mla" else [
        (cfg.num_key_value_heads, cfg.head_dim)] * 2
    # entries of uneven sizes (a few outliers), as keys have
    fp = [torch.randn(cfg.num_hidden_layers, rows, H, length, d) * torch.rand(1, 1, H, length, 1) * 4
          for H, d in kinds]
    cuts = {"prefill": [0, length], "decode": list(range(length + 1)), "chunks": [0, 5, 31, 32, 70, 100, 150]}[steps]
    for start, stop in zip(cuts, cuts[1:]):
        cache.begin(torch.arange(start, stop).expand(rows, -1))
        for layer in range(cfg.num_hidden_layers):
            read = cache.update(layer, *[f[layer, :, :, start:stop] for f in fp])
    for layer in range(cfg.num_hidden_layers):
        cache.begin(torch.full((rows, 1), length - 1))  # rewrite the last entry as it was: read everything
        read = cache.update(layer, *[f[layer, :, :, length - 1:] for f in fp])
        for got, f in zip(read, fp):
            full = length // B * B
            want = f[layer, :, :, :full].unflatten(2, (-1, B))
            bound = want.abs().amax(dim=(-2, -1), keepdim=True) / 254
            assert ((got[:, :, :full].unflatten(2, (-1, B)) - want).abs() <= bound * (1 + 1e-5)).all()
            assert torch.equal(got[:, :, full:], f[layer, :, :, full:])  # the open block, in fp


@pytest.mark.parametrize("kind", ["dense", "moe", "mla", "window"])
def test_greedy_with_int8_cache_equals_fp32_cache(tokenizer, kind):  # noqa: F811
    """The same greedy tokens for 24 steps past blocks' ends, and log-probs within 0.005. Each cached entry is
    within 1/254 of its block's largest, so scores and attention outputs move by a fraction of a percent; on
    these models the log-probs moved by at most 6e-4, while a lost open block or a stale scale (bugs met on the
    way) moved the logits by 0.1."""
    model = make_model(tokenizer, kind)
    prompts = [tokenizer.encode(TEXT[:120]), tokenizer.encode("Café, naïve, façade.")]
    fp32 = Engine(model, tokenizer, max_batch_size=2, max_len=128)
    int8 = Engine(model, tokenizer, max_batch_size=2, max_len=128, kv_cache_dtype="int8")
    assert int8.cpu_decoder is None and isinstance(int8.cache, Int8KVCache)
    for prompt in prompts:
        (want,), = fp32.generate([prompt], GREEDY)
        (got,), = int8.generate([prompt], GREEDY)
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got.logprobs]),
                                   torch.tensor([lp.logprob for lp in want.logprobs]), atol=0.005, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_batch_of_different_lengths_equals_running_alone(tokenizer, kind):  # noqa: F811
    """Right-padded prompts of different lengths prefilled together, n = 2 samples copying a row, one
    request waiting for a free row: each gets the tokens it gets alone, and log-probs as close."""
    model = make_model(tokenizer, kind)
    engine = Engine(model, tokenizer, max_batch_size=4, max_len=160, kv_cache_dtype="int8")
    alone = Engine(model, tokenizer, max_batch_size=4, max_len=160, kv_cache_dtype="int8", prefix_cache=False)
    texts = ["The", TEXT[:140], "日本語", "Numbers 12345. The lazy dog, and then it rests. Café", "🚀"]
    prompts = [tokenizer.encode(t) for t in texts]
    params = [GREEDY, GREEDY, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, n=2, logprobs=True),
              GREEDY, GREEDY]
    batched = engine.generate(prompts, params)
    for prompt, param, outs in zip(prompts, params, batched):
        (expected,) = alone.generate([prompt], param)
        for out, want in zip(outs, expected):
            assert out.token_ids == want.token_ids
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]),
                                       torch.tensor([lp.logprob for lp in want.logprobs]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_prefix_cache_under_continuous_batching_matches_running_alone(tokenizer, kind):  # noqa: F811
    """Waves of requests reusing (whole, cut or extended) earlier prompts and replies, joining a running batch
    between steps, rows swapped as they leave: each gets the tokens it gets alone on an int8 engine without
    the prefix cache, while a good share of the prompts came from the cache."""
    model = make_model(tokenizer, kind)
    engine = Engine(model, tokenizer, max_batch_size=4, max_len=160, kv_cache_dtype="int8")
    alone = Engine(model, tokenizer, max_batch_size=4, max_len=160, kv_cache_dtype="int8", prefix_cache=False)
    rng = random.Random(0)
    texts, requests = [], []
    for _ in range(20):
        for _ in range(rng.randint(1, 3)):
            if texts and rng.random() < 0.9:
                base = rng.choice(texts)
                cut = len(base) if rng.random() < 0.5 else rng.randint(1, len(base))
                prompt = (base[:cut] + [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 6))])[:120]
            else:
                prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(20, 70))]
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.0, ignore_eos=True)
            requests.append(engine.submit(prompt, params))
        for _ in range(rng.randint(4, 12)):
            engine.step()
        texts += [r.prompt + o.token_ids for r in requests if r.done.is_set()
                  for o in r.outputs if r.prompt + o.token_ids not in texts]
    while not all(r.done.is_set() for r in requests):
        engine.step()
    for request in requests:
        expected = alone.generate([request.prompt], request.params)[0]
        assert [o.token_ids for o in request.outputs] == [o.token_ids for o in expected]
    assert sum(r.cached_tokens for r in requests) > 0.2 * sum(len(r.prompt) for r in requests)


def test_unknown_kv_cache_dtype_is_refused(tokenizer):  # noqa: F811
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'"):
        Engine(make_model(tokenizer), tokenizer, max_len=64, kv_cache_dtype="fp8")


def test_generate_command_takes_kv_cache_int8(tokenizer, tmp_path, capsys):  # noqa: F811
    tokenizer.save(tmp_path / "tok")
    model_dir = save_model(make_model(tokenizer), tmp_path / "model", tokenizer_dir=tmp_path / "tok")
    engine = Engine.from_pretrained(model_dir, max_batch_size=1, kv_cache_dtype="int8")
    (expected,), = engine.generate([engine.tokenizer.encode("The quick brown")],
                                   SamplingParams(max_tokens=40, temperature=0.0))
    assert cli(["generate", "--model", str(model_dir), "--prompt", "The quick brown", "--max-new-tokens", "40",
                "--temperature", "0", "--kv-cache", "int8"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    assert cli(["generate", "--model", str(model_dir), "--prompt", "Hi", "--kv-cache", "int8", "--dtype",
                "bfloat16", "--max-new-tokens", "40", "--seed", "1"]) == 0  # the open block in bf16
    assert capsys.readouterr().out.endswith("\n")
