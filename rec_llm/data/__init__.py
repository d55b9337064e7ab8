"""Data: sources of item-id sequences and the sharded, prefetched global batches."""
