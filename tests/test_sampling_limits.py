"""Hostile sampling requests: stop strings whose checking cost grows with the text, streams of broken
UTF-8, and temperatures or penalties that turn the logits into NaN. Each must cost bounded work per
token and give the greedy output, a 400 (SamplingParamError) or a clear error of its own request, never garbage.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.detokenize import CONTEXT_TOKENS, MAX_PENDING_TOKENS, Detokenizer
from lmforge.infer.sampling import (
    MAX_REPETITION_PENALTY,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MIN_REPETITION_PENALTY,
    SAMPLING_EPS,
    DistributionError,
    SamplerState,
    SamplingParamError,
    apply_penalties,
    choose_tokens,
    draw,
    parse_logit_bias,
)
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer

CORPUS = "Stop here. Café, naïve. 東京は大きい。 Emojis: 😀 🎉 🚀. The end, and the end again. " * 30


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    return train_tokenizer([str(folder / "corpus.txt")], vocab_size=300, out_dir=folder, show_progress=False)


@pytest.fixture(scope="module")
def engine(tokenizer):
    config = preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Engine(build_model(config, seed=0).eval(), tokenizer, max_batch_size=4, max_len=128)


class Pieces:
    """A tokenizer whose token i is the string vocab[i] (or, for bytes, decodes as byte-level BPE does:
    the bytes joined, each broken sequence replaced by U+FFFD); it records each window it decodes."""

    def __init__(self, vocab):
        self.vocab, self.windows = vocab, []

    def decode(self, ids, skip_special_tokens=False):
        self.windows.append(len(ids))
        pieces = [self.vocab[i] for i in ids]
        if pieces and isinstance(pieces[0], bytes):
            return b"".join(pieces).decode("utf-8", errors="replace")
        return "".join(pieces)


# -- stop strings -------------------------------------------------------------------------------------


def test_stop_strings_are_bounded():
    SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS).validate(100)
    for stop in (["x"] * (MAX_STOP_STRINGS + 1), ["x" * (MAX_STOP_CHARS + 1)], [""], [3]):
        with pytest.raises(SamplingParamError, match="stop") as error:
            SamplingParams(stop=stop).validate(100)
        assert error.value.field == "stop"
    # the request (200 strings of 4000 characters): refused, and the message does not echo it whole
    with pytest.raises(SamplingParamError) as error:
        SamplingParams(stop=["a" * 4000] * 200).validate(100)
    assert len(str(error.value)) < 300


def test_stop_check_work_is_linear_in_the_text():
    """The longest allowed adversarial strings ('aaa...ab' and the like, which every tail of a stream
    of 'a's begins) against 20000 'a's: the automaton follows at most two edges or links a character,
    where rescanning the held-back tail for each string costs count x length per character."""
    stops = ["a" * (MAX_STOP_CHARS - 1) + c for c in "bcdefghijklmnopq"]
    assert len(stops) == MAX_STOP_STRINGS
    vocab = ["a", "aa", "aaaa"]
    detok = Detokenizer(Pieces(vocab), prompt=[], stop=stops)
    tokens = [0, 1, 2] * 2857
    deltas = [detok.add(t) for t in tokens]
    chars = 7 * 2857
    assert detok.stops.steps <= 2 * chars
    # everything but a possible stop string's beginning (the last 255 'a's) is out; the rest at the end
    assert "".join(deltas) == "a" * (chars - (MAX_STOP_CHARS - 1))
    assert detok.finish() == "a" * (MAX_STOP_CHARS - 1) and not detok.stopped
    # each token decodes a window of a few tokens, whatever the length of the text
    assert max(detok.tokenizer.windows) <= CONTEXT_TOKENS + MAX_PENDING_TOKENS
    # a string completed: cut at its start
    stopped = Detokenizer(Pieces(["a" * 300, "b"]), prompt=[], stop=stops)
    assert stopped.add(0) == "a" * 45 and stopped.add(1) == "" and stopped.stopped and stopped.text == "a" * 45


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """What may be shown of `text` so far: cut before the stop string that ends first (the longest of
    those ending there), else all but the longest tail that begins a stop string."""
    found = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if found:
        end, minus_length = min(found)
        return text[:end + minus_length], True
    held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - held], False


VOCAB = ["a", "b", "ab", "ba", "\n", "aab", "bb", "\nb", "abba", ""]


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text("ab\n", min_size=1, max_size=5), min_size=1, max_size=4),
       tokens=st.lists(st.integers(0, len(VOCAB) - 1), max_size=30))
@example(stops=["abba", "bb"], tokens=[VOCAB.index("abba")])  # "bb" ends first, inside the longer one: "a"
def test_stop_strings_match_a_search_of_the_whole_text(stops, tokens):
    """After every token, what has been shown equals a search of the whole text so far: stop strings
    across tokens, overlapping each other, one inside another, and tokens with no text."""
    detok = Detokenizer(Pieces(VOCAB), prompt=[], stop=stops)
    shown, text = "", ""
    for token in tokens:
        shown += detok.add(token)
        text += VOCAB[token]
        expected, stopped = reference(text, stops)
        assert (shown, detok.stopped) == (expected, stopped)
        if stopped:
            break
    shown += detok.finish()
    assert shown == detok.text == (reference(text, stops)[0] if detok.stopped else text)


# -- broken UTF-8 -------------------------------------------------------------------------------------


def test_stray_continuation_bytes_are_released_in_a_bounded_window(tokenizer, monkeypatch):
    """A token that is a lone UTF-8 continuation byte (a client can force one with logit_bias) never
    completes a character: its U+FFFD is shown after a few tokens, and the window decoded per token stays
    a few tokens long instead of growing with the output."""
    stray = next(t for t in range(tokenizer.vocab_size) if tokenizer.decode([t, t]) == "\ufffd\ufffd")
    decoded, decode = [], tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    detok = Detokenizer(tokenizer, prompt=tokenizer.encode("Stop"))
    deltas = [detok.add(stray) for _ in range(300)]
    assert max(decoded) <= CONTEXT_TOKENS + MAX_PENDING_TOKENS
    assert len("".join(deltas)) >= 300 - MAX_PENDING_TOKENS
    assert "".join(deltas) + detok.finish() == "\ufffd" * 300


def utf8_tokens(text: str, cuts: list[int], garbage: list[int]) -> list[bytes]:
    """The bytes of `text` cut at the given offsets, with the given stray bytes spliced in."""
    data = bytearray(text.encode())
    for i, byte in enumerate(garbage):
        data.insert((i * 7919) % (len(data) + 1), byte)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [bytes(data[a:b]) for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("aé東😀 "), max_size=40), cuts=st.lists(st.integers(0, 400), max_size=60),
       garbage=st.lists(st.integers(0x80, 0xFF), max_size=8))
def test_deltas_decode_bytes_as_a_whole_decode_does(text, cuts, garbage):
    """Byte-level tokens cut anywhere, even each ending inside a character (so the text never ends on a
    character for many tokens), with stray bytes among them: the deltas concatenate to a decode of all
    the bytes at once, show no U+FFFD for valid UTF-8, and each decode covers a few tokens only."""
    pieces = utf8_tokens(text, cuts, garbage)
    tokenizer = Pieces(pieces)
    detok = Detokenizer(tokenizer, prompt=[])
    deltas = [detok.add(i) for i in range(len(pieces))]
    assert "".join(deltas) + detok.finish() == b"".join(pieces).decode("utf-8", errors="replace")
    if not garbage:
        assert "\ufffd" not in "".join(deltas)
    assert max(tokenizer.windows, default=0) <= 2 * MAX_PENDING_TOKENS


def test_tokens_that_each_end_inside_a_character_are_shown_as_they_complete():
    """'X' + the first byte of 東 + ... : every token ends inside a character, the text never ends on
    one; all but the last character are shown within MAX_PENDING_TOKENS tokens."""
    first, rest = "東".encode()[:1], "東".encode()[1:]
    pieces = [b"X" + first, rest + b"X" + first]
    detok = Detokenizer(Pieces(pieces), prompt=[])
    shown = detok.add(0) + "".join(detok.add(1) for _ in range(99))
    assert shown.startswith("X東X東") and "\ufffd" not in shown and len(shown) >= 2 * (100 - MAX_PENDING_TOKENS)
    assert shown + detok.finish() == "X東" * 99 + "X\ufffd"


# -- degenerate sampling values ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300),
                                 dict(repetition_penalty=0.0), dict(repetition_penalty=math.inf),
                                 dict(repetition_penalty=math.nan), dict(temperature=math.nan),
                                 dict(temperature=math.inf), dict(top_p=math.nan), dict(presence_penalty=math.nan)])
def test_out_of_range_values_are_a_bad_param(engine, bad):
    name = next(iter(bad))
    with pytest.raises(SamplingParamError) as error:
        engine.submit([1, 2], SamplingParams(**bad))
    assert error.value.field == name


@pytest.mark.parametrize("key,value,field", [
    ("x", 1, "logit_bias"), ("-1", 1, "logit_bias"), ("300", 1, "logit_bias"), ("٣", 1, "logit_bias"),
    (" 5", 1, "logit_bias"), ("9" * 400, 1, "logit_bias"),
    ("5", 101, "logit_bias.5"), ("5", True, "logit_bias.5"), ("5", "1", "logit_bias.5"),
    ("5", math.nan, "logit_bias.5"),
])
def test_a_logit_bias_entry_that_is_not_a_token_id_and_a_bias_is_named(key, value, field):
    """OpenAI's logit_bias (the server's JSON, the command line's TOKEN_ID=BIAS): the first bad entry is named,
    its key quoted in an excerpt (a client may send a megabyte), the others kept as {token id: bias}."""
    assert parse_logit_bias({"0": -100, "299": 2.5, "007": 1}, vocab_size=300) == {0: -100.0, 299: 2.5, 7: 1.0}
    with pytest.raises(SamplingParamError) as error:
        parse_logit_bias({"1": 1, key: value, "2": "never checked"}, vocab_size=300)
    assert error.value.field == field and len(str(error.value)) < 150
    assert (key[:40] if field == "logit_bias" else field) in str(error.value)


def test_a_tiny_temperature_is_greedy(engine, tokenizer):
    prompt = tokenizer.encode("The end")
    (greedy,), = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for temperature in (1e-40, 1e-9, 9e-6):
        params = SamplingParams(max_tokens=16, temperature=temperature, seed=0, ignore_eos=True)
        (out,), = engine.generate([prompt], params)
        assert out.token_ids == greedy.token_ids


@settings(max_examples=150, deadline=None)
@given(temperature=st.sampled_from([0.0, 1e-40, 1e-6, 1e-5, 1e-3, 1.0, 100.0]),
       penalty=st.sampled_from([MIN_REPETITION_PENALTY, 1.3, MAX_REPETITION_PENALTY]),
       presence=st.sampled_from([-2.0, 0.0, 2.0]), frequency=st.sampled_from([-2.0, 2.0]),
       bias=st.dictionaries(st.integers(0, 49), st.sampled_from([-100.0, 100.0]), max_size=3),
       scale=st.sampled_from([1.0, 1e3, 1e20]), seed=st.integers(0, 2**32))
def test_any_allowed_values_give_a_real_token(temperature, penalty, presence, frequency, bias, scale, seed):
    """Within the bounds validate allows, and for logits as large as 1e20, every row gets a token of the
    vocabulary, and a temperature below SAMPLING_EPS gets the argmax of the penalised logits."""
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, presence_penalty=presence,
                            frequency_penalty=frequency, logit_bias=bias)
    params.validate(50)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(seed)) * scale
    state = SamplerState(params, [3, 4, 5], 50, seed=seed)
    for token in (4, 4, 7):
        state.observe(token)
    (token,) = choose_tokens(logits, [state])
    assert isinstance(token, int) and 0 <= token < 50
    if temperature < SAMPLING_EPS:
        biased = logits[0].index_add(0, *state.bias) if bias else logits[0]
        assert token == int(apply_penalties(biased, params, state.seen, state.counts).argmax())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_row_without_a_distribution_gets_an_error_and_the_others_their_tokens(temperature):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    broken = logits.clone()
    broken[1, 7] = math.nan  # a NaN
    broken[2, 3] = math.inf  # an infinite logit: the softmax of its row is NaN
    broken[3] = -math.inf  # nothing left to choose
    params = SamplingParams(temperature=temperature)
    ours = choose_tokens(broken, [SamplerState(params, [], 50, seed=i) for i in range(4)])
    theirs = choose_tokens(logits, [SamplerState(params, [], 50, seed=i) for i in range(4)])
    assert ours[0] == theirs[0]
    assert all(isinstance(t, DistributionError) for t in ours[1:]), ours
    with pytest.raises(DistributionError, match="sum to 0"):
        draw(torch.zeros(5), torch.Generator())


def test_nan_logits_fail_their_request_only(engine, tokenizer, monkeypatch):
    """A model whose logits are NaN for one request's rows (its n=2 samples): that request ends with a
    DistributionError, the requests batched with it get what they get alone, and the engine goes on."""
    prompts = [tokenizer.encode(t) for t in ("The end", "Café", "Stop here")]
    alone_params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                    SamplingParams(max_tokens=12, temperature=0.9, seed=4, ignore_eos=True)]
    alone = [engine.generate([p], params)[0][0].token_ids for p, params in zip(prompts[1:], alone_params)]
    victim = engine.submit(prompts[0], SamplingParams(max_tokens=12, temperature=0.7, n=2, ignore_eos=True))
    others = [engine.submit(p, params) for p, params in zip(prompts[1:], alone_params)]
    advance = engine._advance

    def poisoned(samples, logits):
        logits = logits.clone()
        logits[[i for i, s in enumerate(samples) if s.request is victim and len(s.output.token_ids) >= 3]] = math.nan
        advance(samples, logits)

    monkeypatch.setattr(engine, "_advance", poisoned)
    while not all(r.done.is_set() for r in [victim, *others]):
        engine.step()
    assert isinstance(victim.error, DistributionError) and "nan" in str(victim.error)
    assert [len(o.token_ids) for o in victim.outputs] == [3, 3]  # no garbage token after the NaN
    assert [r.error for r in others] == [None, None]
    assert [r.outputs[0].token_ids for r in others] == alone
    assert engine.num_active == 0
    monkeypatch.undo()
    (again,), = engine.generate([prompts[1]], alone_params[0])
    assert again.token_ids == alone[0]
