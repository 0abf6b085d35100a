"""llm_jax: language-model pretraining in JAX/Flax."""
