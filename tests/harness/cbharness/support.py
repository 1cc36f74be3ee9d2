"""Locating/building the helper artefacts the emulated desk needs.

* the TCP_NODELAY LD_PRELOAD library for pcscd (see ../nodelay_preload.c)
* a PYTHONPATH under which Debian's vicc can import `Crypto` (Debian ships
  pycryptodome as `Cryptodome`, vicc imports `Crypto`)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .waiting import HarnessError

HARNESS_DIR = Path(__file__).resolve().parent.parent  # tests/harness
PRELOAD_SOURCE = HARNESS_DIR / "nodelay_preload.c"
SYSTEM_PYTHON = os.environ.get("CBHARNESS_PYTHON", "/usr/bin/python3")
VSMARTCARD_PYTHONPATH = "/usr/lib/python3/site-packages/virtualsmartcard"
CRYPTODOME_DIR = "/usr/lib/python3/dist-packages/Cryptodome"
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
PCSCD = shutil.which("pcscd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "/usr/sbin/pcscd"
VICC = "/usr/bin/vicc"


def cache_dir() -> Path:
    """Per-user cache directory (CBHARNESS_CACHE_DIR overrides)."""
    env = os.environ.get("CBHARNESS_CACHE_DIR")
    candidates = []
    if env:
        candidates.append(Path(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    candidates.append(Path(xdg) / "cbharness" if xdg else Path.home() / ".cache" / "cbharness")
    candidates.append(Path(tempfile.gettempdir()) / f"cbharness-cache-{os.getuid()}")
    for c in candidates:
        try:
            c.mkdir(parents=True, exist_ok=True)
            if os.access(c, os.W_OK):
                return c
        except OSError:
            continue
    raise HarnessError(f"no writable cache directory among {candidates}")


def nodelay_preload() -> Path:
    """Path of the TCP_NODELAY preload library.

    $CARDBRIDGE_NODELAY_PRELOAD wins if set (must exist); otherwise the
    library is compiled from nodelay_preload.c into the cache directory, keyed
    by the source hash, and reused on later runs.
    """
    env = os.environ.get("CARDBRIDGE_NODELAY_PRELOAD")
    if env:
        p = Path(env)
        if not p.is_file():
            raise HarnessError(f"CARDBRIDGE_NODELAY_PRELOAD={env} does not exist")
        return p
    src = PRELOAD_SOURCE.read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    out = cache_dir() / f"nodelay_preload-{digest}.so"
    if out.is_file():
        return out
    cc = os.environ.get("CC", "cc")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(PRELOAD_SOURCE), "-ldl"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"cannot compile the nodelay preload ({' '.join(cmd)}): {exc}") from exc
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise HarnessError(f"compiling the nodelay preload failed ({' '.join(cmd)}):\n{r.stdout}{r.stderr}")
    os.replace(tmp, out)  # atomic: concurrent builders are harmless
    return out


def vpcd_driver(entry: int) -> str:
    """LIBPATH for the entry-th vpcd entry of one pcscd.

    The vpcd driver keeps its per-slot state in a global array indexed by
    the slot number only (Lun & 0xffff), so two reader.conf entries that load
    the *same* library overwrite each other's sockets (only the last entry
    works).  pcscd dlopen()s each distinct LIBPATH separately and glibc only
    shares a library between paths that are the same file (dev/inode), so
    entries >= 1 get byte-identical copies of the driver from the cache.
    """
    if entry == 0:
        return VPCD_DRIVER
    real = os.path.realpath(VPCD_DRIVER)
    data = Path(real).read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    d = cache_dir() / f"vpcd-driver-{digest}"
    out = d / f"libifdvpcd-{entry}.so"
    if not out.is_file():
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{out.name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    return str(out)


def vicc_pythonpath() -> str:
    """PYTHONPATH for running Debian's vicc with /usr/bin/python3."""
    shim = cache_dir() / "vicc-pyshim"
    link = shim / "Crypto"
    if not (link.is_symlink() and os.readlink(link) == CRYPTODOME_DIR):
        shim.mkdir(parents=True, exist_ok=True)
        tmp = shim / f".Crypto.{os.getpid()}"
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(CRYPTODOME_DIR, tmp)
        os.replace(tmp, link)
    parts = [VSMARTCARD_PYTHONPATH, str(shim), str(HARNESS_DIR)]
    return ":".join(parts)


def check_prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("the emulated desk needs root (unshare -m + bind mount over /run/pcscd)")
    for path, what in (
        (PCSCD, "pcscd"),
        (VPCD_DRIVER, "vsmartcard-vpcd driver"),
        (VICC, "vicc (vsmartcard-vpicc)"),
        (SYSTEM_PYTHON, "system python3"),
        (VSMARTCARD_PYTHONPATH, "python3-virtualsmartcard"),
        (CRYPTODOME_DIR, "python3-pycryptodome"),
    ):
        if not os.path.exists(path):
            problems.append(f"missing {what}: {path}")
    if shutil.which("unshare") is None:
        problems.append("missing unshare (util-linux)")
    if problems:
        raise HarnessError("emulated desk prerequisites not met:\n  " + "\n  ".join(problems))
