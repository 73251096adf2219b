"""Stands for the limiter and quota tests under tests/usage/ (see tests/aliases.py)."""
