"""The model: one config-driven Transformer (transformer.py) and its parts."""

from lmforge.model.attention import KV_CACHE_DTYPES, KV_CACHE_HELP, Int8KVCache, KVCache
from lmforge.model.transformer import (
    ModelOutput,
    Transformer,
    build_model,
    flops_per_token,
    matmul_params_per_token,
    num_parameters,
)

__all__ = ["KV_CACHE_DTYPES", "KV_CACHE_HELP", "Int8KVCache", "KVCache", "ModelOutput", "Transformer", "build_model",
           "flops_per_token",
           "matmul_params_per_token", "num_parameters"]
