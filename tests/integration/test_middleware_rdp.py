"""Real middleware over real RDP: a CPS login and a CDR-like HTTPS login in an xrdp session.

    emulated desk (private pcscd + vpcd + cb-cardsim CPS3/CPS4)
      -> stock xfreerdp /vc:cardbridge (the add-in at FreeRDP's add-in path, xrdp_fixture)
      -> xrdp + sesman + Xorg (private mount namespace, a test user), the session's shim
         started by the product's xrdp hook (cdrsession start --desk xrdp)
      -> in the session, AS ITS USER: a PKCS#11 application (PyKCS11), curl + libp11 and NSS
         tstclnt with OpenSC's module or the Cryptolib CPS, PCSCLITE_CSOCK_NAME = the shim

The PKCS#11 scenario of test_middleware_pkcs11.py runs at the desk's pcscd and in the xrdp
session: the same answers (signatures byte-identical; RSA-PSS verified instead). The CDR
stand-in's page names the card's holder. No PIN byte in the session's shim log nor in the
xfreerdp add-in's log (debug level). The xrdp fixture (xrdp_fixture.py) is used as it is.
The Cryptolib cases are skipped with the reason when it is not unpacked (scripts/get-cryptolib).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xrdp_fixture as xf  # noqa: E402
from cbharness import EmulatedDesk, wait_until  # noqa: E402
from cbharness.cdr import CdrStandIn, curl_login, nss_login  # noqa: E402
from cbharness.pkcs11 import Middleware, SimCard, find_cryptolib, login_scenario  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, xrdp-sesman)")

PIN = "64209137"
WRONG_PIN = "31759820"
CRYPTOLIB, MISSING = find_cryptolib()
needs_cryptolib = pytest.mark.skipif(CRYPTOLIB is None, reason=MISSING or "no Cryptolib")


class Session:
    """Desk with cb-cardsim, Xvfb, the add-in mount, xrdp, one stock client, its session."""

    def __init__(self, base: Path):
        self.base = base
        self.desk = self.card = self.xvfb = self.addin = self.server = self.client = self.session = None

    def start(self) -> "Session":
        self.desk = EmulatedDesk(slots=2, name="mwrdp").start()
        self.card = SimCard(self.desk, 0, pin=PIN, log_dir=self.base)
        self.card.start(profile="cps3")
        self.xvfb = xf.Xvfb(self.base / "xvfb.log").start()
        self.addin = xf.AddinMount(xf.ADDIN, self.base / "addin")
        self.server = xf.XrdpServer()
        self.server.start()
        self.client = xf.StockClient(self.addin, self.xvfb, self.server.port, desk_socket=self.desk.socket_path,
                                     log_path=self.base / "xfreerdp.log", home=self.base / "client-home",
                                     user=self.server.user, password=self.server.password, desk_name="mw-desk")
        self.client.start()
        self.session = self.server.wait_session(timeout=30)
        assert self.session.socket, f"the xrdp hook exported no PCSCLITE_CSOCK_NAME\n{self.report()}"
        self.client.wait_channel_open()
        self.wait_card()
        return self

    @property
    def uid(self) -> int:
        return self.server.uid

    def session_view(self):
        return [(r["name"], r["atr"]) for r in xf.cb_pcsc(self.session.socket, "list", uid=self.uid).get("readers", [])]

    def wait_card(self) -> None:
        want = [(r["name"], r["atr"]) for r in xf.cb_pcsc(self.desk.socket_path, "list")["readers"]]
        wait_until(lambda: self.session_view() == want, timeout=30, desc="the desk's card in the xrdp session",
                   details=self.report)

    def use(self, profile: str) -> dict:
        if self.card.profile != profile or self.card.proc is None:
            self.card.restart(profile=profile)
        else:
            self.card.restart()  # a fresh card: PIN counter at 3
        self.wait_card()
        return self.card.info()

    def shim_log(self) -> str:
        p = Path(self.session.socket).parent / "shim.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def report(self) -> str:
        parts = [self.server.report()] if self.server else []
        if self.client:
            parts.append(self.client.failure_report(25))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.client:
            self.client.stop(grace=3)
        if self.card:
            self.card.stop()
        for part in (self.server, self.xvfb, self.desk):
            if part is not None:
                part.stop()


@pytest.fixture(scope="module")
def rdp():
    gone = xf.missing("xrdp", "xrdp-sesman", "/usr/sbin/xrdp-chansrv", "/usr/lib/xorg/Xorg", "xfreerdp", "Xvfb",
                      "unshare", "setpriv", "openssl", *map(str, (xf.SHIM, xf.CDRSESSION, xf.CB_PCSC)))
    if not xf.ADDIN.exists():
        gone.append(str(xf.ADDIN))
    if gone:
        pytest.fail(f"missing: {', '.join(gone)}", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="cbmwrdp-"))
    os.chmod(base, 0o755)
    s = Session(base)
    try:
        t0 = time.monotonic()
        s.start()
        print(f"xrdp session {s.session.display} with the card after {time.monotonic() - t0:.1f}s")
        yield s
    finally:
        s.stop()
        shutil.rmtree(base, ignore_errors=True)


def comparable(ops, results):
    return [{k: v for k, v in r.items() if not (k == "signature" and "pss" in ops[i])} for i, r in enumerate(results)]


CASES = [pytest.param("opensc", "cps3", id="opensc-cps3"),
         pytest.param("cryptolib", "cps3", id="cryptolib-cps3", marks=needs_cryptolib),
         pytest.param("cryptolib", "cps4", id="cryptolib-cps4", marks=needs_cryptolib)]


@pytest.mark.parametrize("kind,profile", CASES)
def test_pkcs11_login_in_the_xrdp_session(rdp, kind, profile):
    ops = login_scenario(kind, profile, PIN, WRONG_PIN)
    out = {}
    for where in ("desk", "xrdp"):
        info = rdp.use(profile)
        mw = Middleware(kind, uid=rdp.uid if where == "xrdp" else None)
        try:
            out[where] = mw.run(rdp.desk.socket_path if where == "desk" else rdp.session.socket, ops)
        finally:
            mw.cleanup()
    desk, xrdp = out["desk"], out["xrdp"]
    assert comparable(ops, desk) == comparable(ops, xrdp), f"desk and xrdp session differ:\n{desk}\n{xrdp}\n{rdp.report()}"
    assert desk[1]["rv"] == "CKR_OK" and desk[1]["label"].startswith(info["token_label"][:14]), desk[1]
    assert [r["rv"] for r in desk if r["op"] == "login"] == ["CKR_PIN_INCORRECT", "CKR_OK"]
    signs = [r for r in desk if r["op"] == "sign"]
    assert signs and all(r["rv"] == "CKR_OK" and len(r["signature"]) == 512 for r in signs), signs
    pss = sum(1 for o in ops if "pss" in o)
    print(f"[{kind} {profile}] desk = xrdp session: token '{desk[1]['label']}', {len(signs) - pss} PKCS#1 signatures "
          f"byte-identical" + (f", {pss} RSA-PSS (salted: both valid lengths, not compared)" if pss else ""))


@pytest.fixture(scope="module")
def cdr(rdp):
    server = CdrStandIn(rdp.card.export(rdp.base / "card-ca") / "ca.pem", rdp.base / "cdr").start()
    yield server
    server.stop()


LOGINS = [pytest.param("opensc", "cps3", "curl", id="opensc-cps3-curl"),
          pytest.param("opensc", "cps3", "nss", id="opensc-cps3-nss"),
          pytest.param("cryptolib", "cps3", "curl", id="cryptolib-cps3-curl", marks=needs_cryptolib),
          pytest.param("cryptolib", "cps3", "nss", id="cryptolib-cps3-nss", marks=needs_cryptolib),
          pytest.param("cryptolib", "cps4", "curl", id="cryptolib-cps4-curl", marks=needs_cryptolib),
          pytest.param("cryptolib", "cps4", "nss", id="cryptolib-cps4-nss", marks=needs_cryptolib)]


@pytest.mark.parametrize("kind,profile,client", LOGINS)
def test_cdr_login_in_the_xrdp_session(rdp, cdr, kind, profile, client):
    info = rdp.use(profile)
    mw = Middleware(kind, uid=rdp.uid)
    try:
        if client == "curl":
            r = curl_login(mw, rdp.session.socket, cdr, PIN)
        else:
            token = mw.run(rdp.session.socket, [{"op": "token"}])[0]
            r = nss_login(mw, rdp.session.socket, cdr, PIN, token["label"])
    finally:
        mw.cleanup()
    assert r.returncode == 0, f"{r.client}: {r.stderr[-2000:]}\n{cdr.error_log()}\n{rdp.report()}"
    assert r.holder == info["holder"]["common_name"], r.page
    print(f"\n[xrdp {kind} {profile} {r.client}] {r.page.strip()}")


def test_no_pin_in_the_sessions_logs(rdp):
    """Last: every login above went through this session's shim and the client's add-in."""
    logs = {"shim (session)": rdp.shim_log(), "xfreerdp add-in": rdp.client.proc.log_text()}
    assert re.search(r"transmit 0[01] 20 00 01 <PIN redacted>", logs["shim (session)"] + logs["xfreerdp add-in"]), \
        "no redacted VERIFY in the logs: the search would prove nothing"
    for name, text in logs.items():
        for pin in (PIN, WRONG_PIN):
            hexes = [f"{b:02x}" for b in pin.encode()]
            for rx in (re.compile(r"(?:\s|:|,|-|0x|\\x)*".join(hexes), re.I), re.compile(re.escape(pin))):
                m = rx.search(text)
                assert m is None, f"PIN {pin} in the {name} log: ...{text[max(0, m.start() - 80):m.end() + 20]}"
