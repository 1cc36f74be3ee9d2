"""pytest plugin for CardBridge's pytest CTest entries (loaded with `-p cbharness.pytest_plugin`,
see tests/integration/CMakeLists.txt). It makes a run that tested nothing visible:

* CARDBRIDGE_CI=1 (scripts/test-all sets it; CI runs as root with everything installed): a
  skipped test is a failure. The report names every skip and its reason, and the run exits 1.
  (xfail is not a skip: a strict xfail is a documented bug the test still checks.)
* Otherwise a run whose selected tests were all skipped exits SKIP_EXIT (77); CTest's
  SKIP_RETURN_CODE then shows the entry as skipped, not as Passed.
* A run that collects no test exits 5 (pytest's NO_TESTS_COLLECTED): CTest shows a failure.
"""
from __future__ import annotations

import os

import pytest

SKIP_EXIT = 77
_converted = []  # skips that CI mode turned into failures (their node ids)


def ci_mode() -> bool:
    return os.environ.get("CARDBRIDGE_CI", "").strip().lower() in ("1", "true", "yes", "on")


def _skip_reason(rep) -> str:
    lr = rep.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(lr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if ci_mode() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = _skip_reason(rep)
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI (CARDBRIDGE_CI=1: a skip means this test did not run): {reason}"
        _converted.append(rep.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if ci_mode() and rep.skipped:
        reason = _skip_reason(rep)
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI (CARDBRIDGE_CI=1: a skip means these tests did not run): {reason}"
        _converted.append(rep.nodeid)


def pytest_sessionfinish(session, exitstatus):
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    count = {k: len(tr.stats.get(k, [])) for k in ("passed", "skipped", "xfailed", "xpassed")}
    if ci_mode() and count["skipped"]:  # (reports are converted above; anything left is still a failure)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) and count["skipped"] and not (
            count["passed"] or count["xfailed"] or count["xpassed"]):
        session.exitstatus = SKIP_EXIT


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _converted:
        terminalreporter.write_line(f"CARDBRIDGE_CI=1: {len(_converted)} skipped test(s) counted as failures: "
                                    + ", ".join(_converted))
    elif terminalreporter.stats.get("skipped") and not (terminalreporter.stats.get("passed")
                                                        or terminalreporter.stats.get("xfailed")):
        terminalreporter.write_line(f"every selected test was skipped: exit status {SKIP_EXIT} (CTest: skipped)")
