"""A real xrdp session end to end (xrdp 0.9.21 + sesman + Xorg/xorgxrdp, stock xfreerdp or xfreerdp3):

    emulated desk (private pcscd + vpcd + vicc, tests/harness)
      -> stock xfreerdp /vc:cardbridge (or /dvc:) under Xvfb (add-in exposed at FreeRDP's add-in path
         in a private mount namespace, xrdp_fixture.AddinMount), logging in as a test user
      -> xrdp (private /etc/xrdp; `cdrsession enable xrdp` put [Channels] CBRIDGE=true there) -> the
         session's xrdp-chansrv
      -> cardbridge-shim --desk xrdp (libxrdpapi: the static or the dynamic channel, whichever the
         client opened), started at session start by the product's xrdp hook
         (installers/profile.d/cardbridge.sh: cdrsession start --until-pid $$)
      -> PC/SC programs run by the test AS THAT USER with PCSCLITE_CSOCK_NAME = the session's shim

The same file runs for each FreeRDP flavour (CARDBRIDGE_FREERDP=2|3, see xrdp_fixture.py), and
against the installed packages (CARDBRIDGE_INSTALLED=1, tests/integration/test_installed_packages.py).

xrdp and sesman run in a private mount namespace (private /etc/xrdp, /run/xrdp, and a user that
exists only there): see xrdp_fixture.XrdpServer. Nothing of the host's xrdp is used or started.

Run:  /usr/bin/python3 -m pytest tests/integration/test_xrdp_e2e.py -v      (as root)
Env:  CARDBRIDGE_BUILD_DIR, CARDBRIDGE_ADDIN (see xrdp_fixture.py); CBXRDP_KEEP=1 keeps the
      xrdp test directory (configs, xrdp/sesman/chansrv/session/shim logs).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xrdp_fixture as xf  # noqa: E402
from cbharness import EmulatedDesk, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, xrdp-sesman)")

KEEP = os.environ.get("CBXRDP_KEEP") in ("1", "true", "yes")


class XrdpRig:
    """One xrdp server, one desk, one Xvfb; stock clients connected on demand."""

    def __init__(self, base: Path):
        self.base = base
        self.desk = self.xvfb = self.addin = self.server = self.client = self.session = None
        self.clients = []

    def start(self) -> "XrdpRig":
        self.desk = EmulatedDesk(slots=2, name="xrdpdesk")
        self.desk.start()
        self.desk.insert_card(0)
        self.xvfb = xf.Xvfb(self.base / "xvfb.log").start()
        self.addin = xf.AddinMount(xf.ADDIN, self.base / "addin")
        self.server = xf.XrdpServer(keep=KEEP)
        self.server.start()
        return self

    @property
    def uid(self) -> int:
        return self.server.uid

    # -- clients -----------------------------------------------------------------------------
    def connect(self, name: str, channel: str = "static") -> xf.StockClient:
        c = xf.StockClient(self.addin, self.xvfb, self.server.port, desk_socket=self.desk.socket_path,
                           log_path=self.base / f"xfreerdp-{name}.log", home=self.base / "client-home",
                           channel=channel, user=self.server.user, password=self.server.password, desk_name=name)
        self.clients.append(c)
        self.client = c
        c.start()
        return c

    def disconnect(self, wait_chansrv: bool = True) -> None:
        """Kills the client (a network cut, as far as xrdp can tell); by default waits until the
        session's chansrv has noticed (it listens for the next xrdp connection again)."""
        if self.client is not None:
            self.client.kill()
            self.client = None
        if wait_chansrv and self.session is not None:
            wait_until(lambda: self.server.chansrv_waiting(self.session.display_number), timeout=10,
                       desc="chansrv to notice the disconnect", details=self.report)

    # -- the session's shim, as the session's user ------------------------------------------
    def readers(self) -> list:
        return xf.reader_names(self.session.socket, uid=self.uid)

    def wait_desk(self, name: str, timeout: float = 20.0) -> dict:
        """Waits until the session's shim serves the desk of the client named `name` (a shim that
        missed a disconnect still lists the previous desk's readers until the new hello)."""
        return wait_until(lambda: (lambda st: st if st.get("desk", {}).get("connected") and
                                   st["desk"].get("name") == name else None)(self.status()),
                          timeout=timeout, desc=f"the session's shim to serve desk {name!r}", details=self.report)

    def wait_readers(self, timeout: float = 20.0) -> list:
        want = self.desk.readers
        return wait_until(lambda: self.readers() == want and want, timeout=timeout,
                          desc=f"readers {want} in the xrdp session", details=self.report)

    def status(self) -> dict:
        r = subprocess.run([str(self.server.cdrsession), "status", "--json", "--socket", self.session.socket],
                           capture_output=True, text=True, timeout=10, user=self.uid, group=self.uid, extra_groups=[],
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/"})
        return json.loads(r.stdout)

    def pcsc_session(self) -> xf.PcscSession:
        return xf.PcscSession(self.session.socket, self.server.base, uid=self.uid)

    def shim_log(self) -> str:
        p = Path(self.session.socket).parent / "shim.log"
        try:
            return p.read_text(errors="replace")
        except OSError:
            return ""

    def report(self) -> str:
        parts = [self.server.report()] if self.server else []
        parts += [c.failure_report(25) for c in self.clients]
        return "\n".join(parts)

    def stop(self) -> None:
        for c in self.clients:
            c.stop(grace=3)
        for part in (self.server, self.xvfb, self.desk):
            if part is not None:
                part.stop()


@pytest.fixture(scope="module")
def rig():
    gone = xf.missing("xrdp", "xrdp-sesman", "/usr/sbin/xrdp-chansrv", "/usr/lib/xorg/Xorg", xf.XFREERDP, "Xvfb",
                      "unshare", "openssl", *map(str, (xf.SHIM, xf.CDRSESSION, xf.CB_PCSC)))
    if not xf.ADDIN.exists():
        gone.append(str(xf.ADDIN))
    if not Path("/usr/lib/xorg/modules/drivers/xrdpdev_drv.so").exists():
        gone.append("xorgxrdp")
    if gone:
        pytest.fail(f"missing: {', '.join(gone)}", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="cbxrdp-rig-"))
    t0 = time.monotonic()
    r = XrdpRig(base)
    try:
        r.start()
        c = r.connect("xrdp-desk-a")
        r.session = r.server.wait_session(timeout=30)
        print(f"xrdp session {r.session.display} up {time.monotonic() - t0:.2f}s after start "
              f"(shim {r.session.socket})")
        assert r.session.socket, f"the product's xrdp hook exported no PCSCLITE_CSOCK_NAME\n{r.report()}"
        assert r.session.started and not r.session.start_error, r.session.start_error
        c.wait_channel_open()
        r.wait_desk("xrdp-desk-a")
        yield r
    finally:
        t1 = time.monotonic()
        r.stop()
        print(f"xrdp rig down in {time.monotonic() - t1:.2f}s")
        if not KEEP:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def connected(rig):
    """The session with a stock client connected and the desk's readers visible."""
    if rig.client is None or not rig.client.alive():
        name = f"xrdp-desk-{len(rig.clients)}"
        rig.connect(name)
        rig.client.wait_channel_open()
        rig.wait_desk(name)
    rig.wait_readers()
    return rig


