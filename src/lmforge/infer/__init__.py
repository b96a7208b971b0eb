"""Inference: the engine (KV cache, sampling, batching, streaming) and what runs on it."""

from lmforge.infer.engine import Delta, Engine, Output, Request, SamplingParams, TokenLogprob

__all__ = ["Delta", "Engine", "Output", "Request", "SamplingParams", "TokenLogprob"]
