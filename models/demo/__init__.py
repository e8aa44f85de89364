"""The demo model (work in progress): procedural captioned shapes (``data``), a training script for
a Qwen-Image-architecture model on them (``train``) and a caption-faithfulness scorer
(``evaluate``). Not registered yet: no trained checkpoint meets the accuracy targets so far."""