@pytest.fixture(autouse=True)
def _report(rig):
    """Logs of every process of the rig; pytest shows them only when the test failed."""
    yield
    print(rig.report())


def test_session_serves_the_desk(connected):
    """In the xrdp session: the desk's readers (same names and ATRs), GET CHALLENGE, status."""
    rig = connected
    assert rig.session.display_number >= 10
    direct = xf.cb_pcsc(rig.desk.socket_path, "list")
    via = xf.cb_pcsc(rig.session.socket, "list", uid=rig.uid)
    assert [(r["name"], r["atr"]) for r in via["readers"]] == [(r["name"], r["atr"]) for r in direct["readers"]]
    with rig.pcsc_session() as s:
        assert s.hello["establish"] == xf.OK, s.hello
        r = s.call(op="connect", reader=rig.desk.readers[0])
        assert r["rv"] == xf.OK, r
        a = s.call(op="transmit", apdu=xf.GET_CHALLENGE)
        b = s.call(op="transmit", apdu=xf.GET_CHALLENGE)
        for x in (a, b):
            assert x["rv"] == xf.OK and len(x["resp"]) == 20 and x["resp"].endswith("9000"), x
        assert a["resp"] != b["resp"]
    bench = xf.cb_pcsc(rig.session.socket, "bench", "--op", "transmit", "--iterations", "300",
                       "--reader", rig.desk.readers[0], "--apdu", xf.GET_CHALLENGE, uid=rig.uid)
    assert bench.get("rv") == xf.OK, bench
    direct_bench = xf.cb_pcsc(rig.desk.socket_path, "bench", "--op", "transmit", "--iterations", "300",
                              "--reader", rig.desk.readers[0], "--apdu", xf.GET_CHALLENGE)
    st = rig.status()
    assert st["desk"]["connected"] is True, st
    assert st["desk_link"] == "xrdp", st   # no setting: the channel the client opened
    assert "the desk speaks on the static channel" in rig.shim_log(), rig.shim_log()[-2000:]
    assert st["uid"] == rig.uid, st
    print(f"[xrdp] transmit median {bench['latency']['median_us']:.0f} us (p99 {bench['latency']['p99_us']:.0f}) "
          f"through xrdp vs {direct_bench['latency']['median_us']:.0f} us on the desk's pcscd")


