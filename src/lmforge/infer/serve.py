"""`lmforge serve`: an OpenAI-compatible HTTP API and a web chat, both over one continuously batched Engine.

    lmforge serve --model runs/sft [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints (the request and response schemas are OpenAI's, so the official `openai` client works unchanged):
    GET  /v1/models              the one model this server holds (and /v1/models/{id}: that model)
    POST /v1/chat/completions    prompt = the model's own chat template over `messages`
    POST /v1/completions         prompt = raw text or token ids (one prompt or a batch of them)
    GET  /health                 200 while the engine runs, else 503 (no API key needed)
    POST /tokenize, /detokenize  vLLM's tokenizer endpoints: a text or a chat to token ids and back
    GET  /tokenizer_info         vLLM's: the special tokens and chat template (lm-evaluation-harness finds these
                                 three and then needs no copy of the tokenizer; like vLLM's, outside /v1: no API key)
    GET  /                       the web chat (web/index.html, plain HTML/JS, no build step)

This module assembles the app (create_app: the guard, the routes, the answers to errors) and runs the command
(ServeConfig, main). The endpoints are chat_api.py, completions_api.py, tokenizer_api.py and agent_api.py (the
web chat's agent mode), over the `Server` they share (server.py: the body parsed and checked, prompts encoded,
sampling parameters, requests submitted and awaited, the forms of an answer).

Request fields: stream (+ stream_options.include_usage), n, stop, max_tokens / max_completion_tokens,
temperature, top_p, seed, presence_penalty, frequency_penalty, logit_bias, logprobs / top_logprobs, user
(ignored), and vLLM's extensions of the sampling parameters (the `openai` client sends them in
`extra_body`): top_k, min_p, repetition_penalty, stop_token_ids and ignore_eos. Chat also takes tools,
tool_choice, tool messages and response_format (tools.py: calls parsed in the chat template's format, and
constrained decoding for "required", a named function and JSON output, grammar.py). Others of OpenAI's
(best_of, audio, ...) are refused by name rather than silently ignored. A vision-language model's chat takes
`image_url` content parts in user messages (at most chat_api.MAX_IMAGES): data URLs always, local files under
`--image-dir` (default: the working directory), http(s) URLs only with `--image-urls true`, each within
`--image-max-bytes` and the decompression-bomb pixel limit (vision/fetch.py has the whole policy); a text-only
model given an image answers 400, as does an image it may not read, naming the part's url. `usage` also gives
prompt_tokens_details.cached_tokens: the prompt tokens the engine's prefix cache held (a chat's history).
The schemas, the wording of errors and the answers' pieces are in openai_api.py. Prompts become token ids
through llm.encode_prompts, as for `lmforge generate` and the Python API: a chat through the model's template
(transformers' apply_chat_template ids), a completions text as the text alone (no special tokens added).

Completions also take `echo`: the reply begins with the prompt, and with `logprobs` the prompt's tokens get
theirs (the first one null), which is how lm-evaluation-harness scores text; with max_tokens 0 the prompt
is scored alone.

Every request becomes one engine Request (`n` samples share one prefill); the engine's background thread
steps all running requests together, so concurrent clients share each decode step (continuous batching).
The HTTP side is asyncio: handlers await the engine's events without blocking the loop, and a client
that goes away mid-request cancels its engine request, which frees the batch slot at the next step.
Rendering a chat, tokenizing and building a JSON answer run in worker threads (the tokenizer releases the
GIL), so a request of megabytes never holds up the other streams.

What the server refuses (guard.py's `Guard` before routing, then the handlers before any generation):
- a Host header other than a loopback name while bound to a loopback address (403): a web page on another
  name could otherwise reach the key-less server by DNS rebinding (as Jupyter and Ollama refuse it);
  `--allowed-hosts` names more;
- without the `--api-key`, any /v1 path (401, before 404 or 405, as vLLM answers);
- a body over `--max-body-bytes` (413), declared or counted as it arrives;
- a POST body not declared `Content-Type: application/json` (415): a web page may send a text/plain body
  to any address, never a JSON one without a CORS preflight (which this server never grants);
- a text that cannot fit the context, from its length alone (`Tokenizer.min_tokens`), before tokenizing it;
  more than `--max-prompts` prompts in one completions request, and more than 300 entries in logit_bias or
  stop_token_ids (openai_api.py: each prompt of a batch carries them).

Errors use OpenAI's schema, {"error": {"message", "type", "param", "code"}}, with 400 for anything wrong
in the request (malformed JSON, a wrong type, an unknown field, an out-of-range value, too long a prompt),
401 for a missing or wrong API key, 403 for a Host not allowed, 404 for an unknown model or route, 413 for
too large a body, 415 for a body that is not declared JSON, 500 if generation fails (during a stream: an
error event, since the 200 status has already gone out).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional extra: only this command needs it
    raise ImportError(f"lmforge serve needs the `serve` extra: pip install 'lmforge[serve]' ({e})") from None

from lmforge.infer import chat_api, completions_api, tokenizer_api
from lmforge.infer.agent_api import AgentSettings, add_agent_routes
from lmforge.infer.engine import Engine
from lmforge.infer.guard import Guard, allowed_host_names
from lmforge.infer.openai_api import APIError, excerpt, server_error
from lmforge.infer.server import DEFAULT_MAX_PROMPTS, Server
from lmforge.model import KV_CACHE_HELP
from lmforge.settings import parse_args
from lmforge.vision.fetch import ImagePolicy

log = logging.getLogger("lmforge.infer.server")  # the server's log (guard.py's too)

WEB_DIR = Path(__file__).parent / "web"
# A 128K-token prompt is ~0.5 MB of English, and at most ~1.5 MB as token ids or as JSON-escaped (\uXXXX) CJK
# text. Parsing a body holds the interpreter, and tokenizing it takes memory, in proportion to its size
# (README's security notes give figures), so the cap bounds both.
DEFAULT_MAX_BODY_BYTES = 2 * 2**20


# -- the app --------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, api_key: str | None = None, *, host: str = "127.0.0.1",
               allowed_hosts: list[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_prompts: int = DEFAULT_MAX_PROMPTS, agent: AgentSettings | None = None,
               images: ImagePolicy | None = None) -> FastAPI:
    """The FastAPI app over a started `engine`, to be served on `host` (the address bound decides the Host
    check, see Guard). The caller owns the engine (starts and stops it). `agent`: the web chat's agent mode,
    the sandbox behind /v1/agent (agent_api.py); its sessions are `app.state.agent_sessions`. `images`: where
    a chat's images may come from (default: data URLs only)."""
    server = Server(engine, model_name, max_prompts, images or ImagePolicy())
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_host_names(host, list(allowed_hosts)),
                       max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), type="invalid_request_error",
                        code="not_found" if error.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def internal_error(_, error: Exception):
        log.exception("request failed")
        return server_error(error).response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):  # OpenAI's "retrieve model"
        if model_id != model_name:
            raise APIError(404, f"The model '{excerpt(model_id)}' does not exist; this server holds '{model_name}'.",
                           "model", "model_not_found")
        return server.model_card

    app.state.agent_sessions = add_agent_routes(app, agent)

    @app.post("/v1/chat/completions")
    async def chat(http_request: Request):
        return await chat_api.chat(server, http_request)

    @app.post("/v1/completions")
    async def completions(http_request: Request):
        return await completions_api.completions(server, http_request)

    @app.post("/tokenize")
    async def tokenize(http_request: Request):
        return await tokenizer_api.tokenize(server, http_request)

    @app.post("/detokenize")
    async def detokenize(http_request: Request):
        return await tokenizer_api.detokenize(server, http_request)

    @app.get("/tokenizer_info")
    def tokenizer_info():  # not async: FastAPI runs it in a worker thread
        return tokenizer_api.tokenizer_info(server)

    @app.get("/health")
    async def health():
        status = "ok" if engine.running else "stopped"
        return JSONResponse({"status": status, "model": model_name, "active_requests": engine.num_active},
                            status_code=200 if engine.running else 503)

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app



