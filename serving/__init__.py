"""The OpenAI-compatible server for Hugging Face checkpoints: batching, token ids, versions, reload."""
