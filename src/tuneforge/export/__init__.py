"""Export: merge adapters into the base weights, save Hugging Face folders, GGUF files and Ollama Modelfiles."""
