"""Cache methods, CPU offload, FP8 and LoRA, each a hook attached to a loaded family adapter from
outside. Never imports Ray or HTTP (see shared/DESIGN.md)."""

if __name__ != "ditserve.features":  # one copy of every module: see the README, "Packaging"
    raise ImportError(f"import ditserve.features, not {__name__}: the layers are subpackages of ditserve only")
