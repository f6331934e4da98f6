"""`memsock record` and `memsock replay` against the real broker, checked
with an independent MCAP reader (the `mcap` package from PyPI)."""

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
from mcap.reader import make_reader
from mcap.records import Channel, Message
from mcap.stream_reader import StreamReader

from conftest import _exe, eventually, frame_len
EVENTS = "memsock/events"


def frames_of(slot_size, seqs):
    """The Rust test peer's frames `seqs` (tests/src/lib.rs), computed for
    all of them at once with numpy: its SplitMix64 chain runs along each
    frame, so the frames go side by side."""
    seqs = np.asarray(list(seqs), dtype=np.uint64)
    lens = [frame_len(int(s), slot_size) for s in seqs]
    words = max(lens) // 8 + 1
    c1, c2, c3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

    def vmix(x):
        z = x + c1
        z = (z ^ (z >> np.uint64(30))) * c2
        z = (z ^ (z >> np.uint64(27))) * c3
        return z ^ (z >> np.uint64(31))

    out = np.empty((len(seqs), words), dtype=np.uint64)
    with np.errstate(over="ignore"):
        state = vmix(seqs)
        for i in range(words):
            state = vmix(state)
            out[:, i] = state
    raw = out.astype("<u8").view(np.uint8).reshape(len(seqs), -1)
    result = []
    for row, n in zip(raw, lens):
        whole = n // 8 * 8
        # The tail is mix(state) after the last whole word: that is the
        # next word of the chain, as computed.
        result.append(row[:whole].tobytes() + row[whole : whole + (n - whole)].tobytes())
    return result


def test_frames_of_matches_the_scalar_pattern():
    from conftest import frame_bytes

    seqs = [0, 1, 7, 1000]
    assert frames_of(300, seqs) == [frame_bytes(s, 300) for s in seqs]


class Recorder:
    """`memsock record ... --json` as a child process."""

    def __init__(self, broker, output, *args):
        self.proc = subprocess.Popen(
            [_exe("MEMSOCK_EXE", "memsock"), "--socket", broker.socket, "record", "-o", str(output), "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        assert self.read_until("ready")["ready"]

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"recorder exited ({self.proc.wait()}): {self.proc.stderr.read()}")
        msg = json.loads(line)
        self.lines.append(msg)
        return msg

    def read_until(self, key, cond=lambda m: True):
        while True:
            msg = self.read()
            if key in msg and cond(msg):
                return msg

    def stop(self):
        """SIGINT, which finishes the file; returns the summary line."""
        self.proc.send_signal(signal.SIGINT)
        done = self.read_until("done")
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()
        self.close()
        return done

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self):
        self.proc.stdout.close()
        self.proc.stderr.close()


def read_recording(paths):
    """Every message of the recorded streams, in file order, and the events:
    {stream: [(full seq, log_time, publish_time, bytes)]}, [event dicts]."""
    frames, events, high = {}, [], {}
    for path in paths:
        with open(path, "rb") as f:
            for _schema, channel, message in make_reader(f).iter_messages(log_time_order=False):
                if channel.topic == EVENTS:
                    event = json.loads(message.data)
                    events.append(event)
                    if event["event"] == "seq_high":
                        high[event["stream"]] = event["high"]
                    continue
                seq = high.get(channel.topic, 0) << 32 | message.sequence
                frames.setdefault(channel.topic, []).append(
                    (seq, message.log_time, message.publish_time, bytes(message.data))
                )
    return frames, events


def waiting_subscriber(broker, stream, credits):
    """A lossless subscriber of `stream`, waiting for it to be created
    (attached from its first frame): (thread, list that gets it)."""
    client = broker.connect()
    got = []
    thread = threading.Thread(target=lambda: got.append(client.subscribe(stream, credits=credits, policy="lossless")))
    thread.start()
    assert eventually(lambda: broker.client.stats()["waiting_subscribers"] == 1)
    return thread, got


