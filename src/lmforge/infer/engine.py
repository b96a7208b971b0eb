"""The inference engine: KV-cached, batched, streaming generation, with continuous batching.

How a request runs (one function per step, read top to bottom):
1. `submit` checks it and queues it.
2. `_admit` takes the waiting requests that fit in free rows (and in `max_prefill_tokens`) and
   prefills their prompts together in one forward, right-padded, one row each (on a CPU, for
   dense Llama-family models and prompts up to a few hundred tokens, one C call over the packed
   prompts instead: cpu_decode.py); it copies a
   request's row of the cache to its other samples' rows (n samples share one prefill) and
   samples each one's first token from the logits of its prompt's last real token.
   Prefix caching: a free row keeps the keys and values of the request that last used it, and a
   new prompt that begins with the same tokens (the next turn of a chat: the history, then one
   more message) takes that row and prefills only the rest, as llama.cpp's server reuses a slot's
   cache and vLLM its cached blocks. Replacing or updating the weights empties this cache. Where
   the C matvecs are AVX-512 dot products, the reused entries give bitwise the logits a full
   prefill gives (cpu_decode.c sums a token's products the same way whatever the batch); on
   other paths they agree to rounding.
   Images (a LLaVA model, `self.vision`): `submit` expands each image's placeholder to its tokens and
   preprocesses the image; the prefill runs through PyTorch from embeddings, the image's features in
   place of its tokens (images.py), batched with text-only prompts; the prefix cache compares
   a key in which each image token stands for its image's content (images.py), so a cached
   prefix never crosses a different image. Decoding is the language model's, as for text.
3. `_decode` runs one forward over every running row: one new token each, at each row's own
   position (the cache rows are independent, so prompts of different lengths and requests that
   joined at different times share a batch), then picks each row's next token. On a CPU, for
   dense Llama-family models, that forward is one C call (cpu_decode.py).
4. `_advance` detokenises the token, checks stop ids / stop strings / lengths, and sends a Delta.
   A finished or cancelled sample leaves, and the last row moves into its place (the two swap,
   so the leaving sample's cache stays, in a free row), so the running rows are always rows
   0..k-1 of the cache and a decode step is one forward over a [k, 1] batch.

`start()` runs steps 2-4 in a background thread (continuous batching: requests join and leave
between decode steps, so a short request never waits for a long one); without it, `generate` and
`stream` run the same steps in the caller's thread. What `submit` returns, the Request a caller
iterates or awaits, is request.py's; the text API over the engine is llm.py's.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmforge.checkpoint import DTYPES, model_from
from lmforge.config import PRESETS
from lmforge.files import read_json
from lmforge.infer.cpu_decode import CPUDecoder
from lmforge.infer.detokenize import Detokenizer
from lmforge.infer.images import image_prompt, prefill_embeds
from lmforge.infer.request import Delta, Outbox, Output, Request, TokenLogprob, send_events
from lmforge.infer.sampling import DistributionError, SamplerState, SamplingParams, choose_tokens, token_logprobs
from lmforge.model import KVCache, Transformer
from lmforge.model.llava import Llava
from lmforge.tokenizer import Tokenizer
from lmforge.vision.checkpoint import is_llava_dir, load_llava, read_image_config
from lmforge.vision.image import ImageProcessorConfig

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["Engine", "SamplingParams"]

DEFAULT_MAX_LEN = 2048
# Prompt log-probs need a vocabulary-sized row of fp32 logits per prompt position: the C prefill returns
# them all at once, so prompts that would need more than this many logits go through the model's forward,
# whose hidden states become logits PROMPT_LOGITS_CHUNK positions at a time (a 2048-token prompt with a
# 150K vocabulary would otherwise hold 1.2 GB of logits, and as much again for their log-softmax).
PROMPT_LOGITS_BUDGET = 1 << 26
PROMPT_LOGITS_CHUNK = 256


class _Sample:
    """One running sample: the state of one batch row."""

    def __init__(self, request: Request, index: int, engine: Engine):
        p, prompt = request.params, request.prompt
        self.request, self.index = request, index
        self.output = request.outputs[index]
        self.sampler = SamplerState(p, prompt, engine.vocab_size, None if p.seed is None else p.seed + index,
                                    engine.cache_device)
        self.detok = Detokenizer(engine.tokenizer, prompt, p.stop)
        self.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else engine.eos_ids)
        self.position = len(prompt)  # where `last_token` goes in the cache (positions below are written)
        self.last_token = -1
        self.pending_ids: list[int] = []  # tokens (and log-probs) not yet sent in a Delta
        self.pending_logprobs: list[TokenLogprob] = []
        self.matcher = engine.grammars.matcher(p.grammar) if p.grammar is not None else None  # grammar.py


class Engine:
    def __init__(self, model: Transformer | Llava, tokenizer: Tokenizer, max_batch_size: int = 16,
                 max_len: int | None = None, eos_ids: set[int] | None = None, max_prefill_tokens: int = 2048,
                 prefix_cache: bool = True, cpu_decoder: bool = True, kv_cache_dtype: str = "auto",
                 image_config: ImageProcessorConfig | None = None):
        """`model`: a language model, or a LLaVA model (model/llava.py), whose language model then decodes and
        whose vision tower turns a prompt's images into the embeddings of its placeholder tokens at the
        prefill (`self.vision`; None for a text-only model); `image_config`: how its images are preprocessed
        (default: SigLIP's at the tower's image size).
        `max_len`: the context the cache holds (default min(model's, 2048)). `eos_ids`: token ids
        that end any output unless `ignore_eos` (default: `default_eos_ids`). `max_prefill_tokens`: the
        most tokens (rows x longest prompt, padding included) one prefill forward takes, so a burst of
        long prompts holds the running streams up for one such forward per step at most; a prompt
        longer than that is prefilled alone. `prefix_cache`: reuse the cached keys and values of an
        earlier request whose tokens a new prompt begins with (see the module's docstring). `cpu_decoder`:
        decode steps and short prefills in one C call where the model allows (cpu_decode.py); False runs
        every forward through the model (`self.cpu_decoder` is then None; setting it to None later does
        the same). `kv_cache_dtype`: "auto" keeps keys and values in the weights' dtype; "int8" stores them as
        int8 with a scale per head and block of 32 positions (Int8KVCache: about half a bf16 cache's bytes),
        and then every forward goes through the model: the C decoder reads fp caches only."""
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={max_prefill_tokens}: must be >= 1")
        self.vision = model.eval() if isinstance(model, Llava) else None
        self.image_config = image_config
        if self.vision is not None:
            model = self.vision.language_model
            self.image_config = image_config or ImageProcessorConfig(size=self.vision.config.vision.image_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        if max_len is not None and not 2 <= max_len <= model.config.max_position_embeddings:
            raise ValueError(f"max_len={max_len}: must be from 2 to the model's max_position_embeddings "
                             f"({model.config.max_position_embeddings})")
        self.max_len = max_len or min(model.config.max_position_embeddings, DEFAULT_MAX_LEN)
        self.vocab_size = model.config.vocab_size
        self.eos_ids = eos_ids if eos_ids is not None else default_eos_ids(model, tokenizer)
        self.cache = model.new_cache(max_batch_size, self.max_len, kv_cache_dtype=kv_cache_dtype)
        self.cpu_decoder = CPUDecoder.create(model) if cpu_decoder and kv_cache_dtype == "auto" else None
        self._views: dict[tuple[int, int], KVCache] = {}
        self._running: list[_Sample] = []  # row i of the cache belongs to _running[i]
        self.prefix_cache = prefix_cache
        # Free rows (index >= len(_running)) -> (the tokens whose keys and values they hold at positions
        # 0, 1, ..., when the row was freed: a count); valid for the weights whose (data pointer, version)
        # pairs are _weights_key.
        self._cached: dict[int, tuple[list[int], int]] = {}
        self._freed = itertools.count()
        self._weights_key: tuple = ()
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()  # guards _waiting; wakes the background thread
        self._step_lock = threading.Lock()  # one thread steps the engine at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox: Outbox | None = None  # during a step: events for asyncio requests, per event loop

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        tokenizer: str | Path | None = None, **kw) -> Engine:
        """Load a Hugging Face model directory (weights + tokenizer), or build a preset (`small`, ...)
        with random weights, which then needs `tokenizer` (a directory; the vocabulary follows it)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
        if not Path(path).is_dir() and str(path) in PRESETS and tokenizer is None:
            raise ValueError(f"model '{path}' is a preset with random weights: give a tokenizer directory too")
        tok = Tokenizer.from_dir(tokenizer or path)
        if Path(path).is_dir() and is_llava_dir(path):  # a vision-language model (vision/checkpoint.py)
            llava = load_llava(path, dtype=DTYPES[dtype], device=device)
            kw.setdefault("image_config", read_image_config(path, llava))
            kw.setdefault("eos_ids", default_eos_ids(llava.language_model, tok, path))
            return cls(llava, tok, **kw)
        model = model_from(path, device=device, dtype=DTYPES[dtype], vocab_size=tok.vocab_size)
        if Path(path).is_dir():
            kw.setdefault("eos_ids", default_eos_ids(model, tok, path))
        return cls(model, tok, **kw)

    # -- public API ---------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               images: list[Image.Image] | None = None) -> Request:
        """Queue a prompt (thread-safe). Raises ValueError for a bad prompt or bad params. `images`: for a
        vision-language model, the prompt's images in order, each standing at one placeholder token
        (`<image>`, the config's image_token_index, as the chat template renders it), which the engine
        expands to the image's tokens; they are preprocessed here, in the caller's thread."""
        params = params or SamplingParams()
        pixel_values = cache_key = None
        if images or (self.vision is not None and self.vision.config.image_token_index in prompt):
            prompt, pixel_values, cache_key = image_prompt(self.vision, self.image_config, prompt, images or [])
        params.validate(self.vocab_size)
        if params.n > self.max_batch_size:
            raise ValueError(f"n={params.n}: more samples than the engine's max_batch_size {self.max_batch_size}")
        if not prompt:
            raise ValueError("prompt is empty: give at least one token")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context holds {self.max_len}, "
                             f"so a prompt may have at most {self.max_len - 1}")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
        if params.grammar is not None:
            self.grammars.check(params.grammar)  # GrammarError (a ValueError) with llguidance's message
        request = Request(self, list(prompt), params, pixel_values, cache_key)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify()
        return request

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 images: list[list[Image.Image] | None] | None = None) -> list[list[Output]]:
        """Blocking: all prompts run batched; returns each prompt's n outputs. `params`: the same for every
        prompt, or a list of one per prompt (their own seeds, say). `images`: each prompt's (as `submit`)."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"params: {len(each)} for {len(prompts)} prompts")
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"images: {len(images)} lists for {len(prompts)} prompts")
        requests = [self.submit(p, q, i) for p, q, i in zip(prompts, each, images)]
        for r in requests:
            if self.running:
                r.done.wait()
            else:
                self._drive(r)
            if r.error is not None:
                raise RuntimeError(f"generation failed: {r.error!r}") from r.error
        return [r.outputs for r in requests]

    def stream(self, prompt: list[int], params: SamplingParams | None = None,
               images: list[Image.Image] | None = None) -> Iterator[Delta]:
        """Blocking generator of the Deltas of one prompt."""
        yield from self.submit(prompt, params, images)

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def num_active(self) -> int:
        """Requests queued or generating (the server's /health reports it; 0 once cancelled ones left)."""
        return len(self._waiting) + len({id(s.request) for s in list(self._running)})

    def start(self) -> None:
        """Run the engine in a background thread (continuous batching)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread; requests still queued or running are cancelled."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._thread = None
        with self._step_lock:
            for r in list(self._waiting) + [s.request for s in self._running]:
                r.cancelled = True
            self._drop_cancelled()

    # -- stepping -----------------------------------------------------------------------------------

    def wake(self) -> None:
        """Have the background thread look at the queue now (thread-safe): `Request.cancel` calls it."""
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # the requests in flight got the error; later ones may still succeed
                log.exception("engine step failed")

    def _drive(self, request: Request) -> None:
        while not request.done.is_set():
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, drop cancelled ones, decode one token for every running row."""
        with self._step_lock:
            self._outbox = {}
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._decode()
            except Exception as error:  # fail the requests in flight, keep the engine usable
                for request in {s.request for s in self._running}:
                    request.finish(error, self._outbox)
                self._running.clear()
                self._cached.clear()  # a forward that failed midway may have written any row
                raise
            finally:
                outbox, self._outbox = self._outbox, None
                for loop, items in outbox.items():
                    send_events(loop, items)

    def _drop_cancelled(self) -> None:
        with self._cond:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                r.finish(outbox=self._outbox)
        for i in reversed(range(len(self._running))):
            sample = self._running[i]
            if sample.request.cancelled:
                self._leave(i)
                if not sample.request.done.is_set():
                    sample.request.finish(outbox=self._outbox)

    def _admit(self) -> None:
        """Prefill the next waiting requests together: one forward over their right-padded prompts.

        Every row starts at position 0; a shorter prompt's padding writes cache entries beyond its
        length, which its own later tokens overwrite before they could be attended (a row attends
        only to positions <= its own). Its logits are taken at its last real token.
        """
        batch = self._take_waiting()
        if not batch:
            return
        first, lengths = len(self._running), [len(r.prompt) for r in batch]
        device = self.cache_device
        try:
            # Request i goes to row first + i, its prompt's first `start[i]` tokens found in the cache.
            start = self._claim_cached(batch, first)
            new = [n - s for n, s in zip(lengths, start)]
            width = max(new)
            cache = self._rows(first, first + len(batch))
            decoder = self.cpu_decoder
            # Requests that asked for prompt log-probs need the logits of every prompt position (their
            # prompts were prefilled whole: _claim_cached gave them no cached prefix); the others, of the last.
            scored = [r.params.prompt_logprobs is not None for r in batch]
            prompt_rows: dict[int, torch.Tensor] = {}  # request i's prompt logits, or (PyTorch) hidden states
            images = any(r.pixel_values is not None for r in batch)  # prefilled from embeddings: by PyTorch
            prefill_in_c = (decoder is not None and decoder.prefills and width <= decoder.prefill_max_len and
                            not images and
                            sum(k for k, every in zip(new, scored) if every) * self.vocab_size <= PROMPT_LOGITS_BUDGET)
            if prefill_in_c:
                # The prompts packed, no padding, in one C call, where that is as fast as PyTorch's
                # matmuls (cpu_decode.py); it leaves no OpenMP threads spinning on the cores the next
                # decode steps need, as PyTorch's forward does (BENCHMARKS.md).
                # Packed: sum(new) tokens, request i's new[i] tokens after those of the requests before it.
                ids = [t for r, s in zip(batch, start) for t in r.prompt[s:]]  # [sum(new)] token ids
                positions = [p for n, s in zip(lengths, start) for p in range(s, n)]  # [sum(new)] cache positions
                rows = [i for i, k in enumerate(new) for _ in range(k)]  # [sum(new)] row of `cache` each writes
                ends = list(itertools.accumulate(new))  # request i's tokens end at ends[i] in the packing
                # the packed positions whose logits are wanted: a request's last one, or all of a scored one's
                wanted = [range(end - k if every else end - 1, end) for end, k, every in zip(ends, new, scored)]
                out = torch.tensor([t for w in wanted for t in w])
                logits = decoder(ids, positions, cache, rows=rows, out=out)  # [len(out), vocab]
                got = list(itertools.accumulate(map(len, wanted)))  # request i's rows of logits end at got[i]
                for i in (i for i, every in enumerate(scored) if every):
                    prompt_rows[i] = logits[got[i] - new[i]:got[i]]
                logits = logits[[g - 1 for g in got]]
            else:
                ids = torch.tensor([r.prompt[s:] + [0] * (width - k) for r, s, k in zip(batch, start, new)],
                                   device=device)  # [len(batch), width], right-padded
                # padding past a prompt's end writes entries its own later tokens overwrite; capped at
                # the cache's end, where a row that started late could otherwise run past it
                positions = (torch.tensor(start, device=device)[:, None] + torch.arange(width, device=device)
                             ).clamp_(max=self.max_len - 1)
                # hidden states [len(batch), width, hidden_size]; an int8 cache is told where the padding
                # starts (past a row's prompt, which no block of it completes)
                cache.pad_from = torch.tensor(lengths, device=device)
                embeds = prefill_embeds(self.vision, batch, start, ids) if images else None
                try:
                    hidden = self.model(ids, position_ids=positions, cache=cache, return_hidden=True,
                                        inputs_embeds=embeds).hidden
                finally:
                    cache.pad_from = None
                for i in (i for i, every in enumerate(scored) if every):
                    prompt_rows[i] = hidden[i, :new[i]]
                last = torch.tensor(new, device=device) - 1
                logits = self.model.logits(hidden[torch.arange(len(batch), device=device), last]).float()
            for i, rows in prompt_rows.items():
                batch[i].prompt_logprobs = self._prompt_logprobs(batch[i], rows, hidden=not prefill_in_c)
        except Exception as error:
            for request in batch:
                request.finish(error, self._outbox)
            raise
        # Request i's first sample is row first + i; its other samples take the rows after the
        # batch, each starting from a copy of that row's prefilled cache.
        samples = [_Sample(r, 0, self) for r in batch]
        logit_rows = list(range(len(batch)))
        for i, request in enumerate(batch):
            for index in range(1, request.params.n):
                self._copy_row(first + i, first + len(samples), lengths[i])
                samples.append(_Sample(request, index, self))
                logit_rows.append(i)
        self._running.extend(samples)
        for row in range(first, len(self._running)):  # running now: no longer a cached prefix
            self._cached.pop(row, None)
        self._advance(samples, logits[logit_rows])

    def _claim_cached(self, batch: list[Request], first: int) -> list[int]:
        """For each request of `batch` (it will run in row first + i): the free row whose cached tokens
        share the longest prefix with its prompt is swapped into row first + i, or, if it holds more
        than the prompt shares, the shared part is copied there and the row kept for a later request;
        returns how many prompt tokens each found (0: none). The last prompt token always runs again,
        for its logits. Among equals, and for the row a request overwrites, an empty row comes first,
        then the one freed longest ago (least recently used, as vLLM evicts its cached blocks)."""
        start = [0] * len(batch)
        if not self.prefix_cache:
            return start
        # Weights are the same tensors, unchanged, while each parameter keeps its storage and its version:
        # torch's counter of in-place updates (an optimizer step, load_state_dict's copy_), which has no
        # public accessor; a new tensor has a new data pointer.
        key = tuple((p.data_ptr(), p._version) for p in (self.vision or self.model).parameters())
        if key != self._weights_key:  # new or updated weights: what the rows hold is stale
            self._cached.clear()
            self._weights_key = key
        for i, request in enumerate(batch):
            # a prompt whose log-probs are wanted is prefilled whole: every position's logits are needed
            target, limit = first + i, 0 if request.params.prompt_logprobs is not None else len(request.prompt) - 1
            ranked = sorted(((_common_prefix(tokens, request.cache_key, limit), -freed, row)
                             for row in range(target, self.max_batch_size)
                             for tokens, freed in [self._cached.get(row, ((), -1))]), reverse=True)
            found, _, best = ranked[0]
            if found < self._row_length(best):  # int8: reuse whole blocks (Int8KVCache: its entries round once)
                found -= found % self.cache.block
            victim = min(ranked[1:], key=lambda r: -r[1], default=(0, 0, best))[2]  # empty, else oldest
            if found < self._row_length(best) and victim != best:
                # The row holds more than this prompt shares (an earlier, longer turn of the chat): keep it
                # for later, and copy the shared prefix into the least valuable row instead.
                if victim != target:
                    self._swap_rows(victim, target)
                    best = victim if best == target else best
                self._copy_row(best, target, found)
            elif best != target:
                self._swap_rows(best, target)
            self._cached.pop(target, None)  # its cache is being overwritten from `found` on
            start[i] = request.cached_tokens = found
        return start

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes (they are dropped anyway when the weights' tensors change)."""
        with self._step_lock:
            self._cached.clear()

    def _take_waiting(self) -> list[Request]:
        """Pop the waiting requests to prefill now, oldest first: while their samples fit in free rows
        and the padded batch in max_prefill_tokens (the oldest always goes, whatever its length)."""
        free, batch, width = self.max_batch_size - len(self._running), [], 0
        with self._cond:
            for request in self._waiting:
                wider = max(width, len(request.prompt))
                if request.params.n > free or (batch and (len(batch) + 1) * wider > self.max_prefill_tokens):
                    break
                batch.append(request)
                free, width = free - request.params.n, wider
            for _ in batch:
                self._waiting.popleft()
        return batch

    def _decode(self) -> None:
        k = len(self._running)
        tokens, positions = [s.last_token for s in self._running], [s.position for s in self._running]
        if self.cpu_decoder is not None:
            logits = self.cpu_decoder(tokens, positions, self._rows(0, k))
        else:
            device = self.cache_device
            ids = torch.tensor(tokens, device=device)[:, None]
            logits = self._last_logits(ids, torch.tensor(positions, device=device)[:, None], self._rows(0, k))
        for sample in self._running:
            sample.position += 1
        self._advance(list(self._running), logits)

    def _last_logits(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ids [B, T] at positions [B, T] through the model; fp32 logits [B, vocab] of the last position
        only: the others are never needed, and the output matrix is the largest one."""
        hidden = self.model(ids, position_ids=positions, cache=cache, return_hidden=True).hidden
        return self.model.logits(hidden[:, -1]).float()

    def _advance(self, samples: list[_Sample], logits: torch.Tensor) -> None:
        """Pick each sample's next token from its logits row, record it, emit text, retire finished ones. A
        request with a row that gives no token (NaN logits: DistributionError) fails alone."""
        constrained = [i for i, s in enumerate(samples) if s.matcher is not None]
        if constrained:  # what would break a sample's grammar is masked before its sampler chooses
            self.grammars.apply(logits, constrained, [samples[i].matcher for i in constrained])
        tokens = choose_tokens(logits, [s.sampler for s in samples])
        failed = {s.request: t for s, t in zip(samples, tokens) if isinstance(t, DistributionError)}
        if failed:  # those requests fail alone; the rest of the batch goes on
            self._fail(failed)
            keep = [i for i, s in enumerate(samples) if s.request not in failed]
            samples, tokens, logits = [samples[i] for i in keep], [tokens[i] for i in keep], logits[keep]
        logprobs = self._logprobs(samples, logits, tokens)
        finished = []
        for sample, token, lp in zip(samples, tokens, logprobs):
            sample.sampler.observe(token)
            sample.last_token = token
            out = sample.output
            out.token_ids.append(token)
            sample.pending_ids.append(token)
            if lp is not None:
                out.logprobs.append(lp)
                sample.pending_logprobs.append(lp)
            ended = sample.matcher is not None and self.grammars.advance(sample.matcher, token)
            if token in sample.stop_ids:
                text, reason = sample.detok.finish(), "stop"
            elif ended:  # the grammar is complete: nothing may follow
                text, reason = sample.detok.add(token) + sample.detok.finish(), "stop"
            else:
                text = sample.detok.add(token)
                if sample.detok.stopped:
                    reason = "stop"
                elif (len(out.token_ids) >= sample.request.params.max_tokens
                      or sample.request.prompt_tokens + len(out.token_ids) >= self.max_len):
                    text, reason = text + sample.detok.finish(), "length"
                else:
                    reason = None
            out.text += text
            if text or reason:
                self._emit(sample, text, reason)
            if reason:
                finished.append(sample)
        for sample in finished:
            self._leave(self._running.index(sample))
            request = sample.request
            if all(o.finish_reason for o in request.outputs):
                request.finish(outbox=self._outbox)

    def _fail(self, errors: dict[Request, DistributionError]) -> None:
        """End these requests with their errors: all their samples leave, and their rows are not offered as a
        cached prefix (they may hold NaN)."""
        for i in reversed(range(len(self._running))):  # _leave moves the last row into i: already seen
            if self._running[i].request in errors:
                self._leave(i)
                self._cached.pop(len(self._running), None)
        for request, error in errors.items():
            request.finish(error, self._outbox)

    def _logprobs(self, samples, logits, tokens) -> list[TokenLogprob | None]:
        want = [i for i, s in enumerate(samples) if s.request.params.logprobs]
        result: list[TokenLogprob | None] = [None] * len(samples)
        if not want:
            return result
        top = max(samples[i].request.params.top_logprobs for i in want)
        chosen, alternatives = token_logprobs(logits[want], [tokens[i] for i in want], top)
        text = self.token_text
        for i, lp, alts in zip(want, chosen, alternatives):
            k = samples[i].request.params.top_logprobs
            result[i] = TokenLogprob(tokens[i], text(tokens[i]), lp, [(t, text(t), v) for t, v in alts[:k]])
        return result

    def _prompt_logprobs(self, request: Request, rows: torch.Tensor, hidden: bool) -> list[TokenLogprob | None]:
        """Log-probs of prompt tokens 1.. from the logits of positions 0..n-2, with params.prompt_logprobs
        alternatives each; the first token has none (vLLM's prompt_logprobs). `rows` [n, ...]: the prompt's
        logits, or its hidden states (`hidden`), which become logits PROMPT_LOGITS_CHUNK positions at a time."""
        prompt, k, text = request.prompt, request.params.prompt_logprobs, self.token_text
        entries: list[TokenLogprob | None] = [None]
        for start in range(0, len(prompt) - 1, PROMPT_LOGITS_CHUNK):
            end = min(start + PROMPT_LOGITS_CHUNK, len(prompt) - 1)
            logits = self.model.logits(rows[start:end]).float() if hidden else rows[start:end]
            chosen, alternatives = token_logprobs(logits, prompt[start + 1:end + 1], k)
            entries += [TokenLogprob(t, text(t), lp, [(a, text(a), v) for a, v in alts])
                        for t, lp, alts in zip(prompt[start + 1:end + 1], chosen, alternatives)]
        return entries

    def token_text(self, token: int) -> str:
        """One token's text on its own, as log-prob entries show it."""
        return self.tokenizer.decode([token])

    def _emit(self, sample: _Sample, text: str, reason: str | None) -> None:
        sample.output.finish_reason = reason
        logprobs = sample.pending_logprobs if sample.request.params.logprobs else None
        sample.request.put(Delta(sample.index, text, sample.pending_ids, logprobs, reason), self._outbox)
        sample.pending_ids, sample.pending_logprobs = [], []

    # -- cache rows ---------------------------------------------------------------------------------

    @functools.cached_property
    def grammars(self):
        """llguidance's view of the tokenizer, built when a request first brings a grammar (grammar.py)."""
        from lmforge.infer.grammar import Grammars

        return Grammars(self.tokenizer, self.vocab_size, self.eos_ids)

    @property
    def cache_device(self) -> torch.device:
        return self.cache.stores[0].device

    def _rows(self, start: int, stop: int) -> KVCache:
        """A KVCache over rows start..stop-1 of the engine's cache: the same memory, a smaller batch."""
        key = (start, stop)
        if key not in self._views:
            self._views[key] = self.cache.rows(start, stop)
        return self._views[key]

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_row(src, dst, length)  # every layer at once

    def _swap_rows(self, a: int, b: int) -> None:
        """Exchange two rows' cache entries (as far as either holds anything) and what _cached says of them."""
        length = max(self._row_length(a), self._row_length(b))
        if length == 0:
            return
        self.cache.swap_rows(a, b, length)
        tokens_a, tokens_b = self._cached.pop(a, None), self._cached.pop(b, None)
        if tokens_a is not None:
            self._cached[b] = tokens_a
        if tokens_b is not None:
            self._cached[a] = tokens_b

    def _row_length(self, row: int) -> int:
        if row < len(self._running):
            return self._running[row].position
        return len(self._cached.get(row, ((), 0))[0])

    def _leave(self, row: int) -> None:
        """Free a row: the last running row moves into it, so rows 0..k-1 stay the running ones. With the
        prefix cache the two rows swap, and the leaving sample's tokens stay cached in the freed last row."""
        last = len(self._running) - 1
        sample = self._running[row]
        if row != last:
            moved = self._running[last]
            if self.prefix_cache:
                self._swap_rows(row, last)
            else:
                self._copy_row(last, row, moved.position)
            self._running[row] = moved
        self._running.pop()
        if self.prefix_cache:  # the prompt and the tokens fed back so far (the newest one never was)
            fed = sample.position - len(sample.request.prompt)
            self._cached[last] = (sample.request.cache_key + sample.output.token_ids[:fed], next(self._freed))


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n == 0 or a[0] != b[0]:  # the usual case for unrelated prompts, without building arrays
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def default_eos_ids(model: Transformer, tokenizer: Tokenizer, model_dir: str | Path | None = None) -> set[int]:
    """The token ids that end an output unless `ignore_eos`, those within the vocabulary: every special token
    (each marks an end of text or of a turn, never content), the tokenizer's eos, the config's eos_token_id,
    and those a model directory's generation_config.json lists (Llama 3's <|eot_id|> is only there)."""
    values = [tokenizer.eos_id, model.config.eos_token_id]  # each an id, a list of ids, or None
    if model_dir is not None and (file := Path(model_dir) / "generation_config.json").is_file():
        values.append(read_json(file).get("eos_token_id"))
    ids = set(tokenizer.special_ids)
    for value in values:
        ids.update(i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int))
    return {i for i in ids if i < model.config.vocab_size}
