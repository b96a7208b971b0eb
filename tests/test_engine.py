"""The inference engine against full forwards without a cache, run one request at a time.

Every test builds a tiny random model (dense, MoE or MLA) and a byte-level BPE tokenizer trained on
a few KB of text with accents, CJK and emojis, so that some characters are split across tokens.
"""

import asyncio
import random
import threading
import time

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import lmforge.infer.engine as engine_module
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.detokenize import Detokenizer
from lmforge.infer.sampling import SamplerState, apply_penalties, choose_tokens, draw, filter_logits
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog, and then it rests. Café, naïve, façade. "
        "日本語のテキストです。東京は大きい。 Emojis: 😀 🎉 🚀. Numbers 12345. ") * 40
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
CONFIGS = {
    "dense": ("tiny", {}),
    "moe": ("tiny-moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)),
    "mla": ("tiny-mla", dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                             v_head_dim=16, num_experts=4, moe_intermediate_size=48)),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    return train_tokenizer([str(folder / "corpus.txt")], vocab_size=300, out_dir=folder, show_progress=False)


def make_model(tokenizer, kind="dense", seed=0):
    name, extra = CONFIGS[kind]
    return build_model(preset(name, vocab_size=tokenizer.vocab_size, **{**SIZES, **extra}), seed=seed).eval()


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(make_model(tokenizer), tokenizer, max_batch_size=4, max_len=128)


def reference(model, prompt, steps):
    """Greedy tokens and per-step logits from full forwards over the whole sequence, no cache."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            row = model(torch.tensor([ids])).logits[0, -1].float()
            logits.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt):], torch.stack(logits)


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.2,
                         presence_penalty=0.3, frequency_penalty=0.2, seed=1234, ignore_eos=True)


@pytest.mark.parametrize("kind", ["dense", "moe", "mla"])
def test_greedy_and_logprobs_match_full_forward(tokenizer, kind):
    model = make_model(tokenizer, kind)
    engine = Engine(model, tokenizer, max_batch_size=2, max_len=64)
    prompt = tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
    (out,), = engine.generate([prompt], params)
    expected, logits = reference(model, prompt, 12)
    assert out.token_ids == expected
    assert out.finish_reason == "length"
    assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
    logp = logits.log_softmax(-1)
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    torch.testing.assert_close(got, logp[torch.arange(12), torch.tensor(expected)], atol=1e-4, rtol=0)
    for step, lp in enumerate(out.logprobs):
        values, ids = logp[step].topk(3)
        assert [t for t, _, _ in lp.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, _, v in lp.top]), values, atol=1e-4, rtol=0)
        assert lp.text == tokenizer.decode([lp.token_id])
    if kind == "mla":  # the cache holds MLA's compressed latent, not per-head keys and values
        assert engine.cache.layers[0][0].shape[-1] == model.config.kv_lora_rank


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_equals_one_by_one(engine, tokenizer, params):
    # Five prompts of different lengths for four rows: one waits for a free row.
    texts = ["The", "Café, naïve, façade. The quick", "日本語", "Numbers 12345. The lazy dog", "🚀"]
    prompts = [tokenizer.encode(t) for t in texts]
    batched = engine.generate(prompts, params)
    for prompt, (out,) in zip(prompts, batched):
        (alone,), = engine.generate([prompt], params)
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert len(out.token_ids) == 12


def run_to_end(engine, *requests):
    while not all(r.done.is_set() for r in requests):
        engine.step()


@pytest.mark.parametrize("kind", ["dense", "mla"])  # the C prefill (where it compiles) and PyTorch's, MLA's latent
def test_prefix_cache_reuses_an_earlier_requests_tokens(tokenizer, kind):
    """A prompt that extends a finished request's prompt and reply (a chat's next turn) prefills only what
    is new, and gives the tokens and log-probs a full prefill gives; the finished request's row had been
    swapped out from under a request still running."""
    model = make_model(tokenizer, kind)
    engine = Engine(model, tokenizer, max_batch_size=3, max_len=128)
    fresh = Engine(model, tokenizer, max_batch_size=3, max_len=128, prefix_cache=False)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
    first_prompt = tokenizer.encode("The quick brown fox jumps")
    first = engine.submit(first_prompt, params)  # row 0
    long = engine.submit(tokenizer.encode("Numbers 12345."), SamplingParams(max_tokens=30, temperature=0.0,
                                                                            ignore_eos=True))  # row 1
    run_to_end(engine, first)  # first leaves row 0; long moves there, first's cache to row 1
    assert not long.done.is_set()
    reply = first.outputs[0].token_ids
    turns = {"next turn": first_prompt + reply + tokenizer.encode(" over the lazy dog"),
             "same prompt": first_prompt, "unrelated": tokenizer.encode("日本語のテキスト")}
    expect_cached = {"next turn": len(first_prompt) + len(reply) - 1,  # the last reply token was never fed back
                     "same prompt": len(first_prompt) - 1, "unrelated": 0}  # the last prompt token runs again
    for name, prompt in turns.items():
        request = engine.submit(prompt, params)
        run_to_end(engine, request)
        assert request.cached_tokens == expect_cached[name], name
        (alone,), = fresh.generate([prompt], params)
        out = request.outputs[0]
        assert out.token_ids == alone.token_ids, name
        torch.testing.assert_close(torch.tensor([[v for _, _, v in lp.top] for lp in out.logprobs]),
                                   torch.tensor([[v for _, _, v in lp.top] for lp in alone.logprobs]),
                                   atol=1e-4, rtol=0)
    run_to_end(engine, long)
    (alone,), = fresh.generate([long.prompt], long.params)
    assert long.outputs[0].token_ids == alone.token_ids  # the swaps did not disturb the running row


# the C prefill (where it compiles), PyTorch's forward (MLA), and the dense model's prompts sent to PyTorch's
# forward by the logits budget, its hidden states turned into logits a few positions at a time
@pytest.mark.parametrize("kind,budget", [("dense", None), ("mla", None), ("dense", 0)], ids=["c", "mla", "chunked"])
def test_prompt_logprobs_match_a_full_forward(tokenizer, kind, budget, monkeypatch):
    """prompt_logprobs: each prompt token's log-prob given the ones before it, with its top alternatives, as
    the log-softmax of a cache-less forward gives them; for prompts prefilled in one batch with a request that
    did not ask (whose reply must not change), and in full where the prefix cache holds the prompt."""
    if budget is not None:
        monkeypatch.setattr(engine_module, "PROMPT_LOGITS_BUDGET", budget)
        monkeypatch.setattr(engine_module, "PROMPT_LOGITS_CHUNK", 3)
    model = make_model(tokenizer, kind)
    engine = Engine(model, tokenizer, max_batch_size=4, max_len=128)
    prompts = [tokenizer.encode(t) for t in ["The quick brown fox jumps", "Café, naïve", "日本語のテキスト 😀"]]
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    replies = [out.token_ids for (out,) in engine.generate(prompts, short)]  # the first prompt is now cached
    scored = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    requests = [engine.submit(prompts[0], scored), engine.submit(prompts[1], short), engine.submit(prompts[2], scored)]
    run_to_end(engine, *requests)
    assert [r.outputs[0].token_ids for r in requests] == replies
    assert requests[1].prompt_logprobs is None and requests[0].cached_tokens == 0
    for request in (requests[0], requests[2]):
        prompt, got = request.prompt, request.prompt_logprobs
        with torch.no_grad():
            logp = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        assert len(got) == len(prompt) and got[0] is None
        assert [e.token_id for e in got[1:]] == prompt[1:]
        torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]]),
                                   logp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])], atol=1e-4, rtol=0)
        for position, entry in enumerate(got[1:]):
            values, ids = logp[position].topk(3)
            assert [t for t, _, _ in entry.top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, _, v in entry.top]), values, atol=1e-4, rtol=0)
            assert entry.text == tokenizer.decode([entry.token_id])
    one = engine.submit(prompts[0][:1], scored)  # a one-token prompt: nothing before its token
    run_to_end(engine, one)
    assert one.prompt_logprobs == [None]
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.submit(prompts[0], SamplingParams(prompt_logprobs=21))


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_prefix_cache_under_continuous_batching_matches_no_cache(tokenizer, kind):
    """Waves of requests, most of them reusing part of an earlier prompt and reply, greedy or seeded, n of 1
    or 2, some cancelled, joining a running batch of 6 rows between steps: each gets the tokens an engine
    without the cache gives it alone, while the cache did hold a good share of the prompts."""
    model = make_model(tokenizer, kind)
    engine = Engine(model, tokenizer, max_batch_size=6, max_len=160)
    alone = Engine(model, tokenizer, max_batch_size=6, max_len=160, prefix_cache=False)
    rng = random.Random(0)
    texts, requests = [], []
    for _ in range(40):
        for _ in range(rng.randint(1, 4)):
            if texts and rng.random() < 0.9:  # an earlier prompt and reply, whole or cut, maybe extended
                base = rng.choice(texts)
                cut = len(base) if rng.random() < 0.5 else rng.randint(1, len(base))
                prompt = (base[:cut] + [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 6))])[:100]
            else:
                prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 30))]
            params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]),
                                    seed=rng.randrange(1000), ignore_eos=True, n=rng.choice([1, 1, 2]))
            requests.append(engine.submit(prompt, params))
            if rng.random() < 0.1:
                requests[-1].cancel()
        for _ in range(rng.randint(1, 6)):
            engine.step()
        texts += [r.prompt + o.token_ids for r in requests if r.done.is_set() and not r.cancelled
                  for o in r.outputs if r.prompt + o.token_ids not in texts]
    run_to_end(engine, *requests)
    finished = [r for r in requests if not r.cancelled]
    for request in finished:
        expected = alone.generate([request.prompt], request.params)[0]
        assert [o.token_ids for o in request.outputs] == [o.token_ids for o in expected]
    assert sum(r.cached_tokens for r in finished) > 0.2 * sum(len(r.prompt) for r in finished)


def test_prefix_cache_forgets_when_weights_change(tokenizer):
    model = make_model(tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=2, max_len=64)
    prompt = tokenizer.encode("The quick brown fox jumps")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert engine.submit(prompt, params).cached_tokens == 0
    engine.generate([prompt], params)
    again = engine.submit(prompt, params)
    run_to_end(engine, again)
    assert again.cached_tokens == len(prompt) - 1
    with torch.no_grad():  # an in-place update (an optimizer step, a weight sync in RL)
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    changed = engine.submit(prompt, params)
    run_to_end(engine, changed)
    assert changed.cached_tokens == 0
    (alone,), = Engine(model, tokenizer, max_batch_size=2, max_len=64, prefix_cache=False).generate([prompt], params)
    assert changed.outputs[0].token_ids == alone.token_ids
    engine.reset_prefix_cache()
    engine.generate([prompt], params)
    held = engine.submit(prompt, params)  # what reset_prefix_cache is about to forget
    run_to_end(engine, held)
    assert held.cached_tokens == len(prompt) - 1
    engine.reset_prefix_cache()
    after = engine.submit(prompt, params)
    run_to_end(engine, after)
    assert after.cached_tokens == 0


def test_n_samples_share_one_prefill(tokenizer):
    model = make_model(tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=4, max_len=64, cpu_decoder=False)  # the hook sees every forward
    prefills = []
    hook = model.register_forward_pre_hook(lambda m, args: prefills.append(args[0].shape[1]))
    prompt = tokenizer.encode("The lazy dog")
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=3, ignore_eos=True)
    (outs,) = engine.generate([prompt], params)
    hook.remove()
    assert [t for t in prefills if t > 1] == [len(prompt)]  # one prefill, then one token per step
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # different seeds, different samples
    for i, out in enumerate(outs):  # sample i is the request run alone with seed + i
        (alone,), = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=7 + i,
                                                             ignore_eos=True))
        assert out.token_ids == alone.token_ids


def prefill_recorder(model):
    """Record the [B, T] shape of every forward; returns (shapes, hook handle)."""
    shapes = []
    return shapes, model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))


def run_until_done(engine, requests):
    while not all(r.done.is_set() for r in requests):
        engine.step()


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_waiting_requests_are_prefilled_in_one_forward(tokenizer, kind):
    model = make_model(tokenizer, kind)
    engine = Engine(model, tokenizer, max_batch_size=8, max_len=64, cpu_decoder=False)  # the hook sees every forward
    texts = ["The", "Café, naïve, façade. The quick brown", "日本語", "Numbers 12345.", "🚀 dog"]
    prompts = [tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # all of different lengths
    jobs = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2),
            SAMPLED,
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),  # leaves at once: rows compact
            SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5, n=3, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=0.7, seed=6, ignore_eos=True)]
    shapes, hook = prefill_recorder(model)
    requests = [engine.submit(p, params) for p, params in zip(prompts, jobs)]
    run_until_done(engine, requests)
    hook.remove()
    assert shapes[0] == (len(prompts), max(len(p) for p in prompts))  # all five prompts, one forward
    assert all(t == 1 for _, t in shapes[1:])  # then decode steps only
    for prompt, params, request in zip(prompts, jobs, requests):
        alone = engine.generate([prompt], params)[0]
        assert [o.token_ids for o in request.outputs] == [o.token_ids for o in alone]
        assert [o.text for o in request.outputs] == [o.text for o in alone]
        assert all(len(o.token_ids) == params.max_tokens for o in request.outputs)
    # The logits came from each prompt's last real token, not from its padding.
    expected_tokens, logits = reference(model, prompts[0], 10)
    assert requests[0].outputs[0].token_ids == expected_tokens
    got = torch.tensor([lp.logprob for lp in requests[0].outputs[0].logprobs])
    expected = logits.log_softmax(-1)[torch.arange(10), torch.tensor(expected_tokens)]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_max_prefill_tokens_splits_a_burst(tokenizer):
    model = make_model(tokenizer)
    # decode steps through the model too, so the hook sees them
    engine = Engine(model, tokenizer, max_batch_size=8, max_len=64, max_prefill_tokens=16, cpu_decoder=False)
    prompts = [tokenizer.encode(t) for t in ["The quick", "The lazy dog", "Café, naïve, façade. The quick brown",
                                             "日本", "dog"]]
    lengths = [len(p) for p in prompts]
    assert lengths == [5, 7, 27, 6, 2]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    shapes, hook = prefill_recorder(model)
    requests = [engine.submit(p, params) for p in prompts]
    run_until_done(engine, requests)
    hook.remove()
    # Oldest first, rows x longest prompt <= 16 per forward (2 x 7; then 3 x 27 would not fit, nor
    # 2 x 27, so the 27-token prompt goes alone; then 2 x 6), a decode step of the running rows between.
    assert shapes[:6] == [(2, 7), (2, 1), (1, 27), (3, 1), (2, 6), (5, 1)]
    assert all(t == 1 for _, t in shapes[6:])
    for prompt, request in zip(prompts, requests):
        assert request.outputs[0].token_ids == engine.generate([prompt], params)[0][0].token_ids
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(model, tokenizer, max_prefill_tokens=0)


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(4000)]), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0  # never a token of probability 0
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_samples_softmax_of_logits_over_t(temperature):
    """Tokens chosen with temperature T follow softmax(logits / T), the definition transformers' and
    OpenAI's temperature share (T < 1 sharpens, T > 1 flattens)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    state = SamplerState(SamplingParams(temperature=temperature), [], 5, seed=0)
    draws = torch.tensor([choose_tokens(logits, [state])[0] for _ in range(6000)])
    expected = (logits[0] / temperature).softmax(-1)
    torch.testing.assert_close(torch.bincount(draws, minlength=5) / 6000, expected, atol=0.02, rtol=0)


