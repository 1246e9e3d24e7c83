"""Structured pruning: LLM-Pruner family (taylor, l1, l2, random), block-wise inside layer ranges."""
