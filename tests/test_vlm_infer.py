"""Images in the Engine (infer/engine.py) and the text API (infer/llm.py): a llava directory loads as an Engine
whose greedy replies to image prompts are transformers' `LlavaForConditionalGeneration.generate`'s; the chat
template renders image parts as transformers' processor does; the prefix cache reuses a prompt's keys and values
only for the same image; image requests batch with text-only ones without changing either's reply; bad input is
one ValueError naming what is wrong."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest
import torch
from PIL import Image
from vlm_helpers import picture, tiny_llava_dir

from lmforge.checkpoint import save_model
from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM, encode_chat_images
from lmforge.infer.sampling import SamplingParams
from lmforge.vision.image import ImageError

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_llava_dir(tmp_path_factory.mktemp("vlm_infer"))


def chat(text: str, images: int | list[Image.Image] = 1) -> list[dict]:
    """A user message: the images (or that many random ones), then the text, as content parts."""
    shown = [picture(100 + k) for k in range(images)] if isinstance(images, int) else images
    return [{"role": "user", "content": [*[{"type": "image", "image": image} for image in shown],
                                         {"type": "text", "text": text}]}]


def replies(engine: Engine, prompts, images, params=GREEDY) -> list[list[int]]:
    return [outputs[0].token_ids for outputs in engine.generate(prompts, params, images=images)]


def scored(engine: Engine, ids: list[int], images) -> tuple[list[int], list[float], int]:
    """(greedy tokens, their log-probs, prompt tokens found in the prefix cache) of one request."""
    request = engine.submit(ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True), images)
    list(request)
    return request.outputs[0].token_ids, [lp.logprob for lp in request.outputs[0].logprobs], request.cached_tokens


def test_greedy_replies_equal_transformers_generate(llava_dir):
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoProcessor.from_pretrained(llava_dir)
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    engine = Engine.from_pretrained(llava_dir)
    assert engine.vision is not None and engine.image_config.size == 16
    for images in [[picture(1)], [picture(2), picture(3, size=40)]]:
        messages = chat("Where is the star?", images)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=images, return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        ids, shown = encode_chat_images(engine.tokenizer, messages)
        # lmforge's template renders the parts as transformers' processor does; the engine expands <image>
        assert engine.tokenizer.decode(ids, skip_special_tokens=False) == text
        request = engine.submit(ids, GREEDY, shown)
        assert request.prompt == inputs["input_ids"][0].tolist()
        assert replies(engine, [ids], [shown]) == [expected]


def same(got, expected) -> bool:
    """The same tokens, their log-probs to rounding (a prefill of the rest of a prompt sums in another order)."""
    return got[0] == expected[0] and got[1] == pytest.approx(expected[1], abs=1e-5)


def test_prefix_cache_keys_on_the_image(llava_dir):
    engine = Engine.from_pretrained(llava_dir)
    fresh = Engine.from_pretrained(llava_dir, prefix_cache=False)
    image_token, image_len = engine.vision.config.image_token_index, engine.vision.config.image_seq_length
    ids, _ = encode_chat_images(engine.tokenizer, chat("What colour is the square?"))
    red, blue = picture(10), picture(11)
    expected = {name: scored(fresh, ids, [image]) for name, image in (("red", red), ("blue", blue))}
    # the image changes the reply's log-probs by far more than `same` allows
    assert max(abs(a - b) for a, b in zip(expected["red"][1], expected["blue"][1])) > 5e-5
    prompt_len = len(ids) - 1 + image_len
    assert same(got := scored(engine, ids, [red]), expected["red"]) and got[2] == 0
    got = scored(engine, ids, [red])  # all but the last token found, which runs again for its logits
    assert same(got, expected["red"]) and got[2] == prompt_len - 1
    got = scored(engine, ids, [blue])  # only the text before the image: the image differs
    assert same(got, expected["blue"]) and got[2] == ids.index(image_token)
    # a prompt that ends with its image: the second run starts inside the image's tokens
    tail = engine.tokenizer.encode("Look:") + [image_token]
    reference = scored(fresh, tail, [red])
    assert same(scored(engine, tail, [red]), reference)
    got = scored(engine, tail, [red])
    assert same(got, reference) and got[2] == len(tail) - 2 + image_len


def test_images_batch_with_text_only_requests(llava_dir):
    engine = Engine.from_pretrained(llava_dir, prefix_cache=False)
    text_ids, _ = encode_chat_images(engine.tokenizer, [{"role": "user", "content": "Where is the star?"}])
    image_ids, _ = encode_chat_images(engine.tokenizer, chat("What colour is the square?", images=2))
    alone = [replies(engine, [text_ids], [None])[0], replies(engine, [image_ids], [[picture(4), picture(5)]])[0]]
    together = replies(engine, [text_ids, image_ids, text_ids], [None, [picture(4), picture(5)], None])
    assert together == [alone[0], alone[1], alone[0]]
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3, ignore_eos=True)
    outputs = engine.generate([image_ids], sampled, images=[[picture(4), picture(5)]])[0]
    again = engine.generate([image_ids], sampled, images=[[picture(4), picture(5)]])[0]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in again]  # n samples share one prefill


def test_llm_takes_images_in_chats_and_texts(llava_dir, tmp_path):
    llm = LLM.load(llava_dir)
    image = picture(7)
    image.save(tmp_path / "red.png")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    options = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    by_url = llm.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": "What colour?"}]}], **options)
    by_file = llm.generate([{"role": "user", "content": [{"type": "image_url",
                                                          "image_url": {"url": str(tmp_path / "red.png")}},
                                                         {"type": "text", "text": "What colour?"}]}], **options)
    by_object = llm.generate([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]}], **options)
    assert by_url == by_file == by_object
    assert "".join(llm.stream("<image>What colour?", images=[image], **options)) == llm.generate(
        "<image>What colour?", images=[image], **options)


def test_bad_image_input_is_one_clear_error(llava_dir, tmp_path):
    engine = Engine.from_pretrained(llava_dir)
    ids, _ = encode_chat_images(engine.tokenizer, chat("What colour?"))
    with pytest.raises(ValueError, match="1 image placeholders .* for 2 images"):
        engine.submit(ids, GREEDY, [picture(1), picture(2)])
    with pytest.raises(ValueError, match="1 image placeholders .* for 0 images"):
        engine.submit(ids, GREEDY)
    with pytest.raises(ImageError, match=r"messages\[0\]\.content\[0\]: a content part should be"):
        encode_chat_images(engine.tokenizer, [{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ImageError, match="web URLs are not read here"):
        encode_chat_images(engine.tokenizer, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])
    text_model = tmp_path / "text"
    save_model(engine.vision.language_model, text_model, tokenizer_dir=llava_dir)
    text_engine = Engine.from_pretrained(text_model)
    assert text_engine.vision is None
    with pytest.raises(ValueError, match="no vision tower"):
        text_engine.submit(engine.tokenizer.encode("hello"), GREEDY, [picture(1)])


def test_text_only_inference_runs_without_pillow(llava_dir):
    """Pillow is the `vision` extra: without it the inference commands import and generate text, and reading
    an image says what to install."""
    script = f"""
import sys
sys.modules["PIL"] = None  # as if Pillow were not installed
import lmforge.infer.serve, lmforge.infer.generate, lmforge.infer.chat
from lmforge.infer.llm import LLM
from lmforge.vision.image import ImageError, read_image
llm = LLM.load("tiny", tokenizer={str(llava_dir)!r})
print(len(llm.generate("What colour?", max_tokens=3, temperature=0.0, ignore_eos=True)) > 0)
try:
    read_image(b"not even an image")
except ImageError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["True", "reading images needs Pillow: pip install 'lmforge[vision]'"]
