"""Stands for the provider client tests under tests/providers/ (see tests/aliases.py)."""
