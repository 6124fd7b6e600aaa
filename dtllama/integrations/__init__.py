"""Bridges from dtllama to other training frameworks; each submodule imports its framework on its own
(`dtllama.integrations.torchtitan` needs `pip install 'dtllama[titan]'`), so this package imports nothing."""
