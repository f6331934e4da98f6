"""A numpy worker fed 1.1 MB frames through memsock, zero-copy.

Two processes::

    python fft_worker.py produce --seconds 5 --rate 60
    python fft_worker.py work --seconds 5 [--policy keep_latest|lossless]

`produce` publishes camera-sized frames (uint16, 768 x 751 = 1,153,536
bytes) at a fixed rate. Each frame is a sinusoid along the rows (a
different frequency per frame, chosen from its sequence number) plus noise.

`work` subscribes and runs ``np.fft.rfft`` over the rows of every frame it
receives, reading it in place through ``frame.ndarray(np.uint16, shape)``:
no copy of the frame is made on the receiving side. It checks that the
spectrum's peak is at the frequency the producer put in (so the bytes are
the right ones), and prints frames/s, frames lost (gaps in the sequence
numbers) and the transport latency (``memsock.now_ns() -
frame.timestamp_ns``, on the monotonic clock shared by both processes).

The policy decides who gives way when the worker is slower than the
producer (an FFT over 751-point rows takes ~30 ms here):

* ``keep_latest``: the worker always gets the newest frame; older ones are
  dropped for it (the gaps count them), the producer never waits.
* ``lossless``: the worker gets every frame; the producer waits for it
  (back-pressure: the producer's rate falls to the worker's).

The producer closes the stream when it stops, which ends the workers too.
Both stop on Ctrl-C (or SIGTERM) with a summary. `--socket` picks the
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
import numpy.typing as npt

import memsock

SHAPE = (768, 751)  # rows x columns of uint16: 1,153,536 bytes
FRAME_BYTES = SHAPE[0] * SHAPE[1] * 2
# The frequency (in FFT bins along a row) of the sinusoid in frame `seq` is
# FREQS[seq % len(FREQS)]; the worker checks it finds that peak.
FREQS = (5, 17, 42, 63, 88, 121, 150, 199)


class Args(argparse.Namespace):
    """The command line (see main): what parse_args fills in, typed."""

    socket: str | None
    stream: str
    role: Literal["produce", "work"]
    seconds: float
    # produce
    rate: float
    slots: int
    keep_open: bool
    # work
    policy: Literal["keep_latest", "lossless"]
    credits: int


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def make_patterns(seed: int = 1) -> list[npt.NDArray[np.uint16]]:
    """One image per entry of FREQS: a sinusoid along each row, a phase per
    row, plus noise; values fit in 12 bits like a camera's."""
    rng = np.random.default_rng(seed)
    x = np.arange(SHAPE[1])
    phase = rng.uniform(0, 2 * np.pi, size=(SHAPE[0], 1))
    noise = rng.normal(0, 150, size=SHAPE)
    images = []
    for k in FREQS:
        img = 2048 + 1500 * np.sin(2 * np.pi * k * x / SHAPE[1] + phase) + noise
        images.append(np.clip(img, 0, 4095).astype(np.uint16))
    return images


def produce(args: Args) -> int:
    client = memsock.connect(args.socket)
    pub = client.publisher(args.stream, slot_size=FRAME_BYTES, slots=args.slots)
    images = make_patterns()
    how_long = "until Ctrl-C" if args.seconds <= 0 else f"for {args.seconds:g} s"
    print(
        f"producer: stream {args.stream!r}, {args.slots} slots of {FRAME_BYTES:,} bytes, "
        f"{args.rate:g} frames/s {how_long}" + (" (took the stream over)" if pub.took_over else ""),
        flush=True,
    )
    period = 1.0 / args.rate
    start = time.monotonic()
    end = start + args.seconds if args.seconds > 0 else float("inf")
    next_send = start
    sent = stalled = 0
    tick, sent_at_tick = start + 1.0, 0
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now < next_send:
                time.sleep(min(next_send, end) - now)
                continue
            # Late (a lossless worker held us up): start the schedule again
            # from now instead of sending a burst to catch up.
            next_send = max(next_send + period, now)
            image = images[pub.next_seq % len(images)]
            try:
                pub.send(image, timeout=1.0)  # waits only for lossless subscribers
                sent += 1
            except memsock.Timeout:
                stalled += 1  # a lossless subscriber had no room for 1 s
            if now >= tick:
                n = sent - sent_at_tick
                print(
                    f"producer: {n:4d} frames/s  {n * FRAME_BYTES / 1e6:7.1f} MB/s  next seq {pub.next_seq}",
                    flush=True,
                )
                tick, sent_at_tick = tick + 1.0, sent
    except KeyboardInterrupt:
        print("producer: interrupted", flush=True)
    elapsed = time.monotonic() - start
    print(
        f"producer: sent {sent} frames in {elapsed:.1f} s ({sent / elapsed:.1f} frames/s, "
        f"{sent * FRAME_BYTES / elapsed / 1e6:.0f} MB/s), {stalled} sends timed out",
        flush=True,
    )
    if not args.keep_open:
        # The workers receive what was sent, then StreamClosed. (Closed while
        # we still publish: a stream with neither publisher nor subscribers
        # is forgotten by the broker, and closing it then is NoSuchStream.)
        try:
            client.close_stream(args.stream)
        except memsock.NoSuchStream:
            pass
    pub.close()
    return 0


