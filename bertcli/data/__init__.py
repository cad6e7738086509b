"""Readers for each data format, and batching (padding, length grouping)."""
