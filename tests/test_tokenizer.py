"""Tokenizer: training, transformers parity (encoding, chat templates), assistant masks, HF directories."""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors
from transformers import AutoTokenizer

from lmforge import cli
from lmforge.data.formats import builtin_shakespeare
from lmforge.tokenizer import MARKER_TOKENS, SPECIAL_TOKENS, Tokenizer, train_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! ünïcödé 日本"},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
]
TOOL_CHAT = [
    {"role": "user", "content": "Add 4 and 5."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 4, "b": 5}}}]},
    {"role": "tool", "content": "9"},
    {"role": "assistant", "content": "It is 9."},
]
THINK_CHAT = [
    {"role": "user", "content": "Is 7 prime?"},
    {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisors but 1 and 7."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([builtin_shakespeare()[0]], vocab_size=400, out_dir=out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def reply_runs(ids, mask, tokenizer):
    """The text of each contiguous stretch of the mask: one per assistant reply."""
    runs, current = [], []
    for token, keep in zip(ids + [None], mask + [0]):
        if keep:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


# -- training ---------------------------------------------------------------------------------------


def test_trained_vocab_special_tokens_and_config(tok, tok_dir):
    assert tok.vocab_size == 400
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eos_id == tok.pad_id == 0 and tok.bos_id is None
    assert tok.stop_ids == [0, 2]  # <|endoftext|> and the end of a chat reply, <|im_end|>
    # Markers are single tokens but not special: skip_special_tokens keeps them, drops <|im_end|>.
    ids = tok.encode("<think>x</think><tool_call>{}</tool_call><|im_end|>")
    assert all(tok.token_to_id(m) in ids for m in MARKER_TOKENS[:4])
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think><tool_call>{}</tool_call>"
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["model_max_length"] == 32768
    assert "<|im_start|>" in config["chat_template"]
    # Digits are split one by one (Qwen2's pre-tokenizer), which helps arithmetic.
    assert len(tok.encode("12345")) == 5


def test_transformers_loads_and_encodes_identically(tok, hf):
    text = (Path(builtin_shakespeare()[1]).read_text()[:3000] + " <|im_start|>user\n"
            " 3.14159 ünïcode 日本語 🤖\t\r\n  tabs <think></think>")
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|endoftext|>"
    assert tok.encode_batch([text, "a b"]) == [tok.encode(text), tok.encode("a b")]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=60))
def test_round_trip_arbitrary_unicode(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert hf.encode(text, add_special_tokens=False) == ids


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=300) | st.text(alphabet="ab <|>imstrend_\n", max_size=300))
def test_min_tokens_is_a_lower_bound_and_the_first_tokens_lie_in_chars_for_tokens(tok, text):
    ids = tok.encode(text)
    assert tok.min_tokens(text) <= len(ids)
    for k in (1, 5, len(ids)):  # the text's first k tokens stand for at most chars_for_tokens(k) characters
        assert len(tok.decode(ids[:k])) <= tok.chars_for_tokens(k) or not ids


def test_no_length_bound_for_tokenizers_that_delete_text(tok):
    from tokenizers import Tokenizer as Backend
    from tokenizers import normalizers
    from tokenizers import pre_tokenizers as pre

    assert tok.max_chars_per_token == max(len(t) for t in tok.backend.get_vocab()) == len("</tool_response>")
    for change in (lambda b: setattr(b, "normalizer", normalizers.Strip()),
                   lambda b: setattr(b, "pre_tokenizer", pre.Whitespace())):
        backend = Backend.from_str(tok.backend.to_str())
        change(backend)
        other = Tokenizer(backend)
        assert other.max_chars_per_token is None and other.min_tokens("x" * 10**6) == 0
    nfc = Backend.from_str(tok.backend.to_str())
    nfc.normalizer = normalizers.NFC()
    assert Tokenizer(nfc).max_chars_per_token == 3 * tok.max_chars_per_token


def test_vocab_size_too_small_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([builtin_shakespeare()[0]], vocab_size=200, show_progress=False)


