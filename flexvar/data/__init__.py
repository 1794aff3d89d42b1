"""Data: prepare (builtin / HF hub / image folder -> Arrow), the built-in dataset, splits, latent cache."""
