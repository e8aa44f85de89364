"""Process groups and rank layout, Ulysses/Ring attention, tensor and CFG parallelism, VAE patch
parallelism. Never imports Ray: groups are passed in (see shared/DESIGN.md)."""
