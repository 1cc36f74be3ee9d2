"""The desk link over mutually authenticated TLS 1.3 (tls:HOST:PORT), with real parts:
emulated desk <- cardbridge-desk --listen tls:... <- cardbridge-shim --desk tls:... <- cb-pcsc.

Both ends authorise the peer, not just its CA (docs/security.md): the shim pins the desk it
expects (--tls-peer-name or --tls-peer-fingerprint), the desk has an allow-list of servers
(--tls-allow-server), each certificate must carry its role's extended key usage (a desk
serverAuth, a server clientAuth), and both audit trails record the verified certificate, not
the name the peer declares.

Certificates are made at test time with the openssl CLI: one CA; a desk, a server, a web server
of the same CA (both usages: the impersonation a CA signature alone would let through), one
without any extended key usage; and a rogue self-signed one.
"""
import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
from cbharness import HANG_GUARD_S, EmulatedDesk, Proc, wait_until  # noqa: E402
from cbharness import netinfo  # noqa: E402
from core_support import cb_pcsc  # noqa: E402  (conftest's cb-pcsc runner)

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
DESK = BUILD / "client-plugin" / "cardbridge-desk"
SHIM = BUILD / "server-shim" / "cardbridge-shim"
NO_READERS = "0x8010002E"  # SCARD_E_NO_READERS_AVAILABLE: nothing crossed the link

# name -> extended key usage (None: no extension at all)
CERTS = {"desk": "serverAuth", "server": "clientAuth", "web": "serverAuth,clientAuth", "noeku": None}


def openssl(*args, cwd):
    return subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def fingerprint(pem: Path) -> str:
    out = openssl("x509", "-in", pem, "-noout", "-fingerprint", "-sha256", cwd=pem.parent)
    return "sha256:" + out.strip().split("=", 1)[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=CardBridge test CA", cwd=d)
    for name, eku in CERTS.items():
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}.test", cwd=d)
        ext = f"subjectAltName=DNS:{name}.test\n" + (f"extendedKeyUsage={eku}\n" if eku else "")
        (d / f"{name}.ext").write_text(ext)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2",
            "-subj", "/CN=rogue", "-addext", "extendedKeyUsage=serverAuth,clientAuth", cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)  # one owner's secret: a key others can read is refused
    return d


class Agent:
    def __init__(self, pki, tmp_path, desk, cert="desk", allow=("server.test",)):
        self.log = tmp_path / f"agent-{cert}.log"
        argv = [DESK, "--listen", "tls:127.0.0.1:0", "--tls-cert", pki / f"{cert}.pem", "--tls-key", pki / f"{cert}.key",
                "--tls-ca", pki / "ca.pem", "--log-level", "debug"]
        for a in allow:
            argv += ["--tls-allow-server", a]
        self.proc = Proc(argv, env=desk.full_env(), name="cardbridge-desk", log_path=self.log).start()
        wait_until(lambda: "listening on" in self.log.read_text(), timeout=HANG_GUARD_S, desc="desk agent listening")
        [self.port] = wait_until(lambda: netinfo.listening_tcp_ports(self.proc.pid), timeout=HANG_GUARD_S,
                                 desc="the desk agent's port")

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def desk():
    with EmulatedDesk(slots=2, cards=[0]) as d:
        yield d


@pytest.fixture
def agents(pki, tmp_path, desk):
    started = []

    def start(**kw):
        a = Agent(pki, tmp_path, desk, **kw)
        started.append(a)
        return a
    yield start
    for a in started:
        a.proc.stop()


def start_shim(pki, tmp_path, port, cert="server", peer_name="desk.test", peer_fingerprint=None, name="s"):
    d = tmp_path / name
    d.mkdir(mode=0o700)
    sock = d / "pcscd.comm"
    log = tmp_path / f"shim-{name}.log"
    argv = [SHIM, "--socket", sock, "--desk", f"tls:127.0.0.1:{port}", "--tls-cert", pki / f"{cert}.pem",
            "--tls-key", pki / f"{cert}.key", "--tls-ca", pki / "ca.pem", "--log-level", "debug"]
    if peer_name:
        argv += ["--tls-peer-name", peer_name]
    if peer_fingerprint:
        argv += ["--tls-peer-fingerprint", peer_fingerprint]
    return Proc(argv, name="cardbridge-shim", log_path=log).start(), sock, log


