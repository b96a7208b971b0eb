"""vLLM's tokenizer endpoints of `lmforge serve`, outside /v1 as vLLM's are (so no API key):
    POST /tokenize        a text, or a chat rendered as chat_api.py renders it, to token ids
    POST /detokenize      token ids back to text
    GET  /tokenizer_info  the special tokens and the chat template
lm-evaluation-harness finds these three and then needs no copy of the tokenizer.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse

from lmforge.infer.chat_api import image_chat_prompt
from lmforge.infer.openai_api import APIError, DetokenizeRequest, TokenizeRequest
from lmforge.infer.server import Server


async def tokenize(server: Server, http_request: Request):
    req = await server.parse(TokenizeRequest, http_request)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give either 'prompt' (a text) or 'messages' (a chat) to tokenize.", "prompt")
    return await asyncio.to_thread(tokenize_answer, server, req)


def tokenize_answer(server: Server, req: TokenizeRequest) -> JSONResponse:
    """Any text the body holds, even one longer than the context (as vLLM's: lm-evaluation-harness
    tokenizes whole documents, then cuts them into windows); its JSON too is built here, in a worker
    thread: a 2 MB text's answer holds a million ids."""
    if req.prompt is not None:
        (tokens,) = server.encode([req.prompt], "prompt", False, add_special_tokens=req.add_special_tokens)
    else:
        tokens, _ = image_chat_prompt(server, req.messages, req.add_generation_prompt, fit_context=False, read=False)
    backend = server.engine.tokenizer.backend
    strings = [backend.id_to_token(t) for t in tokens] if req.return_token_strs else None
    return JSONResponse({"count": len(tokens), "max_model_len": server.engine.max_len, "tokens": tokens,
                         "token_strs": strings})


async def detokenize(server: Server, http_request: Request):
    req = await server.parse(DetokenizeRequest, http_request)
    return await asyncio.to_thread(detokenize_answer, server, req)


def detokenize_answer(server: Server, req: DetokenizeRequest) -> JSONResponse:
    server.check_token_ids("tokens", req.tokens)
    return JSONResponse({"prompt": server.engine.tokenizer.decode(req.tokens)})


def tokenizer_info(server: Server) -> dict:
    tokenizer = server.engine.tokenizer
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template, "model_max_length": server.engine.max_len,
            "vocab_size": tokenizer.vocab_size}
