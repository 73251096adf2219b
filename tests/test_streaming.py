"""Stands for the streaming tests under tests/chat/ (see tests/aliases.py)."""
