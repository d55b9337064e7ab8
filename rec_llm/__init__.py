"""rec_llm: large transformer recommenders trained with hybrid parallelism in JAX/Flax."""