def test_seeded_sampling_is_reproducible(engine, tokenizer):
    prompt = tokenizer.encode("The quick")
    first = engine.generate([prompt], SAMPLED)[0][0]
    again = engine.generate([prompt], SAMPLED)[0][0]
    other = engine.generate([prompt], SamplingParams(**{**SAMPLED.__dict__, "seed": 99}))[0][0]
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_filters_and_repetition_penalty_match_transformers():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000) * 3
    for ours, theirs in [
        (dict(top_k=17), TopKLogitsWarper(17)),
        (dict(top_p=0.8), TopPLogitsWarper(0.8)),
        (dict(top_p=0.05), TopPLogitsWarper(0.05)),
        (dict(top_p=0.9999), TopPLogitsWarper(0.9999)),  # beyond the 256 most likely: the full sort
        (dict(min_p=0.1), MinPLogitsWarper(0.1)),
    ]:
        expected = theirs(torch.zeros(1, 1, dtype=torch.long), logits.clone())[0]
        got = filter_logits(logits[0], **ours)
        assert torch.equal(got.isinf(), expected.isinf()), ours
        assert torch.equal(got[~got.isinf()], logits[0][~got.isinf()])
    assert (~filter_logits(logits[0], top_p=0.9999).isinf()).sum() > 256
    logits = logits[:, :200]
    history = torch.tensor([[3, 5, 5, 150, 7]])
    params = SamplingParams(repetition_penalty=1.3)
    seen = torch.zeros(200, dtype=torch.bool)
    seen[history[0]] = True
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())[0]
    torch.testing.assert_close(apply_penalties(logits[0], params, seen, torch.zeros(200)), expected)
    # OpenAI's presence/frequency definition: logit - count * frequency - (count > 0) * presence.
    counts = torch.zeros(200)
    counts[5], counts[7] = 2, 1
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits[0], params, seen, counts)
    assert got[5] == pytest.approx(float(logits[0, 5]) - 0.5 - 0.5)
    assert got[7] == pytest.approx(float(logits[0, 7]) - 0.25 - 0.5)
    assert got[3] == logits[0, 3]


