"""Two unrelated processes sharing a numpy array and a ctypes structure by name.

Run the two roles in two terminals, in any order::

    python shared_state.py writer     # publishes the state every 100 ms
    python shared_state.py reader     # shows the latest state

The writer publishes, every 100 ms, one frame laid out as a ctypes
structure (`Header`: counter, writer pid, timestamp, temperature, checksum)
followed by a float64 numpy array of 1000 values. The reader subscribes to
the stream by its name with ``policy="keep_latest", credits=1``: whenever
it looks, it gets the newest state, never a backlog, and never a state
half-written (the writer fills a slot the reader cannot see; the header's
checksum of the array is verified on every read to show it). It reads the
header with ``Header.from_buffer_copy(memoryview(frame)[:sizeof(Header)])``
and the array in place with ``frame.ndarray(np.float64)[offset:]``.

This is what ``multiprocessing.shared_memory`` makes hard: there, a block
belongs to whoever unlinks it. If the creator unlinks it at exit the
other side can no longer find it (a restarted writer makes a new block
nobody is looking at); if nobody does it leaks in /dev/shm, and Python's
resource tracker warns or unlinks it behind your back; and the reader has
no way to know the writer is gone, nor a consistent snapshot while it
writes. Here the stream belongs to the broker and each process only holds
a lease on its own role:

* stop the writer (Ctrl-C, or kill it): the reader gets ``PublisherGone``,
  keeps the last state it read and keeps waiting;
* start a writer again: it takes the stream over (same geometry), the
  reader gets ``PublisherBack`` and carries on with the new writer's data;
* stop the reader: the writer does not notice (apart from the readers
  count it prints) and carries on; a new reader picks up the latest state.

Nothing is left behind in /dev/shm whoever exits first, even on kill -9:
the broker (``memsock broker``) keeps the stream while a writer or a
reader uses it and forgets it (its memory goes with the last process that
mapped it) once neither does; a writer started then simply creates it
anew. A reader receives the states published after it subscribed: a
reader that arrives while no writer runs has nothing to show until one
does.

`--socket` picks the broker (default: memsock's default socket).
`--seconds N` stops a role after N seconds (default: run until Ctrl-C or
SIGTERM); a reader counts them from when the stream exists (it waits for
the stream to appear, and Ctrl-C ends that wait).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Literal, NoReturn

import numpy as np
import numpy.typing as npt

import memsock

N_VALUES = 1000


class Header(ctypes.Structure):
    _fields_ = [
        ("counter", ctypes.c_uint64),  # states published by this writer
        ("writer_pid", ctypes.c_uint32),
        ("n_values", ctypes.c_uint32),  # float64 values after the header
        ("timestamp", ctypes.c_double),  # time.time() when written
        ("temperature", ctypes.c_double),
        ("checksum", ctypes.c_double),  # sum of the values
    ]
    # The fields as Python sees them, for type checkers (ctypes reads only _fields_).
    counter: int
    writer_pid: int
    n_values: int
    timestamp: float
    temperature: float
    checksum: float


HEADER_SIZE = ctypes.sizeof(Header)  # 40: a multiple of 8, so the array is aligned
assert HEADER_SIZE % 8 == 0
STATE_SIZE = HEADER_SIZE + 8 * N_VALUES
# The geometry every writer uses: a writer taking the stream over must ask
# for the same (else memsock.StreamExists).
SLOT_SIZE, SLOTS = STATE_SIZE, 8


class Args(argparse.Namespace):
    """The command line (see main): what parse_args fills in, typed."""

    socket: str | None
    stream: str
    role: Literal["writer", "reader"]
    seconds: float


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def count_readers(client: memsock.Client, stream: str) -> int:
    try:
        (s,) = client.stats(stream)["streams"]
        return len(s["subscribers"])
    except (memsock.Error, ValueError):
        return -1


def writer(args: Args) -> int:
    client = memsock.connect(args.socket)
    pub = client.publisher(args.stream, slot_size=SLOT_SIZE, slots=SLOTS)
    pid = os.getpid()
    if pub.took_over:
        print(f"writer {pid}: took the stream {args.stream!r} over from a previous writer", flush=True)
    else:
        print(f"writer {pid}: created the stream {args.stream!r}", flush=True)
    # The state is built in a private buffer, then sent (one copy into a
    # slot): readers only ever see complete states.
    buf = bytearray(STATE_SIZE)
    header = Header.from_buffer(buf)
    values = np.frombuffer(buf, dtype=np.float64, offset=HEADER_SIZE, count=N_VALUES)
    x = np.linspace(0, 2 * np.pi, N_VALUES)
    start = time.monotonic()
    end = start + args.seconds if args.seconds > 0 else float("inf")
    next_send, last_print = start, 0.0
    readers: int | None = None
    try:
        while time.monotonic() < end:
            t = time.time()
            header.counter += 1
            header.writer_pid = pid
            header.n_values = N_VALUES
            header.timestamp = t
            header.temperature = 20.0 + 5.0 * math.sin(t / 3.0)
            values[:] = header.temperature * np.sin(x + t)
            header.checksum = float(values.sum())
            try:
                pub.send(buf, timeout=0.5)  # only a lossless reader could make it wait
            except memsock.Timeout:
                print(f"writer {pid}: a lossless reader has no room; state #{header.counter} skipped", flush=True)
            now = time.monotonic()
            if now - last_print >= 1.0:
                n = count_readers(client, args.stream)
                note = ""
                if readers is not None and n != readers:
                    note = "  (a reader left; carrying on)" if n < readers else "  (a reader arrived)"
                readers, last_print = n, now
                print(
                    f"writer {pid}: state #{header.counter:<4d} temperature {header.temperature:6.2f}  "
                    f"values[:3] {np.array2string(values[:3], precision=3)}  readers {n}{note}",
                    flush=True,
                )
            next_send += 0.1
            time.sleep(max(0.0, next_send - time.monotonic()))
    except KeyboardInterrupt:
        pass
    print(
        f"writer {pid}: exiting after {header.counter} states, without closing the stream: "
        "readers keep their last state and a new writer can take over",
        flush=True,
    )
    del header  # (a ctypes view into buf)
    pub.close()
    return 0


def read_state(frame: memsock.Frame) -> tuple[Header, npt.NDArray[np.float64], bool]:
    """The frame's header (a ctypes copy) and values (a numpy copy, 8 KB),
    and whether the checksum matched. The array is read in place (a
    zero-copy view, local: gone when this returns, so the caller can
    release the frame); the copy is what the reader keeps as its last
    state while the slot goes back to the writer."""
    with memoryview(frame) as mv:
        header = Header.from_buffer_copy(mv[:HEADER_SIZE])
    start = HEADER_SIZE // 8
    view = frame.ndarray(np.float64)[start : start + header.n_values]
    ok = math.isclose(float(view.sum()), header.checksum, rel_tol=1e-9, abs_tol=1e-9)
    return header, view.copy(), ok


def describe(header: Header, values: npt.NDArray[np.float64]) -> str:
    age = time.time() - header.timestamp
    return (
        f"state #{header.counter:<4d} from writer {header.writer_pid}  temperature {header.temperature:6.2f}  "
        f"mean {values.mean():+.4f}  max {values.max():6.3f}  age {age * 1e3:7.1f} ms"
    )


def reader(args: Args) -> int:
    client = memsock.connect(args.socket)
    pid = os.getpid()
    print(f"reader {pid}: waiting for stream {args.stream!r}", flush=True)
    sub = client.subscribe(args.stream, credits=1, policy="keep_latest", wait=True)
    print(f"reader {pid}: subscribed (keep_latest, 1 credit)", flush=True)
    start = time.monotonic()
    end = start + args.seconds if args.seconds > 0 else float("inf")
    last: tuple[Header, npt.NDArray[np.float64]] | None = None  # the last state read, ours to keep
    states = bad = 0
    writer_gone = False
    last_print = 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            try:
                frame = sub.recv(timeout=min(1.0, end - now))
            except memsock.Timeout:
                if last is not None and time.monotonic() < end:
                    why = "no writer" if writer_gone else "no new state for 1 s"
                    print(f"reader {pid}: {why}; still have {describe(*last)}", flush=True)
                    last_print = time.monotonic()
                continue
            except memsock.PublisherGone:
                writer_gone = True
                kept = describe(*last) if last is not None else "nothing read yet"
                print(f"reader {pid}: PublisherGone: the writer left; keeping {kept}", flush=True)
                continue
            except memsock.PublisherBack:
                writer_gone = False
                print(f"reader {pid}: PublisherBack: a new writer took the stream over; carrying on", flush=True)
                continue
            except memsock.StreamClosed:
                print(f"reader {pid}: the stream was closed", flush=True)
                break
            header, values, ok = read_state(frame)
            frame.release()  # (not `with frame:`: see fft_worker.py)
            states += 1
            if not ok:
                bad += 1
                print(f"reader {pid}: CHECKSUM MISMATCH in state #{header.counter}", flush=True)
            new_writer = last is not None and last[0].writer_pid != header.writer_pid
            last = (header, values)
            now = time.monotonic()
            if new_writer or now - last_print >= 1.0:
                print(f"reader {pid}: {describe(header, values)}  checksum {'ok' if ok else 'BAD'}", flush=True)
                last_print = now
    except KeyboardInterrupt:
        pass
    print(f"reader {pid}: exiting after reading {states} states ({bad} with a bad checksum)", flush=True)
    if last is not None:
        print(f"reader {pid}: last state: {describe(*last)}", flush=True)
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=None, help="broker socket (default: memsock's default)")
    parser.add_argument("--stream", default="shared-state", help="stream name (default: %(default)s)")
    parser.add_argument("role", choices=("writer", "reader"))
    parser.add_argument(
        "--seconds", type=float, default=0.0,
        help="stop after this long (a reader: once the stream exists; default: 0, until Ctrl-C)",
    )
    args = parser.parse_args(argv, namespace=Args())
    _stop_on_sigterm()
    try:
        return writer(args) if args.role == "writer" else reader(args)
    except memsock.Error as e:
        print(f"{args.role}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while connecting or waiting for the stream
        print(f"{args.role}: interrupted", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
