"""The ``compat`` marker's plugin: which feature pairs this session proved (or saw refused).

``@pytest.mark.compat(a, b)`` marks a test that proves the pair (``refused="reason"``: one that
asserts the start-up refusal). When ``DITSERVE_COMPAT_JSON`` or ``--compat-json PATH`` names a
file, the session writes ``{"pairs": {"a|b": {"status", "reason", "tests"}}}`` there: ``passed``
(every marked test of the pair passed), ``refused`` (likewise, for a declared refusal) or
``failed`` (any failed; the reason is the first failure's last line). ``tools/compat_table.py``
renders it. Why no table comparison here: the README's table is checked against the declared
markers by a cheap static test (``test_compat.py``), and a marked test that fails fails the
session anyway, so a mismatch fails CI with the suite run once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ditserve.tools.compat_table import pair


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--compat-json", default=os.environ.get("DITSERVE_COMPAT_JSON"),
                     help="write the compat-marked tests' results per feature pair to this JSON file "
                          "(default: $DITSERVE_COMPAT_JSON)")


def configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compat(a, b, refused=None): the test proves feature pair (a, b) "
                                       "(or asserts its refusal); rendered by tools/compat_table.py")
    path = config.getoption("--compat-json")
    if path:
        config.pluginmanager.register(CompatRecorder(Path(path)), "ditserve-compat")


class CompatRecorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pairs: dict[str, dict] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report = outcome.get_result()
        marks = list(item.iter_markers("compat"))
        if not marks or report.skipped or (report.when != "call" and report.passed):
            return
        test = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        for mark in marks:
            refused = mark.kwargs.get("refused")
            entry = self.pairs.setdefault("|".join(pair(*mark.args)), {"status": None, "reason": None, "tests": []})
            if test not in entry["tests"]:
                entry["tests"].append(test)
            if report.failed:
                last = str(report.longrepr).strip().splitlines()[-1:] or ["failed"]
                entry["status"], entry["reason"] = "failed", f"{item.nodeid}: {last[0]}"
            elif entry["status"] != "failed":
                entry["status"], entry["reason"] = ("refused", refused) if refused else ("passed", None)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.path.write_text(json.dumps({"pairs": dict(sorted(self.pairs.items()))}, indent=1, ensure_ascii=False))
