"""Python peer processes for the tests: `peer.py ROLE SOCKET STREAM [N]`.

Roles: `publish` sends N numpy frames (frame i: uint16 values i..i+255,
from a non-contiguous view) and reports; `hold` subscribes, takes N
frames, holds them and sleeps (to be killed); `recv` blocks in recv()
with nothing to receive and reports a KeyboardInterrupt; `state`
shares state by name as seed 004's users do — a ctypes header on
STREAM/header and a numpy image on STREAM/image, each keeping its last
value (history=1), version N in both — then exits, or with a fifth
argument `hold` waits to be killed.
"""

import ctypes
import json
import signal
import sys
import time

import numpy as np

import memsock


class Header(ctypes.Structure):
    """The state's header, as a ctypes structure shared by name."""

    _fields_ = [("magic", ctypes.c_uint32), ("version", ctypes.c_uint32), ("height", ctypes.c_uint32), ("width", ctypes.c_uint32)]


MAGIC = 0x5EED0004
SHAPE = (480, 640)


def image(version):
    """The state's image for `version`: every pixel (y, x) is y + x + version, mod 256."""
    y, x = np.indices(SHAPE)
    return ((y + x + version) % 256).astype(np.uint8)


def say(**kw):
    print(json.dumps(kw), flush=True)


def main():
    role, socket, stream = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    client = memsock.connect(socket)
    if role == "publish":
        pub = client.publisher(stream, slot_size=1024, slots=8)
        say(ready=True)
        wide = np.zeros((256, 2), np.uint16)
        for i in range(n):
            wide[:, 0] = np.arange(i, i + 256, dtype=np.uint16)
            pub.send(wide[:, 0], timeout=30)  # strided: copied in C order
        say(report={"sent": n})
    elif role == "state":
        header = client.publisher(stream + "/header", slot_size=ctypes.sizeof(Header), slots=8, history=1)
        pixels = client.publisher(stream + "/image", slot_size=SHAPE[0] * SHAPE[1], slots=8, history=1)
        header.send(Header(MAGIC, n, *SHAPE))
        pixels.send(image(n))
        say(sent=n)
        if sys.argv[5:] == ["hold"]:
            time.sleep(3600)
        say(report={"sent": n})
    elif role == "hold":
        sub = client.subscribe(stream, credits=n, policy="lossless")
        say(ready=True)
        held = [sub.recv(timeout=30) for _ in range(n)]
        say(holding=len(held))
        time.sleep(3600)
    elif role == "recv":
        # Ctrl-C's KeyboardInterrupt even when started with SIGINT ignored
        # (as a shell without job control starts a background command).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sub = client.subscribe(stream, credits=1, wait=False)
        try:
            say(ready=True)
            sub.recv()
        except KeyboardInterrupt:
            say(report={"interrupted": True})
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
