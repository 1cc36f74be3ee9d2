"""A stand-in for CDR (Consultation des DRoits) and the real clients that log in to it with
the card's key, for tests and scripts/demo.

    CdrStandIn   Debian's nginx on 127.0.0.1, HTTPS, a client certificate issued by the card
                 simulator's CA required; GET /droits answers a rights-lookup page naming the
                 certificate's holder (its CN)
    curl_login   OpenSSL-based client: curl with libp11's PKCS#11 engine (libengine-pkcs11-openssl)
    nss_login    NSS-based client (the TLS stack of Firefox): an NSS database with the PKCS#11
                 module added by modutil, and NSS's own tstclnt

Both clients take a cbharness.pkcs11.Middleware (OpenSC or the Cryptolib, which then runs in
its private mount namespace) and the PC/SC socket to use (the desk's pcscd, or a CardBridge
shim: the session). The PIN goes through files of mode 0600 (an OpenSSL config, an NSS
password file), never on a command line.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

from .ports import reserve_ports
from .procs import Proc
from .waiting import HarnessError, wait_until

NGINX = "/usr/sbin/nginx"
ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
AUTH_CERT_LABEL = "Certificat d'authentification CPS"
AUTH_KEY_LABEL = "Cle d'authentification CPS"
PAGE_TITLE = "Consultation des droits"
HOLDER_RX = re.compile(r"Professionnel authentifi\S* : ([^<]+)<")

NGINX_CONF = """worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  map $ssl_client_s_dn $holder {{ "~CN=(?<cn>[^,]+)" $cn; default "(inconnu)"; }}
  map $ssl_client_s_dn $rpps {{ "~serialNumber=(?<sn>[0-9]+)" $sn; default "?"; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    ssl_client_certificate {d}/client-ca.pem;
    ssl_verify_client on;
    ssl_verify_depth 1;
    ssl_protocols TLSv1.2 TLSv1.3;
    location = /droits {{
      default_type text/html;
      return 200 "<html><head><title>{title}</title></head><body><h1>{title} (banc de test CardBridge)</h1>\\n<p>Professionnel authentifie : $holder</p>\\n<p>Identifiant : $rpps</p>\\n<p>Protocole : $ssl_protocol</p>\\n<p>Beneficiaire : droits ouverts (donnees fictives)</p></body></html>\\n";
    }}
    location / {{ return 404; }}
  }}
}}
"""


def _server_pki(d: Path) -> None:
    """A CA of the CDR stand-in and its server certificate for 127.0.0.1 / localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.utcnow()
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CDR stand-in test server CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdr.localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "server-ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                     serialization.NoEncryption()))
    os.chmod(d / "server.key", 0o600)


class CdrStandIn:
    """nginx serving https://127.0.0.1:<port>/droits to holders of a certificate issued by
    |client_ca| (the card simulator's CA: cb-cardsim --export-dir)."""

    def __init__(self, client_ca: Path, work_dir: Optional[Path] = None):
        self.dir = Path(work_dir or tempfile.mkdtemp(prefix="cbcdr-"))
        self._own_dir = work_dir is None
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        shutil.copy(client_ca, self.dir / "client-ca.pem")
        self.ports = None
        self.proc: Optional[Proc] = None
        self.port = 0

    @property
    def server_ca(self) -> Path:
        return self.dir / "server-ca.pem"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/droits"

    def start(self) -> "CdrStandIn":
        if not Path(NGINX).exists():
            raise HarnessError(f"{NGINX} missing (nginx-light, scripts/install-deps)")
        _server_pki(self.dir)
        self.ports = reserve_ports(1)
        self.port = self.ports.base
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(d=self.dir, port=self.port, title=PAGE_TITLE))
        # The port lock is ours; nginx binds it (the lock file stays held until stop()).
        self.proc = Proc([NGINX, "-p", str(self.dir), "-c", str(conf)], name="nginx-cdr",
                         log_path=self.dir / "nginx.out").start()
        import socket

        def listening():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        proc = self.proc
        wait_until(listening, timeout=15, desc="the CDR stand-in (nginx) listening",
                   abort=lambda: None if proc.alive() else f"nginx {proc.exit_description()}",
                   details=lambda: self.error_log())
        return self

    def error_log(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3)
            self.proc = None
        if self.ports is not None:
            self.ports.release()
            self.ports = None
        if self._own_dir and os.environ.get("CBHARNESS_KEEP") not in ("1", "true", "yes"):
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Login:
    client: str
    returncode: int
    page: str
    stderr: str

    @property
    def holder(self) -> Optional[str]:
        m = HOLDER_RX.search(self.page)
        return m.group(1).strip() if m else None

    @property
    def protocol(self) -> Optional[str]:
        m = re.search(r"Protocole : (TLSv[0-9.]+)", self.page)
        return m.group(1) if m else None


