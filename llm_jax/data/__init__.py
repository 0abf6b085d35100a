"""Data layer: corpora, tokenizer, packing and the grain input pipeline."""