def row_spectrum(frame: memsock.Frame) -> npt.NDArray[np.float64]:
    """Mean magnitude spectrum of the frame's rows, computed on a read-only
    zero-copy view of the slot. The view is a local: it is gone when this
    returns, so the caller can release the frame (release refuses while a
    view of it is alive)."""
    image = frame.ndarray(np.uint16, SHAPE)
    spectrum: npt.NDArray[np.float64] = np.abs(np.fft.rfft(image, axis=1)).mean(axis=0)
    return spectrum


def percentiles(values_ns: list[int]) -> str:
    if not values_ns:
        return "n/a"
    p50, p90, p99 = np.percentile(np.array(values_ns) / 1e6, [50, 90, 99])
    return f"p50 {p50:.2f} ms  p90 {p90:.2f} ms  p99 {p99:.2f} ms  max {max(values_ns) / 1e6:.2f} ms"


def work(args: Args) -> int:
    client = memsock.connect(args.socket)
    print(f"worker: subscribing to {args.stream!r} ({args.policy}, {args.credits} credits)", flush=True)
    sub = client.subscribe(args.stream, credits=args.credits, policy=args.policy, wait=True)
    start = time.monotonic()
    end = start + args.seconds if args.seconds > 0 else float("inf")
    frames = lost = wrong = 0
    last_seq: int | None = None
    latencies: list[int] = []  # every frame's transport latency, ns
    fft_s = 0.0
    tick = start + 1.0
    tick_frames, tick_lost, tick_fft = 0, 0, 0.0
    tick_lat: list[int] = []
    how_it_ended = f"{args.seconds:g} s passed"
    try:
        while True:
            now = time.monotonic()
            if now >= tick:
                print(
                    f"worker: {tick_frames:4d} frames/s  lost {tick_lost:4d}  "
                    f"fft {1e3 * tick_fft / max(tick_frames, 1):5.1f} ms/frame  "
                    f"latency {percentiles(tick_lat)}",
                    flush=True,
                )
                tick += 1.0
                tick_frames, tick_lost, tick_lat, tick_fft = 0, 0, [], 0.0
            if now >= end:
                break
            try:
                frame = sub.recv(timeout=min(0.25, end - now))
            except memsock.Timeout:
                continue
            except memsock.PublisherGone:
                print("worker: the producer is gone; waiting for another", flush=True)
                continue
            except memsock.PublisherBack:
                print("worker: a producer took the stream over", flush=True)
                continue
            except memsock.StreamClosed:
                how_it_ended = "the stream was closed"
                break
            latency = memsock.now_ns() - frame.timestamp_ns
            if last_seq is not None and frame.seq > last_seq + 1:
                gap = frame.seq - last_seq - 1
                lost += gap
                tick_lost += gap
            last_seq = frame.seq
            t0 = time.perf_counter()
            spectrum = row_spectrum(frame)
            # The slot goes back to the producer. (Not `with frame:`: if
            # Ctrl-C lands inside numpy, the traceback still holds the view,
            # and leaving the block would raise BufferError in place of the
            # KeyboardInterrupt; this way the frame just goes with the
            # traceback.)
            frame.release()
            dt = time.perf_counter() - t0
            if int(np.argmax(spectrum[1:])) + 1 != FREQS[frame.seq % len(FREQS)]:
                wrong += 1
            frames += 1
            fft_s += dt
            latencies.append(latency)
            tick_frames += 1
            tick_fft += dt
            tick_lat.append(latency)
    except KeyboardInterrupt:
        how_it_ended = "interrupted"
    elapsed = time.monotonic() - start
    print(f"worker: stopped ({how_it_ended})", flush=True)
    print(
        f"worker: {frames} frames in {elapsed:.1f} s ({frames / elapsed:.1f} frames/s), "
        f"lost {lost} (sequence gaps), {wrong} with the wrong spectral peak, "
        f"fft {1e3 * fft_s / max(frames, 1):.1f} ms/frame",
        flush=True,
    )
    print(f"worker: transport latency {percentiles(latencies)}", flush=True)
    return 1 if wrong else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=None, help="broker socket (default: memsock's default)")
    parser.add_argument("--stream", default="fft-frames", help="stream name (default: %(default)s)")
    roles = parser.add_subparsers(dest="role", required=True)
    p = roles.add_parser("produce", help="publish 1.1 MB frames at a fixed rate")
    p.add_argument("--rate", type=float, default=60.0, help="frames per second (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long (0: until Ctrl-C; default: %(default)s)")
    p.add_argument("--slots", type=int, default=8, help="slots in the stream (default: %(default)s)")
    p.add_argument("--keep-open", action="store_true", help="do not close the stream at the end")
    w = roles.add_parser("work", help="FFT every frame received")
    w.add_argument("--policy", choices=("keep_latest", "lossless"), default="keep_latest")
    w.add_argument("--credits", type=int, default=2, help="frames queued + held at once (default: %(default)s)")
    w.add_argument(
        "--seconds", type=float, default=10.0,
        help="how long to receive, counted once the stream exists (0: until Ctrl-C; default: %(default)s)",
    )
    args = parser.parse_args(argv, namespace=Args())
    _stop_on_sigterm()
    try:
        return produce(args) if args.role == "produce" else work(args)
    except memsock.Error as e:
        print(f"{args.role}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while connecting or waiting for the stream
        print(f"{args.role}: interrupted", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
