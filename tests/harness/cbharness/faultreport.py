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
$CARDBRIDGE_BUILD_DIR/fault-matrix/<module>.json and prints the table on the terminal (also when
every test passed). `python3 -m cbharness.faultreport [DIR]` prints the rows of every module as
the Markdown table of docs/faults.md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

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
        path.write_text(json.dumps({"module": self.module, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "prompt_ms": PROMPT_MS, "liveness_ms": LIVENESS_MS,
                                    "rows": [asdict(r) for r in self.rows]}, indent=1) + "\n")
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
        """Writes the JSON and prints the table (pytest's terminal reporter when there is one)."""
        path = self.write()
        lines = self.lines() + ([f"  (written to {path})"] if path else [])
        tr = config.pluginmanager.get_plugin("terminalreporter") if config is not None else None
        capman = config.pluginmanager.get_plugin("capturemanager") if config is not None else None
        if tr is not None and capman is not None:
            with capman.global_and_fixture_disabled():  # (a module fixture's teardown is captured)
                tr.write_line("")
                for l in lines:
                    tr.write_line(l)
        else:
            print("\n".join(lines))


def markdown(directory: Path) -> str:
    """Every module's rows as one Markdown table (docs/faults.md's measured column)."""
    rows = []
    for f in sorted(Path(directory).glob("*.json")):
        rows += json.loads(f.read_text())["rows"]
    out = ["| fault | path | what the program sees | measured | bound | recovery | recovered in | test |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "-" if r["t_ms"] is None else f"{r['t_ms']:.0f} ms"
        rec = "-" if r["t_recovery_ms"] is None else f"{r['t_recovery_ms']:.0f} ms"
        out.append(f"| {r['fault']} | {r['path']} | {r['sees']} | {t} | {r['bound_ms'] / 1000:g} s | {r['recovery']} "
                   f"| {rec} | `{r['test']}` |")
    return "\n".join(out)


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else FaultReport("x").out_dir()
    print(markdown(d))
