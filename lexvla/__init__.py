"""Unified lexical representations for interpretable visual-language alignment (LexVLA), notebook-first and reproducible

Modules:

- `lexvla.maxpool`: Memory-lean patch -> vocabulary max-pool: `max_n (H Zᵀ)` without batch x patches x V (method §4)."""

__version__ = "0.0.1"
