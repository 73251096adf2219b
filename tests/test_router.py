"""Stands for the router tests under tests/providers/ (see tests/aliases.py)."""
