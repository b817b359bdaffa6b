"""The engine: paged KV cache, scheduler, sampling and Engine (generation by a whole population)."""
