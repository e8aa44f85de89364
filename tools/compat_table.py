"""The README's feature compatibility table, generated from the tests that prove each pair.

A test proves a pair by carrying ``@pytest.mark.compat(a, b)`` (``refused="reason"`` for a pair
the start-up checks refuse, the test asserting that message). What "proves" means: a lossless
pair equals one rank without either (<= 1e-4); a pair with a lossy or content-changing feature
(a cache, LoRA, FP8) equals that feature alone on one rank (same cache decisions, same numbers):
the second feature changes nothing it should not.

Two sources give the same table (``render``):

- the declared marker set, read statically from ``tests/*.py`` (``declared``: an AST walk, no
  import, no run); ``tests/test_compat.py`` checks that the README's table is exactly this, so
  a new marked test, a removed one, or a hand edit of the README fails CI at once;
- a run's results: the plugin in ``tests/conftest.py`` writes them as JSON when
  ``DITSERVE_COMPAT_JSON`` (or ``--compat-json``) names a file; ``--check RESULTS`` renders that
  and compares. A marked test that fails fails CI anyway, so CI needs the suite run once (with the
  static check inside it), not twice; the JSON is what a release job (or a person) renders with
  ``--write``.

Columns: nine features. Sequence parallel is one column whose cells need both Ulysses and Ring,
CPU offload one whose cells need both model-level and layerwise (markers name the variant:
``ulysses``/``ring``, ``model_offload``/``layerwise_offload``); a cell is ✅ only when every
variant pair is proven, ❌ when any test declares a refusal, and a cell nothing decides fails
the check (no ❓). A feature listed in ``PENDING`` (not merged yet) shows its reason instead.

Usage::

    python tools/compat_table.py --write            # README from the declared markers
    python tools/compat_table.py --check            # README == declared markers (exit 1 if not)
    python tools/compat_table.py --check results.json   # README == a run's results
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- compat-table:begin -->", "<!-- compat-table:end -->"

# (column key, label), in the table's order
FEATURES: tuple[tuple[str, str], ...] = (
    ("tea_cache", "TeaCache"),
    ("cache_dit", "Cache-DiT"),
    ("sequence_parallel", "Seq Parallel (Ulysses, Ring)"),
    ("tensor_parallel", "Tensor Parallel"),
    ("cfg_parallel", "CFG-Parallel"),
    ("lora", "LoRA"),
    ("cpu_offload", "CPU Offload (model, layerwise)"),
    ("fp8", "FP8"),
    ("vae_patch_parallel", "VAE Patch Parallel"),
)
# a column several variants share: each of its cells needs every variant proven
VARIANTS: dict[str, tuple[str, ...]] = {
    "sequence_parallel": ("ulysses", "ring"),
    "cpu_offload": ("model_offload", "layerwise_offload"),
}
# features not merged yet: their cells say so instead of failing the check
PENDING: dict[str, str] = {}

COLUMN = {v: col for col, vs in VARIANTS.items() for v in vs} | {k: k for k, _ in FEATURES if k not in VARIANTS}
LABEL = dict(FEATURES)


def _variants(column: str) -> tuple[str, ...]:
    return VARIANTS.get(column, (column,))


def pair(a: str, b: str) -> tuple[str, str]:
    """A variant pair in a canonical order (``compat`` markers may name it either way round)."""
    for name in (a, b):
        if name not in COLUMN:
            raise ValueError(f"compat marker: unknown feature {name!r}; known: {sorted(COLUMN)}")
    if COLUMN[a] == COLUMN[b]:
        raise ValueError(f"compat marker: {a!r} and {b!r} are the same column")
    return (a, b) if a < b else (b, a)


# ---- the declared markers, read statically --------------------------------------------------------


def _is_compat(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "compat"
            and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "mark")


def _literal(node: ast.Call) -> tuple[str, str, str | None]:
    a, b = (ast.literal_eval(arg) for arg in node.args)
    refused = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "refused"), None)
    return a, b, refused


def declared(tests: Path = ROOT / "tests") -> dict:
    """Every ``compat`` marker under ``tests`` as results: ``{"a|b": {"status", "reason", "tests"}}``
    with the tests named ``file::function`` (a marker in a module-level list of ``pytest.param``
    belongs to the tests whose decorators name that list)."""
    found: list[tuple[str, str, str | None, str]] = []
    for path in sorted(tests.glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        lists: dict[str, list] = {}
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                marks = [n for n in ast.walk(stmt.value) if _is_compat(n)]
                if marks:
                    lists[stmt.targets[0].id] = marks
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                    and _is_compat(stmt.value) and stmt.targets[0].id == "pytestmark":
                raise ValueError(f"{path.name}: a module-wide compat marker is too broad; mark the tests")
            if not isinstance(stmt, ast.FunctionDef) or not stmt.name.startswith("test"):
                continue
            marks = [n for d in stmt.decorator_list for n in ast.walk(d) if _is_compat(n)]
            for d in stmt.decorator_list:
                marks += [m for n in ast.walk(d) if isinstance(n, ast.Name) for m in lists.get(n.id, [])]
            for mark in marks:
                found.append((*_literal(mark), f"{path.name}::{stmt.name}"))
    out: dict = {}
    for a, b, refused, test in found:
        entry = out.setdefault("|".join(pair(a, b)), {"status": "passed", "reason": None, "tests": []})
        if refused is not None:
            entry["status"], entry["reason"] = "refused", refused
        if test not in entry["tests"]:
            entry["tests"].append(test)
    return out


# ---- one cell per column pair -----------------------------------------------------------------------


def cells(results: dict) -> dict[tuple[str, str], tuple[str, str, list[str]]]:
    """For each column pair (table order): (symbol, what the evidence says, tests)."""
    keys = [k for k, _ in FEATURES]
    out = {}
    for i, j in itertools.combinations(range(len(keys)), 2):
        ca, cb = keys[i], keys[j]
        pending = PENDING.get(ca) or PENDING.get(cb)
        if pending:
            out[(ca, cb)] = ("⏳", pending, [])
            continue
        entries = [results.get("|".join(pair(a, b))) for a in _variants(ca) for b in _variants(cb)]
        tests = sorted({t for e in entries if e for t in e["tests"]})
        refused = [e for e in entries if e and e["status"] == "refused"]
        if refused:
            out[(ca, cb)] = ("❌", refused[0]["reason"], tests)
        elif all(e and e["status"] == "passed" for e in entries):
            out[(ca, cb)] = ("✅", "tested, equal", tests)
        else:
            missing = [f"{a} × {b}" for (a, b), e in zip(itertools.product(_variants(ca), _variants(cb)), entries)
                       if not e or e["status"] != "passed"]
            out[(ca, cb)] = ("✖", "not proven: " + ", ".join(missing), tests)
    return out


def render(results: dict) -> str:
    """The Markdown between the README's markers: the lower-triangle table, then the evidence."""
    table = cells(results)
    keys = [k for k, _ in FEATURES]
    lines = ["| | " + " | ".join(LABEL[k] for k in keys[:-1]) + " |",
             "|---|" + "|".join(":---:" for _ in keys[:-1]) + "|"]
    for i, row in enumerate(keys):
        if i == 0:
            continue
        row_cells = [table[(keys[j], row)][0] for j in range(i)] + [""] * (len(keys) - 1 - i)
        lines.append(f"| **{LABEL[row]}** | " + " | ".join(row_cells) + " |")
    lines += ["", "Evidence, cell by cell:", ""]
    for (ca, cb), (symbol, what, tests) in table.items():
        evidence = ", ".join(f"`{t}`" for t in tests)
        lines.append(f"- {LABEL[ca]} × {LABEL[cb]}: {symbol} {what}" + (f" — {evidence}" if evidence else ""))
    return "\n".join(lines) + "\n"


