"""The fault matrix's report: one row per fault (tests/integration/test_fault_*.py), with what the
program saw, how long it took and how it recovered. Times are measured and reported, never
asserted (the brief's "Deterministic tests": a loaded machine must not fail a test; the hang
guard is the only time bound a test enforces). Each row names the bound it is held to:

  * PROMPT_MS (2 s): a fault the shim or the desk sees happen (a closed connection, an error,
    a removal): the program's error must come within 2 s;
  * LIVENESS_MS: a fault that shows only as silence (a stopped desk, a stalled link): the shim's
    liveness bound, ShimConfig::liveness_after + liveness_timeout (server-shim/core/include/
    cardbridge/shim_core/shim_core.hpp), counted from the request that found the desk silent.

Each test module holds a FaultReport (a module fixture); at the module's end it writes
$CARDBRIDGE_BUILD_DIR/fault-matrix/<module>.json, prints the table on the terminal (also when
every test passed) and checks docs/faults.md: every row the run produced must be in the doc's
table with the same fault, path, what the program sees, bound and recovery (the measured
columns are a reference run's and are not compared). A row that differs fails the module with
the doc line to write. The doc's table is generated from the tests' rows:

    python3 -m cbharness.faultreport                       print the table (build/fault-matrix)
    python3 -m cbharness.faultreport --update-docs [DIR]   rewrite docs/faults.md's table
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PROMPT_MS = 2000
# ShimConfig's defaults (shim_core.hpp): a ping after 5 s without a byte from the desk while a
# request is outstanding, the desk lost if the ping is not answered within 5 s.
LIVENESS_AFTER_MS = 5000
LIVENESS_TIMEOUT_MS = 5000
# (The I/O layer's timer only ever fires early, then re-arms for the real deadline: no slack.)
LIVENESS_MS = LIVENESS_AFTER_MS + LIVENESS_TIMEOUT_MS
# What "within" allows on top of a bound: the shim's answer travelling to the program (a local
# socket and libpcsclite; well under a millisecond on an idle machine). Reported, not asserted.
DELIVERY_MS = 100


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 1)


@dataclass
class FaultRow:
    fault: str                      # what happened
    sees: str                       # what the program sees (exact PC/SC codes)
    t_ms: Optional[float]           # fault -> the program's answer (measured)
    bound_ms: float                 # PROMPT_MS or LIVENESS_MS (+ anything the row documents)
    recovery: str                   # what brings it back (nothing is restarted by hand)
    t_recovery_ms: Optional[float] = None  # the recovery event -> working again (measured)
    pcscd: str = ""                 # what a local pcscd gives for the same fault (or its reference)
    path: str = "unix"              # desk link: unix, rdp-static, rdp-dynamic, relay, ...
    test: str = ""                  # the test that shows it
    notes: str = ""
    within: Optional[bool] = field(default=None)

    def __post_init__(self) -> None:
        self.t_ms = _ms(self.t_ms)
        self.t_recovery_ms = _ms(self.t_recovery_ms)
        self.within = None if self.t_ms is None else self.t_ms <= self.bound_ms + DELIVERY_MS


class FaultReport:
    def __init__(self, module: str):
        self.module = module
        self.rows: List[FaultRow] = []

    def add(self, fault: str, sees: str, t_ms: Optional[float], bound_ms: float, recovery: str,
            t_recovery_ms: Optional[float] = None, *, pcscd: str = "", path: str = "unix", test: str = "",
            notes: str = "") -> FaultRow:
        if not test:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        test = test.rsplit("/", 1)[-1]  # file.py::test[param], whatever pytest's rootdir
        row = FaultRow(fault, sees, t_ms, bound_ms, recovery, t_recovery_ms, pcscd, path, test, notes)
        self.rows.append(row)
        print("FAULT " + json.dumps(asdict(row)), flush=True)  # in the test's captured output
        return row

    # ---- output ----------------------------------------------------------------------------
    def out_dir(self) -> Path:
        build = os.environ.get("CARDBRIDGE_BUILD_DIR") or str(Path(__file__).resolve().parents[3] / "build")
        return Path(build) / "fault-matrix"

    def write(self) -> Optional[Path]:
        if not self.rows:
            return None
        d = self.out_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.module}.json"
        # a partial run (pytest -k) replaces its own rows and keeps the others of the last runs
        rows = {}
        if path.exists():
            try:
                rows = {_key(r["test"], r["path"], r["fault"]): r for r in json.loads(path.read_text())["rows"]}
            except (ValueError, KeyError):
                rows = {}
        for r in self.rows:
            rows[_key(r.test, r.path, r.fault)] = asdict(r)
        path.write_text(json.dumps({"module": self.module, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "prompt_ms": PROMPT_MS, "liveness_ms": LIVENESS_MS,
                                    "rows": list(rows.values())}, indent=1) + "\n")
        return path

    def lines(self) -> List[str]:
        out = [f"fault matrix ({self.module}): time = fault -> the program's answer; bound 2 s "
               f"(silence: liveness {LIVENESS_MS / 1000:g} s)"]
        for r in self.rows:
            t = "-" if r.t_ms is None else f"{r.t_ms:8.0f} ms"
            ok = "" if r.within is None else ("  within" if r.within else "  OVER BOUND")
            rec = "" if r.t_recovery_ms is None else f"; recovered in {r.t_recovery_ms:.0f} ms"
            out.append(f"  [{r.path}] {r.fault}: {t} / {r.bound_ms / 1000:g} s{ok} -> {r.sees}{rec}")
        return out

    def finish(self, config=None) -> None:
        """Writes the JSON, prints the table (pytest's terminal reporter when there is one) and
        checks the rows against docs/faults.md (raises AssertionError on a difference)."""
        path = self.write()
        lines = self.lines() + ([f"  (written to {path})"] if path else [])
        problems = check_docs(self.rows)
        if problems:
            lines += ["  docs/faults.md does not match these rows (python3 -m cbharness.faultreport "
                      "--update-docs after a full run of the fault tests):"] + [f"    {p}" for p in problems]
        tr = config.pluginmanager.get_plugin("terminalreporter") if config is not None else None
        capman = config.pluginmanager.get_plugin("capturemanager") if config is not None else None
        if tr is not None and capman is not None:
            with capman.global_and_fixture_disabled():  # (a module fixture's teardown is captured)
                tr.write_line("")
                for l in lines:
                    tr.write_line(l)
        else:
            print("\n".join(lines))
        assert not problems, "docs/faults.md does not match the fault tests: " + "; ".join(problems)


# ------------------------------------------------------------------------------------------
# docs/faults.md: the table between the markers is generated from the rows; the columns that
# describe behaviour are checked against every run, the measured ones are a reference run's.

DOC = Path(__file__).resolve().parents[3] / "docs" / "faults.md"
BEGIN, END = "<!-- fault-table:begin (generated: python3 -m cbharness.faultreport --update-docs) -->", \
    "<!-- fault-table:end -->"
HEADER = ["fault", "path", "what the program sees", "bound", "recovery", "local pcscd", "measured",
          "recovered in", "test"]
CHECKED = ("fault", "path", "what the program sees", "bound", "recovery")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _doc_cells(r: Dict) -> Dict[str, str]:
    t = "-" if r["t_ms"] is None else f"{r['t_ms']:.0f} ms"
    rec = "-" if r["t_recovery_ms"] is None else f"{r['t_recovery_ms']:.0f} ms"
    return {"fault": r["fault"], "path": r["path"], "what the program sees": r["sees"],
            "bound": f"{r['bound_ms'] / 1000:g} s", "recovery": r["recovery"], "local pcscd": r["pcscd"] or "-",
            "measured": t, "recovered in": rec, "test": f"`{r['test']}`"}


def _line(cells: Dict[str, str]) -> str:
    return "| " + " | ".join(_cell(cells[h]) for h in HEADER) + " |"


def _split(line: str) -> List[str]:
    parts, cur, esc = [], "", False
    for ch in line.strip().strip("|"):
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == "|":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def _key(test: str, path: str, fault: str) -> Tuple[str, str, str]:
    return (test.strip("`"), path, fault)


def doc_rows(doc: Path = DOC) -> Dict[Tuple[str, str, str], Dict[str, str]]:
    """The doc's table: (test, path, fault) -> cells."""
    text = doc.read_text() if doc.exists() else ""
    if BEGIN not in text or END not in text:
        return {}
    body = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip().splitlines()
    out = {}
    for line in body[2:]:
        cells = dict(zip(HEADER, _split(line)))
        out[_key(cells["test"], cells["path"], cells["fault"])] = cells
    return out


def check_docs(rows: List[FaultRow], doc: Path = DOC) -> List[str]:
    documented = doc_rows(doc)
    problems = []
    for r in rows:
        want = _doc_cells(asdict(r))
        have = documented.get(_key(r.test, r.path, r.fault))
        if have is None:
            problems.append(f"missing row: {_line(want)}")
            continue
        diff = [h for h in CHECKED if have.get(h) != want[h]]  # (fault and path: the key)
        if diff:
            problems.append(f"row {r.test} [{r.path}] differs in {', '.join(diff)}: want {_line(want)}")
    return problems


TESTS = Path(__file__).resolve().parents[2] / "integration"
MODULE_ORDER = ["test_fault_matrix.py", "test_fault_input.py", "test_fault_rdp.py"]


def _order(r: Dict) -> Tuple:
    """The table follows the test files (matrix, input, rdp) and the tests' order in them."""
    file, _, name = r["test"].partition("::")
    func = name.split("[")[0]
    src = TESTS / file
    text = src.read_text() if src.exists() else ""
    pos = text.find(f"def {func}(")
    fi = MODULE_ORDER.index(file) if file in MODULE_ORDER else len(MODULE_ORDER)
    return (fi, pos if pos >= 0 else len(text), name)


def table(directory: Path) -> str:
    rows = []
    for f in sorted(Path(directory).glob("*.json")):
        rows += json.loads(f.read_text())["rows"]
    rows.sort(key=_order)  # (stable: a test's rows keep their order)
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    seen = set()
    for r in rows:  # (the FreeRDP 3 flavour's rows are the FreeRDP 2 ones again: one line each)
        if _key(r["test"], r["path"], r["fault"]) not in seen:
            seen.add(_key(r["test"], r["path"], r["fault"]))
            out.append(_line(_doc_cells(r)))
    return "\n".join(out)


def update_docs(directory: Path, doc: Path = DOC) -> None:
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table(directory)}\n{END}{tail}")


if __name__ == "__main__":
    args = sys.argv[1:]
    update = "--update-docs" in args
    args = [a for a in args if a != "--update-docs"]
    d = Path(args[0]) if args else FaultReport("x").out_dir()
    if update:
        update_docs(d)
        print(f"{DOC}: table rewritten from {d}")
    else:
        print(table(d))
