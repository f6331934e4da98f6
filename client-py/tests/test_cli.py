"""The `memsock` command as a pip user gets it: the console script and
`python -m memsock`, running the binary bundled in the wheel."""

import json
import os
import shutil
import signal
import subprocess
import sys

from conftest import WHEEL, eventually

SCRIPTS = os.path.dirname(sys.executable)


def _run(*args, timeout=60):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def test_the_memsock_command_and_python_m_memsock(tmp_path):
    command = shutil.which("memsock", path=SCRIPTS)
    assert command, f"no memsock console script in {SCRIPTS}"
    if not WHEEL:
        # A development build (maturin develop) bundles no binary: it says so.
        done = _run(command, "--version")
        assert done.returncode != 0 and "scripts/build-wheel" in done.stderr, done
        return
    # Nothing from a Rust toolchain helps here.
    assert shutil.which("cargo") is None and shutil.which("rustc") is None, os.environ["PATH"]
    version = _run(command, "--version")
    assert version.returncode == 0 and version.stdout.startswith("memsock "), version

    socket = str(tmp_path / "broker.sock")
    broker = subprocess.Popen([command, "--socket", socket, "broker"], stderr=subprocess.PIPE, text=True)
    try:
        assert eventually(lambda: os.path.exists(socket) or broker.poll() is not None)
        for stats in ([command], [sys.executable, "-m", "memsock"]):
            done = _run(*stats, "--socket", socket, "stats", "--format", "json")
            assert done.returncode == 0, done
            assert json.loads(done.stdout)["streams"] == [], done.stdout
        # The script became the broker (exec): the signal reaches it.
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(timeout=30) == 0, broker.stderr.read()
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
        broker.stderr.close()
    done = _run(sys.executable, "-m", "memsock", "--socket", socket, "stats")
    assert done.returncode == 1 and "memsock:" in done.stderr and "Traceback" not in done.stderr, done
