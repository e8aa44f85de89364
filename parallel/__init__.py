"""Process groups and rank layout; Ulysses, Ring and hybrid sequence parallelism; CFG parallelism;
tensor parallelism. Never imports Ray: groups are built from a ``ParallelConfig`` inside each
worker and passed in (see shared/DESIGN.md)."""

if __name__ != "ditserve.parallel":  # one copy of every module: see the README, "Packaging"
    raise ImportError(f"import ditserve.parallel, not {__name__}: the layers are subpackages of ditserve only")

from .apply import check_parallel, transformer_loader
from .groups import Group, ParallelConfig, ParallelGroups, build_groups, layout

__all__ = ["Group", "ParallelConfig", "ParallelGroups", "build_groups", "check_parallel", "layout", "transformer_loader"]
