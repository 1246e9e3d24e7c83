"""Models: loading any format prunelab reads, the checkpoint it writes, Llama anatomy, and the modeling files
shipped inside checkpoints (each format's keys live in its own module)."""
