"""lowrank_bench: a Hydra-driven runner that reproduces and compares low-rank adaptation methods."""

__version__ = "0.1.0"
