"""Benchmark of the Python client: ``python -m memsock.bench [--json]``.

Starts a private broker and native publishers (``memsock publish``), and
measures, in one run:

- ``py_recv``: 64-byte messages, one ``recv()`` per message (each made
  into ``bytes`` and released);
- ``py_recv_batch``: the same messages through ``recv_batch(4096)``;
- ``py_frames_numpy``: 1.1 MB frames received as numpy views, ``np.sum``
  over each;

and, as references in the same run:

- ``py_ctypes_ring``: the hand-rolled approach of a pure-Python consumer of
  a ring in an mmap'ed file, read through ctypes and spin-polled (the
  layout and loop of the seed article: 1024 messages of 64 bytes, a write
  and a read index), fed by a native producer (`memsock-bench ring-producer`);
- ``np_sum_in_memory``: ``np.sum`` over an in-memory array of the frame size;

and the time to a connection: ``connect`` (the broker running) and
``connect_autostart`` (no broker at the default socket: the client starts
one, in a private ``XDG_RUNTIME_DIR``).

Every case runs ``--rounds`` times, interleaved; figures are medians, and
the targets are medians of the per-round ratios.
"""

import argparse
import ctypes
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import memsock

SMALL = 64
BIG = 1153434


def find_exe(name, explicit, env, option):
    """`explicit`, `$env`, the one bundled in the wheel, PATH or the checkout's target/."""
    from memsock import _cli

    bundled = _cli.bundled() if name == "memsock" else None
    candidates = [explicit, os.environ.get(env), bundled, shutil.which(name)]
    root = Path(__file__).resolve().parents[3]
    candidates += [str(root / "target" / p / name) for p in ("release", "ci", "debug")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit(f"cannot find the {name} binary: pass {option}, set {env} or put it on PATH")


class Broker:
    def __init__(self, exe):
        self.exe = exe
        self.dir = tempfile.TemporaryDirectory(prefix="memsock-bench-")
        self.socket = os.path.join(self.dir.name, "broker.sock")
        self.proc = subprocess.Popen([exe, "--socket", self.socket, "broker"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client = memsock.connect(self.socket)
                return
            except memsock.BrokerUnreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def publisher(self, stream, size, slots, count):
        return subprocess.Popen(
            [self.exe, "--socket", self.socket, "publish", "--stream", stream, "--size", str(size),
             "--slots", str(slots), "--count", str(count), "--subscribers", "1"],
            stdout=subprocess.PIPE, text=True,
        )

    def close(self):
        self.proc.terminate()
        self.proc.wait()
        self.dir.cleanup()


def finish(proc):
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"publisher failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def py_recv(broker, count):
    pub = broker.publisher("recv", SMALL, 1024, count)
    sub = broker.client.subscribe("recv", credits=512, policy="lossless")
    first = sub.recv()
    first.release()
    start = time.perf_counter()
    recv = sub.recv
    for _ in range(count - 1):
        f = recv()
        f.tobytes()
        f.release()
    seconds = time.perf_counter() - start
    finish(pub)
    sub.close()
    return {"case": "py_recv", "size": SMALL, "msgs_per_s": (count - 1) / seconds}


def py_recv_batch(broker, count):
    pub = broker.publisher("batch", SMALL, 1024, count)
    sub = broker.client.subscribe("batch", credits=1000, policy="lossless")
    got = len(sub.recv_batch(1))
    start = time.perf_counter()
    while got < count:
        got += len(sub.recv_batch(4096))
    seconds = time.perf_counter() - start
    finish(pub)
    sub.close()
    return {"case": "py_recv_batch", "size": SMALL, "msgs_per_s": (count - 1) / seconds}


def py_frames_numpy(broker, count):
    pub = broker.publisher("frames", BIG, 8, count)
    sub = broker.client.subscribe("frames", credits=4, policy="lossless")
    with sub.recv() as f:
        pass
    start = time.perf_counter()
    total = 0
    for _ in range(count - 1):
        f = sub.recv()
        a = f.ndarray()
        total += int(np.sum(a))
        del a
        f.release()
    seconds = time.perf_counter() - start
    finish(pub)
    sub.close()
    return {"case": "py_frames_numpy", "size": BIG, "frames_per_s": (count - 1) / seconds}


class RingBuffer(ctypes.Structure):
    # The seed article's layout.
    _fields_ = [
        ("write_index", ctypes.c_ulong),
        ("read_index", ctypes.c_ulong),
        ("buffer", (ctypes.c_char * 64) * 1024),
    ]


def py_ctypes_ring(ring_producer, count):
    fd, path = tempfile.mkstemp(prefix="memsock-bench-ring-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.ftruncate(fd, ctypes.sizeof(RingBuffer))
        mm = mmap.mmap(fd, ctypes.sizeof(RingBuffer), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        rb = RingBuffer.from_buffer(mm)
        producer = subprocess.Popen([ring_producer, "ring-producer", "--path", path, "--count", str(count)])
        start = None
        for _ in range(count):
            while rb.read_index >= rb.write_index:
                pass
            if start is None:
                start = time.perf_counter()
            idx = rb.read_index % 1024
            rb.buffer[idx].raw  # the message, as bytes
            rb.read_index += 1
        seconds = time.perf_counter() - start
        producer.wait(timeout=60)
        del rb
        mm.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return {"case": "py_ctypes_ring", "size": SMALL, "msgs_per_s": (count - 1) / seconds}


def np_sum_in_memory(count):
    a = np.frombuffer(np.random.default_rng(1).bytes(BIG), np.uint8)
    start = time.perf_counter()
    total = 0
    for _ in range(count):
        total += int(np.sum(a))
    seconds = time.perf_counter() - start
    return {"case": "np_sum_in_memory", "size": BIG, "frames_per_s": count / seconds}


def connect(broker, tries):
    """Median ms of a connect (handshake included) to a running broker."""
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        client = memsock.connect(broker.socket)
        times.append(time.perf_counter() - start)
        del client
    return {"case": "connect", "ms": statistics.median(times) * 1e3}


def connect_autostart(exe):
    """Ms of a connect at the default socket with no broker there (the
    client starts one), in a runtime directory of its own."""
    saved = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "MEMSOCK_SOCKET", "MEMSOCK_BROKER", "MEMSOCK_AUTOSTART")}
    with tempfile.TemporaryDirectory(prefix="memsock-bench-xdg-") as runtime:
        os.environ.update(XDG_RUNTIME_DIR=runtime, MEMSOCK_BROKER=exe)
        os.environ.pop("MEMSOCK_SOCKET", None)
        os.environ.pop("MEMSOCK_AUTOSTART", None)
        try:
            start = time.perf_counter()
            client = memsock.connect()
            ms = (time.perf_counter() - start) * 1e3
            pid = client.broker_pid
            del client
            os.kill(pid, 15)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().split(")")[-1].split()[0] == "Z":
                        break
                time.sleep(0.01)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return {"case": "connect_autostart", "ms": ms}


def targets(lines):
    by = {l["case"]: l for l in lines}
    ring = by["py_ctypes_ring"]["msgs_per_s"]
    return {
        "py_recv_vs_ctypes_ring": by["py_recv"]["msgs_per_s"] / ring,
        "py_recv_batch_vs_ctypes_ring": by["py_recv_batch"]["msgs_per_s"] / ring,
        "py_frames_numpy_vs_np_sum_in_memory": by["py_frames_numpy"]["frames_per_s"]
        / by["np_sum_in_memory"]["frames_per_s"],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m memsock.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every message count")
    ap.add_argument("--memsock", help="the memsock binary (default: $MEMSOCK_EXE, the wheel's own, PATH, the checkout's target/)")
    ap.add_argument(
        "--memsock-bench",
        help="the memsock-bench binary, whose hand-rolled ring producer feeds the ctypes reference "
        "(default: $MEMSOCK_BENCH_EXE, PATH, the checkout's target/)",
    )
    args = ap.parse_args(argv)
    n = lambda x: max(10, int(x * args.scale))  # noqa: E731
    ring_producer = find_exe("memsock-bench", args.memsock_bench, "MEMSOCK_BENCH_EXE", "--memsock-bench")
    broker = Broker(find_exe("memsock", args.memsock, "MEMSOCK_EXE", "--memsock"))
    rounds = []
    try:
        for _ in range(args.rounds):
            rounds.append([
                py_ctypes_ring(ring_producer, n(1_000_000)),
                py_recv(broker, n(300_000)),
                py_recv_batch(broker, n(2_000_000)),
                np_sum_in_memory(n(1000)),
                py_frames_numpy(broker, n(1000)),
                connect(broker, 20),
                connect_autostart(broker.exe),
            ])
    finally:
        broker.close()
    figures = []
    for i, first in enumerate(rounds[0]):
        line = dict(first)
        for key in ("msgs_per_s", "frames_per_s", "ms"):
            if key in line:
                line[key] = statistics.median(r[i][key] for r in rounds)
        figures.append(line)
    per_round = [targets(r) for r in rounds]
    summary = {"case": "targets", "rounds": len(rounds)}
    for key in per_round[0]:
        summary[key] = statistics.median(t[key] for t in per_round)
        summary[key + "_range"] = [min(t[key] for t in per_round), max(t[key] for t in per_round)]
    if args.json:
        for line in figures + [summary]:
            print(json.dumps(line))
    else:
        for line in figures:
            if "ms" in line:
                print(f"{line['case']:<18} {line['ms']:>25.2f} ms")
                continue
            rate = line.get("msgs_per_s") or line.get("frames_per_s")
            unit = "msg/s" if "msgs_per_s" in line else "frames/s"
            print(f"{line['case']:<18} {line['size']:>8} B  {rate:>14,.0f} {unit}")
        print(f"\ntargets (median of per-round ratios over {len(rounds)} rounds):")
        goals = {"py_recv_vs_ctypes_ring": 0.6, "py_recv_batch_vs_ctypes_ring": 3.0,
                 "py_frames_numpy_vs_np_sum_in_memory": 0.8}
        for key, goal in goals.items():
            lo, hi = summary[key + "_range"]
            mark = "ok" if summary[key] >= goal else "MISSED"
            print(f"  {key:<38} {summary[key]:6.2f}  (range {lo:.2f}-{hi:.2f}, goal >= {goal})  {mark}")


if __name__ == "__main__":
    main()
