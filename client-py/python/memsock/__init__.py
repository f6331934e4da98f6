"""memsock: shared memory that feels like a local socket.

Frames move between processes through shared-memory rings handed out by
the memsock broker; this package is its Python client. The first
``connect()`` at the default socket starts a broker if none runs (the
wheel bundles it: the ``memsock`` command, also ``python -m memsock``)::

    import memsock, numpy as np

    client = memsock.connect()
    pub = client.publisher("camera", slot_size=1 << 20, slots=8)
    pub.send(np.zeros((512, 1024), np.uint16))

    sub = client.subscribe("camera", credits=4, policy="keep_latest")
    with sub.recv() as frame:
        image = frame.ndarray(np.uint16, (512, 1024))   # zero-copy, read-only
        ...
    # The slot goes back here, or when the last view of it (image) ends.

A forked child (``multiprocessing`` with the fork start method,
``os.fork``) cannot use its parent's client, publishers or subscribers
(``memsock.Forked``): it calls ``memsock.connect()`` for its own.

Every error is a ``memsock.Error``.
"""

from ._memsock import (
    Batch,
    BrokerGone,
    BrokerPermissionDenied,
    BrokerUnreachable,
    Client,
    Corrupt,
    CreditsExhausted,
    CreditsRefused,
    Detached,
    Disconnected,
    Error,
    Forked,
    Frame,
    InvalidArgument,
    Loan,
    NoSuchStream,
    NotPermitted,
    LimitReached,
    Publisher,
    PublisherBack,
    PublisherGone,
    Refused,
    StreamClosed,
    StreamExists,
    Subscriber,
    Timeout,
    WouldBlock,
    connect,
    now_ns,
)



def _bundle() -> None:
    """Tells autostart about the `memsock` binary shipped in the wheel."""
    from . import _cli, _memsock

    path = _cli.bundled()
    if path is not None:
        _memsock._set_bundled_broker(path)


_bundle()

__all__ = [
    "Batch",
    "BrokerGone",
    "BrokerPermissionDenied",
    "BrokerUnreachable",
    "Client",
    "Corrupt",
    "CreditsExhausted",
    "CreditsRefused",
    "Detached",
    "Disconnected",
    "Error",
    "Forked",
    "Frame",
    "InvalidArgument",
    "Loan",
    "NoSuchStream",
    "NotPermitted",
    "LimitReached",
    "Publisher",
    "PublisherBack",
    "PublisherGone",
    "Refused",
    "StreamClosed",
    "StreamExists",
    "Subscriber",
    "Timeout",
    "WouldBlock",
    "connect",
    "now_ns",
]
