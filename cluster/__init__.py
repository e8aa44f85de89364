"""How the app meets a Ray cluster, and the ``ditserve`` command line."""
