"""Checks built wheels as PyPI's users would need them (run by
scripts/test-wheel with target/wheel-tools' python): a manylinux tag no
newer than manylinux_2_28; every ELF file in the wheel (the extension and
the bundled `memsock`) needing no glibc symbol version newer than 2.28;
auditwheel agreeing; the abi3 wheel using only the limited API (abi3audit).
Prints each wheel's size and files."""

import io
import os
import re
import subprocess
import sys
import zipfile

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection

MAX_GLIBC = (2, 28)


def glibc_needed(data):
    """The newest GLIBC_x.y version an ELF image asks for."""
    newest = (0, 0)
    for section in ELFFile(io.BytesIO(data)).iter_sections():
        if not isinstance(section, GNUVerNeedSection):
            continue
        for _, auxiliaries in section.iter_versions():
            for aux in auxiliaries:
                found = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", aux.name)
                if found:
                    newest = max(newest, (int(found.group(1)), int(found.group(2))))
    return newest


def check(path):
    failures = []
    with zipfile.ZipFile(path) as wheel:
        tags = [line.split(":", 1)[1].strip() for line in wheel.read(next(
            n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))).decode().splitlines()
            if line.startswith("Tag:")]
        elves = {}
        for info in wheel.infolist():
            data = wheel.read(info)
            if data[:4] == b"\x7fELF":
                elves[info.filename] = (glibc_needed(data), len(data), info.external_attr >> 16)
    for tag in tags:
        found = re.search(r"manylinux_(\d+)_(\d+)_", tag)
        if not found or (int(found.group(1)), int(found.group(2))) > MAX_GLIBC:
            failures.append(f"tag {tag} is not manylinux_2_28 or older")
    names = set(elves)
    for name in ("memsock/bin/memsock",):
        if name not in names:
            failures.append(f"{name} is missing")
    if not any(n.startswith("memsock/_memsock.") and n.endswith(".so") for n in names):
        failures.append("the extension module is missing")
    for name, (glibc, size, mode) in sorted(elves.items()):
        print(f"  {name}: {size:,} bytes, needs GLIBC_{glibc[0]}.{glibc[1]}, mode {mode & 0o777:o}")
        if glibc > MAX_GLIBC:
            failures.append(f"{name} needs GLIBC_{glibc[0]}.{glibc[1]}")
        if name.endswith("bin/memsock") and not mode & 0o100:
            failures.append(f"{name} is not executable in the wheel")
    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", path], capture_output=True, text=True)
    if show.returncode != 0 or "manylinux_2_28" not in show.stdout.replace("\n", " "):
        failures.append(f"auditwheel show: {show.stdout}{show.stderr}")
    if "abi3" in tags[0]:
        audit = subprocess.run([sys.executable, "-m", "abi3audit", "--strict", "--report", path],
                               capture_output=True, text=True)
        print("  abi3audit:", audit.stdout.strip() or audit.stderr.strip())
        if audit.returncode != 0:
            failures.append(f"abi3audit: {audit.stdout}{audit.stderr}")
    return failures


def main():
    failed = False
    for path in sys.argv[1:]:
        print(f"{os.path.basename(path)}: {os.path.getsize(path):,} bytes")
        for failure in check(path):
            print(f"  FAILED: {failure}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
