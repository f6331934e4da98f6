"""A Python worker for device_producer.cpp (seed 000): takes each 1.1 MB
frame of one channel as a numpy uint16 array, read in place in shared
memory, and finds its strongest frequency; prints a JSON summary when the
device stops.

    python fft_worker.py [--socket PATH] STREAM
"""

import argparse
import json

import numpy as np

import memsock


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket")
    parser.add_argument("stream")
    args = parser.parse_args()
    client = memsock.connect(args.socket) if args.socket else memsock.connect()
    sub = client.subscribe(args.stream, credits=2, wait=True)
    frames, peaks, last_seq, lost = 0, {}, None, 0
    while True:
        try:
            frame = sub.recv(timeout=60)
        except memsock.PublisherGone:
            break
        with frame:
            samples = frame.ndarray(np.uint16)  # no copy
            spectrum = np.abs(np.fft.rfft(samples.astype(np.float32) - 32768.0))
            del samples
            seq = frame.seq
        peak = int(np.argmax(spectrum))
        peaks[peak] = peaks.get(peak, 0) + 1
        lost += 0 if last_seq is None else seq - last_seq - 1
        last_seq = seq
        frames += 1
    print(json.dumps({"stream": args.stream, "frames": frames, "lost": lost,
                      "peaks": {str(k): v for k, v in peaks.items()}}))


if __name__ == "__main__":
    main()
