"""Data: registry -> readers -> converters -> templates -> tokenization -> batches. Never imports `model`."""
