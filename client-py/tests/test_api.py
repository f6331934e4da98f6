"""The Python API in one process (with the real broker): frames and their
views, batches, publisher changes, asyncio, errors, stats."""

import asyncio
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import memsock
from conftest import eventually


@pytest.fixture
def pair(broker):
    client = broker.connect()
    pub = client.publisher("s", slot_size=4096, slots=8)
    sub = client.subscribe("s", credits=4, policy="lossless", wait=False)
    return client, pub, sub


def test_views_are_zero_copy_read_only_and_keep_the_frame(pair):
    _, pub, sub = pair
    image = np.arange(32 * 16, dtype=np.uint16).reshape(32, 16)
    pub.send(image.T)  # not contiguous: sent in C order
    frame = sub.recv(timeout=5)
    assert len(frame) == image.nbytes
    view = frame.ndarray(np.uint16, (16, 32))
    np.testing.assert_array_equal(view, image.T)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 1
    with pytest.raises(BufferError):
        frame.release()  # a view is alive
    mv = memoryview(frame)
    assert mv.readonly and mv.nbytes == image.nbytes
    with pytest.raises(TypeError):
        mv[0] = 0
    mv.release()
    # The array outlives the name `frame`: the frame lives on in it.
    del frame
    gc.collect()
    for i in range(3):
        pub.send(bytes([i]) * 8)
    np.testing.assert_array_equal(view, image.T)
    assert sub.held == 1
    del view
    gc.collect()
    assert [sub.recv(timeout=5).tobytes() for _ in range(3)] == [bytes([i]) * 8 for i in range(3)]


def test_with_and_release(pair):
    _, pub, sub = pair
    pub.send(b"abc")
    with sub.recv(timeout=5) as frame:
        assert frame.tobytes() == b"abc"
    assert frame.released
    with pytest.raises(memsock.Error):
        memoryview(frame)
    frame.release()  # twice is harmless
    assert sub.held == 0


def test_credits_and_try_recv(pair):
    _, pub, sub = pair
    assert sub.try_recv() is None
    for i in range(4):
        pub.send(bytes([i]))
    frames = [sub.recv(timeout=5) for _ in range(4)]
    with pytest.raises(memsock.WouldBlock):
        pub.send(b"x", timeout=0)
    with pytest.raises(memsock.CreditsExhausted):
        sub.try_recv()
    frames[0].release()
    assert pub.send(b"x", timeout=5) == 4
    assert sub.recv(timeout=5).tobytes() == b"x"


def test_recv_batch_copies_many_messages(pair):
    _, pub, sub = pair
    sub.set_credits(6)
    sent = [bytes([i % 256]) * (1 + i % 7) for i in range(5)]
    for m in sent:
        pub.send(m)
    batch = sub.recv_batch(100, timeout=5)
    assert len(batch) == 5
    assert [batch[i] for i in range(5)] == sent
    assert list(batch.seq) == [0, 1, 2, 3, 4]
    assert batch.offsets[-1] == sum(map(len, sent)) == batch.data.size
    assert batch.data.dtype == np.uint8 and batch.timestamp_ns.dtype == np.uint64
    assert sub.held == 0
    with pytest.raises(memsock.Timeout):
        sub.recv_batch(10, timeout=0.05)


def test_publisher_gone_and_back(broker):
    client = broker.connect()
    pub = client.publisher("g", slot_size=64, slots=8)
    sub = client.subscribe("g", wait=False)
    pub.send(b"1")
    pub.close()
    assert sub.recv(timeout=5).tobytes() == b"1"
    with pytest.raises(memsock.PublisherGone):
        sub.recv(timeout=5)
    pub = client.publisher("g", slot_size=64, slots=8)
    assert pub.took_over
    pub.send(b"2")
    with pytest.raises(memsock.PublisherBack):
        sub.recv(timeout=5)
    frame = sub.recv(timeout=5)
    assert (frame.tobytes(), frame.seq) == (b"2", 1)


def test_iteration_ends_when_the_stream_closes(broker):
    client = broker.connect()
    pub = client.publisher("it", slot_size=64, slots=16)
    sub = client.subscribe("it", credits=8, wait=False)
    for i in range(5):
        pub.send(bytes([i]))
    pub.close()  # PublisherGone is skipped by iteration
    client.close_stream("it")
    assert [f.tobytes() for f in sub] == [bytes([i]) for i in range(5)]


