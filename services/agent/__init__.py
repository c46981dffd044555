"""The vLLM worker agent: engine KV events and load → the bus."""
