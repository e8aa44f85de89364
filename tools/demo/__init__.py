"""Offline tools of the built-in demo model ``ditserve/demo``: the procedural captioned shapes
(``data``), the training script (``train``) and the caption-faithfulness scorer (``evaluate``).
The trained checkpoint they produce is served from ``models/demo/checkpoint`` (package data)."""
