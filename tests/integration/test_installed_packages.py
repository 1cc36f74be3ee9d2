"""The Debian packages as an admin uses them: install, run the xrdp end to end on the installed
files only, purge, and nothing is left behind.

    dist/*.deb (scripts/package: debhelper, lintian-clean)
      -> dpkg -i: cardbridge-server, cardbridge-freerdp2, cardbridge-freerdp3, cardbridge-desk
      -> checks of the installed system: FreeRDP's add-in directories, /run/cardbridge (1733 root),
         nothing turned on (no opt-in marker, the user unit not enabled, xrdp.ini untouched)
      -> the desk agent's unit: its system user exists, and the agent runs as that user with a
         desk.conf, from the unit's own command line
      -> tests/integration/test_xrdp_e2e.py with CARDBRIDGE_INSTALLED=1: /usr/bin/cdrsession and
         cardbridge-shim, /etc/profile.d/cardbridge.sh, /usr/libexec/cardbridge/cardbridge-xrdp-config,
         the add-in from /usr/lib/x86_64-linux-gnu/freerdp2 (stock xfreerdp) -- the build tree gives
         only the test's own PC/SC client (cb-pcsc). The xrdp server is the test's private one
         (xrdp_fixture.XrdpServer), on which the admin command `cdrsession enable xrdp` runs.
         The FreeRDP 3 add-in: the same file's main scenario with stock xfreerdp3.
      -> dpkg --purge, then: no package left, no file left in the places the packages or the admin
         commands write (/etc, /usr/bin, /usr/lib, /usr/share/doc, /usr/share/man, /run, dpkg's
         database), and xrdp.ini byte for byte as before.

Needs root; changes the system while it runs (CI machines). Run after scripts/package:
    /usr/bin/python3 -m pytest tests/integration/test_installed_packages.py -v
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import pwd
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
PACKAGES = ["cardbridge-server", "cardbridge-freerdp2", "cardbridge-freerdp3", "cardbridge-desk"]
LIBDIR = "/usr/lib/x86_64-linux-gnu"
XRDP_INI = Path("/etc/xrdp/xrdp.ini")

# Where the packages, their maintainer scripts and `cdrsession enable` may write.
WATCHED = ["/etc", "/usr/bin", "/usr/libexec/cardbridge", f"{LIBDIR}/freerdp2", f"{LIBDIR}/freerdp3",
           "/usr/lib/systemd/user", "/usr/lib/systemd/system", "/usr/lib/tmpfiles.d", "/usr/lib/sysusers.d", "/usr/share/doc", "/usr/share/man/man1",
           "/usr/share/lintian/overrides", "/run", "/var/lib/systemd"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installs packages (root)")


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def installed(pkg: str) -> bool:
    r = run("dpkg-query", "-W", "-f=${Status}", pkg, check=False)
    return r.returncode == 0 and "installed" in r.stdout and "not-installed" not in r.stdout


def snapshot() -> Set[str]:
    """Paths under WATCHED (for /run: two levels; its volatile contents belong to other programs)."""
    out: Set[str] = set()
    for top in WATCHED:
        if not os.path.exists(top):
            continue
        max_depth = 2 if top == "/run" else 64
        base_depth = top.rstrip("/").count("/")
        for dirpath, dirnames, filenames in os.walk(top):
            depth = dirpath.rstrip("/").count("/") - base_depth
            if depth >= max_depth:
                dirnames[:] = []
            for n in dirnames + filenames:
                out.add(os.path.join(dirpath, n))
    out.update(str(p) for p in Path("/var/lib/dpkg/info").glob("cardbridge*"))
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


@pytest.fixture(scope="module")
def debs() -> Dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        hits = sorted(DIST.glob(f"{pkg}_*_amd64.deb"))
        if not hits:
            pytest.fail(f"{DIST}/{pkg}_*_amd64.deb missing: run scripts/package first", pytrace=False)
        found[pkg] = hits[-1]
    return found


@pytest.fixture(scope="module")
def system(debs):
    """Installs the packages; purges them at the end (also when a test failed)."""
    left = [p for p in PACKAGES if installed(p)]
    if left:
        pytest.fail(f"already installed before the test: {left} (purge them first)", pytrace=False)
    before = snapshot()
    ini_before = digest(XRDP_INI)
    r = run("dpkg", "-i", *map(str, debs.values()), env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    print(r.stdout[-2000:])
    state = {"before": before, "ini_before": ini_before, "purged": False}
    try:
        yield state
    finally:
        if not state["purged"]:
            run("dpkg", "--purge", *PACKAGES, check=False)


def test_installed_layout(system):
    for pkg in PACKAGES:
        assert installed(pkg), pkg
    for flavour in ("2", "3"):
        lib = Path(f"{LIBDIR}/freerdp{flavour}/libcardbridge-client.so")
        assert lib.is_file(), lib
        syms = run("nm", "-D", "--defined-only", str(lib)).stdout
        assert "VirtualChannelEntryEx" in syms and "DVCPluginEntry" in syms, syms
        needed = run("readelf", "-d", str(lib)).stdout
        assert f"libfreerdp{flavour}.so" in needed, needed
        other = "3" if flavour == "2" else "2"
        assert f"libfreerdp{other}.so" not in needed and f"libwinpr{other}.so" not in needed, \
            f"the FreeRDP {flavour} add-in links FreeRDP {other}: {needed}"
    # dpkg-buildflags hardening (hardening=+all): PIE, full RELRO with BIND_NOW, stack protector,
    # _FORTIFY_SOURCE, in every binary and both add-ins.
    elves = ["/usr/bin/cardbridge-shim", "/usr/bin/cdrsession", "/usr/bin/cardbridge-desk",
             f"{LIBDIR}/freerdp2/libcardbridge-client.so", f"{LIBDIR}/freerdp3/libcardbridge-client.so"]
    for elf in elves:
        dyn = run("readelf", "-dW", elf).stdout
        assert "BIND_NOW" in dyn or re.search(r"FLAGS_1.*\bNOW\b", dyn), (elf, "no BIND_NOW")
        assert "GNU_RELRO" in run("readelf", "-lW", elf).stdout, (elf, "no RELRO")
        assert "Type:                              DYN" in run("readelf", "-hW", elf).stdout, (elf, "not PIE")
        syms = run("nm", "-D", elf).stdout
        assert "__stack_chk_fail" in syms, (elf, "no stack protector")
        assert re.search(r"__\w+_chk\b", syms), (elf, "no _FORTIFY_SOURCE function")
    for prog in ("/usr/bin/cardbridge-shim", "/usr/bin/cdrsession", "/usr/bin/cardbridge-desk"):
        assert os.access(prog, os.X_OK), prog
        assert run(prog, "--version").stdout.strip().endswith("0.1.0")
        page = Path("/usr/share/man/man1") / (Path(prog).name + ".1.gz")
        assert page.is_file(), page
    st = os.stat("/run/cardbridge")
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o1733, oct(st.st_mode)
    # Nothing is turned on by the installation, and xrdp's configuration is xrdp's.
    assert not Path("/etc/cardbridge/enabled").exists()
    assert not list(Path("/etc/systemd/user").glob("**/cardbridge-session.service"))
    assert digest(XRDP_INI) == system["ini_before"], "installing cardbridge-server changed xrdp.ini"
    hook = Path("/etc/profile.d/cardbridge.sh")
    assert hook.is_file() and "enabled/xrdp" in hook.read_text()
    assert "/etc/profile.d/cardbridge.sh" in run("dpkg-query", "--showformat=${Conffiles}", "-W",
                                                  "cardbridge-server").stdout


def test_desk_service_runs_as_its_own_user(system):
    """cardbridge-desk.service names a system user of its own: the package creates it (no login,
    no home), and the agent runs as that user with the admin's desk.conf, as the unit starts it."""
    unit = Path("/usr/lib/systemd/system/cardbridge-desk.service").read_text()
    user = re.search(r"^User=(\S+)$", unit, re.M).group(1)
    group = re.search(r"^Group=(\S+)$", unit, re.M).group(1)
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1).split()
    pw = pwd.getpwnam(user)  # KeyError: the unit's user does not exist, the service cannot start
    assert pw.pw_uid < 1000 and pw.pw_shell in ("/usr/sbin/nologin", "/bin/false"), pw
    assert pw.pw_dir == "/nonexistent", pw  # Debian's "no home" (whether some other tool made that path or not)
    assert Path("/usr/lib/sysusers.d/cardbridge-desk.conf").is_file()
    with tempfile.TemporaryDirectory(prefix="cb-deskunit-") as d:
        os.chmod(d, 0o755)
        run_dir = Path(d) / "run"
        run_dir.mkdir()
        os.chown(run_dir, pw.pw_uid, pw.pw_gid)
        conf = Path(d) / "desk.conf"
        conf.write_text(f"[desk]\nname = UNIT-TEST-DESK\n[agent]\nlisten = unix:{run_dir}/desk.sock\n")
        # The unit's command line, with this file instead of /etc/cardbridge/desk.conf and stderr.
        argv = [a if a != "/etc/cardbridge/desk.conf" else str(conf) for a in exec_start]
        argv = [a for a in argv if a not in ("--log-target", "journal")]
        assert argv[0] == "/usr/bin/cardbridge-desk" and str(conf) in argv, exec_start
        env = {"PATH": "/usr/bin:/bin", "PCSCLITE_CSOCK_NAME": str(Path(d) / "no-pcscd.comm")}
        p = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            sock = run_dir / "desk.sock"
            for _ in range(200):
                if sock.exists() or p.poll() is not None:
                    break
                time.sleep(0.05)
            assert p.poll() is None, f"the agent exited as {user}: {p.communicate()[0][-3000:]}"
            assert sock.exists(), "the agent did not listen"
            assert os.stat(sock).st_uid == pw.pw_uid
            assert int(Path(f"/proc/{p.pid}/status").read_text().split("Uid:")[1].split()[1]) == pw.pw_uid
        finally:
            p.terminate()
            out = p.communicate(timeout=10)[0]
        assert "UNIT-TEST-DESK" in out or "listening" in out, out[-2000:]