# -- command line ---------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    model: str = field(default="", metadata={"help": "model directory (HF format, with its tokenizer)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes it to the network"})
    port: int = field(default=8000, metadata={"help": "TCP port", "min": 0, "max": 65535})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1"})
    name: str | None = field(default=None, metadata={"help": "model id clients send (default: directory name)"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weight dtype"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    max_batch_size: int = field(default=16, metadata={"help": "requests decoded together (engine slots)", "min": 1})
    max_len: int | None = field(default=None, metadata={"help": "context length of each slot (default: engine's)",
                                                         "min": 2})
    prefix_cache: bool = field(default=True, metadata={
        "help": "reuse the cached keys and values of an earlier request a prompt begins with (a chat's history)"})
    kv_cache: Literal["auto", "int8"] = field(default="auto", metadata={"help": KV_CACHE_HELP})
    allowed_hosts: list[str] = field(default_factory=list, metadata={
        "help": "Host header names answered besides localhost, 127.x.x.x and [::1] ('*': any). Bound to a "
                "loopback address the server answers only those, so a web page on another name cannot reach it "
                "by DNS rebinding; bound to another address it checks the Host only if this is given"})
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata={
        "help": "largest request body, in bytes (413 beyond). A 128K-token prompt is at most ~1.5 MB of JSON "
                "(token ids, or escaped CJK text); parsing and tokenizing a body cost time and memory in "
                "proportion, so the cap bounds what one request can take", "min": 1})
    max_prompts: int = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "most prompts in one /v1/completions request (each is an engine request); vLLM's default",
        "min": 1})
    agent: bool = field(default=False, metadata={
        "help": "the web chat's agent mode: the model's ```python blocks run in a sandboxed interpreter per "
                "conversation (/v1/agent, guarded by --api-key) and the page shows the code and its output"})
    agent_max_steps: int = field(default=5, metadata={"help": "agent: code actions per message", "min": 1})
    agent_cell_timeout: float = field(default=10.0, metadata={"help": "agent: seconds a code cell may run",
                                                              "min": 0.1})
    image_dir: str | None = field(default=".", metadata={
        "help": "a vision-language model's image_url parts may name local files (a path, relative to DIR, or a "
                "file:// URL) only under this directory, after resolving .. and links (default: the working "
                "directory); none: no local files. Data URLs are always taken"})
    image_urls: bool = field(default=False, metadata={
        "help": "fetch http(s) image URLs: at most --image-max-bytes, within --image-timeout seconds, redirects "
                "to http(s) only, from public addresses only (not loopback, private or link-local ones)"})
    image_urls_private: bool = field(default=False, metadata={
        "help": "with --image-urls: also fetch from loopback, private and link-local addresses (this server's "
                "own network, its cloud's metadata service: only if every client may read those)"})
    image_max_bytes: int = field(default=20 * 2**20, metadata={
        "help": "largest image, in encoded bytes (a web URL's download stops there)", "min": 1})
    image_timeout: float = field(default=10.0, metadata={"help": "seconds a web image may take, all of it",
                                                         "min": 0.1})

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(files=None if self.image_dir is None else Path(self.image_dir).resolve(),
                           web=self.image_urls, private_hosts=self.image_urls_private,
                           max_bytes=self.image_max_bytes, timeout=self.image_timeout)


