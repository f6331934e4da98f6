"""Fixtures for the Python client's tests: the real broker binary on a
private socket, the Rust test peer, and Python peer processes."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import memsock

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MASK = (1 << 64) - 1
# Run against an installed wheel (scripts/test-wheel): the package must not
# be this checkout's, and autostart must find the binary bundled in it.
WHEEL = os.environ.get("MEMSOCK_TEST_WHEEL") == "1"
if WHEEL:
    _installed = Path(memsock.__file__).resolve()
    assert HERE.parent not in _installed.parents, f"memsock imported from the checkout: {_installed}"


def _exe(env, name):
    if os.environ.get(env):
        return os.environ[env]
    for profile in ("ci", "release", "debug"):
        path = ROOT / "target" / profile / name
        if path.exists():
            return str(path)
    pytest.fail(f"{name} not built: run ./scripts/test-all (or set {env})")


def mix(x):
    """SplitMix64, as in tests/src/lib.rs."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def frame_len(seq, slot_size):
    return 1 + mix(seq ^ 0xA5A5) % slot_size


def frame_bytes(seq, slot_size):
    """Frame `seq` of the Rust test peer's pattern (tests/src/lib.rs)."""
    n = frame_len(seq, slot_size)
    out = bytearray()
    state = mix(seq)
    while len(out) + 8 <= n:
        state = mix(state)
        out += state.to_bytes(8, "little")
    rest = n - len(out)
    if rest:
        out += mix(state).to_bytes(8, "little")[:rest]
    return bytes(out)


class Broker:
    def __init__(self, exe, options=()):
        self.dir = tempfile.TemporaryDirectory(prefix="memsock-py-test-")
        self.socket = os.path.join(self.dir.name, "broker.sock")
        self.log = open(os.path.join(self.dir.name, "broker.log"), "w+")
        self.proc = subprocess.Popen(
            [exe, "--socket", self.socket, "broker", *options], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client = memsock.connect(self.socket)
                break
            except memsock.BrokerUnreachable:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)

    def connect(self):
        return memsock.connect(self.socket)

    def stream(self, name):
        for s in self.client.stats()["streams"]:
            if s["name"] == name:
                return s
        return None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        self.dir.cleanup()
        assert "panicked" not in text, text


def eventually(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def check_a_killed_holder_gives_back(broker, spawn_holder):
    """A subscriber process holding 3 frames of a 9-slot stream is killed
    (SIGKILL): its credits are free again at once, though the publisher is
    idle, and then its slots. `spawn_holder(socket, stream, n)` starts the
    holder (a peer in some language that says "ready" and "holding")."""
    client = broker.connect()
    # Nine slots: seven to promise, two kept for the publisher's loans.
    pub = client.publisher("held", slot_size=64, slots=9)
    holder = spawn_holder(broker.socket, "held", 3)
    holder.read_until("ready")
    for i in range(3):
        pub.send(bytes([i]))
    holder.read_until("holding")
    assert broker.stream("held")["free_slots"] == 6
    holder.kill()

    newcomer = []

    def admitted():
        try:
            newcomer.append(client.subscribe("held", credits=7, wait=False))
            return True
        except memsock.CreditsRefused:
            return False
    assert eventually(admitted)
    newcomer.pop().close()

    # The lease ended: subscriber and slots reclaimed.
    def reclaimed():
        try:
            pub.send(b"x", timeout=0)
        except memsock.WouldBlock:
            pass
        s = broker.stream("held")
        return not s["subscribers"] and s["free_slots"] == 9
    assert eventually(reclaimed)


@pytest.fixture
def broker():
    b = Broker(_exe("MEMSOCK_EXE", "memsock"))
    yield b
    b.stop()


@pytest.fixture
def group_broker():
    """A broker that also admits the group `nogroup` (that of `nobody`)."""
    b = Broker(_exe("MEMSOCK_EXE", "memsock"), options=("--group", "nogroup"))
    os.chmod(b.dir.name, 0o755)
    yield b
    b.stop()


class Peer:
    """A child process reporting JSON lines on stdout."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise AssertionError(f"peer exited ({self.proc.wait()}): {err}")
        return json.loads(line)

    def read_until(self, key):
        while True:
            msg = self.read()
            if key in msg:
                return msg

    def finish(self, timeout=60):
        report = self.read_until("report")["report"]
        assert self.proc.wait(timeout=timeout) == 0, self.proc.stderr.read()
        self.close()
        return report

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self):
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def rust_peer():
    exe = _exe("MEMSOCK_TEST_PEER", "memsock-test-peer")
    peers = []

    def spawn(spec):
        env = dict(os.environ, MEMSOCK_TEST_PEER=json.dumps(spec))
        p = Peer([exe], env=env)
        peers.append(p)
        return p

    yield spawn
    for p in peers:
        p.close()


@pytest.fixture
def py_peer():
    peers = []

    def spawn(*args):
        p = Peer([sys.executable, str(HERE / "peer.py"), *map(str, args)])
        peers.append(p)
        return p

    yield spawn
    for p in peers:
        p.close()


def _env(runtime_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MEMSOCK_SOCKET", "MEMSOCK_AUTOSTART", "MEMSOCK_IDLE_EXIT")}
    env["XDG_RUNTIME_DIR"] = runtime_dir
    # An installed wheel's broker is the one it bundles.
    if not WHEEL:
        env["MEMSOCK_BROKER"] = _exe("MEMSOCK_EXE", "memsock")
    env.update(extra)
    return env


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone too (it is not ours to reap: init adopted it).
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _brokers_on(socket):
    """Pids of the processes running `memsock ... broker` on `socket`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if socket.encode() in argv and b"broker" in argv and _alive(int(entry)):
            pids.append(int(entry))
    return pids


@pytest.fixture
def runtime_dir():
    """A private XDG_RUNTIME_DIR: its default socket is the test's alone."""
    with tempfile.TemporaryDirectory(prefix="memsock-xdg-") as d:
        os.chmod(d, 0o700)
        yield d
        for pid in _brokers_on(os.path.join(d, "memsock", "broker.sock")):
            os.kill(pid, signal.SIGKILL)
