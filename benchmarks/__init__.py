"""Benchmarks of vit-explain against the PyTorch reference (not part of the installed package)."""
