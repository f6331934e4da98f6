"""Autostart: connecting at the default socket with no broker there starts
exactly one per user (real processes, a private XDG_RUNTIME_DIR each)."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import WHEEL, _alive, _brokers_on, _env, _exe, eventually

# Connects at the default path, publishes auto/I and follows auto/I+1 until
# it has received 3 of its neighbour's frames; prints the broker's pid then,
# and goes on publishing until its stdin closes.
_PEER = r"""
import sys, threading, memsock
i, n = int(sys.argv[1]), int(sys.argv[2])
client = memsock.connect()
pub = client.publisher(f"auto/{i}", slot_size=64, slots=8)
sub = client.subscribe(f"auto/{(i + 1) % n}", credits=4, policy="keep_latest")
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
got, said = 0, False
while not done.is_set():
    pub.send(bytes([i]) * 8)
    try:
        with sub.recv(timeout=0.005) as frame:
            assert frame.tobytes() == bytes([(i + 1) % n]) * 8
            got += 1
    except memsock.Timeout:
        pass
    except (memsock.PublisherGone, memsock.StreamClosed):
        # The neighbour ended (its stdin closed first): so does this one.
        assert said
        break
    if got >= 3 and not said:
        print(client.broker_pid, flush=True)
        said = True
"""


def test_twenty_processes_connecting_at_once_start_exactly_one_broker(runtime_dir):
    n = 20
    env = _env(runtime_dir, MEMSOCK_IDLE_EXIT="2")
    peers = [
        subprocess.Popen(
            [sys.executable, "-c", _PEER, str(i), str(n)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        pids = []
        for peer in peers:
            line = peer.stdout.readline()
            assert line, peer.stderr.read()
            pids.append(int(line))
        socket = os.path.join(runtime_dir, "memsock", "broker.sock")
        assert len(set(pids)) == 1, pids
        assert _brokers_on(socket) == pids[:1]
        with open(socket + ".log") as log:
            assert "autostarted by a client" in log.read()
    finally:
        for peer in peers:
            peer.stdin.close()
        failures = []
        for peer in peers:
            if peer.wait(timeout=60) != 0:
                failures.append(peer.stderr.read())
            peer.stdout.close()
            peer.stderr.close()
        assert not failures, failures[0]
    # No client left: it exits after its idle time (2 s here).
    assert eventually(lambda: not _alive(pids[0]), timeout=30)
    assert _brokers_on(socket) == []


def test_a_caller_capturing_the_first_client_s_output_does_not_wait_for_the_broker(runtime_dir):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "import memsock; print(memsock.connect().broker_pid)"],
        env=_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=50,  # the broker lives 60 s: holding the pipe would pass this
    )
    assert done.returncode == 0, done.stderr
    broker = int(done.stdout)
    assert _alive(broker) and time.monotonic() - started < 50
    # Detached: a session of its own, not a child of the caller's.
    assert os.getsid(broker) == broker
    os.kill(broker, signal.SIGTERM)
    assert eventually(lambda: not _alive(broker), timeout=20)


_CONNECT = r"""
import sys, memsock
try:
    memsock.connect(*sys.argv[1:])
