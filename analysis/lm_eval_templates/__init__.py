"""prunelab's offline lm-eval task YAMLs and their data hooks (see analysis/lm_eval_tasks.py)."""
