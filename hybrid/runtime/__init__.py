"""Runtime core: the loader (the placement pass), the engine (prefill, decode, generation),
KV caches, sampling, the tokenizer and routing statistics."""
