"""Process groups and rank layout; Ulysses, Ring and hybrid sequence parallelism; CFG parallelism;
tensor parallelism. Never imports Ray: groups are built from a ``ParallelConfig`` inside each
worker and passed in (see shared/DESIGN.md)."""

from .apply import apply_parallel, check_parallel, transformer_loader
from .groups import Group, ParallelConfig, ParallelGroups, build_groups, layout

__all__ = ["Group", "ParallelConfig", "ParallelGroups", "apply_parallel", "build_groups", "check_parallel", "layout", "transformer_loader"]
