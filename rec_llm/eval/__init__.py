"""Evaluation: full-ranking (and sampled) next-item metrics, sharded like training."""
