"""The examples of client-c/examples, built by scripts/test-c (their
directory in MEMSOCK_C_EXAMPLES), run as a user runs them against the real
broker: the C tick feed counted by Python, the C++ device feeding Python
FFT workers, the C printer."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fixtures

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
eventually = fixtures.eventually


def _bin(name):
    d = os.environ.get("MEMSOCK_C_EXAMPLES")
    if not d:
        pytest.fail("MEMSOCK_C_EXAMPLES is not set: run scripts/test-c")
    return str(Path(d) / name)


def _start(args):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def _waiting(broker, n):
    assert eventually(lambda: broker.client.stats()["waiting_subscribers"] == n, timeout=30)


def test_a_c_tick_feed_counted_by_python(broker):
    consumer = _start([sys.executable, str(EXAMPLES / "ticks_consumer.py"), "--socket", broker.socket])
    try:
        _waiting(broker, 1)
        produced = _finish(_start([_bin("ticks_producer"), "--socket", broker.socket, "1000000"]))
        assert produced.startswith("sent 1000000 ticks in ")
        got = json.loads(_finish(consumer))
    finally:
        consumer.kill()
    assert got["received"] == 1_000_000 and got["gaps"] == 0, got


def test_a_cpp_device_feeding_python_fft_workers(broker):
    workers = [_start([sys.executable, str(EXAMPLES / "fft_worker.py"), "--socket", broker.socket, f"device/{c}"])
               for c in range(3)]
    try:
        _waiting(broker, 3)
        device = json.loads(_finish(_start([_bin("device_producer"), "--socket", broker.socket, "3", "20", "30"])))
        assert device == {"frames": 20, "channels": 3, "not_sent": 0}
        for c, worker in enumerate(workers):
            got = json.loads(_finish(worker))
            # Every frame a worker took was whole: its tone is where
            # channel c puts it. A worker slower than the device loses
            # frames rather than stalling it.
            assert got["frames"] >= 1 and got["frames"] + got["lost"] <= 20, got
            assert got["peaks"] == {str(100 + 10 * c): got["frames"]}, got
    finally:
        for w in workers:
            w.kill()


def test_the_c_printer(broker):
    printer = _start([_bin("print_subscriber"), "--socket", broker.socket, "demo", "2"])
    try:
        _waiting(broker, 1)
        pub = broker.connect().publisher("demo", slot_size=64, slots=8)
        pub.send(b"hello")
        pub.send(bytes(range(20)))
        out = _finish(printer).splitlines()
    finally:
        printer.kill()
    assert out[0] == "-- subscribed to demo"
    assert out[1].startswith("seq 0 len 5 age ") and out[1].endswith("| 68 65 6c 6c 6f"), out
    assert out[2].startswith("seq 1 len 20 ") and out[2].endswith(
        "| 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f ..."), out


def test_ctrl_c_ends_the_c_printers_wait(broker):
    client = broker.connect()
    _pub = client.publisher("quiet", slot_size=64, slots=8)
    printer = _start([_bin("print_subscriber"), "--socket", broker.socket, "quiet"])
    try:
        assert printer.stdout.readline() == "-- subscribed to quiet\n"
        printer.send_signal(signal.SIGINT)
        assert _finish(printer, timeout=30) == "-- interrupted\n"
    finally:
        printer.kill()
