"""asyncio support: receive without blocking the event loop.

A receive first tries the ring on the loop's thread (cheap when a frame is
there). Only when it is empty does it wait, in the default executor, on a
watcher of the subscriber — which never takes a frame — so a cancelled
``recv_async`` loses nothing.
"""

import asyncio

from ._memsock import Detached, PublisherBack, PublisherGone, StreamClosed, Timeout

# How long one executor wait lasts before the loop looks again (bounds how
# long a cancelled receive keeps an executor thread).
_SLICE = 0.25


async def recv_async(sub, timeout=None):
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    watcher = None
    while True:
        frame, position = sub._poll()
        if frame is not None:
            return frame
        wait = _SLICE
        if deadline is not None:
            wait = min(_SLICE, deadline - loop.time())
            if wait <= 0:
                raise Timeout("timed out waiting for a frame")
        if watcher is None:
            watcher = sub._watcher()
        await loop.run_in_executor(None, watcher.wait, position, wait)


async def anext_frame(sub):
    while True:
        try:
            return await recv_async(sub)
        except (PublisherGone, PublisherBack):
            continue
        except (StreamClosed, Detached):
            raise StopAsyncIteration from None
