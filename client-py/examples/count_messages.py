"""Many small messages from Python: counting them with recv_batch.

Two processes::

    python count_messages.py produce --seconds 5
    python count_messages.py consume --seconds 5 [--policy drop_newest|keep_latest|lossless]

`produce` sends 64-byte messages as fast as a Python loop can (one
``pub.send`` per message; the first 8 bytes of each are a counter equal
to the message's sequence number). `consume` takes them up to 4096 at a
time with ``sub.recv_batch(4096)`` (one Python call per batch: the
messages are copied into one numpy array and their slots go back at once),
prints messages/s each second, and at the end the total, the messages it
lost (gaps in the sequence numbers) and whether every payload matched its
sequence number.

With ``drop_newest`` (the default) a consumer that falls behind loses the
newest messages while its queue (`--credits`) is full; with ``lossless``
the producer waits for it instead and nothing is lost.

The producer closes the stream when it stops, which ends the consumers
too. Both stop on Ctrl-C (or SIGTERM) with a summary. `--socket` picks the
broker (default: memsock's default socket; start one with
``memsock broker``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Literal, NoReturn

import numpy as np

import memsock

MSG = 64  # bytes per message


class Args(argparse.Namespace):
    """The command line (see main): what parse_args fills in, typed."""

    socket: str | None
    stream: str
    role: Literal["produce", "consume"]
    seconds: float
    # produce
    slots: int
    keep_open: bool
    # consume
    policy: Literal["drop_newest", "keep_latest", "lossless"]
    credits: int


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def produce(args: Args) -> int:
    client = memsock.connect(args.socket)
    pub = client.publisher(args.stream, slot_size=MSG, slots=args.slots)
    how_long = "until Ctrl-C" if args.seconds <= 0 else f"for {args.seconds:g} s"
    print(
        f"producer: stream {args.stream!r}, {args.slots} slots of {MSG} bytes, sending {how_long}"
        + (" (took the stream over)" if pub.took_over else ""),
        flush=True,
    )
    msg = bytearray(MSG)
    counter = memoryview(msg).cast("Q")  # the message's first 8 bytes, as a uint64
    send = pub.send
    seq = pub.next_seq
    start = time.monotonic()
    end = start + args.seconds if args.seconds > 0 else float("inf")
    tick, at_tick = start + 1.0, 0
    sent = stalled = 0
    try:
        while True:
            for _ in range(1024):  # look at the clock once per 1024 messages
                counter[0] = seq
                try:
                    seq = send(msg, 1.0) + 1  # waits only for a lossless subscriber with no room
                    sent += 1
                except memsock.Timeout:
                    stalled += 1
                    seq = pub.next_seq
            now = time.monotonic()
            if now >= tick:
                print(f"producer: {sent - at_tick:10,d} msgs/s", flush=True)
                tick, at_tick = tick + 1.0, sent
            if now >= end:
                break
    except KeyboardInterrupt:
        print("producer: interrupted", flush=True)
    elapsed = time.monotonic() - start
    print(
        f"producer: sent {sent:,} messages in {elapsed:.1f} s ({sent / elapsed:,.0f} msgs/s), "
        f"{stalled} sends timed out",
        flush=True,
    )
    if not args.keep_open:
        # The consumers receive what was sent, then StreamClosed. (Closed while
        # we still publish: a stream with neither publisher nor subscribers
        # is forgotten by the broker, and closing it then is NoSuchStream.)
        try:
            client.close_stream(args.stream)
        except memsock.NoSuchStream:
            pass
    pub.close()
    return 0


def consume(args: Args) -> int:
    client = memsock.connect(args.socket)
    print(f"consumer: subscribing to {args.stream!r} ({args.policy}, {args.credits} credits)", flush=True)
    sub = client.subscribe(args.stream, credits=args.credits, policy=args.policy, wait=True)
    start = time.monotonic()
    end = start + args.seconds if args.seconds > 0 else float("inf")
    total = lost = batches = mismatched = 0
    # The first and last sequence numbers received.
    first_seq: int | None = None
    last_seq: int | None = None
    tick, at_tick, lost_at_tick = start + 1.0, 0, 0
    how_it_ended = f"{args.seconds:g} s passed"
    try:
        while True:
            now = time.monotonic()
            if now >= tick:
                print(
                    f"consumer: {total - at_tick:10,d} msgs/s  lost {lost - lost_at_tick:9,d}  "
                    f"{(total - at_tick) / max(batches, 1):6.0f} msgs/batch",
                    flush=True,
                )
                tick, at_tick, lost_at_tick, batches = tick + 1.0, total, lost, 0
            if now >= end:
                break
            try:
                batch = sub.recv_batch(4096, timeout=min(0.25, end - now))
            except memsock.Timeout:
                continue
            except memsock.PublisherGone:
                print("consumer: the producer is gone; waiting for another", flush=True)
                continue
            except memsock.PublisherBack:
                print("consumer: a producer took the stream over", flush=True)
                continue
            except memsock.StreamClosed:
                how_it_ended = "the stream was closed"
                break
            seq = batch.seq.astype(np.int64)
            if first_seq is None:
                first_seq = int(seq[0])  # messages before it were sent before we could see them (or dropped)
            prev = seq[0] - 1 if last_seq is None else last_seq
            lost += int(seq[-1] - prev) - len(seq)  # seq only grows: gaps = span - received
            last_seq = int(seq[-1])
            # Every message is 64 bytes whose first 8 are its seq.
            if np.all(np.diff(batch.offsets) == MSG):
                counters = batch.data.view("<u8").reshape(-1, MSG // 8)[:, 0]
                mismatched += int(np.count_nonzero(counters != batch.seq))
            else:
                mismatched += len(batch)
            total += len(batch)
            batches += 1
    except KeyboardInterrupt:
        how_it_ended = "interrupted"
    elapsed = time.monotonic() - start
    print(f"consumer: stopped ({how_it_ended})", flush=True)
    print(
        f"consumer: received {total:,} messages in {elapsed:.1f} s ({total / elapsed:,.0f} msgs/s), "
        f"lost {lost:,} (sequence gaps), {mismatched} payloads not matching their seq",
        flush=True,
    )
    if first_seq is not None:
        print(f"consumer: sequence numbers {first_seq:,} to {last_seq:,}", flush=True)
    return 1 if mismatched else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=None, help="broker socket (default: memsock's default)")
    parser.add_argument("--stream", default="small-messages", help="stream name (default: %(default)s)")
    roles = parser.add_subparsers(dest="role", required=True)
    p = roles.add_parser("produce", help="send 64-byte messages as fast as possible")
    p.add_argument("--seconds", type=float, default=10.0, help="how long (0: until Ctrl-C; default: %(default)s)")
    p.add_argument("--slots", type=int, default=8192, help="slots in the stream (default: %(default)s)")
    p.add_argument("--keep-open", action="store_true", help="do not close the stream at the end")
    c = roles.add_parser("consume", help="count messages with recv_batch")
    c.add_argument("--policy", choices=("drop_newest", "keep_latest", "lossless"), default="drop_newest")
    c.add_argument("--credits", type=int, default=4096, help="messages queued at once (default: %(default)s)")
    c.add_argument(
        "--seconds", type=float, default=10.0,
        help="how long to receive, counted once the stream exists (0: until Ctrl-C; default: %(default)s)",
    )
    args = parser.parse_args(argv, namespace=Args())
    _stop_on_sigterm()
    try:
        return produce(args) if args.role == "produce" else consume(args)
    except memsock.Error as e:
        print(f"{args.role}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while connecting or waiting for the stream
        print(f"{args.role}: interrupted", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