def card_works(sock):
    r = cb_pcsc(sock, "transmit", "--apdu", "0084000008", "--count", "2")
    assert r["connect"] == "0x00000000"
    assert r["rvs"] == ["0x00000000", "0x00000000"]
    assert r["responses"][0] != r["responses"][1] and all(x.endswith("9000") for x in r["responses"])


def test_cards_work_over_mutual_tls_and_both_audits_name_the_verified_certificate(pki, agents, tmp_path):
    agent = agents()
    shim, sock, log = start_shim(pki, tmp_path, agent.port)
    try:
        wait_until(lambda: "connected, protocol" in log.read_text(), timeout=HANG_GUARD_S, desc="shim connected over TLS")
        card_works(sock)
        server_fp = fingerprint(pki / "server.pem")[len("sha256:"):].replace(":", "").lower()
        desk_fp = fingerprint(pki / "desk.pem")[len("sha256:"):].replace(":", "").lower()
        m = re.search(r"audit: server connected: declared-name='[^']*' software='[^']*' identity='([^']*)'", agent.text())
        assert m, agent.text()[-3000:]
        assert m.group(1).startswith(f"certificate CN=server.test sha256:{server_fp}")
        m = re.search(r"desk connected: declared-name='[^']*' software='[^']*' identity='([^']*)'", log.read_text())
        assert m, log.read_text()[-3000:]
        assert m.group(1).startswith(f"certificate CN=desk.test sha256:{desk_fp}")
    finally:
        shim.stop()


def test_desk_pinned_by_fingerprint_and_server_allowed_by_fingerprint(pki, agents, tmp_path):
    agent = agents(allow=(fingerprint(pki / "server.pem"),))
    shim, sock, log = start_shim(pki, tmp_path, agent.port, peer_name=None,
                                 peer_fingerprint=fingerprint(pki / "desk.pem"))
    try:
        wait_until(lambda: "connected, protocol" in log.read_text(), timeout=HANG_GUARD_S, desc="shim connected")
        card_works(sock)
    finally:
        shim.stop()


def test_a_same_ca_certificate_of_another_server_is_refused_by_the_desk_before_any_apdu(pki, agents, tmp_path):
    """A web server's certificate from the hospital CA (clientAuth included) is not an allowed server."""
    agent = agents()
    shim, sock, log = start_shim(pki, tmp_path, agent.port, cert="web")
    try:
        wait_until(lambda: "refusing the server link with certificate CN=web.test" in agent.text(),
                   timeout=HANG_GUARD_S, desc="the desk refuses web.test")
        assert "not among the allowed peers" in agent.text()
        assert "audit: server connected" not in agent.text()
        assert "connected, protocol" not in log.read_text()
        assert cb_pcsc(sock, "list").get("list") == NO_READERS
    finally:
        shim.stop()


def test_a_same_ca_certificate_posing_as_the_desk_is_refused_by_the_shim_before_any_apdu(pki, agents, desk, tmp_path):
    """web.test (serverAuth, same CA) listens where the shim expects desk.test: the shim sends nothing."""
    agent = agents(cert="web")
    shim, sock, log = start_shim(pki, tmp_path, agent.port)
    try:
        wait_until(lambda: "refusing the desk link with certificate CN=web.test" in log.read_text(),
                   timeout=HANG_GUARD_S, desc="the shim refuses web.test")
        assert "connected, protocol" not in log.read_text()
        # Not one byte of ours: the desk never saw a hello, so it never served this server.
        assert "audit: server connected" not in agent.text()
        assert cb_pcsc(sock, "list").get("list") == NO_READERS
    finally:
        shim.stop()


def test_certificates_without_their_role_are_refused(pki, agents, tmp_path):
    # a server certificate (clientAuth only) cannot act as a desk ...
    agent = agents(cert="server", allow=("server.test",))
    shim, sock, log = start_shim(pki, tmp_path, agent.port, peer_name="server.test", name="a")
    try:
        wait_until(lambda: "unsuitable certificate purpose" in log.read_text(), timeout=HANG_GUARD_S,
                   desc="the shim refuses a desk without serverAuth")
        assert "connected, protocol" not in log.read_text()
    finally:
        shim.stop()
    # ... and a certificate with no extended key usage is no server.
    agent = agents(allow=("noeku.test",))
    shim, sock, log = start_shim(pki, tmp_path, agent.port, cert="noeku", name="b")
    try:
        wait_until(lambda: "no extended key usage (clientAuth required)" in agent.text(), timeout=HANG_GUARD_S,
                   desc="the desk refuses a server without clientAuth")
        assert "connected, protocol" not in log.read_text()
    finally:
        shim.stop()


