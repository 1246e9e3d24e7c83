"""The configuration and modeling files copied into every DeciLM-layout export (transformers + torch only)."""
