"""The built-in demo model ``ditserve/demo``: procedural captioned shapes (``data``), the training
script of a small Qwen-Image-architecture model on them (``train``), the caption-faithfulness
scorer (``evaluate``) and the trained checkpoint itself (``checkpoint/``, shipped in the package)."""
