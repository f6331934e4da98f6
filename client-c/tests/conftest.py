"""Fixtures for the cross-language tests of the C library: those of the
Python client's tests (the real broker, the Rust test peer), and C and
C++ peers built by scripts/test-c (paths in MEMSOCK_C_PEER and
MEMSOCK_CPP_PEER)."""

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "memsock_py_fixtures", Path(__file__).resolve().parents[2] / "client-py" / "tests" / "conftest.py"
)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

broker = fixtures.broker
rust_peer = fixtures.rust_peer
py_peer = fixtures.py_peer


def _peer_fixture(env):
    exe = os.environ.get(env)
    if not exe:
        pytest.fail(f"{env} is not set: run scripts/test-c")
    peers = []

    def spawn(*args, **kw):
        p = fixtures.Peer([exe, *map(str, args)], **kw)
        peers.append(p)
        return p

    yield spawn
    for p in peers:
        p.close()


@pytest.fixture
def c_peer():
    yield from _peer_fixture("MEMSOCK_C_PEER")


@pytest.fixture
def cpp_peer():
    yield from _peer_fixture("MEMSOCK_CPP_PEER")