def served_name(model: str) -> str:
    """The model id clients send by default: the directory's name as given, links not followed, so
    `--model runs/pretrain/final` serves "final" (not the checkpoint-NNNNNN it links to)."""
    return Path(os.path.abspath(model)).name


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(ServeConfig, argv, prog="lmforge serve",
                     description="Serve a model over OpenAI's HTTP API, with a web chat at /.")
    if not cfg.model:
        print("lmforge serve: error: --model DIR is required", file=sys.stderr)
        return 2
    engine = Engine.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                    max_batch_size=cfg.max_batch_size, max_len=cfg.max_len,
                                    prefix_cache=cfg.prefix_cache, kv_cache_dtype=cfg.kv_cache)
    name = cfg.name or served_name(cfg.model)
    app = create_app(engine, name, cfg.api_key, host=cfg.host, allowed_hosts=cfg.allowed_hosts,
                     max_body_bytes=cfg.max_body_bytes, max_prompts=cfg.max_prompts,
                     agent=AgentSettings(max_steps=cfg.agent_max_steps, cell_timeout=cfg.agent_cell_timeout)
                     if cfg.agent else None, images=cfg.image_policy())
    engine.start()
    try:
        print(f"serving '{name}' at http://{cfg.host}:{cfg.port}  (web chat: /, OpenAI API: /v1)", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        engine.stop()
        if app.state.agent_sessions is not None:
            app.state.agent_sessions.close_all()
    return 0
