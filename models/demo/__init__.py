"""The built-in demo model ``ditserve/demo``: its trained checkpoint (``checkpoint/``, shipped as
package data). The dataset, training script and scorer that made it are offline tools
(``ditserve.tools.demo``)."""
