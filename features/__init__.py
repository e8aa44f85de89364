"""Cache methods, CPU offload, FP8 and LoRA, each a hook attached to a loaded family adapter from
outside. Never imports Ray or HTTP (see shared/DESIGN.md)."""
