"""`lmforge serve` against the official `openai` client, over a live server on localhost.

One tiny random model (hidden 64, 2 layers) with a BPE tokenizer trained on a few KB serves every test;
the server runs in a thread beside the test, so the tests can also look inside its engine (active
requests, cancelled ones). Whatever the server answers is compared with the engine run directly on the
same prompt and sampling parameters: the HTTP layer must add the schema and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from lmforge.checkpoint import save_model  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.infer.engine import Engine, SamplingParams  # noqa: E402
from lmforge.infer.serve import create_app, served_name  # noqa: E402
from lmforge.model import build_model  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

MODEL = "tiny-chat"
CORPUS = ("The quick brown fox jumps over the lazy dog. To be, or not to be: that is the question.\n"
          "Café, naïve, façade; 3 + 4 = 7; ünïcödé and 😀 emoji.\n"
          "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.\n") * 30
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model_dir(root: Path, context: int = 1024) -> Path:
    """A random tiny llama plus a ~300-token byte-level BPE tokenizer with the ChatML template."""
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    tokenizer = train_tokenizer([str(root / "corpus.txt")], vocab_size=300, out_dir=root / "tokenizer",
                                show_progress=False)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    model = build_model(cfg, device="cpu", dtype=torch.float32, seed=0)
    return save_model(model, root / "model", tokenizer_dir=root / "tokenizer")


@dataclass
class LiveServer:
    """uvicorn serving `create_app(engine)` in a thread, on a free localhost port."""

    engine: Engine
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    @classmethod
    def start(cls, engine: Engine, api_key: str | None = None, **app_options) -> LiveServer:
        """`app_options`: create_app's keyword arguments (the Host check, the limits)."""
        port = free_port()
        app = create_app(engine, MODEL, api_key, **app_options)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return cls(engine, f"http://127.0.0.1:{port}", server, thread)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def healthy(self) -> bool:
        response = httpx.get(self.url + "/health", timeout=10)
        return response.status_code == 200 and response.json()["status"] == "ok"

    def wait_idle(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.engine.num_active and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.engine.num_active


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("serve"))


@contextlib.contextmanager
def serving(model_dir: Path, max_batch_size: int = 8):
    """An engine on `model_dir` running in the background, served live."""
    engine = Engine.from_pretrained(model_dir, max_batch_size=max_batch_size)
    engine.start()
    server = LiveServer.start(engine)
    try:
        yield server
    finally:
        server.close()
        engine.stop()


@pytest.fixture(scope="module")
def live(model_dir):
    with serving(model_dir) as server:
        yield server


def chat_prompt(engine: Engine, messages) -> list[int]:
    return engine.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]


def engine_outputs(engine: Engine, prompt: list[int], **params):
    """What the engine itself produces for one prompt: the reference for the server's answer."""
    return engine.generate([prompt], SamplingParams(**params))[0]


# -- the happy paths ------------------------------------------------------------------------------