def _e2e(flavour: str, *select: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARDBRIDGE_", "PCSCLITE_"))}
    env.update(CARDBRIDGE_INSTALLED="1", CARDBRIDGE_FREERDP=flavour, PYTHONDONTWRITEBYTECODE="1",
               CARDBRIDGE_BUILD_DIR=os.environ.get("CARDBRIDGE_BUILD_DIR", str(ROOT / "build")),
               PYTHONPATH=str(ROOT / "tests" / "harness"))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            str(ROOT / "tests" / "integration" / "test_xrdp_e2e.py"), *select]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    print(r.stdout[-6000:])
    return r


def test_xrdp_end_to_end_on_the_installed_files(system):
    """The whole xrdp scenario (stock xfreerdp, FreeRDP 2 add-in from the package)."""
    r = _e2e("2")
    assert r.returncode == 0, f"xrdp end to end on the installed files failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-2000:]
    # The admin's opt-in went where the package's purge finds it.
    assert Path("/etc/cardbridge/enabled/xrdp").is_file()


def test_freerdp3_addin_on_the_installed_files(system):
    """The FreeRDP 3 package's add-in with stock xfreerdp3: the session serves the desk, and
    follows the client's channel kind."""
    r = _e2e("3", "-k", "serves_the_desk or either_channel")
    assert r.returncode == 0, f"xfreerdp3 on the installed files failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
    assert "2 passed" in r.stdout, r.stdout[-2000:]


def test_purge_leaves_nothing(system):
    r = run("dpkg", "--purge", *PACKAGES)
    system["purged"] = True
    print(r.stdout[-2000:])
    for pkg in PACKAGES:
        assert not installed(pkg), pkg
        q = run("dpkg-query", "-W", "-f=${Status}", pkg, check=False)
        assert q.returncode != 0 or "not-installed" in q.stdout or q.stdout.strip() == "", q.stdout
    after = snapshot()
    # Other programs may create files meanwhile (a shared machine): only ours count.
    new = sorted(p for p in after - system["before"] if "cardbridge" in p.lower())
    assert not new, f"left behind after purge: {new}"
    assert digest(XRDP_INI) == system["ini_before"], "xrdp.ini differs after install, use and purge"
