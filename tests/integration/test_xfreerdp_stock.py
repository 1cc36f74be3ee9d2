"""Stock `xfreerdp` (Debian's freerdp2-x11) or `xfreerdp3` (freerdp3-x11), under Xvfb, with the
CardBridge add-in, end to end:

    emulated desk (private pcscd + vpcd + vicc, tests/harness)
      -> /usr/bin/xfreerdp[3] /vc:cardbridge (or /dvc:cardbridge), the add-in found by FreeRDP itself at
         /usr/lib/x86_64-linux-gnu/freerdp{2,3}/libcardbridge-client.so -- made visible there only
         inside a private mount namespace (xrdp_fixture.AddinMount: tmpfs-backed overlayfs, /usr
         untouched)
      -> cb-rdp-host (libfreerdp-server2 or 3, the same flavour + WinPR WTS) -> WTS relay socket
      -> cardbridge-shim --desk unix:RELAY -> PC/SC programs on the shim's socket

Checks: readers appear on the shim, GET CHALLENGE works through it, killing xfreerdp makes the
readers vanish; static (/vc) and dynamic (/dvc) channel.

Run:  /usr/bin/python3 -m pytest tests/integration/test_xfreerdp_stock.py -v      (as root)
Env:  CARDBRIDGE_BUILD_DIR, CARDBRIDGE_ADDIN, CARDBRIDGE_FREERDP=2|3, CARDBRIDGE_FREERDP_BUILD_DIR
      (see xrdp_fixture.py)
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xrdp_fixture as xf  # noqa: E402
from cbharness import EmulatedDesk, Proc, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (private mount namespaces)")


@pytest.fixture(scope="module")
def env_ok():
    gone = xf.missing(xf.XFREERDP, "Xvfb", "unshare", "ss", *map(str, (xf.RDP_HOST, xf.SHIM, xf.CB_PCSC)))
    if not xf.ADDIN.exists():
        gone.append(str(xf.ADDIN))
    if gone:
        pytest.fail(f"missing: {', '.join(gone)} (build first; scripts/install-deps)", pytrace=False)


@pytest.fixture(scope="module")
def workdir(env_ok):
    d = Path(tempfile.mkdtemp(prefix="cbstock-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def desk(env_ok):
    d = EmulatedDesk(slots=2, name="stockdesk")
    d.start()
    try:
        d.insert_card(0)
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def xvfb(workdir):
    x = xf.Xvfb(workdir / "xvfb.log").start()
    yield x
    x.stop()


@pytest.fixture(scope="module")
def addin(workdir):
    m = xf.AddinMount(xf.ADDIN, workdir / "addin")
    m.host_view = _host_addin_dir()
    problem = m.check()
    if problem:
        pytest.fail(problem, pytrace=False)
    return m


def _host_addin_dir():
    return sorted(os.listdir(xf.ADDIN_DIR)) if os.path.isdir(xf.ADDIN_DIR) else None


class HostRig:
    """cb-rdp-host + cardbridge-shim on its relay socket."""

    def __init__(self, mode: str, logs: Path, certs: Path):
        self.mode = mode
        self.logs = logs
        self.rt = Path(tempfile.mkdtemp(prefix="cbstock-rt-"))   # short AF_UNIX paths
        self.relay = str(self.rt / "relay" / "desk.sock")
        self.shim_socket = str(self.rt / "shim" / "pcscd.comm")
        self.procs: list = []
        self.host = Proc([xf.RDP_HOST, "--port", "0", "--bind", "127.0.0.1", "--make-cert", certs, "--relay", self.relay,
                          "--channel", mode, "--log-level", "debug"], name="host", log_path=logs / "host.log").start()
        self.procs.append(self.host)
        line = wait_until(lambda: next((l for l in self.host.log_text().splitlines() if l.startswith("READY port=")), None),
                          timeout=20, desc="cb-rdp-host READY line",
                          abort=lambda: None if self.host.alive() else self.host.exit_description(),
                          details=lambda: self.host.log_tail(30))
        self.port = int(line.split("=", 1)[1])
        self.shim = Proc([xf.SHIM, "--socket", self.shim_socket, "--desk", f"unix:{self.relay}", "--log-level", "debug"],
                         name="shim", log_path=logs / "shim.log").start()
        self.procs.append(self.shim)
        wait_until(lambda: os.path.exists(self.shim_socket), timeout=10, desc="the shim's socket",
                   abort=lambda: None if self.shim.alive() else self.shim.exit_description())

    def readers(self) -> list:
        return xf.reader_names(self.shim_socket)

    def report(self) -> str:
        return "\n".join(p.failure_report(25) for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(grace=5)
        shutil.rmtree(self.rt, ignore_errors=True)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_stock_xfreerdp(mode, desk, xvfb, addin, workdir, tmp_path):
    """Readers appear, GET CHALLENGE works, xfreerdp killed -> readers vanish."""
    t_start = time.monotonic()
    rig = HostRig(mode, tmp_path, workdir / "certs")
    client = None
    try:
        client = xf.StockClient(addin, xvfb, rig.port, desk_socket=desk.socket_path, log_path=tmp_path / "xfreerdp.log",
                                home=tmp_path / "home", channel=mode, desk_name=f"stock-{mode}")
        rig.procs.append(client.proc)
        t0 = time.monotonic()
        client.start()
        opened = client.wait_channel_open()
        readers = wait_until(lambda: rig.readers() == desk.readers and desk.readers, timeout=15,
                             desc=f"readers {desk.readers} on the shim", details=rig.report)
        t_readers = time.monotonic() - t0
        assert readers == desk.readers
        assert f"desk 'stock-{mode}'" in rig.shim.log_text(), "the shim did not name the stock client's desk"
        # The add-in really was FreeRDP's own pick from its add-in directory, in the stock binary.
        log = client.proc.log_text()
        assert ("static channel add-in loaded" if mode == "static" else "dynamic channel add-in loaded") in log, log[-2000:]
        assert _host_addin_dir() == addin.host_view, "the host's add-in directory changed"

        direct = xf.cb_pcsc(desk.socket_path, "list")
        via = xf.cb_pcsc(rig.shim_socket, "list")
        assert [(r["name"], r["atr"]) for r in via["readers"]] == [(r["name"], r["atr"]) for r in direct["readers"]]

        with xf.PcscSession(rig.shim_socket, tmp_path) as s:
            assert s.hello["establish"] == xf.OK, s.hello
            r = s.call(op="connect", reader=desk.readers[0])
            assert r["rv"] == xf.OK, f"{r}\n{rig.report()}"
            answers = []
            for i in range(2):
                r = s.call(op="transmit", apdu=xf.GET_CHALLENGE)
                assert r["rv"] == xf.OK and len(r["resp"]) == 20 and r["resp"].endswith("9000"), r
                answers.append(r["resp"])
            assert answers[0] != answers[1], "two GET CHALLENGEs returned the same random"

            bench = xf.cb_pcsc(rig.shim_socket, "bench", "--op", "transmit", "--iterations", "200",
                               "--reader", desk.readers[0], "--apdu", xf.GET_CHALLENGE)
            assert bench.get("rv") == xf.OK, bench

            t1 = time.monotonic()
            client.kill()
            # reader_names() raises unless the shim answers: a crashed shim cannot pass for "no readers".
            wait_until(lambda: rig.readers() == [], timeout=3, desc="readers to vanish after xfreerdp was killed",
                       details=rig.report)
            gone = time.monotonic() - t1
            r = s.call(op="transmit", apdu=xf.GET_CHALLENGE)
            # A local pcscd answers a handle whose reader was removed with SCARD_E_INVALID_VALUE
            # (pcsc-lite's RFReaderInfoById no longer finds the handle's reader).
            assert r["rv"] == xf.E_INVALID_VALUE, f"transmit on a handle of the vanished desk: {r}"
            assert rig.shim.alive(), rig.shim.exit_description()
        print(f"[stock xfreerdp {mode}] channel open {opened:.2f}s, readers on the shim {t_readers:.2f}s after start; "
              f"transmit median {bench['latency']['median_us']:.0f} us p99 {bench['latency']['p99_us']:.0f} us; "
              f"readers gone {gone * 1000:.0f} ms after kill; test {time.monotonic() - t_start:.1f}s")
    finally:
        rig.stop()
        print(rig.report())
