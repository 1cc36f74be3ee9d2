"""The two Debian packages (CPack) and the xrdp configuration helper.

    cpack (from the build tree's CPackConfig.cmake) into a temporary directory
      cardbridge-desk:   the FreeRDP add-in in FreeRDP 2's add-in directory, the desk agent
      cardbridge-server: shim, cdrsession, systemd user unit, environment.d, the xrdp profile
                         hook (a conffile), cardbridge-xrdp-config; postinst/prerm
    installers/xrdp/cardbridge-xrdp-config enable|check|disable on copies of xrdp.ini:
      idempotent, and exact (only the CBRIDGE line and its comment change; disable restores
      the original byte for byte).

Run:  /usr/bin/python3 -m pytest tests/integration/test_session_packaging.py -v
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from test_session_support import BUILD, ROOT

XRDP_CONFIG = ROOT / "installers" / "xrdp" / "cardbridge-xrdp-config"
SYSTEM_INI = Path("/etc/xrdp/xrdp.ini")
ADDIN_DIR = "usr/lib/x86_64-linux-gnu/freerdp2"
COMMENT = "; CardBridge smart-card redirection (cardbridge-server)"


@pytest.fixture(scope="module")
def debs():
    cfg = BUILD / "CPackConfig.cmake"
    if not cfg.exists():
        pytest.fail(f"{cfg} missing: configure the build first", pytrace=False)
    out = Path(tempfile.mkdtemp(prefix="cbpkg-"))
    try:
        t0 = time.monotonic()
        r = subprocess.run(["cpack", "--config", str(cfg), "-B", str(out)], capture_output=True, text=True,
                           timeout=240)
        assert r.returncode == 0, f"cpack failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        print(f"cpack: {time.monotonic() - t0:.1f} s")
        found = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
        assert set(found) == {"cardbridge-desk", "cardbridge-server"}, list(out.iterdir())
        yield found, out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def contents(deb: Path) -> dict:
    """path -> (mode string, size) from dpkg-deb -c."""
    r = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 5)
        out[parts[5].split(" -> ")[0].lstrip(".")] = (parts[0], int(parts[2]))
    return out


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def test_desk_package(debs):
    found, _ = debs
    deb = found["cardbridge-desk"]
    c = contents(deb)
    print("\n".join(sorted(c)))
    addin = f"/{ADDIN_DIR}/libcardbridge-client.so"
    assert addin in c and c[addin][1] > 0, "the add-in must be where FreeRDP 2 looks for add-ins"
    assert c["/usr/bin/cardbridge-desk"][0] == "-rwxr-xr-x"
    assert field(deb, "Package") == "cardbridge-desk"
    assert "pcscd" in field(deb, "Depends")
    # The packaged add-in is a FreeRDP add-in: it exports the static and the dynamic channel entries.
    x = Path(tempfile.mkdtemp(prefix="cbpkgx-"))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
        syms = subprocess.run(["nm", "-D", "--defined-only", str(x / addin.lstrip("/"))], capture_output=True,
                              text=True).stdout
        assert "VirtualChannelEntryEx" in syms or "VirtualChannelEntry" in syms, syms
        assert "DVCPluginEntry" in syms, syms
    finally:
        shutil.rmtree(x, ignore_errors=True)
    # FreeRDP's own add-in directory on this machine is the one the package uses.
    if Path("/usr/lib/x86_64-linux-gnu/freerdp2").is_dir():
        assert any(p.name.endswith("-client.so") for p in Path("/usr/lib/x86_64-linux-gnu/freerdp2").iterdir())


def test_server_package(debs):
    found, _ = debs
    deb = found["cardbridge-server"]
    c = contents(deb)
    print("\n".join(sorted(c)))
    want = {
        "/usr/bin/cardbridge-shim": "-rwxr-xr-x",
        "/usr/bin/cdrsession": "-rwxr-xr-x",
        "/usr/lib/systemd/user/cardbridge-session.service": "-rw-r--r--",
        "/usr/lib/environment.d/60-cardbridge.conf": "-rw-r--r--",
        "/etc/profile.d/cardbridge.sh": "-rw-r--r--",
        "/usr/lib/cardbridge/cardbridge-xrdp-config": "-rwxr-xr-x",
    }
    for path, mode in want.items():
        assert path in c, f"{path} not in {deb.name}"
        assert c[path][0] == mode, (path, c[path])
    assert not any(p.startswith("/home") or "freerdp2" in p for p in c), "the add-in belongs to the desk package"
    assert field(deb, "Package") == "cardbridge-server"

    x = Path(tempfile.mkdtemp(prefix="cbpkgx-"))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], check=True)
        subprocess.run(["dpkg-deb", "-e", str(deb), str(x / "DEBIAN")], check=True)
        # The packaged files are the repository's.
        for src, dst in (("installers/profile.d/cardbridge.sh", "etc/profile.d/cardbridge.sh"),
                         ("installers/systemd/cardbridge-session.service",
                          "usr/lib/systemd/user/cardbridge-session.service"),
                         ("installers/systemd/60-cardbridge.conf", "usr/lib/environment.d/60-cardbridge.conf"),
                         ("installers/xrdp/cardbridge-xrdp-config", "usr/lib/cardbridge/cardbridge-xrdp-config")):
            assert (ROOT / src).read_bytes() == (x / dst).read_bytes(), dst
        # The unit starts the packaged cdrsession; the hook finds it on the default PATH.
        unit = (x / "usr/lib/systemd/user/cardbridge-session.service").read_text()
        exec_start = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
        assert (x / exec_start.lstrip("/")).is_file(), exec_start
        # The shim is found next to cdrsession (find_shim: same directory first).
        assert (x / Path(exec_start).parent.relative_to("/") / "cardbridge-shim").is_file()
        # The hook is a conffile (an admin's edits survive upgrades); the scripts wire xrdp and systemd.
        assert (x / "DEBIAN/conffiles").read_text().split() == ["/etc/profile.d/cardbridge.sh"]
        postinst = (x / "DEBIAN/postinst").read_text()
        prerm = (x / "DEBIAN/prerm").read_text()
        assert "/usr/lib/cardbridge/cardbridge-xrdp-config enable /etc/xrdp/xrdp.ini" in postinst
        assert "systemctl --global enable cardbridge-session.service" in postinst
        assert "/usr/lib/cardbridge/cardbridge-xrdp-config disable /etc/xrdp/xrdp.ini" in prerm
        for s in ("postinst", "prerm"):
            assert os.stat(x / "DEBIAN" / s).st_mode & stat.S_IXUSR
            assert subprocess.run(["sh", "-n", str(x / "DEBIAN" / s)]).returncode == 0
        assert subprocess.run(["sh", "-n", str(x / "etc/profile.d/cardbridge.sh")]).returncode == 0
        # Installed binaries run (shared libraries resolved on this Debian 12).
        for b in ("usr/bin/cdrsession", "usr/bin/cardbridge-shim"):
            r = subprocess.run([str(x / b), "--version"], capture_output=True, text=True, timeout=10)
            assert r.returncode == 0 and "0." in r.stdout, (b, r)
    finally:
        shutil.rmtree(x, ignore_errors=True)


# ---- cardbridge-xrdp-config -------------------------------------------------------------------------

SYNTHETIC_INI = """[Globals]
port=3389
; a comment mentioning CBRIDGE=true outside [Channels] is not the setting

