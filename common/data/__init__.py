"""Dermoscopy data: official dataset layouts, image checks, splits, partitions, cache, synthetic data."""
