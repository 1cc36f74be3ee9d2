"""Real PKCS#11 middleware against an emulated desk.

    SimCard       cb-cardsim (the project's CPS3/CPS4 simulator) in a desk's vpcd slot
    Middleware    a PKCS#11 module: OpenSC's (always) or ANS's Cryptolib CPS (when unpacked
                  by scripts/get-cryptolib), driven by p11_client.py (PyKCS11) in a subprocess
    find_cryptolib()  where the Cryptolib is, or why it is not there (one line, for skips)

The Cryptolib keeps its configuration, disk cache and logs under fixed paths
(/etc/opt/santesocial/CPS, /etc/opt/santesocial/CPS/cache, /var/opt/santesocial/CPS/log).
Each Middleware("cryptolib") gets a state directory of its own that is bind-mounted over
/etc/opt and /var/opt in a private mount namespace (needs root, as the emulated desk does),
so a test chooses a cold or a warm cache and reads the module's own traces, and nothing on
the machine is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .procs import Proc
from .waiting import HarnessError, wait_until

SYSTEM_PYTHON = "/usr/bin/python3"
OPENSC_MODULE = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
CRYPTOLIB_REL = "opt/santesocial/CPS/lib/libcps3_pkcs11_lux.so"
CLIENT = Path(__file__).with_name("p11_client.py")
_REPO = Path(__file__).resolve().parents[3]

ATRS = {
    "cps3": bytes.fromhex("3BAC00402A001225006480000310009000"),
    "instant": bytes.fromhex("3BAC00402A001225006480000310009000"),
    "cps4": bytes.fromhex("3B9B188001001225006480040100009044"),
}


def cryptolib_candidates() -> List[Path]:
    """Where the Cryptolib module may be, in order (CARDBRIDGE_CRYPTOLIB first)."""
    out: List[Path] = []
    env = os.environ.get("CARDBRIDGE_CRYPTOLIB")
    if env:
        p = Path(env)
        out.append(p / "current" / CRYPTOLIB_REL if p.is_dir() else p)
    out.append(Path("/var/cache/cardbridge/cryptolib/current") / CRYPTOLIB_REL)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out.append(cache / "cardbridge/cryptolib/current" / CRYPTOLIB_REL)
    out.append(Path("/") / CRYPTOLIB_REL)  # installed from the RPM
    return out


def find_cryptolib() -> tuple[Optional[Path], str]:
    """(module path, "") or (None, one-line reason). CARDBRIDGE_CRYPTOLIB=none: as if absent."""
    if os.environ.get("CARDBRIDGE_CRYPTOLIB") == "none":
        return None, "Cryptolib CPS disabled (CARDBRIDGE_CRYPTOLIB=none)"
    cands = cryptolib_candidates()
    for p in cands:
        if p.is_file():
            return p, ""
    return None, ("Cryptolib CPS not available: run scripts/get-cryptolib <dops-cryptolib checkout or RPM> "
                  f"(looked for {', '.join(str(c) for c in cands)})")


def cardsim_binary() -> Path:
    build = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", _REPO / "build"))
    return build / "tests" / "tools" / "cardsim" / "cb-cardsim"


class SimCard:
    """cb-cardsim in slot |slot| of an EmulatedDesk: start() inserts it, stop() removes it.

    time_scale 0 = no card delays (the default here: real card timing is the benchmarks'
    business). Every start() is a fresh card process: PIN retry counter back to 3."""

    def __init__(self, desk, slot: int = 0, *, profile: str = "cps3", seed: int = 1, pin: str = "1234",
                 time_scale: float = 0.0, actua: Optional[str] = None, data_revision: Optional[int] = None,
                 log_dir: Optional[Path] = None, binary: Optional[Path] = None):
        self.desk, self.slot = desk, slot
        self.profile, self.seed, self.pin, self.time_scale = profile, seed, pin, time_scale
        self.actua, self.data_revision = actua, data_revision
        self.binary = Path(binary or cardsim_binary())
        self.log_dir = Path(log_dir or desk.dir)
        self.proc: Optional[Proc] = None
        self.starts = 0
        self.apdu_log = self.log_dir / f"cardsim-slot{slot}.apdu.log"

    def _args(self) -> List[str]:
        a = ["--profile", self.profile, "--seed", str(self.seed), "--pin", self.pin]
        if self.actua is not None:
            a += ["--actua", self.actua]
        if self.data_revision is not None:
            a += ["--data-revision", str(self.data_revision)]
        return a

    def info(self) -> dict:
        """Identity of the card: token label, serials, holder, ATR (cb-cardsim --print-info)."""
        r = subprocess.run([str(self.binary), *self._args(), "--print-info"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise HarnessError(f"cb-cardsim --print-info: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def export(self, directory: Path) -> Path:
        """ca.pem (the simulator's CA), auth.pem, sign.pem, info.json into |directory|."""
        directory.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([str(self.binary), *self._args(), "--export-dir", str(directory)], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise HarnessError(f"cb-cardsim --export-dir: {r.stderr.strip()}")
        return directory

    def start(self, timeout: float = 20.0, **changes) -> "SimCard":
        """Insert the card (changes: profile, actua, data_revision, pin ... for this card)."""
        if self.proc is not None and self.proc.alive():
            raise HarnessError("cb-cardsim already running in that slot; stop() first")
        for k, v in changes.items():
            setattr(self, k, v)
        if not self.binary.exists():
            raise HarnessError(f"not built: {self.binary}")
        if self.desk.card_present(self.slot):
            raise HarnessError(f"slot {self.slot} already holds a card")
        self.starts += 1
        argv = [str(self.binary), *self._args(), "--time-scale", f"{self.time_scale:g}", "--host", "127.0.0.1",
                "--port", str(self.desk.port(self.slot)), "--log", str(self.apdu_log)]
        self.proc = Proc(argv, name=f"cardsim-slot{self.slot}",
                         log_path=self.log_dir / f"cardsim-slot{self.slot}.{self.starts}.out").start()
        atr = ATRS[self.profile]
        proc = self.proc

        def present():
            st = self.desk.state(self.slot)
            return st is not None and st.card_present and st.atr == atr

        wait_until(present, timeout=timeout, desc=f"cb-cardsim ({self.profile}) present in slot {self.slot}",
                   abort=lambda: None if proc.alive() else f"cb-cardsim {proc.exit_description()}",
                   details=lambda: proc.failure_report(20))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            self.proc.stop(grace=2.0)
            self.proc = None
            wait_until(lambda: not self.desk.card_present(self.slot), timeout=timeout,
                       desc=f"slot {self.slot} empty after removing cb-cardsim")

    def restart(self, **changes) -> "SimCard":
        self.stop()
        return self.start(**changes)

    def apdu_lines(self) -> List[str]:
        if not self.apdu_log.exists():
            return []
        return [l for l in self.apdu_log.read_text(errors="replace").splitlines() if " apdu " in l]


class Middleware:
    """A PKCS#11 module run by p11_client.py, one process per run() (one C_Initialize)."""

    def __init__(self, kind: str, module: Optional[Path] = None, state_dir: Optional[Path] = None,
                 traces: bool = False, uid: Optional[int] = None):
        if kind not in ("opensc", "cryptolib"):
            raise ValueError(kind)
        self.kind = kind
        if module is None:
            module = Path(OPENSC_MODULE) if kind == "opensc" else find_cryptolib()[0]
        if module is None or not Path(module).exists():
            raise HarnessError(f"{kind} module not found: {module or find_cryptolib()[1]}")
        self.module = Path(module)
        self.traces = traces
        # uid: run as that user (a terminal-server session's user; started as root, then
        # dropped with setpriv after the Cryptolib's mounts).
        self.uid = uid
        self.state_dir = Path(state_dir) if state_dir else None
        self._own_state = False
        if kind == "cryptolib":
            if self.state_dir is None:
                self.state_dir = Path(tempfile.mkdtemp(prefix="cbcryptolib-"))
                self._own_state = True
            self.reset_state()

    # ---- the Cryptolib's private /etc/opt and /var/opt -------------------------------------
    @property
    def etc_dir(self) -> Path:
        return self.state_dir / "etc-opt"

    @property
    def var_dir(self) -> Path:
        return self.state_dir / "var-opt"

    @property
    def cache_dir(self) -> Path:
        return self.etc_dir / "santesocial" / "CPS" / "cache"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "santesocial" / "CPS" / "log"

    def reset_state(self) -> None:
        """Cold start: the RPM's configuration, an empty cache, no logs."""
        for d in (self.etc_dir, self.var_dir):
            shutil.rmtree(d, ignore_errors=True)
        conf = self.etc_dir / "santesocial" / "CPS"
        # The RPM's own files next to the module: <root>/opt/santesocial/CPS/lib/<so>.
        rpm_root = self.module.parents[4]
        shipped = rpm_root / "etc" / "opt" / "santesocial" / "CPS"
        if shipped.is_dir():
            shutil.copytree(shipped, conf)
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "cps3_pkcs11.conf").write_text(
            "Traces\n{\n\tactive = %s;\n\tdebug = %d;\n}\n" % (("true", 10) if self.traces else ("false", 0)))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.uid is not None:
            # The module creates its cache and logs there: the session's user owns them.
            os.chmod(self.state_dir, 0o755)
            for d in (self.etc_dir, self.var_dir):
                for root, dirs, files in os.walk(d):
                    for n in dirs + files:
                        os.chown(os.path.join(root, n), self.uid, self.uid)
                os.chown(d, self.uid, self.uid)

    def cache_files(self) -> List[str]:
        return sorted(p.name for p in self.cache_dir.iterdir()) if self.cache_dir.exists() else []

    def log_text(self) -> str:
        if self.kind != "cryptolib" or not self.log_dir.exists():
            return ""
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.iterdir()) if p.is_file())

    def cleanup(self) -> None:
        if self._own_state and self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # ---- running ---------------------------------------------------------------------------
    def argv(self, program: Sequence[str]) -> List[str]:
        """|program| wrapped for this module (the Cryptolib: in its private mount namespace),
        as self.uid when set."""
        if self.uid is not None:
            program = ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--", *program]
        if self.kind == "opensc":
            return list(program)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/opt && mount --bind "$1" /var/opt && shift && exec "$@"',
                str(self.etc_dir), str(self.var_dir), *program]

    def env(self, socket: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PCSCLITE_", "PYTHON", "LD_PRELOAD", "OPENSC_", "CPS3_"))}
        env["PCSCLITE_CSOCK_NAME"] = str(socket)
        if self.uid is not None:
            env["HOME"] = str(self.state_dir or "/tmp")
        if self.kind == "cryptolib" and self.traces:
            env.update(CPS3_PKCS11_TRACES="true", CPS3_DEBUG="10")
        env.update(extra or {})
        return env

    def run(self, socket: str, ops: List[dict], timeout: float = 120.0,
            env: Optional[Dict[str, str]] = None) -> List[dict]:
        """Runs |ops| (p11_client.py operations) against the PC/SC service at |socket|."""
        argv = self.argv([SYSTEM_PYTHON, str(CLIENT), str(self.module)])
        r = subprocess.run(argv, input=json.dumps(ops), capture_output=True, text=True, timeout=timeout,
                           env=self.env(socket, env))
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode != 0 or not lines:
            raise HarnessError(f"p11_client ({self.kind}) exit {r.returncode}: {r.stderr[-3000:]}")
        out = json.loads(lines[-1])
        if out.get("load_error"):
            raise HarnessError(f"{self.module}: C_Initialize failed: {out['load_error']}")
        return out["results"]

    def __repr__(self) -> str:
        return f"Middleware({self.kind}, {self.module})"


def rsa_verify_pkcs1(cert_der: bytes, signature: bytes, digest_info_or_data: bytes, *, hashed: bool) -> bool:
    """True if |signature| is a PKCS#1 v1.5 signature by the certificate's key: over the data
    (hashed=True: SHA-256 of the data) or over a ready DigestInfo (hashed=False)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    key = x509.load_der_x509_certificate(cert_der).public_key()
    try:
        if hashed:
            key.verify(signature, digest_info_or_data, padding.PKCS1v15(), hashes.SHA256())
        else:
            # The DigestInfo is SHA-256's: verify its hash as prehashed.
            key.verify(signature, digest_info_or_data[-32:], padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return True
    except Exception:  # noqa: BLE001 - cryptography raises InvalidSignature
        return False


SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")
# What the scenarios sign: more than 64 bytes, so that the IAS card-side hash (CPS3 signature
# key) continues an intermediate state.
MESSAGE = b"Consultation des droits: patient 1 80 01 75 123 456 78" * 3


def sha256_digest_info(data: bytes) -> bytes:
    return SHA256_DIGEST_INFO_PREFIX + hashlib.sha256(data).digest()


def login_scenario(stack: str, profile: str, pin: str, wrong_pin: str) -> list:
    """p11_client operations of a login as tests compare it (desk vs. shim vs. RDP): slots,
    token, objects before and after C_Login, a wrong PIN, the right one, both certificates, a
    signature with each key (the mechanisms the stack offers for it; CPS4 with the Cryptolib:
    RSA-PSS too), logout."""
    ops = [{"op": "slots"}, {"op": "token"}, {"op": "open"}, {"op": "objects"},
           {"op": "login", "pin": wrong_pin}, {"op": "token"},
           {"op": "login", "pin": pin}, {"op": "token"}, {"op": "objects"},
           {"op": "cert", "label": "Certificat d'authentification CPS"},
           {"op": "cert", "label": "Certificat de signature CPS"},
           {"op": "sign", "key": "Cle d'authentification CPS", "mechanism": "RSA_PKCS",
            "data": sha256_digest_info(MESSAGE).hex()}]
    if stack == "cryptolib":
        ops += [{"op": "sign", "key": "Cle de signature CPS", "mechanism": "SHA256_RSA_PKCS", "data": MESSAGE.hex()},
                {"op": "sign", "key": "Cle de signature CPS", "mechanism": "RSA_PKCS",
                 "data": sha256_digest_info(MESSAGE).hex()}]
        if profile == "cps4":
            ops.append({"op": "sign", "key": "Cle d'authentification CPS", "mechanism": "RSA_PKCS_PSS",
                        "data": hashlib.sha256(MESSAGE).hexdigest(),
                        "pss": {"hash": "SHA256", "mgf": "MGF1_SHA256", "salt": 32}})
    ops.append({"op": "logout"})
    return ops
