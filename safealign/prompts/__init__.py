"""Prompts: the pair/benign table schema, prompt backends (the LLM recipe), importers of published sets."""
