"""Text in, text out: a model directory behind one call, as litgpt's `LLM.load(...).generate(...)` gives.

    llm = LLM.load("runs/sft")                                        # or a preset with tokenizer=DIR
    llm.generate("ROMEO:", max_tokens=50, temperature=0.8, seed=0)    # -> str
    llm.generate([{"role": "user", "content": "What is 2 + 2?"}])     # a chat -> the assistant's reply
    for text in llm.stream("ROMEO:"): print(text, end="")
    llm.generate(["ROMEO:", "JULIET:"])                               # a batch, decoded together -> [str]

A prompt is a text or a chat (a list of {"role", "content"} messages). `encode_prompts` turns prompts into
token ids for every caller: this API, `lmforge generate` and `lmforge chat`, and the server's chat,
completions and /tokenize, so all of them send the model the same ids for the same prompt:
- a text is tokenized with the tokenizer's special tokens (`add_special_tokens`: a Llama tokenizer's
  post-processor puts BOS in front), as transformers' `tokenizer(text)` does;
- a chat is rendered with the model's own template and the generation prompt, then tokenized without
  them (the template writes its own BOS), which gives transformers' `apply_chat_template` ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.infer.engine import Engine
from lmforge.infer.request import Request
from lmforge.infer.sampling import SamplingParamError, SamplingParams
from lmforge.tokenizer import Tokenizer, TokenizerError
from lmforge.vision.image import ImageError, pillow, read_image_url

if TYPE_CHECKING:
    from PIL import Image

Prompt = str | list[dict]
# SamplingParams fields the text API refuses: they ask for what a text does not hold (more samples than one,
# log-probs), which Engine.generate gives.
NOT_FOR_TEXT = ("n", "logprobs", "top_logprobs", "prompt_logprobs")


class ChatTemplateError(ValueError):
    """The model's chat template cannot render these messages: it refused them, or the tokenizer has none (one
    that does not compile is the tokenizer directory's TokenizerError)."""


class ContextLengthError(ValueError):
    """A prompt that cannot fit the context, told from its length alone, before it is tokenized."""

    def __init__(self, at_least: int, chars: int, max_len: int):
        super().__init__(f"the prompt is at least {at_least} tokens ({chars} characters); the context holds "
                         f"{max_len}, so a prompt may have at most {max_len - 1}")
        self.at_least, self.chars, self.max_len = at_least, chars, max_len


def encode_prompts(tokenizer: Tokenizer, prompts: list[Prompt], *, add_special_tokens: bool = True,
                   add_generation_prompt: bool = True, max_len: int | None = None,
                   tools: list[dict] | None = None) -> list[list[int]]:
    """Token ids of each prompt (see the module's docstring). `add_special_tokens` applies to texts, and
    `add_generation_prompt` (the opening of the assistant's turn) to chats. With `max_len`, a prompt that
    cannot leave room for one token of reply is a ContextLengthError from its length alone
    (`Tokenizer.min_tokens`), so a megabyte of text is refused without tokenizing it. Tokenizing releases
    the GIL, and a batch of texts (or of chats) is tokenized in parallel threads. `tools`: function definitions
    the chat template shows the model (OpenAI's / transformers' form)."""
    texts = [prompt if isinstance(prompt, str) else _render_chat(tokenizer, prompt, add_generation_prompt, tools)
             for prompt in prompts]
    if max_len is not None:
        for text in texts:
            if (at_least := tokenizer.min_tokens(text)) >= max_len:
                raise ContextLengthError(at_least, len(text), max_len)
    specials = [add_special_tokens and isinstance(prompt, str) for prompt in prompts]
    if len(texts) > 1 and len(set(specials)) == 1:  # a batch of one kind: tokenized together
        return tokenizer.encode_batch(texts, add_special_tokens=specials[0])
    return [tokenizer.encode(text, add_special_tokens=special) for text, special in zip(texts, specials)]


def _render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> str:
    """The chat as the model's template renders it; a template that refuses the messages (its
    raise_exception), or none at all, is a ChatTemplateError."""
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except TokenizerError:  # the template does not compile: an error of the tokenizer directory, naming it
        raise
    except Exception as e:  # templates are code from the model's author: any error is theirs to word
        raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from e


IMAGE_PLACEHOLDER = "<image>"  # what an image part becomes in the text (vision/checkpoint.IMAGE_TOKEN)


def encode_chat_images(tokenizer: Tokenizer, messages: list[dict],
                       read_image: Callable[[str], Image.Image] = read_image_url, **options
                       ) -> tuple[list[int], list[Image.Image]]:
    """(token ids, images) of a chat whose messages may hold content parts: OpenAI's `{"type": "text",
    "text"}` and `{"type": "image_url", "image_url": {"url"}}`, and transformers' `{"type": "image"}` with a
    PIL image, a `url` or a `path`. Each image part becomes `<image>` and a message's parts are joined by
    newlines, as training data is (data/vlm.py), so any template renders the chat as the model was trained on;
    `read_image(url)` reads each image in order (where a server's policy on files and web URLs lives: its
    errors propagate). `options`: encode_prompts' (add_generation_prompt, max_len, tools). A part that is
    none of these is an ImageError naming it."""
    images: list[Image.Image] = []
    flat = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            message = {**message, "content": "\n".join(_part_text(part, f"messages[{i}].content[{j}]", images,
                                                                   read_image) for j, part in enumerate(content))}
        flat.append(message)
    (ids,) = encode_prompts(tokenizer, [flat], **options)
    return ids, images


