"""The desk link over mutually authenticated TLS 1.3 (tls:HOST:PORT), with real parts:
emulated desk <- cardbridge-desk --listen tls:... <- cardbridge-shim --desk tls:... <- cb-pcsc.

Certificates are made at test time with the openssl CLI: one CA, a desk and a server
certificate, and a rogue self-signed one.
"""
import os
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


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=CardBridge test CA", cwd=d)
    for name in ("desk", "server"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}.test", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}.test\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2",
            "-subj", "/CN=rogue", cwd=d)
    return d


@pytest.fixture
def tls_desk(pki, tmp_path):
    with EmulatedDesk(slots=2, cards=[0]) as desk:
        log = tmp_path / "desk.log"
        # port 0: the agent holds the port the kernel gives it (read back from /proc)
        agent = Proc([DESK, "--listen", "tls:127.0.0.1:0", "--tls-cert", pki / "desk.pem", "--tls-key",
                      pki / "desk.key", "--tls-ca", pki / "ca.pem", "--log-level", "debug"],
                     env=desk.full_env(), name="cardbridge-desk", log_path=log).start()
        wait_until(lambda: "listening on" in log.read_text(), timeout=HANG_GUARD_S, desc="desk agent listening")
        [port] = wait_until(lambda: netinfo.listening_tcp_ports(agent.pid), timeout=HANG_GUARD_S,
                            desc="the desk agent's port")
        yield desk, port, log
        agent.stop()


def start_shim(tmp_path, port, cert, key, ca, peer_name=None, name="s"):
    d = tmp_path / name
    d.mkdir(mode=0o700)
    sock = d / "pcscd.comm"
    log = tmp_path / f"shim-{name}.log"
    argv = [SHIM, "--socket", sock, "--desk", f"tls:127.0.0.1:{port}", "--tls-cert", cert, "--tls-key", key,
            "--tls-ca", ca, "--log-level", "debug"]
    if peer_name:
        argv += ["--tls-peer-name", peer_name]
    return Proc(argv, name="cardbridge-shim", log_path=log).start(), sock, log


def test_cards_work_over_mutual_tls(pki, tls_desk, tmp_path):
    desk, port, desk_log = tls_desk
    shim, sock, log = start_shim(tmp_path, port, pki / "server.pem", pki / "server.key", pki / "ca.pem", "desk.test")
    try:
        wait_until(lambda: "connected, protocol" in log.read_text(), timeout=HANG_GUARD_S, desc="shim connected over TLS")
        r = cb_pcsc(sock, "transmit", "--apdu", "0084000008", "--count", "2")
        assert r["connect"] == "0x00000000"
        assert r["rvs"] == ["0x00000000", "0x00000000"]
        assert r["responses"][0] != r["responses"][1] and all(x.endswith("9000") for x in r["responses"])
        assert "over TLS (/CN=server.test)" in desk_log.read_text()
    finally:
        shim.stop()


def test_wrong_server_name_is_refused(pki, tls_desk, tmp_path):
    desk, port, _ = tls_desk
    shim, sock, log = start_shim(tmp_path, port, pki / "server.pem", pki / "server.key", pki / "ca.pem", "other.test")
    try:
        wait_until(lambda: "certificate verify failed" in log.read_text(), timeout=HANG_GUARD_S, desc="name check failure logged")
        assert "connected, protocol" not in log.read_text()
        assert cb_pcsc(sock, "list").get("list") == "0x8010002E"  # no readers: nothing crossed
    finally:
        shim.stop()


def test_certificate_of_another_ca_is_refused_by_the_desk(pki, tls_desk, tmp_path):
    desk, port, desk_log = tls_desk
    shim, sock, log = start_shim(tmp_path, port, pki / "rogue.pem", pki / "rogue.key", pki / "ca.pem")
    try:
        wait_until(lambda: "TLS connection refused" in desk_log.read_text(), timeout=HANG_GUARD_S, desc="desk refuses the rogue")
        assert "connected, protocol" not in log.read_text()
    finally:
        shim.stop()


def test_plaintext_and_old_tls_are_refused(pki, tls_desk):
    desk, port, desk_log = tls_desk
    # A cardbridge frame in clear text: no plaintext fallback.
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) as s:
        s.sendall(b"\x00\x00\x00\x05hello")
        s.settimeout(HANG_GUARD_S)
        assert s.recv(100) == b""
    # TLS 1.2 with a valid client certificate: refused (TLS 1.3 only).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) as raw:
        with pytest.raises(ssl.SSLError):
            with ctx.wrap_socket(raw) as t:
                t.recv(1)
    wait_until(lambda: desk_log.read_text().count("TLS connection refused") >= 2, timeout=HANG_GUARD_S,
               desc="both refusals logged")


def test_tls_needs_all_three_files(pki, tmp_path):
    r = subprocess.run([DESK, "--listen", "tls:127.0.0.1:1", "--tls-cert", pki / "desk.pem"], capture_output=True,
                       text=True, timeout=HANG_GUARD_S, env={k: v for k, v in os.environ.items() if not k.startswith("CARDBRIDGE_TLS")})
    assert r.returncode == 2 and "mutual authentication" in r.stderr