def test_cli_trains_from_jsonl_and_skips_bad_lines(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\nnot json\n{"text": "the dog sat on the log"}\n')
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "--data", str(data), "--vocab-size", "300", "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "1 skipped" in printed and "line 2: malformed JSON" in printed
    tokenizer = Tokenizer.from_dir(out)
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"


# -- chat templates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("messages, tools", [(CHAT, None), (TOOL_CHAT, TOOLS), (THINK_CHAT, None)])
def test_our_template_matches_transformers_ids_and_mask(tok, hf, messages, tools):
    ids, mask = tok.encode_chat(messages, tools=tools)
    # Our template carries {% generation %} tags, so transformers can compute the mask too.
    expected = hf.apply_chat_template(messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == expected["input_ids"]
    assert mask == expected["assistant_masks"]
    prompt_ids, prompt_mask = tok.encode_chat(messages[:-1], add_generation_prompt=True, tools=tools)
    assert prompt_ids == hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tools=tools)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # a reply continues its prompt token for token


def test_our_template_masks_replies_and_end_tokens(tok):
    ids, mask = tok.encode_chat(CHAT)
    assert reply_runs(ids, mask, tok) == ["Hello! ünïcödé 日本<|im_end|>", "42<|im_end|>"]
    ids, mask = tok.encode_chat(TOOL_CHAT, tools=TOOLS)
    assert reply_runs(ids, mask, tok) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}\n</tool_call><|im_end|>', "It is 9.<|im_end|>"]
    ids, mask = tok.encode_chat(THINK_CHAT)
    assert reply_runs(ids, mask, tok) == ["<think>\n7 has no divisors but 1 and 7.\n</think>\n\nYes.<|im_end|>"]
    assert tok.render_chat(CHAT[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def _third_party_dir(tok_dir, tmp_path, name, specials, post_bos=False, **config):
    """A Hugging Face tokenizer directory in the style of a real model: its own special tokens and
    chat template, built on the small trained vocabulary."""
    tokenizer = Tokenizer.from_dir(tok_dir)
    tokenizer.backend.add_special_tokens(specials)
    if post_bos:  # Llama 3 adds <|begin_of_text|> in the post-processor
        bos = tokenizer.backend.token_to_id(specials[0])
        tokenizer.backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)])])
    tokenizer.chat_template = None
    out = tmp_path / name
    tokenizer.save(out)
    data = json.loads((out / "tokenizer_config.json").read_text())
    data.update(config)
    (out / "tokenizer_config.json").write_text(json.dumps(data))
    return out


@pytest.fixture
def llama_dir(tok_dir, tmp_path):
    out = _third_party_dir(
        tok_dir, tmp_path, "llama3",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        post_bos=True, chat_template=(TEMPLATES / "llama3.jinja").read_text(), eos_token="<|eot_id|>", pad_token=None,
        # Older configs write tokens as AddedToken dicts.
        bos_token={"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False})
    # A token declared only in tokenizer_config.json's added_tokens_decoder, as some checkpoints have.
    data = json.loads((out / "tokenizer_config.json").read_text())
    data["added_tokens_decoder"]["405"] = {"content": "<|reserved_special_token_0|>", "special": True}
    (out / "tokenizer_config.json").write_text(json.dumps(data))
    return out


def test_llama3_directory_loads_and_matches_transformers(llama_dir):
    tokenizer, hf = Tokenizer.from_dir(llama_dir), AutoTokenizer.from_pretrained(llama_dir)
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.bos_id == 400
    assert tokenizer.eos_id == 404 and tokenizer.pad_id == 404  # no pad token: eos stands in
    assert tokenizer.stop_ids == [404]
    assert tokenizer.token_to_id("<|reserved_special_token_0|>") == 405 == tokenizer.vocab_size - 1
    assert tokenizer.encode("Hi", add_special_tokens=True) == hf.encode("Hi") == [400] + tokenizer.encode("Hi")
    messages = [dict(m) for m in CHAT]
    messages[2]["content"] = "  Hello there \n"  # the Llama 3 template trims contents
    for generation_prompt in (False, True):
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=generation_prompt)
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=generation_prompt)["input_ids"]
        assert ids[0] == 400 and ids.count(400) == 1
    ids, mask = tokenizer.encode_chat(messages)
    assert reply_runs(ids, mask, tokenizer) == ["Hello there<|eot_id|>", "42<|eot_id|>"]


