"""How the app meets a Ray cluster, and the ``ditserve`` command line."""

if __name__ != "ditserve.cluster":  # one copy of every module: see the README, "Packaging"
    raise ImportError(f"import ditserve.cluster, not {__name__}: the layers are subpackages of ditserve only")
