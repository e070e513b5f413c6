"""Training: the config, the data sources, the epoch loop and checkpoints, the CPU allocator setting."""