def test_models_and_health(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert live.healthy()
    assert httpx.get(live.url + "/health").json()["active_requests"] == 0


def test_chat_matches_engine(live):
    response = live.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    prompt = chat_prompt(live.engine, HELLO)
    (expected,) = engine_outputs(live.engine, prompt, max_tokens=12, temperature=0.0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == len(prompt) + len(expected.token_ids)
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.id.startswith("chatcmpl-") and abs(response.created - time.time()) < 60


def test_chat_stream_equals_non_stream(live):
    client = live.client()
    kw = dict(model=MODEL, messages=HELLO, max_tokens=20, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(stream=True, model=MODEL, messages=HELLO, max_tokens=3))
    assert all(c.choices and c.usage is None for c in plain)


def test_sse_wire_format(live):
    """The bytes on the wire: `data: {json}` events separated by blank lines, ending with `data: [DONE]`."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")


def test_ignore_eos_and_max_completion_tokens(live):
    client = live.client()
    for kw in (dict(max_tokens=15), dict(max_completion_tokens=15)):
        response = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=1.0, seed=3,
                                                  extra_body={"ignore_eos": True}, **kw)
        assert response.usage.completion_tokens == 15 and response.choices[0].finish_reason == "length"
    expected = engine_outputs(live.engine, chat_prompt(live.engine, HELLO), max_tokens=15, temperature=1.0, seed=3,
                              ignore_eos=True)[0]
    assert response.choices[0].message.content == expected.text


def test_n_samples_and_seed(live):
    client = live.client()
    kw = dict(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, n=3, seed=1234)
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # same seed, same samples
    assert len(set(texts)) > 1  # the n samples differ from each other
    expected = engine_outputs(live.engine, chat_prompt(live.engine, HELLO), max_tokens=10, temperature=1.0, n=3,
                              seed=1234)
    assert texts == [o.text for o in expected]
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in expected)
    other = client.chat.completions.create(**{**kw, "seed": 99})
    assert [c.message.content for c in other.choices] != texts
    # streamed: each chunk names its choice; every choice streams its own sample and ends with its reason
    streamed, reasons = ["", "", ""], [None, None, None]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert streamed == texts and reasons == [o.finish_reason for o in expected]


def test_sampling_parameters_reach_the_engine(live):
    """temperature, top_p and the OpenAI penalties give what the engine gives with the same values."""
    params = dict(temperature=0.7, top_p=0.9, presence_penalty=1.5, frequency_penalty=-0.5, seed=5)
    response = live.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, **params)
    expected = engine_outputs(live.engine, chat_prompt(live.engine, HELLO), max_tokens=12, **params)[0]
    assert response.choices[0].message.content == expected.text
    plain = engine_outputs(live.engine, chat_prompt(live.engine, HELLO), max_tokens=12, temperature=0.7, seed=5)[0]
    assert expected.text != plain.text  # the penalties and top_p changed something, so the check above means it


def test_logit_bias_and_vllm_sampling_extensions_reach_the_engine(live):
    """OpenAI's logit_bias (string token ids) and vLLM's top_k, min_p, repetition_penalty and stop_token_ids
    (sent by the openai client in extra_body) give what the engine gives with the same values."""
    client, prompt = live.client(), chat_prompt(live.engine, HELLO)
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "ignore_eos": True}
    response = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0.9, seed=3,
                                              extra_body=extra)
    expected = engine_outputs(live.engine, prompt, max_tokens=12, temperature=0.9, seed=3, top_k=5, min_p=0.05,
                              repetition_penalty=1.3, ignore_eos=True)[0]
    plain = engine_outputs(live.engine, prompt, max_tokens=12, temperature=0.9, seed=3, ignore_eos=True)[0]
    assert response.choices[0].message.content == expected.text != plain.text
    greedy = engine_outputs(live.engine, prompt, max_tokens=12, temperature=0.0, ignore_eos=True)[0]
    favoured = next(t for t in range(100, 200) if t not in greedy.token_ids[:1])
    response = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                              logit_bias={str(favoured): 100}, extra_body={"ignore_eos": True})
    assert response.choices[0].message.content == live.engine.tokenizer.decode([favoured] * 6)
    # a stop token id ends the reply before it, finish_reason "stop"
    stop_id = greedy.token_ids[3]
    cut = greedy.token_ids.index(stop_id)
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert response.choices[0].text == live.engine.tokenizer.decode(greedy.token_ids[:cut])
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens == cut + 1


def test_next_chat_turn_reuses_the_cached_prefix(live, model_dir):
    """The second turn of a chat (history, reply, a new message) finds its history in the prefix cache and
    says so in usage.prompt_tokens_details.cached_tokens; its answer is what a full prefill gives."""
    client = live.client()
    kw = dict(model=MODEL, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(messages=HELLO, **kw)
    history = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(messages=history, **kw)
    prompt = chat_prompt(live.engine, history)
    fed = chat_prompt(live.engine, HELLO) + engine_outputs(live.engine, chat_prompt(live.engine, HELLO),
                                                           max_tokens=10, temperature=0, ignore_eos=True)[0].token_ids
    shared = next((i for i, (a, b) in enumerate(zip(fed, prompt)) if a != b), min(len(fed), len(prompt)))
    assert min(shared, len(fed) - 1) <= second.usage.prompt_tokens_details.cached_tokens < len(prompt)
    assert second.usage.prompt_tokens_details.cached_tokens > len(chat_prompt(live.engine, HELLO))
    fresh = Engine.from_pretrained(model_dir, max_batch_size=2, prefix_cache=False)
    assert second.choices[0].message.content == engine_outputs(fresh, prompt, max_tokens=10, temperature=0,
                                                               ignore_eos=True)[0].text
    again = list(client.chat.completions.create(messages=history, stream=True,
                                                stream_options={"include_usage": True}, **kw))
    assert again[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1  # all but the last token


def test_stop_strings(live):
    client = live.client()
    prompt = "To be, or not"
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(text) >= 8
    for stop in (text[4:6], [text[5:7], "never appears \x00"]):
        first = min(text.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in text)
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                             extra_body={"ignore_eos": True})
        assert response.choices[0].text == text[:first]
        assert response.choices[0].finish_reason == "stop"
        streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                  stop=stop, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in streamed) == text[:first]
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_completions_prompt_forms_and_batches(live):
    client = live.client()
    tokenizer = live.engine.tokenizer
    prompts = ["The quick brown", "Café"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, temperature=1.0, seed=11)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    batch = live.engine.generate([tokenizer.encode(p) for p in prompts],
                                 SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=11))
    expected = [o.text for outputs in batch for o in outputs]
    assert [c.text for c in response.choices] == expected
    assert response.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    # Token-id prompts, one and several, mean the same as their text.
    ids = [tokenizer.encode(p) for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, n=2, temperature=1.0, seed=11)
    assert [c.text for c in by_ids.choices] == expected
    one = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, temperature=0)
    assert one.choices[0].text == client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=6,
                                                            temperature=0).choices[0].text
    # Streaming a batch: every choice's chunks add up to its non-streamed text.
    texts = {}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, temperature=1.0,
                                           seed=11, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(4)] == expected
    # OpenAI's default length for completions is 16 tokens.
    default = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16


def _reference_bytes(tokenizer, token_id: int) -> list[int]:
    """Token bytes the way transformers' converter reads a byte-level vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if token_id in tokenizer.backend.get_added_tokens_decoder():
        return list(tokenizer.backend.id_to_token(token_id).encode())
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    return [decoder[c] for c in tokenizer.backend.id_to_token(token_id)]


def test_chat_logprobs(live):
    response = live.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                                     logprobs=True, top_logprobs=3)
    (expected,) = engine_outputs(live.engine, chat_prompt(live.engine, HELLO), max_tokens=10, temperature=0.0,
                                 logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == response.usage.completion_tokens
    tokenizer = live.engine.tokenizer
    for entry, token_id, reference in zip(content, expected.token_ids, expected.logprobs):
        assert entry.token == tokenizer.decode([token_id])
        assert math.isclose(entry.logprob, reference.logprob, abs_tol=1e-4)
        assert entry.bytes == _reference_bytes(tokenizer, token_id)
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-6)  # greedy: the best one
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
        for top, (top_id, _, _) in zip(entry.top_logprobs, reference.top):
            assert top.bytes == _reference_bytes(tokenizer, top_id)
    # Streamed log-probs are the same entries, spread over the chunks.
    chunks = live.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    plain = live.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(live):
    response = live.client().completions.create(model=MODEL, prompt="The quick", max_tokens=12, temperature=1.0,
                                                seed=2, logprobs=2, extra_body={"ignore_eos": True})
    (expected,) = engine_outputs(live.engine, live.engine.tokenizer.encode("The quick"), max_tokens=12,
                                 temperature=1.0, seed=2, logprobs=True, top_logprobs=2, ignore_eos=True)
    choice = response.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert lp.tokens == [e.text for e in expected.logprobs]
    for value, top, reference in zip(lp.token_logprobs, lp.top_logprobs, expected.logprobs):
        assert math.isclose(value, reference.logprob, abs_tol=1e-4)
        # The k alternatives plus the chosen token ("up to logprobs+1 elements").
        assert {text for _, text, _ in reference.top} | {reference.text} == set(top)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(0 <= offset <= len(choice.text) for offset in lp.text_offset)
    # Where every token is whole characters, the offsets are exactly where each token's text starts.
    if "\ufffd" not in "".join(lp.tokens):
        assert [choice.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens


def test_completion_echo_scores_text_as_lm_evaluation_harness_does(live):
    """echo with logprobs, the request lm-evaluation-harness's `local-completions` sends for a loglikelihood
    (a batch of token-id prompts, max_tokens 1, logprobs 1, echo): each reply begins with its prompt, whose
    tokens carry the log-probs of a forward over it (the first null), so a continuation's log-likelihood read as
    the harness reads it is the model's. A stream sends the echoed prompt in each choice's first chunk."""
    engine, tokenizer = live.engine, live.engine.tokenizer
    context, continuation = tokenizer.encode("To be, or not"), tokenizer.encode(" to be")
    prompts = [context + continuation, tokenizer.encode("The quick brown fox")]
    response = live.client().completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0,
                                                logprobs=1, echo=True, seed=1234)
    for prompt, choice in zip(prompts, sorted(response.choices, key=lambda c: c.index)):
        with torch.no_grad():
            logp = engine.model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        reference = logp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        (alone,) = engine_outputs(engine, prompt, max_tokens=1, temperature=0.0)
        lp, echoed = choice.logprobs, tokenizer.decode(prompt)
        assert choice.text == echoed + alone.text
        lengths = {len(lp.tokens), len(lp.token_logprobs), len(lp.top_logprobs), len(lp.text_offset)}
        assert lengths == {len(prompt) + 1}
        assert lp.tokens[:len(prompt)] == [tokenizer.decode([t]) for t in prompt]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(prompt)]), reference, atol=1e-4, rtol=0)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(prompt)] == len(echoed)
    lp = sorted(response.choices, key=lambda c: c.index)[0].logprobs
    start = len(context)  # the harness: sum(token_logprobs[ctxlen:-1]), greedy if each is its top's max
    with torch.no_grad():
        logp = engine.model(torch.tensor([prompts[0]])).logits[0].float().log_softmax(-1)
    expected = logp[torch.arange(start - 1, len(prompts[0]) - 1), torch.tensor(continuation)]
    assert math.isclose(sum(lp.token_logprobs[start:-1]), float(expected.sum()), abs_tol=1e-3)
    scored = zip(lp.token_logprobs[start:-1], lp.top_logprobs[start:-1])
    greedy = all(value == max(top.values()) for value, top in scored)
    assert greedy == bool((logp[start - 1:-1].argmax(-1) == torch.tensor(continuation)).all())

    (alone,) = engine_outputs(engine, tokenizer.encode("The quick"), max_tokens=4, temperature=0.0)
    stream = live.client().completions.create(model=MODEL, prompt="The quick", max_tokens=4, temperature=0,
                                              echo=True, stream=True)
    texts = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert texts[0].startswith("The quick") and "".join(texts) == "The quick" + alone.text

    # max_tokens 0 (OpenAI's legacy scoring request): the prompt and its log-probs, nothing generated
    for stream in (False, True):
        answer = live.client().completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, logprobs=2,
                                                  echo=True, stream=stream, **({"stream_options": {
                                                      "include_usage": True}} if stream else {}))
        chunks = list(answer) if stream else [answer]
        choice = chunks[0].choices[0]
        assert len(chunks) == 1 or (len(chunks) == 2 and chunks[1].choices == [])  # a stream: the echo, the usage
        assert choice.text == tokenizer.decode(prompts[0]) and choice.finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 0
        assert choice.logprobs.tokens == lp.tokens[:len(prompts[0])]
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(prompts[0])], abs=1e-5)
        assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs[1:])