def test_wrong_desk_name_is_refused(pki, agents, tmp_path):
    agent = agents()
    shim, sock, log = start_shim(pki, tmp_path, agent.port, peer_name="other.test")
    try:
        wait_until(lambda: "refusing the desk link with certificate CN=desk.test" in log.read_text(),
                   timeout=HANG_GUARD_S, desc="name check failure logged")
        assert "connected, protocol" not in log.read_text()
        assert cb_pcsc(sock, "list").get("list") == NO_READERS
    finally:
        shim.stop()


def test_certificate_of_another_ca_is_refused_by_the_desk(pki, agents, tmp_path):
    agent = agents(allow=("rogue",))
    shim, sock, log = start_shim(pki, tmp_path, agent.port, cert="rogue")
    try:
        wait_until(lambda: "TLS connection refused" in agent.text(), timeout=HANG_GUARD_S, desc="desk refuses the rogue")
        assert "connected, protocol" not in log.read_text()
    finally:
        shim.stop()


def test_plaintext_and_old_tls_are_refused(pki, agents):
    agent = agents()
    # A cardbridge frame in clear text: no plaintext fallback.
    with socket.create_connection(("127.0.0.1", agent.port), timeout=HANG_GUARD_S) as s:
        s.sendall(b"\x00\x00\x00\x05hello")
        s.settimeout(HANG_GUARD_S)
        assert s.recv(100) == b""
    # TLS 1.2 with a valid client certificate: refused (TLS 1.3 only).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", agent.port), timeout=HANG_GUARD_S) as raw:
        with pytest.raises(ssl.SSLError):
            with ctx.wrap_socket(raw) as t:
                t.recv(1)
    wait_until(lambda: agent.text().count("TLS connection refused") >= 2, timeout=HANG_GUARD_S,
               desc="both refusals logged")


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("CARDBRIDGE_TLS")}


def test_tls_needs_all_three_files_and_the_peers_identity(pki, tmp_path):
    r = subprocess.run([DESK, "--listen", "tls:127.0.0.1:1", "--tls-cert", pki / "desk.pem"], capture_output=True,
                       text=True, timeout=HANG_GUARD_S, env=clean_env())
    assert r.returncode == 2 and "mutual authentication" in r.stderr
    files = ["--tls-cert", pki / "desk.pem", "--tls-key", pki / "desk.key", "--tls-ca", pki / "ca.pem"]
    r = subprocess.run([DESK, "--listen", "tls:127.0.0.1:1", *files], capture_output=True, text=True,
                       timeout=HANG_GUARD_S, env=clean_env())
    assert r.returncode == 2 and "--tls-allow-server" in r.stderr, "a CA signature alone authorises no server"
    r = subprocess.run([SHIM, "--socket", tmp_path / "x.comm", "--desk", "tls:127.0.0.1:1", *files],
                       capture_output=True, text=True, timeout=HANG_GUARD_S, env=clean_env())
    assert r.returncode == 2 and "--tls-peer-name or --tls-peer-fingerprint" in r.stderr


def test_a_private_key_other_users_can_read_is_refused(pki, tmp_path):
    """One key per user: a server key shared by every session user would let any of them be "the
    server" to any desk (docs/security.md)."""
    shared = tmp_path / "shared.key"
    shared.write_bytes((pki / "server.key").read_bytes())
    shared.chmod(0o644)
    files = ["--tls-cert", pki / "server.pem", "--tls-key", shared, "--tls-ca", pki / "ca.pem"]
    r = subprocess.run([SHIM, "--socket", tmp_path / "x.comm", "--desk", "tls:127.0.0.1:1", "--tls-peer-name",
                        "desk.test", *files], capture_output=True, text=True, timeout=HANG_GUARD_S, env=clean_env())
    assert r.returncode == 2 and "accessible to other users (mode 0644)" in r.stderr, r
    shared.chmod(0o600)
    os.chown(shared, 65534, 65534)
    r = subprocess.run([SHIM, "--socket", tmp_path / "x.comm", "--desk", "tls:127.0.0.1:1", "--tls-peer-name",
                        "desk.test", *files], capture_output=True, text=True, timeout=HANG_GUARD_S, env=clean_env())
    assert r.returncode == 2 and "belongs to uid 65534" in r.stderr, r
