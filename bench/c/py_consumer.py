"""The Python consumer of `memsock-bench c`: receives COUNT 64-byte frames
of STREAM one at a time (API `recv`) or in batches (`recv_batch`), and
prints {"received": N, "ns": T}, T from the first frame to the last.

    python py_consumer.py SOCKET STREAM COUNT recv|recv_batch
"""

import json
import sys
import time

import memsock


def main():
    socket, stream, count, api = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sub = memsock.connect(socket).subscribe(stream, credits=128, policy="lossless", wait=True)
    received, start = 0, None
    if api == "recv":
        while received < count:
            frame = sub.recv(timeout=60)
            frame.release()
            if start is None:
                start = time.perf_counter_ns()
            received += 1
    else:
        while received < count:
            batch = sub.recv_batch(4096, timeout=60)
            if start is None:
                start = time.perf_counter_ns()
            received += len(batch)
    print(json.dumps({"received": received, "ns": time.perf_counter_ns() - start}), flush=True)


if __name__ == "__main__":
    main()
