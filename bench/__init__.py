"""The relay benchmark: see run.py."""