def _disconnect_with_handle(rig, wait_chansrv: bool = True):
    """A PC/SC client holding a card handle; then the RDP client is killed."""
    s = rig.pcsc_session()
    assert s.call(op="connect", reader=rig.desk.readers[0])["rv"] == xf.OK
    assert s.call(op="transmit", apdu=xf.GET_CHALLENGE)["rv"] == xf.OK
    rig.disconnect(wait_chansrv=wait_chansrv)
    return s


def test_disconnect_readers_vanish_while_idle(connected):
    """Client gone, nobody uses PC/SC: the readers must still vanish (within 3 s)."""
    rig = connected
    pid = rig.status()["pid"]
    rig.disconnect()
    t0 = time.monotonic()
    # reader_names() raises unless the shim answers (SCARD_E_NO_READERS_AVAILABLE is a real answer).
    wait_until(lambda: rig.readers() == [], timeout=3.0, desc="readers to vanish after the client disconnected")
    print(f"[xrdp] idle disconnect: readers gone after {time.monotonic() - t0:.1f}s")
    assert rig.status()["pid"] == pid, "the session's shim was restarted (crashed?)"


def test_call_to_a_frozen_client_does_not_hang(connected):
    """The client stops answering without closing the connection (SIGSTOP: what a network cut looks
    like to the server); a Transmit on an open handle must fail within 15 s, not hang."""
    rig = connected
    sess = rig.pcsc_session()
    try:
        assert sess.call(op="connect", reader=rig.desk.readers[0])["rv"] == xf.OK
        assert sess.call(op="transmit", apdu=xf.GET_CHALLENGE)["rv"] == xf.OK
        rig.client.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        sess.send(op="transmit", apdu=xf.GET_CHALLENGE)
        try:
            r = sess.read(timeout=15)
        finally:
            print(f"[xrdp] transmit with the client frozen: answered after {time.monotonic() - t0:.1f}s")
        assert r["rv"] != xf.OK, r
    finally:
        sess.p.kill()
        sess.close()
        rig.disconnect()   # SIGKILL works on a stopped process; waits for chansrv to notice


def test_disconnect_then_reconnect(connected):
    """Kill the client: a call on an old handle fails and the readers vanish (within 2 s of it);
    a new xfreerdp logging in as the same user gets the SAME session (display, shim) back, the
    readers come back, the old handle stays dead, a new one works."""
    rig = connected
    before = rig.status()
    sess = _disconnect_with_handle(rig)
    try:
        t0 = time.monotonic()
        r = sess.call(op="transmit", apdu=xf.GET_CHALLENGE)
        # With a local pcscd, a handle whose reader was removed gets SCARD_E_INVALID_VALUE
        # (pcsc-lite's RFReaderInfoById finds no reader for it); SCARD_E_READER_UNAVAILABLE while
        # the removal is under way.
        assert r["rv"] in (xf.E_INVALID_VALUE, xf.E_READER_UNAVAILABLE), \
            f"transmit with the RDP client gone: {r}"
        wait_until(lambda: rig.readers() == [], timeout=2.0, desc="readers to vanish", details=rig.report)
        gone = time.monotonic() - t0
        assert rig.status()["desk"]["connected"] is False

        t1 = time.monotonic()
        name = f"xrdp-desk-{len(rig.clients)}"
        c = rig.connect(name)
        c.wait_channel_open()
        rig.wait_desk(name)
        rig.wait_readers()
        back = time.monotonic() - t1
        again = rig.server.wait_session(timeout=5)
        assert (again.display, again.socket, again.leader) == (rig.session.display, rig.session.socket, rig.session.leader)
        after = rig.status()
        assert after["pid"] == before["pid"], "the session's shim was restarted instead of reused"
        assert after["desk"]["connected"] is True
        assert (rig.server.session_logdir / "reconnect.log").exists(), "sesman did not run reconnectwm.sh"

        r = sess.call(op="transmit", apdu=xf.GET_CHALLENGE)
        # pcscd: a handle of a removed reader stays invalid when a reader of that name comes back.
        assert r["rv"] == xf.E_INVALID_VALUE, f"the old handle after the reconnect: {r}"
        with rig.pcsc_session() as fresh:
            assert fresh.call(op="connect", reader=rig.desk.readers[0])["rv"] == xf.OK
            r = fresh.call(op="transmit", apdu=xf.GET_CHALLENGE)
            assert r["rv"] == xf.OK and r["resp"].endswith("9000"), r
        print(f"[xrdp] readers gone {gone * 1000:.0f} ms after the first call with the client gone; "
              f"back {back:.2f}s after starting the new xfreerdp")
    finally:
        sess.close()


