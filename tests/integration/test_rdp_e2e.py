"""End to end over a real RDP channel (FreeRDP 2 or 3, loopback, TLS):

    emulated desk (private pcscd + vpcd + vicc, tests/harness)
      -> cb-rdp-client with the CardBridge add-in (static /vc or dynamic /dvc CBRIDGE channel)
      -> cb-rdp-host (libfreerdp-server2 + WinPR WTS) -> cardbridge::shim::WtsRelay
      -> relay socket -> cardbridge-shim --desk unix:RELAY
      -> PC/SC programs on the shim's socket (cb-pcsc, pyscard)

Fault scenarios pin the exact PC/SC code a local pcscd 1.9.9 gives for the same event (the
RDP client going away is the desk's readers being unplugged, for the programs on the server):
  * a call in flight at the card when the reader goes: SCARD_E_READER_UNAVAILABLE
    (ifdwrapper.c@1.9.9 IFDTransmit: IFD_NO_SUCH_DEVICE -> SCARD_E_READER_UNAVAILABLE);
  * later calls on a handle of that reader (Transmit, Begin, End, ...): SCARD_E_INVALID_VALUE
    (readerfactory.c@1.9.9 RFReaderInfoById finds the handle in no reader);
  * SCardStatus on it: SCARD_E_READER_UNAVAILABLE (winscard_clnt.c@1.9.9 SCardStatus: the
    handle's reader is not in the reader array; the daemon is not asked).
Waits end on events (log lines, reader lists, a call seen blocked); time bounds are hang guards.
How long things take is printed; the benchmarks (tests/bench/rdp_bench.py) measure it.

Run:  /usr/bin/python3 -m pytest tests/integration/test_rdp_e2e.py -v
Env:  CARDBRIDGE_BUILD_DIR  build directory (default <repo>/build)
      CARDBRIDGE_FREERDP_BUILD_DIR  build directory of the FreeRDP flavour under test: add-in, cb-rdp-host,
                            cb-rdp-client (default: CARDBRIDGE_BUILD_DIR; scripts/test-all runs the FreeRDP 3
                            flavour from build-frdp3)
      CARDBRIDGE_ADDIN      add-in to load (default $CARDBRIDGE_FREERDP_BUILD_DIR/client-plugin/libcardbridge-client.so)
      CBHARNESS_KEEP=1      keep the desk's directory (logs)
Logs of every process of a test are in its pytest tmp_path and are printed when it fails.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
from cbharness import GATED_APDU, HANG_GUARD_S, EmulatedDesk, Proc, wait_until  # noqa: E402

from core_support import RV, SESSION_SCRIPT, PcscSession, cb_pcsc  # noqa: E402  (conftest's clients)

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
FREERDP_BUILD = Path(os.environ.get("CARDBRIDGE_FREERDP_BUILD_DIR", BUILD))
ADDIN = Path(os.environ.get("CARDBRIDGE_ADDIN", FREERDP_BUILD / "client-plugin" / "libcardbridge-client.so"))
HOST = FREERDP_BUILD / "tests" / "tools" / "rdp_host" / "cb-rdp-host"
CLIENT = FREERDP_BUILD / "tests" / "tools" / "rdp_client" / "cb-rdp-client"
SHIM = BUILD / "server-shim" / "cardbridge-shim"
CB_PCSC = BUILD / "tests" / "tools" / "cb-pcsc"

GET_CHALLENGE = "0084000008"
QUIET_TESTS = {"test_latency"}
OK = "0x00000000"
# pcscd 1.9.9 for a handle whose reader was unplugged (see the module docstring)
ORPHAN_RV = RV["E_INVALID_VALUE"]            # 0x80100011: RFReaderInfoById
LOST_IN_FLIGHT_RV = RV["E_READER_UNAVAILABLE"]  # 0x80100017: IFDTransmit, IFD_NO_SUCH_DEVICE
STATUS_LOST_RV = RV["E_READER_UNAVAILABLE"]     # 0x80100017: libpcsclite's SCardStatus


def _require(path: Path, what: str) -> None:
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: build first (CARDBRIDGE_BUILD_DIR={BUILD})", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _binaries():
    _require(HOST, "cb-rdp-host")
    _require(CLIENT, "cb-rdp-client")
    _require(SHIM, "cardbridge-shim")
    _require(CB_PCSC, "cb-pcsc")
    _require(ADDIN, "the add-in")


@pytest.fixture(scope="module")
def desk():
    """Two virtual readers; a card in the first one, with the harness's test INS (80 EE) for
    large and extended APDUs and its gated INS (80 EF: held at the card until released)."""
    d = EmulatedDesk(slots=2, name="rdpdesk")
    d.start()
    try:
        d.insert_card(0, test_ins=True, extended=True, gate=True)
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def cert_dir():
    d = Path(tempfile.mkdtemp(prefix="cbrdp-cert-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Rig:
    """cb-rdp-host + cardbridge-shim, and cb-rdp-clients started on demand."""

    def __init__(self, mode: str, desk: EmulatedDesk, logs: Path, cert_dir: Path, log_level: str = "debug"):
        self.mode = mode
        self.log_level = log_level
        self.desk = desk
        self.logs = logs
        self.cert_dir = cert_dir
        # AF_UNIX paths are short: keep the sockets out of pytest's long tmp_path.
        self.rt = Path(tempfile.mkdtemp(prefix="cbrdp-"))
        self.relay = str(self.rt / "relay" / "desk.sock")
        self.shim_socket = str(self.rt / "shim" / "pcscd.comm")
        self.script = self.rt / "pcsc_session.py"
        self.script.write_text(SESSION_SCRIPT)
        self.sessions: list[PcscSession] = []
        self.procs: list[Proc] = []
        self.port = 0
        self.host: Proc | None = None
        self.shim: Proc | None = None

    # -- processes -------------------------------------------------------------------------
    def _proc(self, argv, name, env=None) -> Proc:
        p = Proc(argv, name=name, log_path=self.logs / f"{name}.log", env=env).start()
        self.procs.append(p)
        return p

    def start_host(self) -> None:
        self.host = self._proc([HOST, "--port", "0", "--bind", "127.0.0.1", "--make-cert", self.cert_dir,
                                "--relay", self.relay, "--channel", self.mode, "--log-level", self.log_level], "host")
        line = wait_until(lambda: next((l for l in self.host.log_text().splitlines() if l.startswith("READY port=")),
                                       None),
                          timeout=HANG_GUARD_S, desc="cb-rdp-host READY line",
                          abort=lambda: None if self.host.alive() else self.host.exit_description(),
                          details=lambda: self.host.log_tail(30))
        self.port = int(line.split("=", 1)[1])

    def start_shim(self) -> None:
        self.shim = self._proc([SHIM, "--socket", self.shim_socket, "--desk", f"unix:{self.relay}",
                                "--log-level", self.log_level], "shim")
        wait_until(lambda: os.path.exists(self.shim_socket), timeout=HANG_GUARD_S, desc="the shim's socket",
                   abort=lambda: None if self.shim.alive() else self.shim.exit_description())

    def start_client(self, name: str, desk_name: str | None = None) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PCSCLITE_")}
        env.update(self.desk.env())
        args = f"log-level:{self.log_level},name:{desk_name or name}"
        p = self._proc([CLIENT, "--host", "127.0.0.1", "--port", str(self.port), "--addin", ADDIN,
                        "--mode", self.mode, "--addin-args", args, "--client-name", name], f"client-{name}", env=env)
        wait_until(lambda: "CONNECTED" in p.log_text().splitlines(), timeout=HANG_GUARD_S,
                   desc=f"client {name} to connect",
                   abort=lambda: None if p.alive() else p.exit_description(), details=lambda: p.log_tail(30))
        return p

    def session(self, name: str = "shim-program", sock: Optional[str] = None,
                env: Optional[Dict[str, str]] = None) -> PcscSession:
        """A PC/SC program (pyscard, core_support.PcscSession) on the shim's socket (or sock),
        with its context established; closed with the rig."""
        s = PcscSession(sock or self.shim_socket, self.script, name, env)
        self.sessions.append(s)
        assert s.rv("establish") == OK
        return s

    def desk_session(self, name: str = "desk-program", env: Optional[Dict[str, str]] = None) -> PcscSession:
        """A PC/SC program at the desk itself (on the desk's pcscd)."""
        return self.session(name, self.desk.socket_path, env)

    # -- observations on the shim side -----------------------------------------------------
    def shim_readers(self) -> list[str]:
        r = cb_pcsc(self.shim_socket, "list")
        return [x["name"] for x in r.get("readers", [])] if r.get("list") == OK else []

    def wait_readers(self, timeout: float = HANG_GUARD_S) -> list[str]:
        want = self.desk.readers
        return wait_until(lambda: self.shim_readers() == want and want, timeout=timeout,
                          desc=f"readers {want} on the shim", details=self.report)

    def report(self) -> str:
        return "\n".join(p.failure_report(25) for p in self.procs)

    def stop(self) -> None:
        for s in self.sessions:
            s.close()
        for p in reversed(self.procs):
            p.stop(grace=5)
        shutil.rmtree(self.rt, ignore_errors=True)


@pytest.fixture(params=["static", "dynamic"])
def rig(request, desk, tmp_path, cert_dir):
    # Measurements run every process at log level info (debug logging costs latency).
    level = "info" if request.node.originalname in QUIET_TESTS else "debug"
    r = Rig(request.param, desk, tmp_path, cert_dir, level)
    try:
        r.start_host()
        r.start_shim()
        yield r
    finally:
        r.stop()
        # Captured output: pytest shows it when the test failed.
        print(r.report())


def transmit_ok(sess: PcscSession, apdu: str, what: str, h: str = "h") -> str:
    r = sess.call("transmit", apdu=apdu, h=h)
    hint = ""
    if r["rv"] == "0x80100011":
        hint = (" -- SCARD_E_INVALID_VALUE from the desk: inside a FreeRDP client the add-in's SCard* calls "
                "bind to libwinpr2's Windows-ABI SCard* exports instead of libpcsclite's (see the RDP relay "
                "report: pcsc_card_api.cpp must dlsym libpcsclite)")
    assert r["rv"] == OK, f"{what}: {r}{hint}"
    return r["resp"]


# ===================================================================================== tests

def test_relay_socket_is_private(rig):
    relay = Path(rig.relay)
    assert stat.S_IMODE(relay.parent.stat().st_mode) == 0o700
    st = relay.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_card_over_rdp(rig, desk):
    """Readers appear on the shim; GET CHALLENGE twice; a large and an extended APDU."""
    client = rig.start_client("desk-a")
    t0 = time.monotonic()
    assert rig.wait_readers() == desk.readers
    print(f"[{rig.mode}] readers on the shim {time.monotonic() - t0:.3f}s after the client connected")
    lst = cb_pcsc(rig.shim_socket, "list")
    direct = cb_pcsc(desk.socket_path, "list")
    assert [(x["name"], x["atr"]) for x in lst["readers"]] == [(x["name"], x["atr"]) for x in direct["readers"]]

    sess = rig.session()
    try:
        r = sess.call("connect", reader=desk.readers[0])
        assert r["rv"] == OK, r
        a = transmit_ok(sess, GET_CHALLENGE, "GET CHALLENGE #1")
        b = transmit_ok(sess, GET_CHALLENGE, "GET CHALLENGE #2")
        for resp in (a, b):
            assert len(resp) == 2 * (8 + 2) and resp.endswith("9000"), resp
        assert a[:16] != b[:16], "two GET CHALLENGEs returned the same random"

        # Short APDU, 256-byte response (test INS: P1P2 = length of a 00 01 02 .. pattern).
        resp = transmit_ok(sess, "80EE010000", "short APDU with a 256-byte response")
        assert bytes.fromhex(resp) == bytes(i & 0xFF for i in range(256)) + b"\x90\x00"

        # Extended APDU both ways: 4000 bytes echoed back.
        data = bytes((7 * i + 3) & 0xFF for i in range(4000))
        apdu = "80EE000000" + f"{len(data):04X}" + data.hex() + "0000"
        resp = transmit_ok(sess, apdu, "extended APDU echo")
        assert bytes.fromhex(resp) == data + b"\x90\x00"

        # Extended Le: 20000 pattern bytes from a command without data.
        resp = transmit_ok(sess, "80EE4E2000" + "0000", "extended-Le APDU (20000 bytes)")
        assert bytes.fromhex(resp) == bytes(i & 0xFF for i in range(20000)) + b"\x90\x00"
    finally:
        sess.close()
    assert client.alive()
    # The add-in logs through FreeRDP's WLog (issue 10), under com.cardbridge, while the client runs.
    # (FreeRDP 3's default WLog layout adds the function: "... - [sink_it_]: static channel ...".)
    wlog_line = re.compile(rf"\[INFO\]\[com\.cardbridge\.addin\] - (\[\w+\]: )?{rig.mode} channel CBRIDGE open")
    wait_until(lambda: wlog_line.search(client.log_text()),
               timeout=HANG_GUARD_S, desc="the add-in's WLog lines in the client's output",
               details=lambda: client.log_tail(30))


def test_disconnect_then_reconnect_from_another_desk(rig, desk):
    """Kill the client: the readers vanish, the old handle fails as a handle of an unplugged
    reader does on pcscd (Transmit SCARD_E_INVALID_VALUE, Status SCARD_E_READER_UNAVAILABLE,
    see the module docstring); a second client (another desk name) brings the readers back, a
    new connection works and the old handle stays dead."""
    first = rig.start_client("desk-a")
    rig.wait_readers()
    sess = rig.session()
    assert sess.call("connect", reader=desk.readers[0])["rv"] == OK
    transmit_ok(sess, GET_CHALLENGE, "GET CHALLENGE before the disconnect")

    t0 = time.monotonic()
    first.send_signal(signal.SIGKILL)
    wait_until(lambda: rig.shim_readers() == [], timeout=HANG_GUARD_S, desc="readers to vanish from the shim",
               details=rig.report)
    print(f"[{rig.mode}] readers gone {(time.monotonic() - t0) * 1000:.0f} ms after the client was killed")
    assert sess.call("transmit", apdu=GET_CHALLENGE)["rv"] == ORPHAN_RV
    assert sess.call("status")["rv"] == STATUS_LOST_RV
    assert sess.rv("begin") == ORPHAN_RV

    t1 = time.monotonic()
    rig.start_client("desk-b")
    rig.wait_readers()
    print(f"[{rig.mode}] readers back {time.monotonic() - t1:.3f}s after starting the second client")
    assert "desk 'desk-b'" in rig.shim.log_text(), "the shim did not see the second desk"

    # the old handle stays dead: it is not mapped onto the new desk's reader of the same name
    assert sess.call("transmit", apdu=GET_CHALLENGE)["rv"] == ORPHAN_RV
    fresh = rig.session("fresh")
    assert fresh.call("connect", reader=desk.readers[0])["rv"] == OK
    transmit_ok(fresh, GET_CHALLENGE, "GET CHALLENGE after the reconnect")


def test_takeover_by_second_client(rig, desk):
    """A second client connecting takes the session over: the first one is disconnected in
    an orderly way (exit status 0) and the shim serves the new desk. A program's handle from the
    first desk is a handle of an unplugged reader (pcscd's codes, module docstring)."""
    first = rig.start_client("desk-a")
    rig.wait_readers()
    old = rig.session("old-program")
    assert old.call("connect", reader=desk.readers[0])["rv"] == OK
    second = rig.start_client("desk-b")
    rc = first.wait(HANG_GUARD_S)
    assert rc == 0, f"the client that lost the session exited with {rc}\n{first.log_tail(20)}"
    wait_until(lambda: "desk 'desk-b'" in rig.shim.log_text(), timeout=HANG_GUARD_S, desc="the shim to see desk-b",
               details=rig.report)
    rig.wait_readers()
    sess = rig.session()
    assert sess.call("connect", reader=desk.readers[0])["rv"] == OK
    transmit_ok(sess, GET_CHALLENGE, "GET CHALLENGE through the second client")
    assert old.call("transmit", apdu=GET_CHALLENGE)["rv"] == ORPHAN_RV
    # (a reader of the same name is back: libpcsclite finds it in the array and asks the daemon,
    # which finds the handle in no reader: SCARD_E_INVALID_VALUE, as pcscd)
    assert old.call("status")["rv"] == ORPHAN_RV
    assert second.alive()


def test_orderly_shutdown(rig):
    """SIGTERM to a client: it exits 0 and the readers go. SIGTERM to the host with a client
    connected: the host closes the session in order (the client exits 0), exits 0 itself and
    removes its socket."""
    client = rig.start_client("desk-a")
    rig.wait_readers()
    assert client.stop(grace=HANG_GUARD_S) == 0, client.failure_report(20)
    wait_until(lambda: rig.shim_readers() == [], timeout=HANG_GUARD_S, desc="readers to vanish after the client left",
               details=rig.report)
    second = rig.start_client("desk-b")
    rig.wait_readers()
    assert rig.host.stop(grace=HANG_GUARD_S) == 0, rig.host.failure_report(30)
    assert second.wait(HANG_GUARD_S) == 0, second.failure_report(20)
    assert not os.path.exists(rig.relay)
    assert rig.shim.alive(), rig.shim.failure_report(30)


def test_latency(rig, desk):
    """300 GET CHALLENGEs through the RDP channel all succeed; the median round trip, local
    pcscd vs. through the channel, is reported (measured, not asserted: rdp_bench_quick is the
    benchmark)."""
    rig.start_client("desk-a")
    rig.wait_readers()
    reader = desk.readers[0]
    local = cb_pcsc(desk.socket_path, "bench", "--op", "transmit", "--reader", reader, "--apdu", GET_CHALLENGE,
                    "--iterations", "300")
    remote = cb_pcsc(rig.shim_socket, "bench", "--op", "transmit", "--reader", reader, "--apdu", GET_CHALLENGE,
                     "--iterations", "300")
    assert local.get("rv") == OK and remote.get("rv") == OK, (local, remote)
    assert remote["latency"]["n"] == local["latency"]["n"] == 300, (local, remote)  # every call succeeded
    lm, rm = local["latency"]["median_us"], remote["latency"]["median_us"]
    print(f"[{rig.mode}] transmit median: local pcscd {lm:.0f} us, over RDP {rm:.0f} us "
          f"(p99 {remote['latency']['p99_us']:.0f} us)")
