"""Inference: the Engine behind chat, predict, the API and the web UI."""
