"""`lmforge generate` and `lmforge chat` on a saved tiny model directory."""

import io
import subprocess
import sys

import pytest
from test_engine import make_model, tokenizer  # noqa: F401  (a fixture)

from lmforge.checkpoint import save_model
from lmforge.cli import main as cli
from lmforge.infer import Engine, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):  # noqa: F811
    tok_dir = tmp_path_factory.mktemp("tok")
    tokenizer.save(tok_dir)
    return save_model(make_model(tokenizer), tmp_path_factory.mktemp("m") / "model", tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, max_batch_size=1)


def test_generate_prints_only_the_completion(model_dir, engine, capsys):
    prompt = "The quick brown"
    params = SamplingParams(max_tokens=15, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01,
                            repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3, seed=3)
    (expected,), = engine.generate([engine.tokenizer.encode(prompt)], params)
    assert cli(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "15",
                "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.01",
                "--repetition-penalty", "1.1", "--presence-penalty", "0.5", "--frequency-penalty", "0.3",
                "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected.text + "\n"
    assert "tok/s" in captured.err


def test_generate_chat_template_stop_and_bf16(model_dir, engine, capsys):
    ids, _ = engine.tokenizer.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    (full,), = engine.generate([ids], SamplingParams(max_tokens=20, temperature=0.0))
    stop = full.text[3:5]
    assert len(stop) == 2
    assert cli(["generate", "--model", str(model_dir), "--prompt", "Hi", "--chat", "--temperature", "0",
                "--max-new-tokens", "20", "--stop", stop]) == 0
    assert capsys.readouterr().out == full.text[:full.text.index(stop)] + "\n"
    # bf16 weights run end to end (their text may differ from fp32's, so only check it runs)
    assert cli(["generate", "--model", str(model_dir), "--prompt", "Hi", "--dtype", "bfloat16",
                "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_generate_from_a_preset_needs_a_tokenizer(model_dir, capsys):
    assert cli(["generate", "--model", "tiny", "--tokenizer", str(model_dir), "--prompt", "Hi",
                "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    capsys.readouterr()
    assert cli(["generate", "--model", "tiny", "--prompt", "Hi"]) == 1
    assert capsys.readouterr().err == ("lmforge: error: model 'tiny' is a preset with random weights: give a "
                                       "tokenizer directory too\n")


def test_generate_as_a_subprocess_writes_nothing_else_to_stdout(model_dir, engine):
    (expected,), = engine.generate([engine.tokenizer.encode("Café")], SamplingParams(max_tokens=8, temperature=0))
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "generate", "--model", str(model_dir),
                             "--prompt", "Café", "--max-new-tokens", "8", "--temperature", "0"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout == expected.text + "\n"


def test_chat_history_reset_system_exit(model_dir, engine, monkeypatch, capsys):
    script = "Hello\nHow are you\n/reset\n/system Be brief.\nHello\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli(["chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    replies = [part.split("\n[", 1)[0] for part in out.split("assistant> ")[1:]]
    assert len(replies) == 3
    assert out.count(" tok/s, first token ") == 3
    cached = [int(line.split(" tokens (")[1].split(" cached")[0]) for line in out.splitlines() if " cached), " in line]
    assert len(cached) == 3 and cached[1] > 0  # the second turn found the first in the prefix cache
    assert "(conversation cleared)" in out and "(system prompt set; conversation cleared)" in out
    params = SamplingParams(max_tokens=12, temperature=0.0)

    def expected(messages):
        ids, _ = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return engine.generate([ids], params)[0][0].text

    first = expected([{"role": "user", "content": "Hello"}])
    second = expected([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "How are you"}])
    third = expected([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert replies == [first, second, third]


def test_generate_logit_bias(model_dir, engine, capsys):
    """--logit-bias TOKEN_ID=BIAS gives what the engine gives with that logit_bias; a malformed entry is an
    error that names it."""
    prompt = engine.tokenizer.encode("The quick brown", add_special_tokens=True)
    params = dict(max_tokens=6, temperature=0, ignore_eos=True)
    (free,), = engine.generate([prompt], SamplingParams(**params))
    banned, favoured = free.token_ids[0], next(t for t in range(50, 300) if t != free.token_ids[0])
    bias = {banned: -100.0, favoured: 3.0}
    (expected,), = engine.generate([prompt], SamplingParams(**params, logit_bias=bias))
    assert expected.token_ids != free.token_ids and banned not in expected.token_ids
    assert cli(["generate", "--model", str(model_dir), "--prompt", "The quick brown", "--max-new-tokens", "6",
                "--temperature", "0", "--ignore-eos", "--logit-bias", f"{banned}=-100", f"{favoured}=3"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    assert cli(["generate", "--model", str(model_dir), "--prompt", "Hi", "--logit-bias", "x=1"]) == 2
    assert capsys.readouterr().err.endswith("lmforge generate: error: --logit-bias 'x=1': expected TOKEN_ID=BIAS, "
                                            "e.g. 13=-100\n")
    assert cli(["generate", "--model", str(model_dir), "--prompt", "Hi", "--logit-bias", "1=1", "300=1"]) == 2
    assert capsys.readouterr().err.endswith("lmforge generate: error: logit_bias: '300' is not a token id of this "
                                            "model (0 to 299)\n")  # as the server says it (parse_logit_bias)


def test_generate_stop_token_ids_ignore_eos_and_logprobs(model_dir, engine, capsys):
    """--stop-token-ids, --ignore-eos and --logprobs/--top-logprobs give what the engine gives for the
    same SamplingParams; the log-probs go to stderr as JSON lines, stdout keeps only the completion."""
    import json

    prompt = engine.tokenizer.encode("The quick brown", add_special_tokens=True)
    (free,), = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stop_id = free.token_ids[6]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id], ignore_eos=True,
                            logprobs=True, top_logprobs=3)
    (expected,), = engine.generate([prompt], params)
    assert expected.finish_reason == "stop" and expected.token_ids[-1] == stop_id
    assert cli(["generate", "--model", str(model_dir), "--prompt", "The quick brown", "--max-new-tokens", "12",
                "--temperature", "0", "--stop-token-ids", str(stop_id), "--ignore-eos", "--top-logprobs", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected.text + "\n"
    lines = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert [line["id"] for line in lines] == expected.token_ids
    for line, lp in zip(lines, expected.logprobs):
        assert line["logprob"] == pytest.approx(lp.logprob, abs=1e-6) and line["token"] == lp.text
        assert [t["id"] for t in line["top_logprobs"]] == [i for i, _, _ in lp.top] and len(lp.top) == 3
    assert cli(["generate", "--model", str(model_dir), "--prompt", "Hi", "--top-logprobs", "99"]) == 2
    assert "top_logprobs" in capsys.readouterr().err


def test_generate_prompt_logprobs_scores_the_prompt(model_dir, engine, capsys):
    """--prompt-logprobs K: a JSON line per prompt token ("prompt": true, the first one's log-prob null) with the
    engine's prompt_logprobs, before the lines of the generated tokens."""
    import json

    prompt = engine.tokenizer.encode("The quick brown", add_special_tokens=True)
    request = engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, logprobs=True))
    list(request)
    assert cli(["generate", "--model", str(model_dir), "--prompt", "The quick brown", "--max-new-tokens", "2",
                "--temperature", "0", "--prompt-logprobs", "2", "--logprobs"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [line["id"] for line in lines] == prompt + request.outputs[0].token_ids
    assert [line.get("prompt", False) for line in lines] == [True] * len(prompt) + [False, False]
    assert lines[0]["logprob"] is None and lines[0]["top_logprobs"] == []
    for line, lp in zip(lines[1:], request.prompt_logprobs[1:] + request.outputs[0].logprobs):
        assert line["logprob"] == pytest.approx(lp.logprob, abs=1e-6) and line["token"] == lp.text
        assert [t["id"] for t in line["top_logprobs"]] == [i for i, _, _ in lp.top]
    assert len(request.prompt_logprobs[1].top) == 2
