"""Packaging sources and the admin commands around them (the packages themselves are built,
linted, installed, used and purged by tests/integration/test_installed_packages.py after
scripts/package):

    installers/debian: four binary packages, maintainer scripts that never touch another
      package's configuration nor call systemctl, the user unit opt-in (ConditionPathExists).
    the xrdp session hook (installers/profile.d/cardbridge.sh): does nothing until the admin opted
      xrdp sessions in.
    `cdrsession enable|disable xrdp`: the opt-in marker and CBRIDGE=true under [Channels] in a copy
      of xrdp.ini, idempotent, and disable restores the file byte for byte.
    installers/xrdp/cardbridge-xrdp-config enable|check|disable on copies of xrdp.ini: idempotent,
      and exact (only the CBRIDGE line and its comment change).

Run:  /usr/bin/python3 -m pytest tests/integration/test_session_packaging.py -v
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from test_session_support import BUILD, ROOT

XRDP_CONFIG = ROOT / "installers" / "xrdp" / "cardbridge-xrdp-config"
HOOK = ROOT / "installers" / "profile.d" / "cardbridge.sh"
DEBIAN = ROOT / "installers" / "debian"
CDRSESSION = BUILD / "cdrsession" / "cdrsession"
SYSTEM_INI = Path("/etc/xrdp/xrdp.ini")
COMMENT = "; CardBridge smart-card redirection (cardbridge-server)"


def test_debian_sources():
    control = (DEBIAN / "control").read_text()
    assert re.findall(r"^Package: (\S+)", control, re.M) == [
        "cardbridge-desk", "cardbridge-freerdp2", "cardbridge-freerdp3", "cardbridge-server"]
    assert "Recommends: libccid" in control
    assert "@localhost" not in control and "${shlibs:Depends}" in control
    assert (DEBIAN / "copyright").read_text().startswith("Format: https://www.debian.org/doc/packaging-manuals/")
    rules = (DEBIAN / "rules").read_text()
    assert "hardening=+all" in rules and "-DBUILD_TESTING=OFF" in rules and "--no-enable" in rules
    for script in sorted(DEBIAN.glob("*.post*")) + sorted(DEBIAN.glob("*.pre*")):
        text = script.read_text()
        assert os.access(script, os.X_OK), script
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0, script
        assert "#DEBHELPER#" in text, script
        code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
        assert "xrdp.ini" not in code and "/etc/xrdp" not in code, f"{script} touches xrdp's configuration"
        assert "systemctl" not in code, f"{script} calls systemctl"
    unit = (ROOT / "installers" / "systemd" / "cardbridge-session.service").read_text()
    assert "ConditionPathExists=/etc/cardbridge/enabled/systemd" in unit
    for page in ("cardbridge-desk", "cardbridge-shim", "cdrsession"):
        r = subprocess.run(["man", "--warnings", "-l", "-Tutf8", str(ROOT / "installers" / "man" / f"{page}.1")],
                           capture_output=True, text=True, env={**os.environ, "MANWIDTH": "80"})
        assert r.returncode == 0 and not r.stderr.strip(), (page, r.stderr)
        text = re.sub(".\x08", "", r.stdout)   # overstrike (bold, underline)
        assert "SYNOPSIS" in text and page in text, text[:500]


def _hook(tmp_path: Path, etc: Path) -> dict:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700, exist_ok=True)
    env = {"PATH": f"{CDRSESSION.parent}:/usr/bin:/bin", "HOME": "/nonexistent", "XRDP_SESSION": "1",
           "DISPLAY": ":4242", "XDG_RUNTIME_DIR": str(rt), "CARDBRIDGE_ETC": str(etc)}
    script = (f'. "{HOOK}"\n'
              'echo "CSOCK=${PCSCLITE_CSOCK_NAME:-}"\n'
              'echo "STARTED=${CARDBRIDGE_SESSION_STARTED:-}"\n'
              'echo "ERROR=${CARDBRIDGE_START_ERROR:-}"\n')
    r = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)


def test_hook_is_opt_in(tmp_path):
    if not CDRSESSION.exists():
        pytest.fail(f"{CDRSESSION} not built", pytrace=False)
    v = _hook(tmp_path, tmp_path / "etc-empty")
    assert v == {"CSOCK": "", "STARTED": "", "ERROR": ""}, v
    assert not (tmp_path / "rt" / "cardbridge").exists(), "the hook started something without the opt-in"


def test_hook_failed_start_is_not_marked_and_says_why(tmp_path):
    """Opted in, but the session's directory cannot be made (a file squats on it): the start
    fails, the session is not marked as started and gets the reason."""
    etc = tmp_path / "etc"
    (etc / "enabled").mkdir(parents=True)
    (etc / "enabled" / "xrdp").write_text("")
    (tmp_path / "rt").mkdir(mode=0o700)
    (tmp_path / "rt" / "cardbridge").write_text("not a directory")
    v = _hook(tmp_path, etc)
    assert v["CSOCK"] == "" and v["STARTED"] == "", v
    assert "cardbridge" in v["ERROR"] and "not a directory" in v["ERROR"], v


def _enable(action: str, etc: Path, ini: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CDRSESSION), action, "xrdp", "--xrdp-ini", str(ini), "--xrdp-config-tool",
                           str(XRDP_CONFIG)], capture_output=True, text=True, timeout=20,
                          env={**os.environ, "CARDBRIDGE_ETC": str(etc)})


def test_cdrsession_enable_disable_xrdp(tmp_path):
    if not CDRSESSION.exists():
        pytest.fail(f"{CDRSESSION} not built", pytrace=False)
    ini = tmp_path / "xrdp.ini"
    ini.write_text(SYNTHETIC_INI)
    original = ini.read_bytes()
    etc = tmp_path / "etc-cardbridge"
    r = _enable("enable", etc, ini)
    assert r.returncode == 0, r
    assert (etc / "enabled" / "xrdp").is_file()
    assert "restart xrdp" in r.stdout, r.stdout
    enabled = ini.read_bytes()
    assert [l for l in channels_section(enabled.decode()) if l.startswith("CBRIDGE")] == ["CBRIDGE=true"]
    r = _enable("enable", etc, ini)  # idempotent
    assert r.returncode == 0 and ini.read_bytes() == enabled and "already allowed" in r.stdout, r
    r = _enable("disable", etc, ini)
    assert r.returncode == 0, r
    assert ini.read_bytes() == original and not etc.exists()
    # No xrdp: the marker is set, and the admin is told to come back once xrdp is there.
    r = _enable("enable", etc, tmp_path / "absent.ini")
    assert r.returncode == 0 and "not found" in r.stdout and (etc / "enabled" / "xrdp").is_file(), r


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
