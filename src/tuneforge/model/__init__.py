"""Model: find, load and prepare tokenizers and causal LMs (local, hub, ModelScope, GGUF, embedded)."""
