"""ditserve: serving for diffusion transformers on Ray Serve.

The code lives in the top-level folders of the repository (``models/``, ``parallel/``,
``features/``, ``deployments/``, ``cluster/``), installed as subpackages of this package.
"""

__version__ = "0.1.0"