def replayer(broker, *args):
    """`memsock replay ARGS` as a child process (its output piped)."""
    return subprocess.Popen(
        [_exe("MEMSOCK_EXE", "memsock"), "--socket", broker.socket, "replay", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def peer_publisher(rust_peer, broker, stream, slot_size, slot_count, count, **extra):
    spec = {
        "role": "publisher",
        "socket": broker.socket,
        "stream": stream,
        "slot_size": slot_size,
        "slot_count": slot_count,
        "count": count,
        **extra,
    }
    return rust_peer(spec)


def test_a_lossless_recording_holds_every_frame_of_streams_created_after_it_started(broker, rust_peer, tmp_path):
    """Two publishers at full speed, both created after the recorder
    started: one of 1 MiB frames, one of 64-byte frames. Every frame is in
    the file, byte for byte, in order, none missing; channel metadata holds
    the geometry; the recorder is a subscriber like any other."""
    out = tmp_path / "rec.mcap"
    rec = Recorder(broker, out, "--stream", "rec/**", "--credits", "16")
    big = peer_publisher(rust_peer, broker, "rec/big", 1 << 20, 16, 40)
    small = peer_publisher(rust_peer, broker, "rec/ticks", 64, 1024, 200_000)
    assert big.finish()["sent"] == 40
    assert small.finish()["sent"] == 200_000
    subs = [s for s in broker.client.stats()["streams"] if s["name"] == "rec/big"]
    assert [s["pid"] for s in subs[0]["subscribers"]] == [rec.proc.pid]
    done = rec.stop()
    assert done["frames"] == 200_040 and done["upstream_gaps"] == 0 and done["recorder_drops"] == 0

    frames, events = read_recording([out])
    assert sorted(frames) == ["rec/big", "rec/ticks"]
    for stream, slot_size, count in [("rec/big", 1 << 20, 40), ("rec/ticks", 64, 200_000)]:
        got = frames[stream]
        assert [f[0] for f in got] == list(range(count)), f"{stream}: every frame, in order"
        expected = frames_of(slot_size, range(count))
        bad = [i for i, (f, e) in enumerate(zip(got, expected)) if f[3] != e]
        assert not bad, f"{stream}: frames {bad[:5]} differ"
        assert all(f[2] > 0 and f[1] >= f[2] for f in got), "publish time stamped, logged after"
    with open(out, "rb") as f:
        summary = make_reader(f).get_summary()
    channels = {c.topic: c for c in summary.channels.values()}
    assert channels["rec/big"].metadata["slot_size"] == str(1 << 20)
    assert channels["rec/big"].metadata["slot_count"] == "16"
    assert channels["rec/ticks"].message_encoding == "memsock.raw"
    assert not [e for e in events if e["event"] == "gap"]


def test_a_keep_latest_recorder_behind_a_slow_disk_counts_its_drops_by_cause(broker, rust_peer, tmp_path):
    """A keep-latest recorder writing at 2 MB/s behind a publisher of 64 KiB
    frames at full speed: it drops frames rather than grow, counts them as
    its own, and every gap in the file is explained by a gap event whose
    causes add up; the totals match what it reports."""
    out = tmp_path / "slow.mcap"
    rec = Recorder(broker, out, "--stream", "slow", "--policy", "keep-latest", "--throttle", "2M", "--credits", "16")
    pub = peer_publisher(rust_peer, broker, "slow", 65536, 64, 3000)
    assert pub.finish()["sent"] == 3000
    done = rec.stop()
    frames, events = read_recording([out])
    seqs = [f[0] for f in frames["slow"]]
    gaps = {e["before_seq"]: e for e in events if e["event"] == "gap" and "before_seq" in e}
    tail = [e for e in events if e["event"] == "gap" and "after_seq" in e]
    # Lost after the last recorded frame: one trailing event.
    assert len(tail) <= 1 and all(e["after_seq"] == seqs[-1] for e in tail)
    upstream = sum(e["upstream"] for e in tail)
    recorder = sum(e["recorder"] for e in tail)
    previous = -1
    for seq in seqs:
        missing = seq - previous - 1
        if missing:
            e = gaps.pop(seq)
            assert e["upstream"] + e["recorder"] == missing, (seq, e)
            upstream += e["upstream"]
            recorder += e["recorder"]
        previous = seq
    assert not gaps, "no gap event without its gap"
    assert recorder > 0, "a 2 MB/s disk cannot keep up"
    assert (upstream, recorder) == (done["upstream_gaps"], done["recorder_drops"])
    assert done["frames"] == len(seqs)
    # Every frame sent is in the file or counted lost, by cause.
    assert len(seqs) + upstream + recorder == 3000
    expected = frames_of(65536, seqs)
    assert [f[3] for f in frames["slow"]] == expected


def test_replay_publishes_the_recorded_bytes_at_the_recorded_pacing(broker, rust_peer, tmp_path):
    """A paced publisher recorded, then replayed at 1x into a lossless
    subscriber: the same bytes, and the replay takes as long as the
    recording did (never less)."""
    out = tmp_path / "paced.mcap"
    rec = Recorder(broker, out, "--stream", "paced")
    pub = peer_publisher(rust_peer, broker, "paced", 4096, 16, 60, pace_ns=10_000_000)
    assert pub.finish()["sent"] == 60
    rec.stop()
    frames, _ = read_recording([out])
    recorded = frames["paced"]
    span = (recorded[-1][1] - recorded[0][1]) / 1e9

    waiting, subs = waiting_subscriber(broker, "replayed", 8)
    started = time.monotonic()
    replay = replayer(broker, str(out), "--rename", "paced=replayed", "--json")
    waiting.join()
    sub = subs[0]
    got, arrivals = [], []
    for _ in range(60):
        with sub.recv(timeout=30) as frame:
            got.append(bytes(frame))
            arrivals.append(time.monotonic())
    out_text, err_text = replay.communicate(timeout=60)
    assert replay.returncode == 0, err_text
    assert got == [f[3] for f in recorded]
    replayed = arrivals[-1] - arrivals[0]
    assert replayed >= span * 0.95, (replayed, span)
    assert time.monotonic() - started < span + 30
    summary = json.loads(out_text.strip().splitlines()[-1])
    assert summary["done"] and summary["frames"] == 60 and summary["streams"] == 1


def test_split_files_hold_every_frame_and_replay_as_one(broker, rust_peer, tmp_path):
    """Splitting by size starts new files without losing a frame; the
    files replay as one recording."""
    out = tmp_path / "split.mcap"
    rec = Recorder(broker, out, "--stream", "split", "--split-size", "1M")
    pub = peer_publisher(rust_peer, broker, "split", 65536, 32, 200)
    assert pub.finish()["sent"] == 200
    done = rec.stop()
    files = [tmp_path / name for name in sorted(os.listdir(tmp_path)) if name.startswith("split-")]
    assert len(files) >= 3 and [str(f) for f in files] == done["files"]
    frames, _ = read_recording(files)
    assert [f[0] for f in frames["split"]] == list(range(200))
    assert [f[3] for f in frames["split"]] == frames_of(65536, range(200))

    waiting, subs = waiting_subscriber(broker, "split-again", 8)
    replay = replayer(broker, *map(str, files), "--rename", "split=split-again", "--max-speed")
    waiting.join()
    sub = subs[0]
    got = []
    for _ in range(200):
        with sub.recv(timeout=30) as frame:
            got.append(bytes(frame))
    _, err_text = replay.communicate(timeout=60)
    assert replay.returncode == 0, err_text
    assert got == [f[3] for f in frames["split"]]


def test_a_recorder_killed_outright_leaves_complete_chunks_a_streaming_reader_reads(broker, rust_peer, tmp_path):
    """SIGKILL mid-recording: the streaming reader of the `mcap` package
    reads every complete chunk, frames intact and in order, up to the cut."""
    out = tmp_path / "killed.mcap"
    rec = Recorder(broker, out, "--stream", "killed")
    pub = peer_publisher(rust_peer, broker, "killed", 65536, 32, 600)
    assert pub.finish()["sent"] == 600
    rec.read_until("frames", lambda m: m["frames"] >= 600)
    rec.kill()
    seqs, data, topics = [], [], {}
    with open(out, "rb") as f:
        try:
            for record in StreamReader(f, skip_magic=False).records:
                if isinstance(record, Channel):
                    topics[record.id] = record.topic
                elif isinstance(record, Message) and topics[record.channel_id] == "killed":
                    seqs.append(record.sequence)
                    data.append(bytes(record.data))
        except Exception as e:  # the cut: the reader stops there
            cut = e
        else:
            cut = None
    assert seqs == list(range(len(seqs)))
    # Chunks of 4 MiB hold some 60 frames of 64 KiB (at most the last two
    # chunks' worth can be missing: the one being written and the buffer).
    assert len(seqs) >= 600 - 200, (len(seqs), cut)
    assert data == frames_of(65536, seqs)


def test_a_publisher_taken_over_mid_recording(broker, rust_peer, tmp_path):
    """A publisher that exits and one that takes the stream over: the
    recording has every frame of both, numbered on, with the departure and
    the return recorded between them."""
    out = tmp_path / "takeover.mcap"
    rec = Recorder(broker, out, "--stream", "handover")
    first = peer_publisher(rust_peer, broker, "handover", 512, 16, 100)
    assert first.finish()["sent"] == 100
    assert eventually(lambda: broker.stream("handover")["publisher_pid"] is None)
    second = peer_publisher(rust_peer, broker, "handover", 512, 16, 100)
    assert second.finish()["sent"] == 100
    rec.stop()
    frames, events = read_recording([out])
    assert [f[0] for f in frames["handover"]] == list(range(200))
    assert [f[3] for f in frames["handover"]] == frames_of(512, range(200))
    kinds = [e["event"] for e in events if e["stream"] == "handover"]
    assert kinds[:3] == ["seq_high", "publisher_gone", "publisher_back"], kinds


def test_bad_arguments_are_refused_with_a_reason(broker, tmp_path):
    exe = _exe("MEMSOCK_EXE", "memsock")
    (tmp_path / "taken.mcap").write_bytes(b"a recording")
    for args, text in [
        (["record", "-o", str(tmp_path / "x.mcap"), "--stream", "a**"], "whole part"),
        (["record", "-o", str(tmp_path / "x.mcap"), "--policy", "sometimes"], "lossless or keep-latest"),
        (["record", "-o", str(tmp_path / "x.mcap"), "--split-size", "lots"], "not a number of bytes"),
        (["replay", str(tmp_path / "missing.mcap")], "no such file"),
        (["record", "-o", str(tmp_path / "taken.mcap")], "File exists"),
        (["replay", str(tmp_path / "x.mcap"), "--rename", "nothing"], "FROM=TO"),
    ]:
        r = subprocess.run([exe, "--socket", broker.socket, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and text in r.stderr, (args, r.stderr)


def test_a_recording_started_late_holds_the_kept_state_unless_declined(broker, tmp_path):
    client = broker.connect()
    with client.publisher("state", slot_size=16, slots=8, history=2) as pub:
        for i in range(5):
            pub.send(np.full(2, i, np.uint64))
    # The writer is gone; its last two frames are kept. A recorder that
    # comes now records them first (history), one with --no-history none.
    for args, want in (((), [3, 4]), (("--no-history",), [])):
        out = tmp_path / f"late{len(args)}.mcap"
        rec = Recorder(broker, out, "--stream", "state", *args)

        def delivered():
            subs = broker.stream("state")["subscribers"]
            # (Handed over as it subscribes: a declined history would show
            # queued or delivered at once.)
            return bool(subs) and (subs[0]["delivered"], subs[0]["queued"]) == (len(want), 0)

        assert eventually(delivered)
        rec.stop()
        frames, _events = read_recording([out])
        got = [(seq, np.frombuffer(data, np.uint64)[0]) for seq, _log, _pub, data in frames.get("state", [])]
        assert got == [(s, s) for s in want], args
