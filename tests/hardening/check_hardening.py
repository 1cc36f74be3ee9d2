#!/usr/bin/env python3
"""Reads built ELF files and fails when one lacks the hardening cmake/CardbridgeHardening.cmake
(and, for the Debian packages, dpkg-buildflags) asks for:

  PIE          an executable is ELF type DYN with DF_1_PIE (a shared object is DYN anyway)
  RELRO        a PT_GNU_RELRO segment
  BIND_NOW     DT_BIND_NOW, DF_BIND_NOW or DF_1_NOW: with RELRO, full RELRO (the GOT is
               read-only once the dynamic linker has bound everything at start-up)
  stack guard  __stack_chk_fail imported (-fstack-protector-strong: every C++ program of
               ours has a function with a local array)
  FORTIFY      at least one __*_chk function imported when the file uses libc functions that
               _FORTIFY_SOURCE protects (checksec's and Debian hardening-check's rule: a
               file that calls none has nothing to fortify)

Two flags leave no trace in a linked ELF file on Debian 12 and are checked where they do:
  CET          -fcf-protection marks each object file with a GNU property note (x86 feature:
               IBT, SHSTK); the linked file loses it because Debian's crti.o and crtbeginS.o
               carry none, so the object files (--objects DIR) are read instead
  stack clash  -fstack-clash-protection leaves no marker at all: the compile commands
               (--compile-commands compile_commands.json) must carry it, with the others

  check_hardening.py [--objects DIR] [--compile-commands FILE] [--scan DIR] FILE...
  check_hardening.py --expect-refused PIE,RELRO,... FILE...   (the check's own test)
FILE: files that must exist and pass; --scan DIR: every ELF executable and shared object
under DIR (CMakeFiles excluded) must pass too. Exit 0 when everything passes, 1 otherwise
(or when nothing was checked). Prints one line per file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

# libc functions that have a __*_chk twin under _FORTIFY_SOURCE (glibc 2.36).
FORTIFIABLE = {
    "memcpy", "memmove", "mempcpy", "memset", "explicit_bzero", "stpcpy", "stpncpy", "strcat", "strcpy",
    "strncat", "strncpy", "strlcpy", "strlcat", "sprintf", "snprintf", "vsprintf", "vsnprintf", "printf",
    "fprintf", "vprintf", "vfprintf", "dprintf", "vdprintf", "asprintf", "vasprintf", "obstack_printf",
    "obstack_vprintf", "fgets", "fgets_unlocked", "fread", "fread_unlocked", "read", "pread", "pread64",
    "readlink", "readlinkat", "recv", "recvfrom", "getcwd", "getwd", "realpath", "confstr", "getgroups",
    "ttyname_r", "getlogin_r", "gethostname", "getdomainname", "wcscpy", "wcpcpy", "wcsncpy", "wcpncpy",
    "wcscat", "wcsncat", "wmemcpy", "wmemmove", "wmempcpy", "wmemset", "swprintf", "vswprintf", "wprintf",
    "fwprintf", "vwprintf", "vfwprintf", "fgetws", "fgetws_unlocked", "mbstowcs", "wcstombs", "mbsrtowcs",
    "wcsrtombs", "mbsnrtowcs", "wcsnrtombs", "wcrtomb", "wctomb", "ptsname_r", "syslog", "vsyslog", "poll",
    "ppoll", "longjmp", "siglongjmp", "fdelt",
}
FLAGS_NEEDED = ("-fstack-protector-strong", "-fstack-clash-protection", "-fcf-protection=full")
SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".cxx")


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"}).stdout


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def check_file(path: Path) -> tuple[bool, str]:
    header = readelf("-h", str(path))
    m = re.search(r"^\s*Type:\s+(\w+)", header, re.M)
    kind = m.group(1) if m else "?"
    if kind not in ("EXEC", "DYN"):
        return False, f"not a linked program or library (type {kind})"
    segments = readelf("-l", str(path))
    dynamic = readelf("-d", str(path))
    symbols = readelf("--dyn-syms", str(path))
    interp = "Requesting program interpreter" in segments
    flags1 = re.search(r"\(FLAGS_1\)\s+Flags:(.*)$", dynamic, re.M)
    flags1 = flags1.group(1).split() if flags1 else []
    flags = re.search(r"\(FLAGS\)\s+(.*)$", dynamic, re.M)
    flags = flags.group(1).split() if flags else []
    executable = interp or "PIE" in flags1
    imported = set()
    for line in symbols.splitlines():
        parts = line.split()
        # Num: Value Size Type Bind Vis Ndx Name: undefined (UND) symbols are the imports.
        if len(parts) >= 8 and parts[6] == "UND":
            imported.add(parts[7].split("@")[0])
    chk = sorted(s for s in imported if re.fullmatch(r"__\w+_chk", s) and s != "__stack_chk_fail")
    unprotected = sorted(s for s in imported if s in FORTIFIABLE)

    results = {
        ("PIE" if executable else "DYN"): (kind == "DYN" and "PIE" in flags1) if executable else kind == "DYN",
        "RELRO": "GNU_RELRO" in segments,
        "BIND_NOW": "(BIND_NOW)" in dynamic or "BIND_NOW" in flags or "NOW" in flags1,
        "stack-protector": "__stack_chk_fail" in imported,
        "FORTIFY": bool(chk) or not unprotected,
    }
    fortify_note = f"{len(chk)} _chk" if chk else ("nothing to fortify" if not unprotected else "none of " + ",".join(unprotected[:4]))
    words = [f"{k}={'yes' if v else 'NO'}" for k, v in results.items()]
    words[-1] += f" ({fortify_note})"
    return all(results.values()), ("executable " if executable else "library ") + " ".join(words), \
        {k for k, v in results.items() if not v}


def built_objects(compile_commands: Path | None) -> set | None:
    """The object files the build still makes (a build directory keeps the objects of sources
    since moved or removed: not ours to judge)."""
    if compile_commands is None or not compile_commands.exists():
        return None
    out = set()
    for e in json.loads(compile_commands.read_text()):
        output = e.get("output")
        if output is None:  # CMake writes no "output" for every generator: the command's -o
            argv = e["arguments"] if "arguments" in e else shlex.split(e.get("command", ""))
            output = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"), None)
        if output:
            out.add((Path(e["directory"]) / output).resolve())
    return out or None


def check_objects(root: Path, built: set | None = None) -> tuple[int, list[str]]:
    """Object files without the CET property note."""
    bad = []
    count = 0
    for obj in sorted(root.rglob("*.o")):
        if not is_elf(obj) or (built is not None and obj.resolve() not in built):
            continue
        count += 1
        if not re.search(r"x86 feature:.*\bIBT\b.*\bSHSTK\b", readelf("-n", str(obj))):
            bad.append(str(obj))
    return count, bad


def check_compile_commands(path: Path, source_root: Path | None) -> tuple[int, list[str]]:
    bad = []
    entries = json.loads(path.read_text())
    count = 0
    for e in entries:
        src = e.get("file", "")
        if not src.endswith(SOURCE_SUFFIXES):
            continue
        count += 1
        argv = e["arguments"] if "arguments" in e else shlex.split(e["command"])
        missing = [f for f in FLAGS_NEEDED if f not in argv]
        if not any(a.startswith("-D_FORTIFY_SOURCE=") and a[-1] in "23" for a in argv):
            missing.append("-D_FORTIFY_SOURCE=2|3")
        if not any(re.fullmatch(r"-O[1-3s]|-Ofast|-Og", a) for a in argv):
            missing.append("-O (FORTIFY needs optimisation)")
        if missing:
            bad.append(f"{src}: {' '.join(missing)}")
    return count, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--scan", action="append", type=Path, default=[])
    ap.add_argument("--objects", action="append", type=Path, default=[])
    ap.add_argument("--compile-commands", type=Path)
    ap.add_argument("--expect-refused", metavar="CHECK,...",
                    help="self-test: exit 0 only if every FILE fails at least these checks")
    args = ap.parse_args()

    if args.expect_refused:
        expected = set(args.expect_refused.split(","))
        good = bool(args.files)
        for f in args.files:
            ok, text, failed = check_file(f)
            print(f"{f}: {text}")
            if not expected <= failed:
                print(f"FAIL the check let through what it must refuse: {sorted(expected - failed)}")
                good = False
        return 0 if good else 1

    failures = 0
    checked = 0
    files = list(args.files)
    for f in files:
        if not f.exists():
            print(f"FAIL {f}: missing (not built?)")
            failures += 1
    seen = {f.resolve() for f in files if f.exists()}
    for root in args.scan:
        for p in sorted(root.rglob("*") if root.is_dir() else []):
            if "CMakeFiles" in p.parts or not p.is_file() or p.suffix in (".o", ".a") or p.resolve() in seen:
                continue
            if (os.access(p, os.X_OK) or ".so" in p.name) and is_elf(p):
                files.append(p)
                seen.add(p.resolve())
    for f in files:
        if not f.exists():
            continue
        ok, text, _ = check_file(f)
        checked += 1
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {f}: {text}")
    built = built_objects(args.compile_commands)
    for root in args.objects:
        n, bad = check_objects(root, built)
        checked += n
        failures += len(bad)
        print(f"{'ok  ' if not bad else 'FAIL'} CET (IBT, SHSTK property note): {n - len(bad)}/{n} object files under {root}")
        for b in bad[:20]:
            print(f"     no CET note: {b}")
    if args.compile_commands:
        n, bad = check_compile_commands(args.compile_commands, None)
        checked += n
        failures += len(bad)
        print(f"{'ok  ' if not bad else 'FAIL'} compile flags ({', '.join(FLAGS_NEEDED)}, _FORTIFY_SOURCE, -O): "
              f"{n - len(bad)}/{n} compile commands")
        for b in bad[:20]:
            print(f"     missing: {b}")
    if checked == 0:
        print("FAIL nothing was checked")
        return 1
    print(f"hardening: {checked} checks, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
