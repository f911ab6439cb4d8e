"""Tiny random models and tokenizers trained on the fly, for tests and benchmarks that must not download anything.

Like ``torch.testing``: part of the package so that ``tests/`` and ``bench/`` import the same helpers without
path tricks. Nothing in the library imports it.
"""
