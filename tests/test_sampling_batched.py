"""choose_tokens' batched paths against choose_token row by row: the very same tokens, draws and errors.

A seeded sample must give the same text whatever shares its batch, so the batched sampling of
`_sample_rows` (and the batched argmax of greedy rows in a mixed batch) must pick, bit for bit, the token
`choose_token` picks for the row alone, and draw the same numbers from the row's generator.
"""

import random

import pytest
import torch

import lmforge.infer.sampling as sampling
from lmforge.infer.sampling import (
    DistributionError,
    SamplerState,
    SamplingParams,
    choose_one_by_one,
    choose_tokens,
    filter_logits,
    filter_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    """Settings of every kind: pure sampling (most often, as RL rollouts), every filter alone and together, the
    edges of each (top_k 1 / V / above V, a top_p past the 256 best, a min_p of 1), penalties, bias, greedy."""
    kind = rng.choice(["plain", "plain", "filters", "filters", "edges", "penalized", "greedy"])
    params = SamplingParams(temperature=rng.choice([1.0, 1.0, 0.7, 1.3, 1e-5, 2e-4, 100.0]),
                            seed=rng.randrange(2**40))
    if kind in ("filters", "penalized"):
        params.top_k = rng.choice([0, 0, 1, 2, rng.randrange(1, vocab + 1)])
        params.top_p = rng.choice([1.0, 0.95, 0.9, 0.5, rng.random() or 1.0])
        params.min_p = rng.choice([0.0, 0.0, 0.05, 0.2])
    if kind == "edges":
        params.top_k = rng.choice([vocab, vocab + 3, vocab - 1])
        params.top_p = rng.choice([0.9999, 1e-6, 1.0])
        params.min_p = rng.choice([1.0, 1e-9, 0.0])
    if kind in ("penalized", "greedy") or rng.random() < 0.1:
        params.repetition_penalty = rng.choice([1.0, 1.3, 0.8])
        params.presence_penalty = rng.choice([0.0, 0.5])
        params.frequency_penalty = rng.choice([0.0, -0.3])
        params.logit_bias = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randrange(3))}
    if kind == "greedy":
        params.temperature = rng.choice([0.0, 1e-6])
    return params


def random_logits(rng: random.Random, rows: int, vocab: int) -> torch.Tensor:
    """Logits of every shape a model gives and a few it should not: spread or peaked, many ties (rounded
    values), -inf entries (masked tokens), and the odd row with NaN, +inf or nothing finite."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = torch.randn(rows, vocab, generator=g) * rng.choice([0.3, 1.0, 4.0, 20.0])
    for row in logits:
        shape = rng.random()
        if shape < 0.2:
            row.copy_(row.round())  # ties everywhere, at the top-k and top-p cuts too
        elif shape < 0.3:
            row[torch.rand(vocab, generator=g) < 0.5] = float("-inf")
        elif shape < 0.33:
            row[rng.randrange(vocab)] = rng.choice([float("nan"), float("inf")])
        elif shape < 0.35:
            row.fill_(float("-inf"))
    return logits


def alone_logits(row: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """The logits choose_token draws from, for the row alone."""
    p = state.params
    return filter_logits(sampling._bias_and_penalize(row, state) / p.temperature, p.top_k, p.top_p, p.min_p)


def comparable(tokens: list[int | DistributionError]) -> list[int | str]:
    return [str(t) if isinstance(t, DistributionError) else t for t in tokens]


@pytest.mark.parametrize("vocab", [2, 50, 300, 2048])
@pytest.mark.parametrize("chunk", [sampling.SAMPLE_CHUNK, 1])  # 1: every row a chunk of its own
def test_batched_sampling_chooses_the_tokens_of_the_one_row_path(vocab, chunk, monkeypatch):
    monkeypatch.setattr(sampling, "SAMPLE_CHUNK", chunk)
    rng = random.Random(vocab * 7 + chunk)
    for _ in range(3):  # batches of different mixes, 6 decode steps each
        rows = rng.choice([1, 5, 33])
        params = [random_params(rng, vocab) for _ in range(rows)]
        prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 6))] for _ in range(rows)]
        batched = [SamplerState(p, prompt, vocab, seed=p.seed) for p, prompt in zip(params, prompts)]
        alone = [SamplerState(p, prompt, vocab, seed=p.seed) for p, prompt in zip(params, prompts)]
        for _ in range(6):
            logits = random_logits(rng, rows, vocab)
            before = logits.clone()
            sampled = [i for i, p in enumerate(params) if not p.greedy]
            if sampled:  # the logits drawn from, bit for bit (a last-bit difference would rarely change a token)
                torch.testing.assert_close(sampling._sampling_logits(logits[sampled], [batched[i] for i in sampled]),
                                           torch.stack([alone_logits(logits[i], alone[i]) for i in sampled]),
                                           rtol=0, atol=0, equal_nan=True)
            ours = choose_tokens(logits, batched)
            assert torch.equal(logits.isnan(), before.isnan()) and torch.equal(logits.nan_to_num(), before.nan_to_num())
            theirs = choose_one_by_one(logits, alone)
            assert comparable(ours) == comparable(theirs), [p for p, a, b in zip(params, ours, theirs) if a != b]
            for state, token in zip(batched + alone, ours + theirs):
                if not isinstance(token, DistributionError):
                    state.observe(token)
        for a, b in zip(batched, alone):  # the same numbers drawn from each generator
            assert a.generator is None or torch.equal(a.generator.get_state(), b.generator.get_state())


def test_rollout_batches_take_the_batched_path_and_keep_each_seed(monkeypatch):
    """A GRPO-like batch (temperature 1, top_p 0.9, a seed per sample) is sampled in one call of _sample_rows,
    and each sample's tokens are those of the sample alone."""
    calls = []
    original = sampling._sample_rows
    monkeypatch.setattr(sampling, "_sample_rows", lambda logits, states: calls.append(len(states))
                        or original(logits, states))
    vocab, rows = 6400, 16
    states = [SamplerState(SamplingParams(top_p=0.9), [], vocab, seed=100 + i) for i in range(rows)]
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(rows, vocab, generator=g) * 3 for _ in range(4)]
    together = [choose_tokens(step, states) for step in logits]
    assert calls == [rows] * 4
    for i in range(rows):
        state = SamplerState(SamplingParams(top_p=0.9), [], vocab, seed=100 + i)
        assert [choose_tokens(step[i:i + 1], [state])[0] for step in logits] == [t[i] for t in together]


def test_top_p_and_min_p_compare_in_fp32_as_the_one_row_path():
    """filter_logits compares an fp32 tensor with a Python float, which PyTorch does in fp32: a top_p or
    min_p a hair above a representable value acts as that value. filter_rows must cut at the same token."""
    logits = torch.tensor([[2.0, 1.0, 1.0, -3.0]]).log_softmax(-1)
    probs = logits.softmax(-1)[0]  # cuts at these rows' own masses and ratio + 1e-12: the same in fp32, not in float64
    for params in [SamplingParams(top_p=float(probs[0]) + 1e-12), SamplingParams(top_p=float(probs[:2].sum()) + 1e-12),
                   SamplingParams(min_p=float(probs[1] / probs[0]) + 1e-12), SamplingParams(top_k=2, top_p=0.999)]:
        alone = filter_logits(logits[0], params.top_k, params.top_p, params.min_p)
        assert torch.equal(filter_rows(logits, [params])[0], alone), params
