"""Bridges from dtllama to other training frameworks; each submodule imports its framework on its own
(`dtllama.integrations.torchtitan` needs `pip install 'dtllama[titan]'`), so this package imports nothing.
Importing a submodule changes nothing in its framework: what needs patching, an explicit call applies
(`dtllama.integrations.torchtitan.apply_shims()`, which its entry points call)."""
