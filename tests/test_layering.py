"""The layering rule of shared/DESIGN.md, checked on every import the code makes.

    cluster/ → deployments/ → parallel/, features/ → models/;  tools/ may use everything,
    nothing imports tools/; features/ and parallel/ do not import each other; models/, parallel/
    and features/ import no Ray and no HTTP; cluster/ uses only what ``ditserve.deployments``
    exports (its ``__init__``), not the modules inside it nor the layers below.

Anyone can run it as a grep that prints nothing when the rule holds:

    python tests/test_layering.py

How imports are found: Python's ``ast``, not a regex over lines. It sees the imports a regex
misses or misreads: those inside functions (the lazy ``from ditserve.deployments import Engine`` in
a tool is exactly what the rule is about), multi-line ``from x import (a, b)``, relative imports
(``from ..reducer`` is resolved to ``ditserve.features.reducer`` from the file's place) and
``importlib.import_module("...")`` with a constant name; and it ignores module names in strings and
docstrings. Imports under ``if TYPE_CHECKING:`` count too: a type-only import still couples the
layers. ``from pkg import name`` is checked both as ``pkg`` and as ``pkg.name`` (``name`` may be a
submodule).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "parallel", "features", "deployments", "cluster", "tools")
HTTP = ("fastapi", "starlette", "uvicorn", "http", "aiohttp", "requests", "httpx")

# layer -> module prefixes its files must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "models": ("ray", *HTTP, "ditserve.parallel", "ditserve.features", "ditserve.deployments", "ditserve.cluster",
               "ditserve.tools"),
    "parallel": ("ray", *HTTP, "ditserve.features", "ditserve.deployments", "ditserve.cluster", "ditserve.tools"),
    "features": ("ray", *HTTP, "ditserve.parallel", "ditserve.deployments", "ditserve.cluster", "ditserve.tools"),
    "deployments": ("ditserve.cluster", "ditserve.tools"),
    "cluster": ("ditserve.tools",),
}
# cluster/ may import these ditserve modules and nothing else of ditserve
CLUSTER_ALLOWED = ("ditserve.deployments", "ditserve.cluster")


def _module_name(path: Path) -> str:
    """``features/cache/hooks.py`` -> ``ditserve.features.cache.hooks`` (a package: its __init__)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["ditserve", *parts])


def imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (the module ``module``, by default
    named from its place in the repository); ``from m import n`` gives m and m.n."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _files(layer: str) -> list[Path]:
    return sorted(p for p in (ROOT / layer).rglob("*.py") if "__pycache__" not in p.parts)


def _where(path: Path, line: int, name: str, why: str) -> str:
    return f"{path.relative_to(ROOT)}:{line}: imports {name} ({why})"


def direction_violations() -> list[str]:
    """Imports against the one-way direction, of Ray/HTTP below deployments/, of tools/, and of a
    layer under its bare name (``import models`` would load a second copy of the module)."""
    out: list[str] = []
    for layer in LAYERS:
        for path in _files(layer):
            seen: set[tuple[int, str]] = set()
            for line, name in imports(path):
                top = name.split(".")[0]
                if top in LAYERS and (line, top) not in seen:
                    seen.add((line, top))
                    out.append(_where(path, line, name, "a layer by its bare name: import ditserve." + top))
                for prefix in FORBIDDEN.get(layer, ()):
                    if _matches(name, prefix) and (line, prefix) not in seen:
                        seen.add((line, prefix))
                        out.append(_where(path, line, name, f"{layer}/ must not import {prefix}"))
    return out


def cluster_violations() -> list[str]:
    """cluster/ imports of ditserve modules other than ``ditserve.deployments`` (the package's
    exports, not its modules) and ``ditserve.cluster`` itself."""
    out: list[str] = []
    for path in _files("cluster"):
        reported: set[tuple[int, str]] = set()
        for line, name in imports(path):
            if not _matches(name, "ditserve") or name == "ditserve":
                continue
            if name == "ditserve.deployments" or _matches(name, "ditserve.cluster"):
                continue
            # `from ditserve.deployments import Engine` also yields ditserve.deployments.Engine: an export
            if name.startswith("ditserve.deployments.") and _is_export(name):
                continue
            if any(l == line and _matches(name, r) for l, r in reported):  # `from m import a`: m said it
                continue
            reported.add((line, name))
            out.append(_where(path, line, name, "cluster/ uses only the names ditserve.deployments exports"))
    return out


def _is_export(name: str) -> bool:
    """``ditserve.deployments.X`` where X is a name in the package's ``__all__`` (not a submodule)."""
    rest = name.removeprefix("ditserve.deployments.")
    if "." in rest or (ROOT / "deployments" / f"{rest}.py").exists() or (ROOT / "deployments" / rest).is_dir():
        return False
    tree = ast.parse((ROOT / "deployments" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return rest in ast.literal_eval(node.value)
    return False


def test_layers_import_one_way():
    violations = direction_violations()
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_cluster_uses_only_deployments_public_api():
    violations = cluster_violations()
    assert not violations, "cluster/ reaches past deployments' public API:\n" + "\n".join(violations)


def test_the_checker_sees_what_it_must(tmp_path):
    """The checker itself: lazy, relative, multi-line and import_module imports are all found."""
    source = tmp_path / "probe.py"
    source.write_text(
        "import importlib\n"
        "from ..deployments import (\n    Engine,\n)\n"
        "def f():\n    import ray.serve\n    importlib.import_module('ditserve.parallel.groups')\n"
        "from .cache import hooks\n"
        "'''import ditserve.cluster'''\n"
    )
    names = {name for _, name in imports(source, "ditserve.features.probe")}
    assert {"ditserve.deployments", "ditserve.deployments.Engine", "ray.serve", "ditserve.parallel.groups",
            "ditserve.features.cache.hooks"} <= names
    assert "ditserve.cluster" not in names
    assert _is_export("ditserve.deployments.Engine") and not _is_export("ditserve.deployments.app")


def test_parallel_group_is_a_feature_reducer():
    """features/ reduces through its own protocol; parallel's Group satisfies it without either
    package importing the other."""
    import torch

    from ditserve.features.reducer import LOCAL, Reducer
    from ditserve.parallel.groups import ParallelGroups

    group = ParallelGroups.single().branch
    assert isinstance(group, Reducer) and isinstance(LOCAL, Reducer)
    t = torch.tensor([1.0, 2.0])
    assert group.all_reduce(t) is t and LOCAL.all_reduce(t) is t and LOCAL.size == group.size == 1


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_is_not_importable_by_its_bare_name(layer):
    """``import models`` from the repository root would load a second copy of every module (two
    request-context variables that do not see each other); each layer refuses, naming the right import."""
    proc = subprocess.run([sys.executable, "-c", f"import {layer}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and f"ditserve.{layer}" in proc.stderr, proc.stderr


if __name__ == "__main__":  # the grep: prints nothing (exit status 0) when the rule holds
    found = direction_violations() + cluster_violations()
    for violation in found:
        print(violation)
    sys.exit(1 if found else 0)