def test_lm_evaluation_harness_scores_and_generates_through_the_server(live, model_dir):
    """lm-evaluation-harness's own `local-completions` model (the reference client) against the live server:
    each continuation's log-likelihood, and whether it is the greedy one, are those of a forward of the model
    (one of them the engine's greedy reply); generate_until gives the engine's text."""
    harness = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    engine, tokenizer = live.engine, live.engine.tokenizer
    (greedy,) = engine_outputs(engine, tokenizer.encode("The quick brown"), max_tokens=4, temperature=0.0)
    pairs = [("To be, or not", " to be"), ("The quick brown", greedy.text), ("Café,", " naïve")]
    lm = harness.LocalCompletionsAPI(base_url=live.url + "/v1/completions", model=MODEL, tokenizer=str(model_dir),
                                     tokenizer_backend="huggingface", batch_size=2, max_length=1024)
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (loglikelihood, is_greedy) in zip(pairs, results):
        start, whole = len(tokenizer.encode(context)), tokenizer.encode(context + continuation)
        with torch.no_grad():
            logp = engine.model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        target = torch.tensor(whole[start:])
        assert math.isclose(loglikelihood, float(logp[torch.arange(start - 1, len(whole) - 1), target].sum()),
                            abs_tol=1e-3)
        assert is_greedy == bool((logp[start - 1:-1].argmax(-1) == target).all())
    assert [is_greedy for _, is_greedy in results] == [False, True, False]
    # Without a local copy of the tokenizer the harness finds the server's (/tokenizer_info, /tokenize) and uses it.
    remote = harness.LocalCompletionsAPI(base_url=live.url + "/v1/completions", model=MODEL, batch_size=2,
                                         max_length=1024)
    assert type(remote.tokenizer).__name__ == "RemoteTokenizer"
    assert remote.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]) == results
    (expected,) = engine_outputs(engine, tokenizer.encode("The quick"), max_tokens=8, temperature=0.0, stop=["\n"])
    request = Instance("generate_until", {}, ("The quick", {"until": ["\n"], "max_gen_toks": 8}), 0)
    assert lm.generate_until([request]) == [expected.text]


