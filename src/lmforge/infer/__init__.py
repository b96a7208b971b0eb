"""Inference: the engine (KV cache, sampling, batching, streaming), the text API over it, and what runs on it."""

from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM
from lmforge.infer.request import Delta, Output, Request, TokenLogprob
from lmforge.infer.sampling import SamplingParams

__all__ = ["LLM", "Delta", "Engine", "Output", "Request", "SamplingParams", "TokenLogprob"]
