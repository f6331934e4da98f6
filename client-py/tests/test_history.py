"""Late joiners across processes: seed 004's users share a ctypes header
and a numpy image by name between unrelated processes; a reader started
after the writer's last update, after it exited or was killed, still gets
the current state, and a new writer's update follows."""

import ctypes
import os
import signal
import sys

import numpy as np
import pytest

import memsock

sys.path.insert(0, os.path.dirname(__file__))
from conftest import eventually  # noqa: E402
from peer import MAGIC, SHAPE, Header, image  # noqa: E402


def next_frame(sub):
    """The next frame, past the news of writers coming and going."""
    while True:
        try:
            return sub.recv(timeout=10)
        except (memsock.PublisherBack, memsock.PublisherGone):
            pass


def read_state(client, stream, history=True):
    """The header and image of `stream` as a late reader gets them."""
    got = []
    for name in (stream + "/header", stream + "/image"):
        sub = client.subscribe(name, credits=2, wait=False)
        frame = next_frame(sub)
        got.append((sub, frame))
    (hsub, hframe), (isub, iframe) = got
    assert (hframe.history, iframe.history) == (history, history)
    header = Header.from_buffer_copy(hframe)
    pixels = iframe.ndarray(np.uint8, SHAPE).copy()
    return header, pixels, (hsub, isub)


def check(header, pixels, version):
    assert (header.magic, header.version, header.height, header.width) == (MAGIC, version, *SHAPE)
    assert np.array_equal(pixels, image(version))


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_the_state_outlives_its_writer_and_a_new_writer_takes_over(broker, py_peer, ending):
    if ending == "exit":
        assert py_peer("state", broker.socket, "cam", 1).finish() == {"sent": 1}
    else:
        writer = py_peer("state", broker.socket, "cam", 1, "hold")
        assert writer.read_until("sent") == {"sent": 1}
        os.kill(writer.proc.pid, signal.SIGKILL)
        writer.proc.wait()
    # Kept once the broker has seen the writer's lease end (its pid in the
    # segment may go first).
    assert eventually(lambda: all(broker.stream(f"cam/{p}")["retained_ns"] is not None for p in ("header", "image")))
    kept = broker.stream("cam/image")
    assert (kept["history"], kept["history_held"]) == (1, 1) and kept["publisher_pid"] is None

    # A reader started afterwards, in another process than the writer.
    reader = broker.connect()
    header, pixels, subs = read_state(reader, "cam")
    check(header, pixels, 1)

    # A second writer takes over: the reader sees its update, live.
    assert py_peer("state", broker.socket, "cam", 2).finish() == {"sent": 2}
    hframe, iframe = (next_frame(sub) for sub in subs)
    assert not hframe.history and not iframe.history
    check(Header.from_buffer_copy(hframe), iframe.ndarray(np.uint8, SHAPE), 2)
    # And a reader coming now gets the update as the state.
    header, pixels, _ = read_state(broker.connect(), "cam")
    check(header, pixels, 2)


def test_a_reader_may_decline_the_history_or_take_part_of_it(broker):
    client = broker.connect()
    pub = client.publisher("log", slot_size=8, slots=13, history=3)
    for i in range(5):
        pub.send(np.uint64(i))
    none = client.subscribe("log", credits=2, history=False)
    one = client.subscribe("log", credits=2, history=1)
    every = client.subscribe("log", credits=4)
    with pytest.raises(ValueError):
        client.subscribe("log", credits=2, history="some")
    pub.send(np.uint64(5))

    def seqs(sub):
        out = []
        while (frame := sub.try_recv()) is not None:
            assert int(np.frombuffer(frame, np.uint64)[0]) == frame.seq
            out.append((frame.seq, frame.history))
            frame.release()
        return out

    assert seqs(none) == [(5, False)]
    assert seqs(one) == [(4, True), (5, False)]
    assert seqs(every) == [(2, True), (3, True), (4, True), (5, False)]


def test_a_kept_stream_goes_after_its_idle_time_or_when_closed(broker):
    client = broker.connect()
    with client.publisher("brief", slot_size=8, slots=4, history=1, history_idle=0.2) as pub:
        pub.send(b"x")
    with client.publisher("long", slot_size=8, slots=4, history=1) as pub:
        pub.send(b"y")
    assert eventually(lambda: broker.stream("brief") is None)
    assert broker.stream("long")["history_held"] == 1
    client.close_stream("long")
    assert eventually(lambda: broker.stream("long") is None)
    with pytest.raises(ValueError):
        client.publisher("bad", slot_size=8, slots=4, history=1, history_idle=-1)
