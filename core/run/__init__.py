"""A run's bookkeeping: the config schema and its checks, the run record, the error family, atomic writes."""
