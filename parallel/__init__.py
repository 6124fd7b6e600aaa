"""Parallelisms applied to a dtllama model from outside, one module and one `apply_*` each."""