def _part_text(part, where: str, images: list[Image.Image], read_image: Callable[[str], Image.Image]) -> str:
    """One content part's text; an image part's image appended to `images`."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise ImageError(f"{where}.image_url: expected {{\"url\": a data URL or a file}}")
        images.append(read_image(url))
        return IMAGE_PLACEHOLDER
    if kind == "image":
        source = part.get("image", part.get("url", part.get("path")))
        if isinstance(source, str):
            images.append(read_image(source))
        elif source is not None and isinstance(source, pillow().Image):
            images.append(source)
        else:
            raise ImageError(f"{where}: an image part needs `image` (a PIL image), `url` or `path`")
        return IMAGE_PLACEHOLDER
    raise ImageError(f"{where}: a content part should be text, image_url or image, not {str(part)[:60]}")


def _sampling_params(options: dict) -> SamplingParams:
    """SamplingParams from the text API's keyword options. A name that is not a sampling parameter, or one
    of NOT_FOR_TEXT, is a SamplingParamError naming it; the values are checked by Engine.submit."""
    known = [f.name for f in fields(SamplingParams) if f.name not in NOT_FOR_TEXT]
    for name in options:
        if name not in known:
            raise SamplingParamError(name, f"{name}: not a sampling option of the text API (those are "
                                           f"{', '.join(known)}; Engine.generate gives n samples and log-probs)")
    return SamplingParams(**options)


class LLM:
    """An Engine behind text: `generate` and `stream` take a text or a chat and give text. Without
    `engine.start()` the caller's thread runs the engine; with it, any number of threads may call."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    @classmethod
    def load(cls, model: str | Path, **options) -> LLM:
        """A model directory, or a preset with random weights and `tokenizer=DIR`. `options`:
        Engine.from_pretrained's (tokenizer, dtype, device, max_batch_size, max_len, ...)."""
        return cls(Engine.from_pretrained(model, **options))

    def encode(self, prompt: Prompt) -> list[int]:
        """The token ids the model is given for `prompt`. An empty text means text from nothing: the
        tokenizer's BOS, or its end-of-text token where it has none (GPT-2's unconditional samples)."""
        (ids,) = encode_prompts(self.tokenizer, [prompt])
        return ids or [self.tokenizer.eos_id if self.tokenizer.bos_id is None else self.tokenizer.bos_id]

    def encode_images(self, prompt: Prompt, images: list[Image.Image] | None = None
                      ) -> tuple[list[int], list[Image.Image]]:
        """(token ids, images) for a prompt that may show images: a text with one `<image>` per image of
        `images`, or a chat with image content parts (encode_chat_images; files relative to the working
        directory, data URLs)."""
        if isinstance(prompt, list) and images:
            raise ValueError("images: give a chat's images as content parts of its messages")
        if isinstance(prompt, list):
            return encode_chat_images(self.tokenizer, prompt)
        return self.encode(prompt), list(images or [])

    def generate(self, prompt: Prompt | list[Prompt], images: list[Image.Image] | None = None,
                 **sampling) -> str | list[str]:
        """The reply to a text or a chat; for a list of them, the replies, decoded together. `images`: a text
        prompt's, one per `<image>` in it (a chat's are content parts of its messages). `sampling`:
        SamplingParams' options (max_tokens=256, temperature=1.0, top_k, top_p, seed, stop, ...)."""
        one = isinstance(prompt, str) or bool(prompt) and isinstance(prompt[0], dict)
        prompts = [prompt] if one else prompt
        if images and not one:
            raise ValueError("images: for one text prompt; a batch's images go in its chats' content parts")
        encoded = [self.encode_images(p, images) for p in prompts]
        outputs = self.engine.generate([ids for ids, _ in encoded], _sampling_params(sampling),
                                       images=[shown or None for _, shown in encoded])
        texts = [n_outputs[0].text for n_outputs in outputs]
        return texts[0] if one else texts

    def stream(self, prompt: Prompt, images: list[Image.Image] | None = None, **sampling) -> Iterator[str]:
        """The reply's text as it is generated, piece by piece (never a broken UTF-8 character). The
        prompt and options are checked now; leaving the loop early cancels the generation."""
        ids, shown = self.encode_images(prompt, images)
        return _texts(self.engine.submit(ids, _sampling_params(sampling), shown or None))


def _texts(request: Request) -> Iterator[str]:
    try:
        yield from (delta.text for delta in request if delta.text)
    finally:
        if not request.done.is_set():
            request.cancel()
