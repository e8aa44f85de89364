"""Offline tools that use the whole stack (demo-model training and evaluation, TeaCache fitting,
checkpoint conversion). Nothing served imports this package (shared/DESIGN.md)."""

if __name__ != "ditserve.tools":  # one copy of every module: see the README, "Packaging"
    raise ImportError(f"import ditserve.tools, not {__name__}: the layers are subpackages of ditserve only")