except memsock.BrokerUnreachable as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize("how", ["MEMSOCK_AUTOSTART=0", "MEMSOCK_SOCKET", "explicit path"])
def test_no_autostart_when_told_so_or_given_a_path(runtime_dir, how):
    default = os.path.join(runtime_dir, "memsock", "broker.sock")
    args, env, tried = [], _env(runtime_dir), default
    if how == "MEMSOCK_AUTOSTART=0":
        env["MEMSOCK_AUTOSTART"] = "0"
    elif how == "MEMSOCK_SOCKET":
        tried = os.path.join(runtime_dir, "elsewhere.sock")
        env["MEMSOCK_SOCKET"] = tried
    else:
        tried = default
        args = [default]
    done = subprocess.run([sys.executable, "-c", _CONNECT, *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert tried in done.stdout and "cannot reach" in done.stdout, done.stdout
    assert not os.path.exists(default) and _brokers_on(default) == []


# Connects at the default path after naming the bundled binary (argv[1]; an
# installed wheel names its own as it loads), and prints the broker's pid.
_CONNECT_BUNDLED = r"""
import sys, memsock
memsock._memsock._set_bundled_broker(sys.argv[1])
try:
    print(memsock.connect().broker_pid)
except memsock.BrokerUnreachable as e:
    print(e)
    sys.exit(3)
"""


def test_a_failed_autostart_says_what_it_tried(runtime_dir):
    env = _env(runtime_dir, MEMSOCK_BROKER="/nonexistent/memsock", PATH="/nonexistent")
    args = [sys.executable, "-c", _CONNECT_BUNDLED, "/nonexistent/bundled/memsock"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, (done.stdout, done.stderr)
    said = done.stdout
    assert "starting one failed" in said and "the bundled /nonexistent/bundled/memsock" in said, said
    assert "MEMSOCK_BROKER=/nonexistent/memsock" in said and "on PATH" in said, said


def test_the_bundled_broker_comes_first(runtime_dir):
    """Before $MEMSOCK_BROKER and PATH (neither of which works here)."""
    import memsock

    # An installed wheel's own binary; a development build has none.
    bundled = memsock._cli.bundled() or _exe("MEMSOCK_EXE", "memsock")
    assert not WHEEL or memsock._cli.bundled(), "the wheel has no bundled memsock"
    env = _env(runtime_dir, MEMSOCK_BROKER="/nonexistent/memsock", PATH="/nonexistent")
    done = subprocess.run(
        [sys.executable, "-c", _CONNECT_BUNDLED, bundled], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    pid = int(done.stdout)
    # Idle for 60 s before it exits: there to be looked at.
    assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(bundled)
    os.kill(pid, signal.SIGTERM)
    assert eventually(lambda: not _alive(pid), timeout=30)
    with open(os.path.join(runtime_dir, "memsock", "broker.sock.log")) as f:
        assert "autostarted by a client" in f.read()


def test_a_broker_holds_its_lock_so_a_second_refuses_and_a_stale_socket_is_replaced(runtime_dir):
    exe = _exe("MEMSOCK_EXE", "memsock")
    socket = os.path.join(runtime_dir, "memsock", "broker.sock")
    first = subprocess.Popen([exe, "--socket", socket, "broker"], stderr=subprocess.PIPE, text=True)
    try:
        assert eventually(lambda: os.path.exists(socket))
        second = subprocess.run([exe, "--socket", socket, "broker"], capture_output=True, text=True, timeout=30)
        assert second.returncode != 0 and "already running" in second.stderr, second.stderr
        first.kill()
        first.wait()
        # SIGKILL left the socket file behind; the lock went with the process.
        assert os.path.exists(socket)
        third = subprocess.Popen([exe, "--socket", socket, "broker", "--idle-exit", "1"], stderr=subprocess.PIPE, text=True)
        assert third.wait(timeout=30) == 0, third.stderr.read()
        third.stderr.close()
    finally:
        first.kill()
        first.wait()
        first.stderr.close()


def test_idle_exit_counts_from_the_last_client(runtime_dir):
    import memsock

    exe = _exe("MEMSOCK_EXE", "memsock")
    socket = os.path.join(runtime_dir, "memsock", "broker.sock")
    broker = subprocess.Popen([exe, "--socket", socket, "broker", "--idle-exit", "1.5"], stderr=subprocess.DEVNULL)
    try:
        assert eventually(lambda: os.path.exists(socket))
        client = memsock.connect(socket)
        # Connected for 3 s, twice the idle time: the broker stays (an exit
        # ends the wait at once and fails the test).
        with pytest.raises(subprocess.TimeoutExpired):
            broker.wait(timeout=3)
        client.stats()
        del client
        assert broker.wait(timeout=30) == 0
    finally:
        broker.kill()
        broker.wait()


def test_autostart_writes_nothing_in_a_directory_others_control(runtime_dir):
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _CONNECT], env=_env(runtime_dir), capture_output=True, text=True, timeout=60
    )
    sockets = os.path.join(runtime_dir, "memsock")
    os.mkdir(sockets)
    os.chmod(sockets, 0o777)  # as another user's /tmp/memsock-<uid> could be
    done = run()
    assert done.returncode == 3 and "writable by others" in done.stdout, (done.stdout, done.stderr)
    assert os.listdir(sockets) == []
    # A lock file planted as a link is not followed.
    os.chmod(sockets, 0o700)
    target = os.path.join(runtime_dir, "victim")
    os.symlink(target, os.path.join(sockets, "broker.sock.lock"))
    done = run()
    assert done.returncode == 3 and "cannot open" in done.stdout, (done.stdout, done.stderr)
    assert not os.path.exists(target)
