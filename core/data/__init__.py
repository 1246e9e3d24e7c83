"""Text for calibration and evaluation, offline (text.py), and the R lazy-load reader it needs (rdata.py)."""
