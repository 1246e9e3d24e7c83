"""Shared pieces of prunelab: config schema, model I/O, text data, checkpoints, run bookkeeping, the generic search
engine (search.py: layer replacement and pruner=obs allocation=search use it)."""