def _private_dir(prefix: str, uid: Optional[int] = None) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o700)
    if uid is not None:
        os.chown(d, uid, uid)
    return d


def _give(path: Path, uid: Optional[int]) -> None:
    """Files the client reads as the session's user (mw.uid)."""
    if uid is not None:
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                os.chown(os.path.join(root, n), uid, uid)


def curl_login(mw, socket: str, cdr: CdrStandIn, pin: str, *, tls: str = "1.2", timeout: float = 60.0) -> Login:
    """curl + libp11's PKCS#11 engine, the card's authentication certificate and key.

    The client's signature algorithms are limited to RSA PKCS#1 v1.5 in TLS 1.2: OpenSSL would
    otherwise pick RSA-PSS, which neither OpenSC's CPx driver nor the Cryptolib offers on a CPS3
    (TLS 1.3 needs PSS: tls="1.3" for the CPS4 with the Cryptolib)."""
    d = _private_dir("cbcurl-", mw.uid)
    try:
        conf = d / "openssl.cnf"
        lines = ["openssl_conf = openssl_init", "[openssl_init]", "engines = engine_section"]
        if tls == "1.2":
            lines.append("ssl_conf = ssl_section")
        lines += ["[engine_section]", "pkcs11 = pkcs11_section", "[pkcs11_section]", "engine_id = pkcs11",
                  f"dynamic_path = {ENGINE}", f"MODULE_PATH = {mw.module}", f"PIN = {pin}", "init = 0"]
        if tls == "1.2":
            lines += ["[ssl_section]", "system_default = tls_defaults", "[tls_defaults]",
                      "SignatureAlgorithms = RSA+SHA256:RSA+SHA384:RSA+SHA512"]
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        server_ca = d / "server-ca.pem"
        shutil.copy(cdr.server_ca, server_ca)
        _give(d, mw.uid)
        argv = ["curl", "-sS", "--max-time", str(int(timeout)), "--engine", "pkcs11",
                "--cert-type", "ENG", "--cert", f"pkcs11:object={quote(AUTH_CERT_LABEL)};type=cert",
                "--key-type", "ENG", "--key", f"pkcs11:object={quote(AUTH_KEY_LABEL)};type=private",
                "--cacert", str(server_ca), f"--tlsv{tls}", "--tls-max", tls, cdr.url]
        r = subprocess.run(mw.argv(argv), capture_output=True, text=True, timeout=timeout + 30,
                           env=mw.env(socket, {"OPENSSL_CONF": str(conf)}))
        return Login("curl+libp11", r.returncode, r.stdout, r.stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def nss_login(mw, socket: str, cdr: CdrStandIn, pin: str, token_label: str, *, tls: str = "1.2",
              timeout: float = 60.0, wrap: Sequence[str] = (), before_login=None) -> Login:
    """NSS: a fresh database trusting the stand-in's server CA, the PKCS#11 module added with
    modutil, tstclnt sending GET /droits with the certificate "<token>:<label>" (the way
    Firefox finds a card's certificate), the PIN from a password file. |wrap| prefixes the
    tstclnt command (e.g. tests/tools/replay/cb-record, to record its PC/SC calls);
    |before_login| is called once the database is ready (modutil loads the module too: a
    recording of a cold Cryptolib login empties its cache there)."""
    d = _private_dir("cbnss-", mw.uid)
    try:
        db = f"sql:{d}/db"
        (d / "db").mkdir()
        server_ca = d / "server-ca.pem"
        shutil.copy(cdr.server_ca, server_ca)
        _give(d, mw.uid)
        env = mw.env(socket)

        def run(argv, **kw):
            r = subprocess.run(mw.argv(argv), capture_output=True, text=True, env=env, timeout=timeout, **kw)
            if r.returncode != 0:
                raise HarnessError(f"{argv[0]} failed ({r.returncode}): {r.stdout[-1000:]} {r.stderr[-1000:]}")
            return r

        run(["certutil", "-N", "-d", db, "--empty-password"])
        run(["certutil", "-A", "-d", db, "-n", "cdr-server-ca", "-t", "C,,", "-a", "-i", str(server_ca)])
        run(["modutil", "-dbdir", db, "-add", f"cps-{mw.kind}", "-libfile", str(mw.module), "-force"],
            input="\n")
        if before_login is not None:
            before_login()
        pw = d / "pin.txt"
        pw.write_text(pin + "\n")
        os.chmod(pw, 0o600)
        _give(d, mw.uid)
        request = "GET /droits HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
        argv = ["tstclnt", "-h", "127.0.0.1", "-p", str(cdr.port), "-d", db, "-n", f"{token_label}:{AUTH_CERT_LABEL}",
                "-W", str(pw), "-V", f"tls{tls}:tls{tls}"]
        # The request from a file: with a pipe, tstclnt spins on the pipe's POLLHUP once the
        # server has closed the connection, and never exits.
        req = d / "request.txt"
        req.write_text(request)
        try:
            with open(req) as stdin:
                r = subprocess.run(mw.argv([*wrap, *argv]), stdin=stdin, capture_output=True, text=True, env=env,
                                   timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return Login("nss-tstclnt", -1, out, f"timed out after {timeout:.0f}s; stderr: {err}")
        return Login("nss-tstclnt", r.returncode, r.stdout, r.stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Command line (scripts/demo):
#   python3 -m cbharness.cdr desk --env-file F [--profile cps3] [--pin 1234]
#       an emulated desk with cb-cardsim in its first reader; KEY=VALUE lines (PCSCLITE_CSOCK_NAME,
#       CBDESK_READER0, CBDESK_CA) in F once ready; runs until SIGINT/SIGTERM/SIGHUP
#   python3 -m cbharness.cdr login --socket S --ca CA.pem --pin P [--module auto|opensc|cryptolib]
#       the CDR stand-in, then a curl (OpenSSL) and an NSS login through S with the module;
#       prints the module used and the pages

def _main(argv=None) -> int:
    import argparse
    import signal as _signal
    import sys as _sys

    from .desk import EmulatedDesk
    from .pkcs11 import Middleware, SimCard, find_cryptolib

    ap = argparse.ArgumentParser(prog="python3 -m cbharness.cdr")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("desk")
    d.add_argument("--env-file", required=True)
    d.add_argument("--profile", default="cps3", choices=["cps3", "cps4"])
    d.add_argument("--pin", default="1234")
    lg = sub.add_parser("login")
    lg.add_argument("--socket", required=True)
    lg.add_argument("--ca", required=True, type=Path)
    lg.add_argument("--pin", required=True)
    lg.add_argument("--module", default="auto", choices=["auto", "opensc", "cryptolib"])
    a = ap.parse_args(argv)

    if a.cmd == "desk":
        class Stop(Exception):
            pass

        def on_signal(signum, frame):
            raise Stop()

        for s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
            _signal.signal(s, on_signal)
        desk = EmulatedDesk(slots=2, name="demo")
        card = None
        try:
            desk.start()
            card = SimCard(desk, 0, profile=a.profile, pin=a.pin).start()  # instant card timing
            ca = card.export(Path(desk.dir) / "card-export") / "ca.pem"
            tmp = f"{a.env_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"PCSCLITE_CSOCK_NAME={desk.socket_path}\nCBDESK_READER0={desk.readers[0]}\nCBDESK_CA={ca}\n")
            os.replace(tmp, a.env_file)
            while True:
                time.sleep(1)
        except Stop:
            return 0
        finally:
            if card is not None:
                card.stop()
            desk.stop()
            try:
                os.unlink(a.env_file)
            except OSError:
                pass

    # login
    cryptolib, why = find_cryptolib()
    kind = a.module
    if kind == "auto":
        kind = "cryptolib" if cryptolib else "opensc"
    if kind == "cryptolib" and not cryptolib:
        print(f"  {why}", file=_sys.stderr)
        return 2
    mw = Middleware(kind)
    print(f"  module: {'ANS Cryptolib CPS' if kind == 'cryptolib' else 'OpenSC'} ({mw.module})"
          + ("" if kind == "cryptolib" else f"\n  (the Cryptolib CPS is not here: {why})"))
    cdr = CdrStandIn(a.ca).start()
    rc = 0
    try:
        print(f"  CDR stand-in: nginx on {cdr.url} (client certificate from the card simulator's CA required)")
        token = mw.run(a.socket, [{"op": "token"}])[0]
        for login in (curl_login(mw, a.socket, cdr, a.pin), nss_login(mw, a.socket, cdr, a.pin, token["label"])):
            if login.holder:
                print(f"  {login.client:12s} -> page for {login.holder} ({login.protocol}):")
                body = re.sub(r"<[^>]+>", " ", login.page.split("<body>", 1)[-1])
                for line in (l.strip() for l in body.splitlines()):
                    if line:
                        print(f"      {line}")
            else:
                rc = 1
                print(f"  {login.client:12s} -> FAILED (exit {login.returncode}): {login.stderr.strip()[-300:]}")
    finally:
        cdr.stop()
        mw.cleanup()
    return rc


if __name__ == "__main__":
    raise SystemExit(_main())