def test_logit_bias_matches_transformers_and_comes_before_the_penalties():
    """OpenAI's logit_bias adds to the raw logits (transformers' sequence bias with one-token sequences);
    greedy picks the argmax of the biased logits, sampling follows their softmax, and the penalties see
    the biased logits (vLLM's order)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 200) * 3
    top = int(logits.argmax())
    bias = {top: -100.0, 3: 5.0, 150: 2.5}
    expected = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(
        torch.zeros(1, 1, dtype=torch.long), logits.clone())
    greedy = SamplerState(SamplingParams(temperature=0.0, logit_bias=bias), [], 200, seed=None)
    assert choose_tokens(logits, [greedy]) == [int(expected.argmax())] != [top]
    assert choose_tokens(logits, [SamplerState(SamplingParams(temperature=0.0, logit_bias={7: 100.0}), [], 200,
                                               seed=None)]) == [7]
    small = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    state = SamplerState(SamplingParams(logit_bias={0: -3.0, 3: 2.0}), [], 5, seed=0)
    draws = torch.tensor([choose_tokens(small, [state])[0] for _ in range(6000)])
    wanted = (small[0] + torch.tensor([-3.0, 0, 0, 2.0, 0])).softmax(-1)
    torch.testing.assert_close(torch.bincount(draws, minlength=5) / 6000, wanted, atol=0.02, rtol=0)
    # token 0 is in the prompt: bias first, 1 - 2 = -1, then x1.5 -> -1.5 < -1.4; the penalty first would
    # give 1 / 1.5 - 2 = -1.33 > -1.4
    both = SamplerState(SamplingParams(temperature=0.0, repetition_penalty=1.5, logit_bias={0: -2.0}), [0], 2,
                        seed=None)
    assert choose_tokens(torch.tensor([[1.0, -1.4]]), [both]) == [1]


def test_stop_strings_across_tokens(engine, tokenizer):
    prompt = tokenizer.encode("The quick brown")
    full = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True))[0][0]
    tokens = full.token_ids
    # A stop string made of the end of token 4's text and the start of token 5's: split across tokens.
    left, right = tokenizer.decode(tokens[3:4]), tokenizer.decode(tokens[4:5])
    stop = left[-1:] + right[:1]
    assert len(stop) == 2
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True, stop=["@@never@@", stop])
    deltas = list(engine.stream(prompt, params))
    out_text = "".join(d.text for d in deltas)
    assert out_text == full.text[:full.text.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in deltas)
    (out,), = engine.generate([prompt], params)
    assert out.text == out_text and out.finish_reason == "stop"
    assert out.token_ids == tokens[:len(out.token_ids)]
    assert stop in tokenizer.decode(out.token_ids)  # the tokens that made the stop string are reported


def test_stop_token_ids_and_eos(engine, tokenizer):
    prompt = tokenizer.encode("Café")
    full = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=1.0, seed=5, ignore_eos=True))[0][0]
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=5, ignore_eos=True, stop_token_ids=[stop_id])
    (out,), = engine.generate([prompt], params)
    assert out.token_ids == full.token_ids[:first + 1]  # the stop token is generated, its text is not shown
    assert out.finish_reason == "stop"
    assert out.text == tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)
    # eos is a stop token unless ignore_eos
    eos_engine = Engine(engine.model, tokenizer, max_batch_size=1, max_len=128, eos_ids={stop_id})
    (out,), = eos_engine.generate([prompt], SamplingParams(max_tokens=20, temperature=1.0, seed=5))
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"


def test_streaming_never_splits_a_character(tokenizer):
    text = "Emojis: 😀 🎉 🚀 and 日本語のテキスト, café façade 🚀🚀"
    ids = tokenizer.encode(text)
    # The tokenizer really does split characters: some single tokens decode to a broken character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = Detokenizer(tokenizer, prompt=tokenizer.encode("Say: "))
    deltas = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)
    # With a stop string that starts inside a multi-token emoji run.
    detok = Detokenizer(tokenizer, prompt=[], stop=["🎉 🚀"])
    deltas = [detok.add(i) for i in ids]
    assert detok.stopped and "".join(deltas) == "Emojis: 😀 "


def test_engine_stream_deltas_concatenate_to_output(engine, tokenizer):
    prompt = tokenizer.encode("日本")
    params = SamplingParams(max_tokens=25, temperature=1.0, seed=11, ignore_eos=True, logprobs=True)
    deltas = list(engine.stream(prompt, params))
    (out,), = engine.generate([prompt], params)
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    assert [lp.token_id for d in deltas for lp in d.logprobs] == out.token_ids
    assert [d.finish_reason for d in deltas][-1] == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_continuous_batching_matches_running_alone(tokenizer):
    model = make_model(tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=3, max_len=256)
    long = (tokenizer.encode("The quick brown fox"), SamplingParams(max_tokens=120, temperature=0.0,
                                                                    ignore_eos=True))
    jobs = [(tokenizer.encode("Café, naïve"), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
            (tokenizer.encode("日本語の"), SamplingParams(max_tokens=10, temperature=0.8, seed=2, ignore_eos=True)),
            (tokenizer.encode("Numbers"), SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=4,
                                                        n=2, ignore_eos=True))]
    alone = [engine.generate([p], params)[0] for p, params in [long, *jobs]]
    step = engine.step

    def slow_step():  # a tiny model's step takes ~50 us: the long request could end before this thread,
        time.sleep(0.001)  # waiting for the GIL, submits the others (it did once); now it lasts >= 120 ms
        step()

    engine.step = slow_step
    engine.start()
    try:
        first = engine.submit(*long)
        events = iter(first)
        next(events)  # the long request is running
        late = [engine.submit(*jobs[0])]
        next(events)
        late += [engine.submit(*job) for job in jobs[1:]]  # the third waits for rows, then joins
        for request in late:
            request.done.wait(timeout=60)
            assert request.done.is_set()
        assert not first.done.is_set()  # the short requests did not wait for the long one
        list(events)
    finally:
        engine.stop()
    for request, expected in zip([first, *late], alone):
        assert [o.token_ids for o in request.outputs] == [o.token_ids for o in expected]
        assert [o.text for o in request.outputs] == [o.text for o in expected]


def test_cancel_frees_the_row(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer, max_batch_size=1, max_len=256)
    engine.start()
    try:
        hog = engine.submit(tokenizer.encode("The"), SamplingParams(max_tokens=200, ignore_eos=True, seed=0))
        waiting = engine.submit(tokenizer.encode("dog"), SamplingParams(max_tokens=5, temperature=0.0,
                                                                        ignore_eos=True))
        events = iter(hog)
        next(events)
        assert not waiting.done.is_set()
        hog.cancel()
        list(events)  # the cancelled request's stream ends
        assert waiting.done.wait(timeout=60)
        assert len(waiting.outputs[0].token_ids) == 5
        assert hog.outputs[0].finish_reason is None and len(hog.outputs[0].token_ids) < 200
        assert engine.num_active == 0
    finally:
        engine.stop()
    assert engine.num_active == 0


def test_a_step_wakes_an_event_loop_once(engine, tokenizer, monkeypatch):
    """Requests iterated on one event loop get a step's events in one hand-off to that loop (one
    call_soon_threadsafe, a system call on the engine's thread), not one per token, and each request
    still gets all its events."""
    prompts = [tokenizer.encode(t) for t in ["The lazy", "dog", "Café"]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for (out,) in engine.generate(prompts, params)]
    steps, handoffs, events = [], [], []
    step, iterating = engine.step, threading.Event()

    def counted_step():  # the engine's thread waits for the requests to be iterated on the event loop: else
        iterating.wait(30)  # a fast engine may finish them first, and their events are then drained, not handed off
        steps.append(1)
        step()

    async def main():
        loop = asyncio.get_running_loop()
        handoff = loop.call_soon_threadsafe

        def counted_handoff(callback, *args, **kwargs):
            if threading.current_thread() is not threading.main_thread():  # the engine's: (request, event) pairs
                handoffs.append(len(args[0]))
            return handoff(callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted_handoff)
        requests = [engine.submit(p, params) for p in prompts]
        engine.start()

        async def tokens(request):
            deltas = [d async for d in request.aiter()]
            events.append(len(deltas) + 1)  # and the end of the stream
            return [t for d in deltas for t in d.token_ids]

        tasks = [asyncio.create_task(tokens(r)) for r in requests]
        for _ in range(3):  # each task runs to its first await: its request has taken this loop
            await asyncio.sleep(0)
        iterating.set()
        return await asyncio.gather(*tasks)

    monkeypatch.setattr(engine, "step", counted_step)
    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == expected
    # one by one there would be a hand-off per event (len(handoffs) == sum(events))
    assert 1 <= len(handoffs) <= len(steps) < sum(events) and sum(handoffs) == sum(events)


def test_async_iteration(engine, tokenizer):
    prompt = tokenizer.encode("The lazy")
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    (expected,), = engine.generate([prompt], params)

    async def consume():
        return [d async for d in engine.submit(prompt, params).aiter()]

    engine.start()
    try:
        ticks = []

        async def main():
            async def ticker():  # the event loop keeps running while we wait for tokens
                while len(ticks) < 1000:
                    ticks.append(1)
                    await asyncio.sleep(0)
            tick = asyncio.create_task(ticker())
            deltas = await consume()
            tick.cancel()
            return deltas

        deltas = asyncio.run(main())
    finally:
        engine.stop()
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert ticks


def test_submit_rejects_bad_requests(engine, tokenizer):
    with pytest.raises(ValueError, match="at most 127"):
        engine.submit([1] * 128)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match=r"token ids must be"):
        engine.submit([tokenizer.vocab_size])
    for bad in [dict(temperature=-1), dict(top_p=0.0), dict(max_tokens=0), dict(n=5), dict(top_logprobs=50),
                dict(stop=[""]), dict(stop_token_ids=[10**6]), dict(logit_bias={10**6: 1.0}),
                dict(logit_bias={1: 101.0})]:
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            engine.submit([1, 2], SamplingParams(**bad))


def test_engine_survives_a_failing_step(engine, tokenizer, monkeypatch):
    calls = threading.Event()

    def broken(*args, **kwargs):
        calls.set()
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(engine.model, "forward", broken)
        m.setattr(engine, "cpu_decoder", None)  # its C steps would not call forward
        with pytest.raises(RuntimeError, match="boom"):
            engine.generate([tokenizer.encode("The")], GREEDY)
    assert calls.is_set() and engine.num_active == 0
    (out,), = engine.generate([tokenizer.encode("The")], GREEDY)
    assert len(out.token_ids) == 12


def test_a_closed_event_loop_cancels_its_request(tokenizer):
    engine = Engine(make_model(tokenizer), tokenizer, max_batch_size=1, max_len=512)
    engine.start()
    try:
        abandoned = engine.submit(tokenizer.encode("The"), SamplingParams(max_tokens=500, ignore_eos=True, seed=0))

        async def first_event():
            async for delta in abandoned.aiter():
                return delta

        asyncio.run(first_event())  # the loop closes while the request still runs, as when a server stops
        nxt = engine.submit(tokenizer.encode("dog"), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert nxt.done.wait(timeout=60)  # the only row was freed
        assert abandoned.outputs[0].finish_reason is None and len(abandoned.outputs[0].token_ids) < 500
    finally:
        engine.stop()


def test_prompts_past_the_c_prefill_limit_go_through_pytorch(tokenizer, monkeypatch):
    """The dense fp32 model prefills in C up to CPUDecoder.prefill_max_len prompt tokens (where the C
    matvecs are fast enough, CPUDecoder.prefills); a batch with a longer prompt goes through the
    model's forward. Both give the tokens of a PyTorch-only engine."""
    model = make_model(tokenizer)
    fast = Engine(model, tokenizer, max_batch_size=4)
    slow = Engine(model, tokenizer, max_batch_size=4, cpu_decoder=False)
    monkeypatch.setattr(fast.cpu_decoder, "prefill_max_len", 6)
    short, long = tokenizer.encode("dog")[:6], tokenizer.encode("Café, naïve, façade. The quick")
    assert len(long) > 6
    shapes, hook = prefill_recorder(model)
    for prompt in (short, long):
        (ours,), = fast.generate([prompt], GREEDY)
        (theirs,), = slow.generate([prompt], GREEDY)
        assert ours.token_ids == theirs.token_ids
    hook.remove()
    # the model's forward ran for both prompts of the slow engine, and for the fast one's long prompt
    # (its short one too where this CPU's C matvecs are not used for prefill)
    in_pytorch = [len(long)] if fast.cpu_decoder.prefills else [len(short), len(long)]
    assert sorted(t for _, t in shapes if t > 1) == sorted([len(short), len(long), *in_pytorch])