def test_tokenizer_endpoints_agree_with_transformers(live, model_dir):
    """vLLM's /tokenize (a text, or a chat through the model's template), /detokenize and /tokenizer_info give
    what transformers' tokenizer of the same directory gives; bad requests get OpenAI's errors."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(model_dir))
    text = "Café, naïve 😀 — To be, or not"
    ids = reference(text, add_special_tokens=False).input_ids
    answer = httpx.post(live.url + "/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                      "return_token_strs": True}, timeout=30).json()
    assert answer == {"count": len(ids), "max_model_len": live.engine.max_len, "tokens": ids,
                      "token_strs": reference.convert_ids_to_tokens(ids)}
    answer = httpx.post(live.url + "/tokenize", json={"model": MODEL, "prompt": text}, timeout=30).json()
    assert answer["tokens"] == reference(text).input_ids and answer["token_strs"] is None
    chat = reference.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True, return_dict=True)
    answer = httpx.post(live.url + "/tokenize", json={"messages": HELLO}, timeout=30).json()
    assert answer["tokens"] == chat["input_ids"] == chat_prompt(live.engine, HELLO)
    plain = reference.apply_chat_template(HELLO, add_generation_prompt=False, tokenize=True, return_dict=True)
    answer = httpx.post(live.url + "/tokenize", json={"messages": HELLO, "add_generation_prompt": False},
                        timeout=30).json()
    assert answer["tokens"] == plain["input_ids"] != chat["input_ids"]
    assert httpx.post(live.url + "/detokenize", json={"tokens": ids}, timeout=30).json() == {
        "prompt": reference.decode(ids)}
    info = httpx.get(live.url + "/tokenizer_info", timeout=30).json()
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == (
        reference.eos_token, reference.bos_token, reference.chat_template)
    for path, body, status, param in [("/tokenize", {"prompt": "a", "messages": HELLO}, 400, "prompt"),
                                      ("/tokenize", {}, 400, "prompt"),
                                      ("/tokenize", {"prompt": 5}, 400, "prompt"),
                                      ("/tokenize", {"prompt": "a", "model": "gpt-17"}, 404, "model"),
                                      ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
                                      ("/detokenize", {"tokens": "abc"}, 400, "tokens")]:
        response = httpx.post(live.url + path, json=body, timeout=30)
        assert response.status_code == status and response.json()["error"]["param"] == param, (path, body)


def test_32_concurrent_clients(live):
    """32 clients at once (more than the 8 engine slots), streaming or not, chat or completions: each gets
    exactly the greedy answer it gets alone (greedy, so float noise between batch shapes cannot flip a draw)."""
    engine = live.engine
    jobs = []
    for i in range(32):
        messages = [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}]
        jobs.append(dict(kind=("chat", "completion")[i % 2], stream=i % 4 >= 2, messages=messages,
                         prompt=f"Story {i}: the fox", max_tokens=4 + i % 9))
    for job in jobs:
        chat = job["kind"] == "chat"
        prompt = chat_prompt(engine, job["messages"]) if chat else engine.tokenizer.encode(job["prompt"])
        job["expected"] = engine_outputs(engine, prompt, max_tokens=job["max_tokens"], temperature=0.0)[0].text

    def run(job):
        client = live.client(timeout=120)
        kw = dict(model=MODEL, max_tokens=job["max_tokens"], temperature=0, stream=job["stream"])
        if job["kind"] == "chat":
            result = client.chat.completions.create(messages=job["messages"], **kw)
            if job["stream"]:
                return "".join(c.choices[0].delta.content or "" for c in result if c.choices)
            return result.choices[0].message.content
        result = client.completions.create(prompt=job["prompt"], **kw)
        if job["stream"]:
            return "".join(c.choices[0].text for c in result)
        return result.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(run, jobs))
    assert answers == [job["expected"] for job in jobs]
    assert live.wait_idle() == 0 and live.healthy()


# -- bad requests -------------------------------------------------------------------------------

GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GOOD_COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
LONG = "the " * 1100  # ~1100 tokens: more than the 1024-token context

BAD_REQUESTS = [
    # (name, path, body (bytes = sent as is), status, param)
    ("malformed json", "chat", b'{"model": "tiny-chat", "messages": [', 400, None),
    ("not an object", "chat", b"[1, 2, 3]", 400, None),
    ("empty body", "completion", b"", 400, None),
    ("missing messages", "chat", {"model": MODEL}, 400, "messages"),
    ("missing model", "chat", {"messages": GOOD_CHAT["messages"]}, 400, "model"),
    ("empty messages", "chat", {**GOOD_CHAT, "messages": []}, 400, "messages"),
    ("message not an object", "chat", {**GOOD_CHAT, "messages": ["hi"]}, 400, "messages.0"),
    ("unknown role", "chat", {**GOOD_CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("content of wrong type", "chat", {**GOOD_CHAT, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("template refuses", "chat", {**GOOD_CHAT, "messages": [{"role": "user", "content": "a"},
                                                            {"role": "system", "content": "b"}]}, 400, "messages"),
    ("temperature a string", "chat", {**GOOD_CHAT, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", "chat", {**GOOD_CHAT, "temperature": 2.5}, 400, "temperature"),
    ("temperature negative", "completion", {**GOOD_COMPLETION, "temperature": -0.1}, 400, "temperature"),
    ("top_p zero", "chat", {**GOOD_CHAT, "top_p": 0}, 400, "top_p"),
    ("n zero", "chat", {**GOOD_CHAT, "n": 0}, 400, "n"),
    ("n not an integer", "completion", {**GOOD_COMPLETION, "n": 1.5}, 400, "n"),
    ("n over the engine's slots", "chat", {**GOOD_CHAT, "n": 50}, 400, "n"),
    ("max_tokens negative", "chat", {**GOOD_CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero", "completion", {**GOOD_COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens a bool", "completion", {**GOOD_COMPLETION, "max_tokens": True}, 400, "max_tokens"),
    ("max_completion_tokens negative", "chat", {**GOOD_CHAT, "max_completion_tokens": -5}, 400,
     "max_completion_tokens"),
    ("presence_penalty out of range", "chat", {**GOOD_CHAT, "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty a list", "completion", {**GOOD_COMPLETION, "frequency_penalty": [1]}, 400,
     "frequency_penalty"),
    ("seed a float", "chat", {**GOOD_CHAT, "seed": 1.5}, 400, "seed"),
    ("seed beyond 64 bits", "completion", {**GOOD_COMPLETION, "seed": 2**70}, 400, "seed"),
    ("stream a string", "chat", {**GOOD_CHAT, "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", "chat", {**GOOD_CHAT, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("stop a number", "chat", {**GOOD_CHAT, "stop": 5}, 400, "stop"),
    ("stop empty", "completion", {**GOOD_COMPLETION, "stop": [""]}, 400, "stop"),
    ("logprobs a number in chat", "chat", {**GOOD_CHAT, "logprobs": 3}, 400, "logprobs"),
    ("top_logprobs without logprobs", "chat", {**GOOD_CHAT, "top_logprobs": 2}, 400, "logprobs"),
    ("top_logprobs too many", "chat", {**GOOD_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("logprobs too many", "completion", {**GOOD_COMPLETION, "logprobs": 50}, 400, "logprobs"),
    ("logit_bias key not a token id", "chat", {**GOOD_CHAT, "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ("logit_bias token out of vocabulary", "completion", {**GOOD_COMPLETION, "logit_bias": {"100000": 1}}, 400,
     "logit_bias"),
    ("logit_bias value out of range", "chat", {**GOOD_CHAT, "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
    ("top_k below -1", "chat", {**GOOD_CHAT, "top_k": -2}, 400, "top_k"),
    ("min_p above 1", "completion", {**GOOD_COMPLETION, "min_p": 1.5}, 400, "min_p"),
    ("repetition_penalty zero", "chat", {**GOOD_CHAT, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("stop_token_ids out of vocabulary", "chat", {**GOOD_CHAT, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("stop_token_ids not a list", "completion", {**GOOD_COMPLETION, "stop_token_ids": 5}, 400, "stop_token_ids"),
    ("unknown field", "chat", {**GOOD_CHAT, "frobnicate": 1}, 400, "frobnicate"),
    ("echo in chat (a completions field)", "chat", {**GOOD_CHAT, "echo": True}, 400, "echo"),
    ("echo a string", "completion", {**GOOD_COMPLETION, "echo": "please"}, 400, "echo"),
    ("known unused field of wrong type", "chat", {**GOOD_CHAT, "user": 5}, 400, "user"),
    ("prompt of wrong type", "completion", {**GOOD_COMPLETION, "prompt": {"text": "hi"}}, 400, "prompt"),
    ("prompt empty", "completion", {**GOOD_COMPLETION, "prompt": ""}, 400, "prompt"),
    ("prompt token out of vocabulary", "completion", {**GOOD_COMPLETION, "prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("prompt longer than the context", "completion", {**GOOD_COMPLETION, "prompt": LONG}, 400, "prompt"),
    ("messages longer than the context", "chat", {**GOOD_CHAT, "messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("prompt + max_tokens over the context", "chat", {**GOOD_CHAT, "max_tokens": 1020}, 400, "max_tokens"),
    ("unknown model", "chat", {**GOOD_CHAT, "model": "gpt-17"}, 404, "model"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(live, name, path, body, status, param):
    url = live.url + ("/v1/chat/completions" if path == "chat" else "/v1/completions")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert live.healthy()
    good = GOOD_CHAT if path == "chat" else GOOD_COMPLETION
    assert httpx.post(url, json=good, timeout=30).status_code == 200


def test_unknown_route_and_method(live):
    missing = httpx.get(live.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(live.url + "/v1/chat/completions").status_code == 405
    assert live.healthy()


def test_openai_client_raises_on_errors(live):
    with pytest.raises(openai.BadRequestError) as info:
        live.client().chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        live.client().chat.completions.create(model="other", messages=HELLO, max_tokens=2)


def test_a_failing_generation_is_a_500_and_the_server_recovers(live, monkeypatch):
    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated failure inside the model")

    with monkeypatch.context() as patch:
        patch.setattr(live.engine.model, "forward", broken_forward)
        patch.setattr(live.engine, "cpu_decoder", None)  # its C steps would not call forward
        response = httpx.post(live.url + "/v1/chat/completions", json=GOOD_CHAT, timeout=30)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "simulated failure" in error["message"]
        # Streaming: the 200 status has gone out before generation starts, so the failure is an error event.
        with httpx.stream("POST", live.url + "/v1/completions", json={**GOOD_COMPLETION, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line]
        assert stream.status_code == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["type"] == "server_error"
    assert live.healthy() and live.wait_idle() == 0
    assert live.client().completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason


def test_health_is_503_while_the_engine_is_stopped(model_dir):
    server = LiveServer.start(Engine.from_pretrained(model_dir, max_batch_size=1))  # never started
    try:
        response = httpx.get(server.url + "/health", timeout=10)
        assert response.status_code == 503 and response.json()["status"] == "stopped"
    finally:
        server.close()


# -- clients that leave -------------------------------------------------------------------------


@pytest.fixture
def submitted(live, monkeypatch):
    """The engine requests the server submits during a test (with a slowed-down model)."""
    requests = []
    submit = live.engine.submit

    def spy(prompt, params=None):
        requests.append(submit(prompt, params))
        return requests[-1]

    monkeypatch.setattr(live.engine, "submit", spy)
    # Slow each forward a little, so the reply (900+ tokens) still runs when the client hangs up.
    forward = live.engine.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(live.engine.model, "forward", slow_forward)
    return requests


def test_disconnect_mid_stream_frees_the_slot(live, submitted):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # role chunk, a few tokens; then hang up
    assert any(line.startswith("data: {") for line in received)
    assert live.wait_idle() == 0
    (request,) = submitted
    assert request.cancelled and len(request.outputs[0].token_ids) < 900
    assert live.healthy()


def test_disconnect_while_waiting_for_a_full_answer_frees_the_slot(live, submitted, monkeypatch):
    decode = live.engine._decode

    def slow_decode():  # >= 2 ms a step: the answer takes seconds, the client gives up after 0.5 s
        decode()
        time.sleep(0.002)

    monkeypatch.setattr(live.engine, "_decode", slow_decode)
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 1000, "ignore_eos": True, "n": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert live.wait_idle() == 0
    (request,) = submitted
    assert request.cancelled and all(len(o.token_ids) < 1000 for o in request.outputs)
    assert live.healthy()


# -- the command line: API key, default bind address, model options --------------------------------------------


def test_cli_serve_with_api_key(model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_dir),
                                "--port", str(port), "--api-key", "sekret", "--max-batch-size", "2",
                                "--name", "served-tiny", "--dtype", "bfloat16", "--max-len", "128",
                                "--prefix-cache", "false"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        banner = process.stdout.readline()
        assert f"http://127.0.0.1:{port}" in banner  # binds localhost unless told otherwise
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:  # no key needed for health
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
        if Path("/proc/net/tcp").exists():  # the listening socket itself: 127.0.0.1 only, not 0.0.0.0
            listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                         if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")]
            assert listening == [f"0100007F:{port:04X}"]
        name = "served-tiny"
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        (model,) = good.models.list().data
        assert model.id == name and model.max_model_len == 128
        assert good.chat.completions.create(model=name, messages=HELLO, max_tokens=3).choices[0].message
        again = good.chat.completions.create(model=name, messages=HELLO, max_tokens=3)
        assert again.usage.prompt_tokens_details.cached_tokens == 0  # --prefix-cache false
        with pytest.raises(openai.BadRequestError):  # the 128-token context set by --max-len
            good.completions.create(model=name, prompt="hi", max_tokens=200)
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        missing = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "hi"})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(url + "/health").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_served_name_is_the_directory_as_given(tmp_path):
    """A run's `final` link serves as "final", the name the README's client sends, not as the checkpoint
    it links to."""
    checkpoint = tmp_path / "run" / "checkpoint-000012"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "final").symlink_to(checkpoint.name)
    assert served_name(str(tmp_path / "run" / "final")) == "final"
    assert served_name(str(tmp_path / "run" / "final") + "/") == "final"
    assert served_name(str(checkpoint / "..")) == "run"