@pytest.fixture
def qwen_dir(tok_dir, tmp_path):
    out = _third_party_dir(tok_dir, tmp_path, "qwen", [], eos_token="<|im_end|>", pad_token=None,
                           tokenizer_class="Qwen2Tokenizer")
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return out


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3"])
@pytest.mark.parametrize("messages, tools", [(CHAT, None), (TOOL_CHAT, TOOLS), (THINK_CHAT, None)])
def test_qwen_templates_match_transformers(qwen_dir, template, messages, tools):
    # transformers >= 4.43 keeps the template in its own file; both read it from there.
    shutil.copy(TEMPLATES / f"{template}.jinja", qwen_dir / "chat_template.jinja")
    tokenizer, hf = Tokenizer.from_dir(qwen_dir), AutoTokenizer.from_pretrained(qwen_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for generation_prompt in (False, True):
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=generation_prompt, tools=tools)
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                             tools=tools)["input_ids"]


def test_qwen_masks_cover_exactly_replies_and_end_tokens(qwen_dir):
    shutil.copy(TEMPLATES / "qwen2_5.jinja", qwen_dir / "chat_template.jinja")
    qwen25 = Tokenizer.from_dir(qwen_dir)
    ids, mask = qwen25.encode_chat(TOOL_CHAT, tools=TOOLS)
    # The generation prompt ends in a newline, so the reply starts at <tool_call>, as the model writes it.
    assert reply_runs(ids, mask, qwen25) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}\n</tool_call><|im_end|>', "It is 9.<|im_end|>"]
    assert sum(mask) < len(mask) // 2  # system prompt, tools and user turns are not trained on

    shutil.copy(TEMPLATES / "qwen3.jinja", qwen_dir / "chat_template.jinja")
    qwen3 = Tokenizer.from_dir(qwen_dir)
    # Qwen3 renders reasoning only after the last user query, and always opens a think block there.
    chat = CHAT[:3] + [{"role": "user", "content": "Why?"},
                       {"role": "assistant", "content": "Because.", "reasoning_content": "think"}]
    chat[2] = {**chat[2], "reasoning_content": "dropped from history"}
    ids, mask = qwen3.encode_chat(chat)
    assert reply_runs(ids, mask, qwen3) == ["Hello! ünïcödé 日本<|im_end|>",
                                            "<think>\nthink\n</think>\n\nBecause.<|im_end|>"]
    # Template variables reach the template: Qwen3's enable_thinking=False pre-fills an empty think block.
    assert qwen3.render_chat(CHAT[:2], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_named_templates_and_missing_template(tok_dir, tmp_path):
    out = tmp_path / "named"
    shutil.copytree(tok_dir, out)
    data = json.loads((out / "tokenizer_config.json").read_text())
    data["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 'ok' }}"}]
    (out / "tokenizer_config.json").write_text(json.dumps(data))
    assert Tokenizer.from_dir(out).render_chat(CHAT) == "ok"
    data.pop("chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_dir(out).render_chat(CHAT)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_templates_are_sandboxed(tok):
    evil = Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        evil.render_chat(CHAT)


def test_save_load_round_trip_keeps_everything(tok, tmp_path):
    tok.save(tmp_path / "copy")
    again = Tokenizer.from_dir(tmp_path / "copy")
    assert again.sha256() == tok.sha256()
    assert (again.eos_token, again.pad_token, again.chat_template) == (tok.eos_token, tok.pad_token, tok.chat_template)
    assert again.encode_chat(CHAT) == tok.encode_chat(CHAT)
