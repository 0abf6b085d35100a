"""TFDS builders that need no download; importing registers them with TFDS."""

from llm_jax.data.corpora import stdlib_source  # noqa: F401  (registers the builder)

EMBEDDED = frozenset({"stdlib_source"})