def test_asyncio_recv_does_not_block_the_loop_and_is_cancel_safe(pair):
    client, pub, sub = pair

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.create_task(ticker())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sub.recv_async(), 0.1)
        assert ticks > 0, "the loop ran while the receive waited"
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, pub.send, b"late")
        frame = await sub.recv_async(timeout=5)
        assert frame.tobytes() == b"late" and frame.seq == 0
        with pytest.raises(memsock.Timeout):
            await sub.recv_async(timeout=0.05)
        for i in range(3):
            pub.send(bytes([i]))
        pub.close()
        loop.call_later(0.1, client.close_stream, "s")
        got = [f.tobytes() async for f in sub]
        t.cancel()
        return got

    assert asyncio.run(main()) == [b"\x00", b"\x01", b"\x02"]


def test_a_user_the_broker_does_not_admit_is_told_permission_denied(broker):
    code = (
        "import memsock, sys\n"
        "try:\n"
        "    memsock.connect(sys.argv[1])\n"
        "except memsock.BrokerPermissionDenied as e:\n"
        "    print(e)\n"
    )
    if os.geteuid() == 0:
        # Root passes any mode: the client runs as `nobody`, whom only the
        # socket's mode (0600) keeps out.
        os.chmod(broker.dir.name, 0o755)
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable]
    else:
        # Without our own write permission, the kernel refuses us too.
        os.chmod(broker.socket, 0o400)
        command = [sys.executable]
    out = subprocess.run([*command, "-c", code, broker.socket], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "permission denied" in out.stdout and "--group" in out.stdout, out.stdout


def test_another_user_may_not_close_a_stream_it_does_not_publish(group_broker):
    client = group_broker.connect()
    pub = client.publisher("mine", slot_size=64, slots=5)
    assert issubclass(memsock.NotPermitted, memsock.Refused)
    if os.geteuid() != 0:
        # No other user to run a client as (the rule is unit-tested in the
        # broker): the half that needs none — a client of the broker's
        # user may close a stream another client publishes.
        group_broker.connect().close_stream("mine")
        return
    code = (
        "import memsock, sys\n"
        "try:\n"
        "    memsock.connect(sys.argv[1]).close_stream('mine')\n"
        "except memsock.NotPermitted as e:\n"
        "    assert isinstance(e, memsock.Refused)\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups", sys.executable, "-c", code,
         group_broker.socket],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "may not close stream \"mine\"" in out.stdout, out.stdout
    assert not group_broker.stream("mine")["closed"]
    pub.send(b"still open")
    client.close_stream("mine")  # the broker's user may


def test_errors_are_memsock_errors_with_clear_messages(broker, tmp_path):
    with pytest.raises(memsock.BrokerUnreachable, match="memsock broker"):
        memsock.connect(str(tmp_path / "nobody.sock"))
    client = broker.connect()
    with pytest.raises(memsock.NoSuchStream):
        client.subscribe("missing", wait=False)
    pub = client.publisher("e", slot_size=64, slots=5)
    with pytest.raises(memsock.StreamExists):
        client.publisher("e", slot_size=64, slots=5)
    # Two of the five slots are kept for the publisher's loans.
    with pytest.raises(memsock.CreditsRefused, match="4 credits refused, 3 available"):
        client.subscribe("e", credits=4, wait=False)
    with pytest.raises(memsock.InvalidArgument, match="policy"):
        client.subscribe("e", policy="sometimes")
    with pytest.raises(memsock.InvalidArgument):
        pub.send(b"x" * 65)
    # The broker's typed refusal of a configuration reaches Python as such.
    with pytest.raises(memsock.InvalidArgument, match="slot_count = 1 is out of range"):
        client.publisher("e2", slot_size=64, slots=1)
    with pytest.raises(TypeError):
        pub.send(12)
    assert issubclass(memsock.NoSuchStream, memsock.Refused)
    assert all(issubclass(e, memsock.Error) for e in
               (memsock.BrokerUnreachable, memsock.PublisherGone, memsock.Timeout, memsock.StreamClosed))


def test_stats_are_plain_dicts_of_counted_truth(broker):
    client = broker.connect()
    pub = client.publisher("st", slot_size=64, slots=8)
    sub = client.subscribe("st", credits=2, wait=False)
    for _ in range(5):
        pub.send(b"x")
    got = 0
    while sub.try_recv() is not None:
        got += 1
    s = client.stats("st")["streams"][0]
    assert (s["name"], s["slot_size"], s["slot_count"], s["published"]) == ("st", 64, 8, 5)
    (u,) = s["subscribers"]
    assert (u["policy"], u["credits"], u["delivered"], u["dropped"]) == ("drop_newest", 2, got, 5 - got)
    assert eventually(lambda: client.stats()["clients"] >= 1)


def test_stats_have_one_representation_here_and_in_memsock_stats_json(broker):
    client = broker.connect()
    pub = client.publisher("one", slot_size=64, slots=8)
    sub = client.subscribe("one", credits=2, policy="keep_latest", wait=False)
    pub.send(b"x")
    ours = client.stats("one")
    cli = subprocess.run(
        [os.environ.get("MEMSOCK_EXE", "memsock"), "--socket", broker.socket, "stats", "--json", "--stream", "one"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    theirs = json.loads(cli.stdout)

    def shape(d):
        if isinstance(d, dict):
            return {k: shape(v) for k, v in d.items()}
        if isinstance(d, list):
            return [shape(v) for v in d]
        return type(d).__name__

    # Rates and pids may differ between the two reads; names, nesting and
    # types may not, nor how a policy is spelled.
    assert shape(ours) == shape(theirs)
    assert ours["streams"][0]["subscribers"][0]["policy"] == "keep_latest"
    assert theirs["streams"][0]["subscribers"][0]["policy"] == "keep_latest"
    del sub


def test_loans_are_written_in_place_sent_on_exit_and_discarded_on_error(pair):
    _, pub, sub = pair
    with pub.loan(64) as buf:
        a = buf.ndarray(np.uint16, (4, 8))
        a[:] = np.arange(32, dtype=np.uint16).reshape(4, 8)
        del a
        memoryview(buf)[:2] = b"\xff\xff"
    frame = sub.recv(timeout=5)
    expect = np.arange(32, dtype=np.uint16)
    expect[0] = 0xFFFF
    np.testing.assert_array_equal(frame.ndarray(np.uint16), expect)
    assert frame.seq == 0
    with pytest.raises(RuntimeError):
        with pub.loan(8) as buf:
            memoryview(buf)[:] = b"12345678"
            raise RuntimeError("not sent")
    assert sub.try_recv() is None
    # A view still alive at the end of the block: not sent, BufferError.
    with pytest.raises(BufferError):
        with pub.loan(8) as buf:
            view = buf.ndarray()
    assert sub.try_recv() is None
    with pytest.raises(memsock.Error):
        pub.close()  # a loan is still out (held by the view)
    del view, buf
    gc.collect()
    with pub.loan(3) as buf:
        memoryview(buf)[:] = b"end"
    assert sub.recv(timeout=5).tobytes() == b"end"
    with pytest.raises(memsock.InvalidArgument):
        pub.loan(4097)
    pub.close()


def test_an_exception_in_a_with_block_is_not_masked_by_a_live_view(pair):
    _, pub, sub = pair
    pub.send(np.arange(10, dtype=np.float64).tobytes() + b"tail")
    kept = []
    with pytest.raises(KeyError):
        with sub.recv(timeout=5) as frame:
            kept.append(frame.ndarray(np.float64, offset=8, count=9))
            raise KeyError("the real error")
    np.testing.assert_array_equal(kept[0], np.arange(1, 10, dtype=np.float64))
    assert not frame.released  # left to the view's end
    assert sub.held_by_views == 1
    kept.clear()
    gc.collect()
    assert frame.released and sub.held_by_views == 0 and sub.held == 0
    frame.release()  # harmless
    with pytest.raises(ValueError):
        with pub.loan(16) as buf:
            kept.append(buf.ndarray(np.uint32, offset=4, count=2))
            raise ValueError("also kept")
    kept.clear()


def test_a_shape_sets_how_many_items_must_fit(broker):
    client = broker.connect()
    size = 1_153_434  # not a multiple of 8
    pub = client.publisher("odd", slot_size=size, slots=4)
    sub = client.subscribe("odd", credits=2, policy="lossless", wait=False)
    with pub.loan(size) as buf:
        head = buf.ndarray(np.int64, (1,))
        head[0] = -42
        grid = buf.ndarray(np.uint16, (2, 3), offset=8)
        grid[:] = [[1, 2, 3], [4, 5, 6]]
        assert buf.ndarray(np.int64).shape == (size // 8,)  # as many as fit
        del head, grid
    with sub.recv(timeout=5) as frame:
        assert frame.ndarray(np.int64, (1,))[0] == -42
        assert frame.ndarray(np.int64, 1)[0] == -42
        np.testing.assert_array_equal(frame.ndarray(np.uint16, (2, 3), offset=8), [[1, 2, 3], [4, 5, 6]])
        assert frame.ndarray(np.int64).shape == (size // 8,)
        assert frame.ndarray(np.uint8, (-1, 2), count=6).shape == (3, 2)
        with pytest.raises(ValueError):
            frame.ndarray(np.int64, (size,))  # more than fits
        with pytest.raises(ValueError):
            frame.ndarray(np.uint8, offset=size + 1)
        gc.collect()


def test_views_alive_at_the_end_of_a_with_block_defer_its_release(broker):
    client = broker.connect()
    pub = client.publisher("views", slot_size=64, slots=8)
    sub = client.subscribe("views", credits=2, policy="lossless", wait=False)
    for i in range(2):
        pub.send(np.full(8, i, dtype=np.uint16))
    # The natural numpy code: the array is still bound when the block ends.
    with sub.recv(timeout=5) as fr:
        a = fr.ndarray(np.uint16)
    assert not fr.released and "views end" in repr(fr)
    assert (sub.held, sub.held_by_views) == (1, 1)
    with pytest.raises(BufferError):
        fr.release()  # explicitly: still refused
    tail = a[2:]  # a view of the view keeps the frame too
    del a
    gc.collect()
    assert not fr.released
    np.testing.assert_array_equal(tail, [0] * 6)
    # Every credit held by views: the receive says so rather than wait.
    with sub.recv(timeout=5) as fr2:
        b = fr2.ndarray(np.uint16)
    with pytest.raises(memsock.CreditsExhausted, match="views"):
        sub.recv(timeout=5)
    del tail, b
    gc.collect()
    assert fr.released and fr2.released
    assert (sub.held, sub.held_by_views) == (0, 0)
    pub.send(np.full(8, 2, dtype=np.uint16), timeout=5)
    with sub.recv(timeout=5) as fr3:
        np.testing.assert_array_equal(fr3.ndarray(np.uint16), [2] * 8)


def test_a_stream_without_timestamps_stamps_every_frame_zero(broker):
    client = broker.connect()
    pub = client.publisher("plain", slot_size=64, slots=4, timestamps=False)
    sub = client.subscribe("plain", credits=2, policy="lossless", wait=False)
    pub.send(b"x")
    frame = sub.recv(timeout=5)
    assert (frame.tobytes(), frame.timestamp_ns) == (b"x", 0)


def test_the_publisher_holds_at_most_its_loan_budget(broker):
    client = broker.connect()
    pub = client.publisher("budget", slot_size=64, slots=8, loans=2)
    sub = client.subscribe("budget", credits=6, policy="lossless", wait=False)
    first, second = pub.loan(8), pub.loan(8)
    with pytest.raises(memsock.Error, match="already holds its 2 loan"):
        pub.loan(8)
    memoryview(first)[:1] = b"a"
    first.send()
    with pub.loan(1) as buf:
        memoryview(buf)[:] = b"b"
    second.discard()
    assert [sub.recv(timeout=5).tobytes()[:1] for _ in range(2)] == [b"a", b"b"]


def test_a_batch_never_swallows_news_of_the_publisher(broker):
    client = broker.connect()
    pub = client.publisher("news", slot_size=64, slots=8)
    sub = client.subscribe("news", credits=4, policy="lossless", wait=False)
    generation = sub.publisher_generation
    assert generation % 2 == 1  # a publisher is attached
    pub.send(b"a")
    pub.send(b"b")
    pub.close()
    # The batch holds the two frames; the departure it met comes next.
    batch = sub.recv_batch(10, timeout=5)
    assert [batch[i] for i in range(len(batch))] == [b"a", b"b"]
    with pytest.raises(memsock.PublisherGone):
        sub.recv(timeout=5)
    assert sub.publisher_generation == generation + 1
    pub = client.publisher("news", slot_size=64, slots=8)
    pub.send(b"c")
    with pytest.raises(memsock.PublisherBack):
        sub.recv_batch(10, timeout=5)
    assert sub.recv_batch(10, timeout=5)[0] == b"c"
    assert sub.publisher_generation == generation + 2


def test_a_limit_reached_is_its_own_exception_with_the_numbers():
    from conftest import Broker, _exe

    b = Broker(_exe("MEMSOCK_EXE", "memsock"), options=("--limit", "client.streams=1"))
    try:
        client = memsock.connect(b.socket)
        pub = client.publisher("one", slot_size=64, slots=8)
        with pytest.raises(memsock.LimitReached, match="this client may hold 1 streams created; it holds 1"):
            client.publisher("two", slot_size=64, slots=8)
        assert issubclass(memsock.LimitReached, memsock.Refused)
        stats = client.stats()
        assert 0 < stats["descriptors"] < stats["descriptor_limit"]
        pub.close()
    finally:
        b.stop()
