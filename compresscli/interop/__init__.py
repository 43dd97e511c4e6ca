"""Formats others load: `compress export` (plain Hugging Face / timm directories, compressed-tensors), each codec
asked which formats it can be written in."""