def undecided(results: dict) -> list[str]:
    """Cells neither proven nor refused (nor pending)."""
    return [f"{LABEL[a]} × {LABEL[b]}: {what}" for (a, b), (s, what, _) in cells(results).items() if s == "✖"]


def readme_table(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip("\n") + "\n"


def replace_table(readme: str, table: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table + readme[end:]


def from_run(path: Path) -> dict:
    """A run's JSON (the plugin's) as results; pairs it did not run are absent."""
    return json.loads(path.read_text())["pairs"]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the README's table")
    mode.add_argument("--check", action="store_true", help="exit 1 if the README's table differs")
    parser.add_argument("results", nargs="?", type=Path, help="a run's JSON (default: the declared markers)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(list(argv) if argv is not None else None)
    results = from_run(args.results) if args.results else declared()
    table = render(results)
    readme = args.readme.read_text()
    if args.write:
        if undecided(results):
            print("undecided cells:\n  " + "\n  ".join(undecided(results)), file=sys.stderr)
            return 1
        args.readme.write_text(replace_table(readme, table))
        return 0
    if readme_table(readme) != table:
        print(f"{args.readme}: the compatibility table differs from "
              f"{args.results or 'the compat markers in tests/'}; run tools/compat_table.py --write", file=sys.stderr)
        bad = undecided(results)
        if bad:
            print("undecided cells:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
