"""llm_jax: language-model pretraining in JAX/Flax."""
from llm_jax import host_memory

# before JAX starts its threads: they then share one arena that keeps freed pages mapped
host_memory.keep_freed_memory()