def test_no_reconnect_storm_while_disconnected(connected):
    """With the client gone, the shim waits for the next client without opening channels: from
    the moment it says so until a new client is attached, it connects exactly once (to that
    client). Event-based: no time window is measured."""
    rig = connected
    start = len(rig.shim_log())
    sess = _disconnect_with_handle(rig)
    try:
        sess.call(op="transmit", apdu=xf.GET_CHALLENGE)   # makes the shim notice (see the test above)
        wait_until(lambda: rig.readers() == [], timeout=2.0, desc="readers to vanish")
        waiting = "no RDP client attached to the xrdp session; waiting"
        wait_until(lambda: waiting in rig.shim_log()[start:], timeout=10, desc="the shim to wait for a client",
                   details=rig.report)
        mark = start + rig.shim_log()[start:].index(waiting)
        name = f"xrdp-desk-{len(rig.clients)}"
        c = rig.connect(name)
        c.wait_channel_open()
        rig.wait_desk(name)
        after = rig.shim_log()[mark:]
        n = after.count("connected to desk xrdp")
        print(f"[xrdp] channel connections while waiting for the next client: {n}")
        assert n == 1, f"{n} channel connections between the wait and the next client:\n{after[-3000:]}"
    finally:
        sess.close()


def test_either_channel_no_setting(connected):
    """The session's own shim (started by the hook, `--desk xrdp`: no channel setting) follows the
    client: a reconnect with /dvc:cardbridge is served over the dynamic channel, a reconnect with
    /vc:cardbridge over the static one again, by the same shim process."""
    rig = connected
    pid = rig.status()["pid"]
    want = rig.desk.readers
    for channel in ("dynamic", "static"):
        rig.disconnect()
        wait_until(lambda: rig.readers() == [], timeout=3.0, desc="readers to vanish", details=rig.report)
        before = len(rig.shim_log())
        name = f"xrdp-{channel}-{len(rig.clients)}"
        c = rig.connect(name, channel=channel)
        c.wait_channel_open()
        rig.wait_desk(name)
        rig.wait_readers()
        log = rig.shim_log()[before:]
        assert f"the desk speaks on the {channel} channel" in log, log[-3000:]
        st = rig.status()
        assert st["pid"] == pid and st["desk"]["connected"] is True, st
        r = xf.cb_pcsc(rig.session.socket, "transmit", "--reader", want[0], "--apdu", xf.GET_CHALLENGE, "--count", "3",
                       uid=rig.uid)
        assert r.get("connect") == xf.OK, r
        bench = xf.cb_pcsc(rig.session.socket, "bench", "--op", "transmit", "--iterations", "200", "--reader", want[0],
                           "--apdu", xf.GET_CHALLENGE, uid=rig.uid)
        assert bench.get("rv") == xf.OK, bench
        print(f"[xrdp {channel}] transmit median {bench['latency']['median_us']:.0f} us")


def test_session_end_stops_the_shim(rig):
    """The session's leader exits (logout): sesman ends the session and the shim stops
    (cdrsession --until-pid), removing its socket."""
    sock = rig.session.socket
    assert os.path.exists(sock)
    os.kill(rig.session.leader, 15)
    t0 = time.monotonic()
    wait_until(lambda: not os.path.exists(sock), timeout=10, desc="the shim's socket to go away", details=rig.report)
    wait_until(lambda: not any("cardbridge-shim" in c and "--desk xrdp" in c for c in rig.server.processes().values()),
               timeout=5, desc="the shim to exit", details=rig.report)
    print(f"[xrdp] shim gone {time.monotonic() - t0:.2f}s after the session leader exited")