def test_engine_decodes_in_c_when_it_can_and_agrees_with_pytorch(tokenizer):
    """The dense fp32 model prefills and decodes through cpu_decode.c; the same requests (prompts of
    different lengths, n=2) through PyTorch's forward give the same tokens (greedy and seeded
    sampling) and log-probs (MoE stays on PyTorch)."""
    model = make_model(tokenizer)
    fast = Engine(model, tokenizer, max_batch_size=4)
    slow = Engine(model, tokenizer, max_batch_size=4, cpu_decoder=False)
    assert fast.cpu_decoder is not None and slow.cpu_decoder is None
    assert Engine(make_model(tokenizer, "moe"), tokenizer).cpu_decoder is None
    prompts = [tokenizer.encode(t) for t in ["The quick", "dog", "Café, naïve"]]
    for params in (SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.9, seed=5, n=2, ignore_eos=True)):
        ours, theirs = fast.generate(prompts, params), slow.generate(prompts, params)
        for a, b in zip(ours, theirs):
            assert [o.token_ids for o in a] == [o.token_ids for o in b]
            for oa, ob in zip(a, b):
                if params.logprobs:
                    torch.testing.assert_close(torch.tensor([lp.logprob for lp in oa.logprobs]),
                                               torch.tensor([lp.logprob for lp in ob.logprobs]), atol=1e-4, rtol=0)