[Xorg]
name=Xorg
lib=libxup.so
CBRIDGE=false

[Channels]
; Channel names not listed here will be blocked by XRDP.
rdpdr=true
rdpsnd=true
drdynvc=true
cliprdr=true
rail=true
xrdpvr=true
tcutils=true
"""


def xconf(action: str, ini: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(XRDP_CONFIG), action, str(ini)], capture_output=True, text=True, timeout=10)


@pytest.fixture(params=["system", "synthetic"])
def ini(request, tmp_path) -> Path:
    p = tmp_path / "xrdp.ini"
    if request.param == "system":
        if not SYSTEM_INI.exists():
            pytest.skip("xrdp is not installed here")
        shutil.copy(SYSTEM_INI, p)
    else:
        p.write_text(SYNTHETIC_INI)
    p.chmod(0o640)
    return p


def channels_section(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("["):
            inside = line == "[Channels]"
            continue
        if inside:
            lines.append(line)
    return lines


def test_xrdp_config_enable_check_disable(ini):
    original = ini.read_bytes()
    assert xconf("check", ini).returncode == 1
    r = xconf("enable", ini)
    assert r.returncode == 0, r
    enabled = ini.read_bytes()
    # Exact: the original plus the comment and CBRIDGE=true right after [Channels], nothing else.
    before, after = original.decode().splitlines(), enabled.decode().splitlines()
    i = before.index("[Channels]")
    assert after == before[:i + 1] + [COMMENT, "CBRIDGE=true"] + before[i + 1:]
    assert enabled.endswith(b"\n")
    assert [l for l in channels_section(enabled.decode()) if l.startswith("CBRIDGE")] == ["CBRIDGE=true"]
    assert stat.S_IMODE(ini.stat().st_mode) == 0o640, "the file's mode must be kept"
    r = xconf("check", ini)
    assert r.returncode == 0 and "allowed" in r.stdout, r
    # Idempotent.
    assert xconf("enable", ini).returncode == 0 and ini.read_bytes() == enabled
    # disable restores the original exactly, and is idempotent too.
    assert xconf("disable", ini).returncode == 0
    assert ini.read_bytes() == original
    assert xconf("disable", ini).returncode == 0 and ini.read_bytes() == original
    assert xconf("check", ini).returncode == 1
    # No leftovers of the atomic rewrite.
    assert sorted(p.name for p in ini.parent.iterdir()) == ["xrdp.ini"]


def test_xrdp_config_existing_setting_and_missing_section(tmp_path):
    ini = tmp_path / "xrdp.ini"
    ini.write_text("[Globals]\nport=3389\n\n[Channels]\nrdpdr=true\nCBRIDGE = false\ncliprdr=true\n")
    assert xconf("check", ini).returncode == 1
    assert xconf("enable", ini).returncode == 0
    assert ini.read_text() == "[Globals]\nport=3389\n\n[Channels]\nrdpdr=true\nCBRIDGE=true\ncliprdr=true\n"
    assert xconf("check", ini).returncode == 0

    ini.write_text("[Globals]\nport=3389\n")
    assert xconf("enable", ini).returncode == 0
    assert ini.read_text() == f"[Globals]\nport=3389\n\n[Channels]\n{COMMENT}\nCBRIDGE=true\n"
    assert xconf("enable", ini).returncode == 0
    assert ini.read_text().count("CBRIDGE=true") == 1
    assert xconf("check", ini).returncode == 0

    # No xrdp installed: nothing to do, and no failure (the package's postinst calls it blindly).
    r = xconf("enable", tmp_path / "absent.ini")
    assert r.returncode == 0 and not (tmp_path / "absent.ini").exists()
    assert xconf("bogus", ini).returncode == 2
