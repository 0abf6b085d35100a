"""TFDS builders that need no download; importing registers them with TFDS."""

# Imported for their side effect: registering the builders.
from llm_jax.data.corpora import code_pairs, gettext_translation, stdlib_source  # noqa: F401

EMBEDDED = frozenset({"stdlib_source", "gettext_translation", "code_pairs", "code_next"})
