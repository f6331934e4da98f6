"""Counts the ticks of ticks_producer.c (seed 003's Python side): reads
them in batches as one numpy record array, checks none is missing, and
prints what it got as JSON.

    python ticks_consumer.py [--socket PATH]
"""

import argparse
import json
import time

import numpy as np

import memsock

TICK = np.dtype([("index", "<u8"), ("timestamp_ns", "<u8"), ("price", "<f8"), ("reserved", "u1", 40)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket")
    args = parser.parse_args()
    client = memsock.connect(args.socket) if args.socket else memsock.connect()
    sub = client.subscribe("ticks", credits=512, policy="lossless", wait=True)
    count, gaps, latency_ns, start = 0, 0, 0, None
    while True:
        try:
            batch = sub.recv_batch(4096, timeout=60)
        except memsock.PublisherGone:
            break
        ticks = np.asarray(batch.data).view(TICK)
        start = start or time.monotonic()
        gaps += int(ticks["index"][0] != count) + int(np.count_nonzero(np.diff(ticks["index"]) != 1))
        latency_ns = max(latency_ns, memsock.now_ns() - int(ticks["timestamp_ns"][-1]))
        count += len(ticks)
    seconds = time.monotonic() - (start or time.monotonic())
    print(json.dumps({"received": count, "gaps": gaps, "seconds": round(seconds, 3),
                      "msgs_per_s": round(count / seconds) if seconds else None}))


if __name__ == "__main__":
    main()
