"""Frames between processes through the real broker: Rust -> Python,
Python -> Python, Python -> Rust; a killed Python subscriber; Ctrl-C."""

import json
import platform
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import memsock
from conftest import Broker, _exe, check_a_killed_holder_gives_back, eventually, frame_bytes, frame_len


def subscribe_in_background(broker, name, **kw):
    """Subscribes (waiting for the stream) on a thread; returns a getter."""
    out = {}
    client = broker.connect()
    t = threading.Thread(target=lambda: out.setdefault("sub", client.subscribe(name, **kw)))
    t.start()
    assert eventually(lambda: broker.client.stats()["waiting_subscribers"] == 1)

    def get():
        t.join(timeout=30)
        return out["sub"]

    return get


def test_rust_publisher_to_python_subscriber(broker, rust_peer):
    get = subscribe_in_background(broker, "rs", credits=8, policy="lossless")
    pub = rust_peer({"role": "publisher", "socket": broker.socket, "stream": "rs",
                     "slot_size": 512, "slot_count": 16, "count": 2000})
    sub = get()
    seen = 0
    while True:
        try:
            frame = sub.recv(timeout=30)
        except memsock.PublisherGone:
            break
        with frame:
            assert frame.seq == seen
            assert len(frame) == frame_len(seen, 512)
            assert memoryview(frame).tobytes() == frame_bytes(seen, 512)
            assert frame.timestamp_ns <= memsock.now_ns()
        seen += 1
    assert seen == 2000
    assert pub.finish()["sent"] == 2000


def test_python_publisher_to_python_subscriber(broker, py_peer):
    get = subscribe_in_background(broker, "py", credits=4, policy="lossless")
    pub = py_peer("publish", broker.socket, "py", 500)
    sub = get()
    for i in range(500):
        frame = sub.recv(timeout=30)
        a = frame.ndarray(np.uint16)
        assert frame.seq == i
        np.testing.assert_array_equal(a, np.arange(i, i + 256, dtype=np.uint16))
        del a
        frame.release()
    assert pub.finish()["sent"] == 500
    with pytest.raises(memsock.PublisherGone):
        sub.recv(timeout=30)


def test_python_publisher_to_rust_subscriber(broker, rust_peer):
    sub = rust_peer({"role": "subscriber", "socket": broker.socket, "stream": "to-rust",
                     "policy": "lossless", "credits": 8, "wait_for_stream": True})
    assert eventually(lambda: broker.client.stats()["waiting_subscribers"] == 1)
    client = broker.connect()
    pub = client.publisher("to-rust", slot_size=512, slots=16)
    for seq in range(3000):
        data = frame_bytes(seq, 512)
        # bytes, bytearray, memoryview and numpy all go in.
        obj = (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8))[seq % 4]
        assert pub.send(obj, timeout=30) == seq
    assert eventually(lambda: broker.stream("to-rust")["subscribers"][0]["queued"] == 0)
    client.close_stream("to-rust")
    got = sub.finish()
    assert (got["received"], got["missing"], got["bad"], got["end"]) == (3000, 0, 0, "closed")


def test_a_killed_python_subscriber_gives_its_slots_back(broker, py_peer):
    check_a_killed_holder_gives_back(broker, lambda socket, stream, n: py_peer("hold", socket, stream, n))


def _in_futex_wait(pid):
    """Whether process `pid`'s main thread is in a futex system call."""
    futex = {"x86_64": "202", "aarch64": "98"}[platform.machine()]
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0] == futex


def test_ctrl_c_interrupts_a_blocking_recv(broker, py_peer):
    client = broker.connect()
    _pub = client.publisher("quiet", slot_size=64, slots=4)
    peer = py_peer("recv", broker.socket, "quiet")
    peer.read_until("ready")
    # Signal once its main thread sleeps in recv(), without the GIL (a
    # futex wait), not at a guessed moment: a peer slowed down on a busy
    # machine took the signal before recv() and went silent (CI, 1 run).
    assert eventually(lambda: _in_futex_wait(peer.proc.pid)), "the peer never blocked in recv()"
    peer.proc.send_signal(signal.SIGINT)
    assert peer.finish(timeout=10) == {"interrupted": True}


def test_memsock_publish_can_leave_frames_unstamped(broker):
    get = subscribe_in_background(broker, "plain", credits=8, policy="lossless")
    args = [_exe("MEMSOCK_EXE", "memsock"), "--socket", broker.socket, "publish", "--stream", "plain",
            "--size", "64", "--slots", "16", "--count", "100", "--subscribers", "1", "--no-timestamps"]
    publisher = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    sub = get()
    stamps = []
    for seq in range(100):
        with sub.recv(timeout=30) as frame:
            assert frame.seq == seq
            stamps.append(frame.timestamp_ns)
    out, _ = publisher.communicate(timeout=60)
    assert publisher.returncode == 0
    assert json.loads(out)["sent"] == 100
    assert stamps == [0] * 100


def test_every_handle_tells_that_its_broker_is_gone_and_frames_keep_flowing():
    broker = Broker(_exe("MEMSOCK_EXE", "memsock"))
    try:
        client = broker.connect()
        pub = client.publisher("orphaned", slot_size=64, slots=8)
        sub = client.subscribe("orphaned", credits=4, policy="lossless", wait=False)
        assert client.broker_gone is None and pub.broker_gone is None and sub.broker_gone is None
        broker.proc.kill()
        broker.proc.wait()
        assert eventually(lambda: client.broker_gone is not None)
        for handle in (client, pub, sub):
            gone = handle.broker_gone
            assert isinstance(gone, memsock.BrokerGone) and "closed" in gone.reason, gone
        with pytest.raises(memsock.Disconnected):
            client.stats()
        for n in range(100):
            pub.send(np.uint64(n).tobytes(), timeout=10)
            with sub.recv(timeout=10) as frame:
                assert frame.ndarray(np.uint64)[0] == n
    finally:
        broker.proc.kill()
        broker.proc.wait()
        broker.log.close()
        broker.dir.cleanup()
