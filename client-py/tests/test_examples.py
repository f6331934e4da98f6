"""The examples (client-py/examples), as their README runs them: two
processes each, no broker started by hand (the first connect starts one,
in a private XDG_RUNTIME_DIR)."""

import re
import signal
import subprocess
import sys

from conftest import HERE, _env

EXAMPLES = HERE.parent / "examples"


class Role:
    def __init__(self, runtime_dir, script, *args):
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(runtime_dir, PYTHONUNBUFFERED="1"),
        )
        self.lines = []

    def wait_for(self, text):
        """Reads until a line containing `text` (the process is killed by
        `finish`'s timeout if it never comes)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in: {''.join(self.lines)}")

    def finish(self, timeout=120):
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        out = "".join(self.lines) + rest
        assert self.proc.returncode == 0, out
        return out


def _number(pattern, out):
    found = re.search(pattern, out)
    assert found, (pattern, out)
    return int(found.group(1).replace(",", ""))


def test_fft_worker(runtime_dir):
    worker = Role(runtime_dir, "fft_worker.py", "work", "--seconds", "60")
    worker.wait_for("subscribing to")
    producer = Role(runtime_dir, "fft_worker.py", "produce", "--seconds", "3", "--rate", "30")
    sent = producer.finish()
    out = worker.finish()
    assert _number(r"sent (\d+) frames", sent) > 0, sent
    # The producer closes the stream at the end, which ends the worker.
    assert "stream was closed" in out, out
    assert _number(r"worker: ([\d,]+) frames in", out) > 0, out
    assert _number(r"(\d+) with the wrong spectral peak", out) == 0, out


def test_count_messages(runtime_dir):
    consumer = Role(runtime_dir, "count_messages.py", "consume", "--seconds", "60", "--policy", "lossless")
    consumer.wait_for("subscribing to")
    producer = Role(runtime_dir, "count_messages.py", "produce", "--seconds", "1")
    sent = _number(r"sent ([\d,]+) messages", producer.finish())
    out = consumer.finish()
    # Lossless once subscribed: the messages before its attach point aside,
    # every one arrives, each carrying its own sequence number.
    received = _number(r"received ([\d,]+) messages", out)
    first = _number(r"sequence numbers ([\d,]+) to", out)
    assert received == sent - first, out
    assert _number(r"lost ([\d,]+) \(sequence gaps\)", out) == 0, out
    assert _number(r"([\d,]+) payloads not matching", out) == 0, out


def test_shared_state(runtime_dir):
    reader = Role(runtime_dir, "shared_state.py", "reader", "--seconds", "60")
    reader.wait_for("waiting for stream")
    writer = Role(runtime_dir, "shared_state.py", "writer", "--seconds", "1")
    wrote = writer.finish()
    states = _number(r"exiting after (\d+) states", wrote)
    reader.wait_for("PublisherGone")
    # SIGTERM, not SIGINT, which a shell starting the tests in the
    # background may have set to be ignored: it exits with its summary.
    reader.proc.send_signal(signal.SIGTERM)
    out = reader.finish()
    assert 0 < _number(r"after reading (\d+) states", out) <= states, out
    assert _number(r"\((\d+) with a bad checksum\)", out) == 0, out
    assert f"state #{states} " in out.split("PublisherGone")[1], out
