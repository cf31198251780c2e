"""llm-labs: a compact LLM research lab."""
