"""Separation-model constants (TOML), one file per model, shipped as ``chisep.models``."""
