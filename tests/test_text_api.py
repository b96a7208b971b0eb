"""The text API (infer/llm.py): a text or a chat in, the engine's text out, with the prompt's token ids
exactly those transformers gives (a Llama tokenizer's one BOS, a chat template's rendering)."""

from pathlib import Path

import pytest
from test_engine import TEXT, tokenizer  # noqa: F401  (a fixture)
from test_generate import model_dir  # noqa: F401  (a fixture: a saved tiny model with that tokenizer)
from tokenizers import processors
from transformers import AutoTokenizer

from lmforge.infer import LLM, SamplingParams
from lmforge.infer.llm import ChatTemplateError, ContextLengthError, encode_prompts
from lmforge.infer.sampling import SamplingParamError
from lmforge.tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 😀"}]
LLAMA3_TEMPLATE = Path(__file__).parent / "fixtures" / "chat_templates" / "llama3.jinja"


@pytest.fixture(scope="module")
def llm(model_dir):  # noqa: F811
    return LLM.load(model_dir, max_batch_size=4, max_len=128)


def engine_text(llm, ids, **params) -> str:
    """The engine's own output for these token ids: what the text API must give."""
    return llm.engine.generate([ids], SamplingParams(**params))[0][0].text


def test_text_and_chat_give_the_engines_output_on_the_same_tokens(llm):
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    text_ids = llm.tokenizer.encode("The quick brown", add_special_tokens=True)
    chat_ids, _ = llm.tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    assert llm.encode("The quick brown") == text_ids
    assert llm.encode(CHAT) == chat_ids  # transformers' apply_chat_template ids (test_server_security)
    expected = [engine_text(llm, text_ids, **greedy), engine_text(llm, chat_ids, **greedy)]
    assert [llm.generate("The quick brown", **greedy), llm.generate(CHAT, **greedy)] == expected
    assert llm.generate(["The quick brown", CHAT], **greedy) == expected  # a batch of both kinds, decoded together
    other = "日本語のテキスト"
    assert llm.generate(["The quick brown", other], **greedy) == [
        expected[0], engine_text(llm, llm.tokenizer.encode(other), **greedy)]


def test_stream_concatenates_to_the_full_text(llm):
    sampled = dict(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
    pieces = list(llm.stream(CHAT, **sampled))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == llm.generate(CHAT, **sampled) == engine_text(llm, llm.encode(CHAT), **sampled)


def test_leaving_a_stream_early_cancels_its_generation(llm):
    stream = llm.stream("The", max_tokens=100, ignore_eos=True, seed=0)
    next(stream)
    assert llm.engine.num_active == 1
    stream.close()
    llm.engine.step()  # the step that drops cancelled requests
    assert llm.engine.num_active == 0


@pytest.mark.parametrize("options,field", [
    (dict(temprature=0.5), "temprature"),  # not a sampling option
    (dict(n=2), "n"),  # more than one text: Engine.generate's
    (dict(logprobs=True), "logprobs"),
    (dict(temperature=-1.0), "temperature"),
    (dict(stop="ab"), "stop"),  # a string would stop at "a" and at "b"
    (dict(logit_bias={10**6: 1.0}), "logit_bias"),
])
def test_sampling_options_are_checked_naming_the_bad_one(llm, options, field):
    for call in (llm.generate, llm.stream):  # stream checks when called, not when first iterated
        with pytest.raises(SamplingParamError) as info:
            call("The", **options)
        assert info.value.field == field and field in str(info.value)
    assert llm.engine.num_active == 0


def test_an_empty_text_starts_from_the_end_of_text_token(llm):
    """Unconditional text: without a BOS token, from the end-of-text token, as GPT-2 samples."""
    assert llm.tokenizer.bos_id is None
    assert llm.encode("") == [llm.tokenizer.eos_id]
    assert isinstance(llm.generate("", max_tokens=3, temperature=0.0), str)


def test_a_llama_tokenizer_puts_one_bos_in_front_of_texts_and_chats(tokenizer, tmp_path):  # noqa: F811
    """Llama 3's post-processor adds <|begin_of_text|> to a text; its chat template writes the BOS itself, so a
    chat is tokenized without the post-processor: both as transformers gives them, with one BOS each."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = Tokenizer.from_dir(_saved(tokenizer, tmp_path / "base")).backend
    backend.add_special_tokens(specials)
    bos = backend.token_to_id(specials[0])
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)])])
    llama = Tokenizer(backend, eos_token="<|eot_id|>", bos_token=specials[0], chat_template=LLAMA3_TEMPLATE.read_text())
    reference = AutoTokenizer.from_pretrained(str(_saved(llama, tmp_path / "llama3")))
    text, chat = encode_prompts(llama, ["Café 😀", CHAT])
    assert text == reference("Café 😀")["input_ids"] and text[0] == bos
    assert chat == reference.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
    assert chat.count(bos) == 1 and chat[0] == bos
    assert encode_prompts(llama, ["Café 😀"], add_special_tokens=False) == [llama.encode("Café 😀")]


def test_what_cannot_be_encoded_is_a_typed_error(tokenizer, monkeypatch):  # noqa: F811
    """A prompt that cannot fit the context is refused from its length alone, without tokenizing it; a chat
    the template refuses is a ChatTemplateError with the template's own words."""
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(tokenizer, "encode", no_tokenizing)
    monkeypatch.setattr(tokenizer, "encode_batch", no_tokenizing)
    for prompts in ([TEXT * 10], [[{"role": "user", "content": TEXT * 10}]], ["hi", TEXT * 10]):
        with pytest.raises(ContextLengthError, match="context holds 128") as info:
            encode_prompts(tokenizer, prompts, max_len=128)
        assert info.value.at_least >= 128
    monkeypatch.undo()
    two_systems = [{"role": "system", "content": "a"}, *CHAT]
    with pytest.raises(ChatTemplateError, match="only the first message may be a system message"):
        encode_prompts(tokenizer, [two_systems])


def _saved(tok: Tokenizer, path: Path) -> Path:
    tok.save(path)
    return path
