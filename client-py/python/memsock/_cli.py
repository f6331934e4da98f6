"""The `memsock` command line shipped in the wheel (memsock/bin/memsock):
the `memsock` console script and `python -m memsock` run it."""

import os
import sys
from typing import List, Optional


def bundled() -> Optional[str]:
    """The path of the bundled `memsock` binary, or None (a development
    build, made without scripts/build-wheel, has none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "memsock")
    return path if os.access(path, os.X_OK) else None


def main(argv: Optional[List[str]] = None) -> None:
    """Replaces this process with the bundled binary: its exit status,
    signals and terminal are the command's own."""
    path = bundled()
    if path is None:
        sys.exit(
            "memsock: this memsock package has no bundled command line (a development build); "
            "build the wheel with scripts/build-wheel, or run target/release/memsock"
        )
    args = sys.argv[1:] if argv is None else argv
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(path, ["memsock", *args])
