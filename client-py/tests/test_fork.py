"""Handles across fork: a multiprocessing pool (fork start method) whose
workers inherit the parent's client, publisher and subscriber."""

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import warnings

import numpy as np

import memsock
from conftest import eventually

# The parent's handles, inherited by forked workers (set before the pool).
_INHERITED = {}


def _worker(task):
    socket, i = task
    client, pub, sub = _INHERITED["client"], _INHERITED["pub"], _INHERITED["sub"]
    loan, held = _INHERITED["loan"], _INHERITED["held"]
    refusals = {}
    for what, use in [
        ("stats", lambda: client.stats()),
        ("publisher", lambda: client.publisher(f"fork/nope{i}", slot_size=64, slots=4)),
        ("send", lambda: pub.send(b"from the child")),
        ("loan", lambda: pub.loan(8)),
        ("recv", lambda: sub.recv(timeout=1)),
        ("try_recv", lambda: sub.try_recv()),
        ("recv_batch", lambda: sub.recv_batch(4, timeout=1)),
        ("loan view", lambda: memoryview(loan)),
        ("loan send", lambda: loan.send()),
    ]:
        try:
            use()
            refusals[what] = None
        except memsock.Forked as e:
            refusals[what] = str(e)
    forked = client.forked
    # The child's copies go: the parent's lease must not notice.
    _INHERITED.clear()
    del client, pub, sub, loan, held
    gc.collect()
    # Its own connection works: a stream of its own, a frame through it.
    own = memsock.connect(socket)
    name = f"fork/w{i}"
    mine = own.publisher(name, slot_size=64, slots=4)
    back = own.subscribe(name, credits=2, policy="lossless", wait=False)
    mine.send(np.full(8, i, dtype=np.uint64))
    with back.recv(timeout=10) as frame:
        got = int(frame.ndarray(np.uint64)[0])
    publisher_pid = own.stats(name)["streams"][0]["publisher_pid"]
    return {"pid": os.getpid(), "forked": forked, "refusals": refusals, "got": got, "publisher_pid": publisher_pid}


def test_forked_workers_get_a_clear_error_and_connect_themselves(broker):
    client = broker.connect()
    pub = client.publisher("fork/in", slot_size=64, slots=16)
    sub = client.subscribe("fork/in", credits=4, policy="lossless", wait=False)
    pub.send(b"before")
    held = sub.recv(timeout=5)  # a frame held across the fork
    loan = pub.loan(8)  # and a loan being written
    memoryview(loan)[:] = b"parent's"
    _INHERITED.update(client=client, pub=pub, sub=sub, loan=loan, held=held)
    try:
        context = multiprocessing.get_context("fork")
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a process with threads (the
            # client's reader) may deadlock: what memsock guards against.
            warnings.simplefilter("ignore", DeprecationWarning)
            # A fresh fork of the parent for every task.
            with context.Pool(4, maxtasksperchild=1) as pool:
                results = pool.map(_worker, [(broker.socket, i) for i in range(8)], chunksize=1)
    finally:
        _INHERITED.clear()
    assert not client.forked
    for i, r in enumerate(results):
        assert r["forked"] and r["pid"] != os.getpid(), r
        for what, error in r["refusals"].items():
            assert error is not None, f"{what} worked in a forked child"
            assert "memsock.connect()" in error, error
        assert r["got"] == i and r["publisher_pid"] == r["pid"], r
    # The parent's lease is whole: its held frame, its subscriber, its
    # publisher, and the broker still counts its one subscriber.
    assert held.tobytes() == b"before"
    held.release()
    loan.send(timeout=5)
    with sub.recv(timeout=5) as frame:
        assert frame.tobytes() == b"parent's"
    for n in range(6):
        pub.send(bytes([n]) * 4, timeout=5)
        with sub.recv(timeout=5) as frame:
            assert frame.tobytes() == bytes([n]) * 4
    stream = client.stats("fork/in")["streams"][0]
    assert stream["publisher_pid"] == os.getpid()
    assert len(stream["subscribers"]) == 1


_ORPHANING_PARENT = r"""
import os, sys, time
import memsock
client = memsock.connect(sys.argv[1])
sub = client.subscribe("fork/orphan", credits=2, policy="lossless", wait=False)
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_dead_parent_s_lease_ends_though_its_forked_child_lives(broker):
    client = broker.connect()
    pub = client.publisher("fork/orphan", slot_size=64, slots=8)  # noqa: F841 (kept)

    def subscribers():
        return len(client.stats("fork/orphan")["streams"][0]["subscribers"])

    parent = subprocess.Popen(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", _ORPHANING_PARENT, broker.socket],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        child = int(parent.stdout.readline())
        assert eventually(lambda: subscribers() == 1)
        parent.kill()
        parent.wait()
        # The child's copy of the connection closed as it started: the
        # parent's death ends the lease, though the child lives on.
        assert eventually(lambda: subscribers() == 0)
        os.kill(child, 0)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if child is not None:
            os.kill(child, signal.SIGKILL)
