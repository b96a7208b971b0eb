"""lmforge: build a language model end to end, and own every step."""

__version__ = "0.1.0"
