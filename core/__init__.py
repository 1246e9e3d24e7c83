"""Shared pieces of prunelab: config schema, model I/O, text data, checkpoints, run bookkeeping."""
