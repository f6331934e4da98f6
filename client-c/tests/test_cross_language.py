"""The C library between processes and languages, through the real broker:
C -> Rust and Python (10^6 frames of random length, lossless, byte-exact),
Rust -> C, C++ -> C++, a C subscriber killed with SIGKILL, and a broker
that dies under a C program. Run by scripts/test-c, which builds the peers."""

import json
import os
import subprocess
import threading

import numpy as np

import memsock
from conftest import fixtures

eventually = fixtures.eventually

U64 = np.uint64


def _mix(x):
    """SplitMix64 over an array (tests/src/lib.rs `mix`); wraps like u64."""
    z = x + U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    return z ^ (z >> U64(31))


def expected_batch(seqs, slot_size):
    """Frames `seqs` of the test pattern, concatenated, and their lengths.

    Frame `seq` is the first `frame_len` bytes of the chain mix(mix(seq)),
    mix(mix(mix(seq))), ... as little-endian words (fill_frame's tail word
    is the chain's next)."""
    seqs = np.asarray(seqs, dtype=U64)
    lens = (U64(1) + _mix(seqs ^ U64(0xA5A5)) % U64(slot_size)).astype(np.int64)
    words = (slot_size + 7) // 8
    chain = np.empty((len(seqs), words), dtype="<u8")
    state = _mix(seqs)
    for w in range(words):
        state = _mix(state)
        chain[:, w] = state
    full = chain.view(np.uint8).reshape(len(seqs), words * 8)
    return full[np.arange(words * 8) < lens[:, None]], lens


def test_the_pattern_is_the_rust_peers():
    # A few frames from the Rust peer, checked against expected_batch:
    # the Python model of the pattern is the one the C peer writes.
    expected = b"".join(fixtures.frame_bytes(s, 100) for s in range(50))
    got, lens = expected_batch(range(50), 100)
    assert got.tobytes() == expected
    assert list(lens) == [fixtures.frame_len(s, 100) for s in range(50)]


def test_c_publisher_to_rust_and_python_lossless_subscribers(broker, c_peer, rust_peer):
    n, slot_size = 1_000_000, 256
    client = broker.connect()
    rust = rust_peer({"role": "subscriber", "socket": broker.socket, "stream": "c-fast",
                      "policy": "lossless", "credits": 1024, "wait_for_stream": True,
                      "max_frames": n})
    py = []
    t = threading.Thread(target=lambda: py.append(
        client.subscribe("c-fast", credits=2048, policy="lossless", wait=True)))
    t.start()
    assert eventually(lambda: broker.client.stats()["waiting_subscribers"] == 2)
    # Room for large batches: the Python side checks a batch at a time.
    pub = c_peer("publish", broker.socket, "c-fast", n, slot_size, 4096)
    t.join(timeout=30)
    sub = py[0]

    seen, bad = 0, 0
    while True:
        try:
            batch = sub.recv_batch(4096, timeout=60)
        except memsock.PublisherGone:
            break
        seqs = np.asarray(batch.seq)
        assert (seqs == np.arange(seen, seen + len(seqs), dtype=U64)).all(), "lost or reordered"
        want, lens = expected_batch(seqs, slot_size)
        got_lens = np.diff(np.asarray(batch.offsets))
        if not (np.array_equal(got_lens, lens) and np.array_equal(np.asarray(batch.data), want)):
            bad += 1
        seen += len(seqs)
    assert (seen, bad) == (n, 0)
    assert pub.finish(timeout=60) == {"sent": n}
    report = rust.finish(timeout=60)
    assert (report["received"], report["missing"], report["bad"]) == (n, 0, 0)
    assert report["first"] == 0 and report["last"] == n - 1


def test_rust_publisher_to_c_subscriber(broker, c_peer, rust_peer):
    n, slot_size = 20_000, 1024
    sub = c_peer("subscribe", broker.socket, "to-c", 8, slot_size)
    assert eventually(lambda: broker.client.stats()["waiting_subscribers"] == 1)
    pub = rust_peer({"role": "publisher", "socket": broker.socket, "stream": "to-c",
                     "slot_size": slot_size, "slot_count": 16, "count": n})
    assert pub.finish()["sent"] == n
    assert sub.finish() == {"received": n, "missing": 0, "bad": 0, "first": 0, "last": n - 1,
                            "end": "publisher_gone"}


def test_cpp_publisher_to_cpp_subscriber(broker, cpp_peer):
    n, slot_size = 20_000, 4096
    sub = cpp_peer("subscribe", broker.socket, "cpp", 8, slot_size)
    assert eventually(lambda: broker.client.stats()["waiting_subscribers"] == 1)
    pub = cpp_peer("publish", broker.socket, "cpp", n, slot_size, 16)
    assert pub.finish() == {"sent": n}
    assert sub.finish() == {"received": n, "missing": 0, "bad": 0, "first": 0, "last": n - 1,
                            "end": "publisher_gone"}


def test_a_killed_c_subscriber_gives_its_slots_and_credits_back(broker, c_peer):
    fixtures.check_a_killed_holder_gives_back(broker, lambda socket, stream, n: c_peer("hold", socket, stream, n))


def test_a_broker_gone_mid_stream(broker):
    peer = subprocess.Popen([os.environ["MEMSOCK_C_PEER"], "broker-gone", broker.socket],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(peer.stdout.readline()) == {"ready": True}
        broker.proc.kill()
        broker.proc.wait()
        peer.stdin.write("go\n")
        peer.stdin.flush()
        report = json.loads(peer.stdout.readline())["report"]
        assert peer.wait(timeout=30) == 0, peer.stderr.read()
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        for f in (peer.stdin, peer.stdout, peer.stderr):
            f.close()
    # The data plane does not need the broker: the stream goes on.
    assert report["sent"] == "ok" and report["received"] == "ok" and report["exact"]
    # What needs it says the connection is gone, and why.
    assert report["stats"] == "disconnected from the broker", report
    assert "connection to the broker is gone" in report["stats_error"], report
    assert report["set_credits"] == "disconnected from the broker", report
    assert report["connect"] == "the broker is unreachable", report
    assert broker.socket in report["connect_error"], report
