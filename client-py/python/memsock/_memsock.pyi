"""Type stubs of the native part of memsock (see the docstrings there)."""

from collections.abc import AsyncIterator, Coroutine, Iterator
from os import PathLike
from types import TracebackType
from typing import Any, Literal, Optional, Union, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "connect", "_set_bundled_broker", "now_ns", "Client", "BrokerGone", "Publisher", "Loan", "Subscriber",
    "Position", "Watcher", "Batch", "Frame", "Error", "BrokerUnreachable", "BrokerPermissionDenied",
    "Disconnected", "Refused", "NoSuchStream", "StreamExists", "CreditsRefused", "NotPermitted", "LimitReached",
    "InvalidArgument", "PublisherGone", "PublisherBack", "StreamClosed", "Detached", "CreditsExhausted",
    "WouldBlock", "Timeout", "Corrupt", "Forked",
]

# Names for the stub only (not in the module).
_Policy = Literal["drop_newest", "keep_latest", "lossless"]
_Strategy = Literal["park", "spin_then_park", "spin"]

def _set_bundled_broker(path: Union[str, PathLike[str]]) -> None: ...
def connect(socket: Optional[Union[str, PathLike[str]]] = None, name: Optional[str] = None) -> Client:
    """Connects to the broker (default path: $MEMSOCK_SOCKET, else
    $XDG_RUNTIME_DIR/memsock/broker.sock, else /tmp/memsock-<uid>/broker.sock)
    under `name`, which stats and `memsock top` show (default: the script's
    file name).
    At the default path a per-user broker is started if none answers
    (unless $MEMSOCK_SOCKET is set or MEMSOCK_AUTOSTART=0)."""

def now_ns() -> int:
    """Nanoseconds on the monotonic clock (the clock of Frame.timestamp_ns)."""

@final
class Client:
    """A connection to the broker: the lease of everything opened through it."""

    @property
    def broker_pid(self) -> int: ...
    @property
    def disconnected(self) -> bool: ...
    @property
    def forked(self) -> bool:
        """Whether this is a child forked since the client connected."""
    @property
    def broker_gone(self) -> Optional[BrokerGone]:
        """None while the broker is there; why it went, once it has."""
    def publisher(
        self,
        name: str,
        slot_size: int,
        slots: int,
        *,
        max_subscribers: Optional[int] = None,
        mlock: bool = False,
        huge_pages: bool = False,
        prefault: bool = True,
        timestamps: bool = True,
        loans: int = 0,
        history: int = 0,
        history_idle: Optional[float] = None,
    ) -> Publisher:
        """Creates stream `name` (or takes it over) and publishes to it."""
    def subscribe(
        self,
        name: str,
        credits: int = 4,
        policy: _Policy = "drop_newest",
        wait: bool = True,
        *,
        strategy: _Strategy = "spin_then_park",
        history: Union[bool, int, None] = None,
    ) -> Subscriber:
        """Subscribes to stream `name`, waiting for it to exist if `wait`."""
    def close_stream(self, name: str) -> None:
        """Closes stream `name` for good. Its publisher may, and so may a
        client running as the broker's user; once it has no publisher, a
        client running as the user who created it too (else NotPermitted)."""
    def stats(self, name: Optional[str] = None) -> dict[str, Any]:
        """Live counters of every stream (or one), as plain dicts."""

@final
class BrokerGone:
    """The broker is gone (shut down, crashed): reason says how."""

    @property
    def reason(self) -> str: ...

@final
class Publisher:
    """The publisher of a stream."""

    @property
    def stream(self) -> str: ...
    @property
    def slot_size(self) -> int: ...
    @property
    def next_seq(self) -> int: ...
    @property
    def took_over(self) -> bool: ...
    @property
    def broker_gone(self) -> Optional[BrokerGone]: ...
    def send(self, obj: Any, timeout: Optional[float] = None) -> int:
        """Sends the bytes of any buffer-protocol object (one copy); returns its seq."""
    def loan(self, nbytes: int) -> Loan:
        """A slot to write in place; sent when its with-block ends normally
        (views deleted first: a view written after the send would change a
        frame others read)."""
    def close(self) -> None:
        """Stops publishing."""
    def __enter__(self) -> Publisher: ...
    def __exit__(
        self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> bool: ...

@final
class Loan:
    """A loaned slot: a writable buffer-protocol object of len(loan) bytes."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def ndarray(
        self,
        dtype: Optional[npt.DTypeLike] = None,
        shape: Union[int, tuple[int, ...], None] = None,
        offset: int = 0,
        count: int = ...,
    ) -> np.ndarray:
        """A writable zero-copy numpy view; delete it before the block ends:

        with pub.loan(img.nbytes) as buf:
            a = buf.ndarray(np.uint16, img.shape)
            a[:] = img
            del a
        """
    def send(self, timeout: Optional[float] = None) -> int: ...
    def discard(self) -> None: ...
    def __enter__(self) -> Loan: ...
    def __exit__(
        self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> bool: ...

@final
class Frame:
    """A received frame, read in place; a buffer-protocol object (read-only)."""

    @property
    def seq(self) -> int: ...
    @property
    def timestamp_ns(self) -> int: ...
    @property
    def history(self) -> bool: ...
    @property
    def released(self) -> bool: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def ndarray(
        self,
        dtype: Optional[npt.DTypeLike] = None,
        shape: Union[int, tuple[int, ...], None] = None,
        offset: int = 0,
        count: int = ...,
    ) -> np.ndarray:
        """A read-only zero-copy numpy view that keeps the frame alive."""
    def tobytes(self) -> bytes:
        """A copy of the frame's bytes."""
    def release(self) -> None:
        """Gives the slot back (BufferError while a view is alive; a with-block
        left while views live defers the release to the last view's end)."""
    def __enter__(self) -> Frame: ...
    def __exit__(
        self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> bool: ...

@final
class Batch:
    """Messages copied by recv_batch: data[offsets[i]:offsets[i+1]] is message i."""

    @property
    def data(self) -> npt.NDArray[np.uint8]: ...
    @property
    def offsets(self) -> npt.NDArray[np.uint64]: ...
    @property
    def seq(self) -> npt.NDArray[np.uint64]: ...
    @property
    def timestamp_ns(self) -> npt.NDArray[np.uint64]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> bytes: ...

@final
class Position: ...

@final
class Watcher:
    def wait(self, position: Position, timeout: float) -> bool: ...

@final
class Subscriber:
    """A subscription to a stream."""

    @property
    def stream(self) -> str: ...
    @property
    def credits(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def broker_gone(self) -> Optional[BrokerGone]: ...
    @property
    def held_by_views(self) -> int:
        """Frames whose with-block ended while views were alive (released when the last view ends)."""
    @property
    def publisher_generation(self) -> int:
        """Publisher arrivals and departures so far; odd while one is attached."""
    def recv(self, timeout: Optional[float] = None) -> Frame:
        """Waits for the next frame (GIL released, Ctrl-C answered)."""
    def try_recv(self) -> Optional[Frame]:
        """The next frame if one is queued."""
    def recv_batch(self, max_n: int, timeout: Optional[float] = None) -> Batch:
        """Waits for one message, then takes up to max_n, copied."""
    def recv_async(self, timeout: Optional[float] = None) -> Coroutine[Any, Any, Frame]:
        """recv for asyncio: does not block the event loop; cancel-safe."""
    def set_credits(self, credits: int) -> None: ...
    def close(self) -> None: ...
    def __iter__(self) -> Iterator[Frame]: ...
    def __next__(self) -> Frame: ...
    def __aiter__(self) -> AsyncIterator[Frame]: ...
    def __anext__(self) -> Coroutine[Any, Any, Frame]: ...
    def __enter__(self) -> Subscriber: ...
    def __exit__(
        self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> bool: ...
    def _poll(self) -> tuple[Optional[Frame], Optional[Position]]: ...
    def _watcher(self) -> Watcher: ...

class Error(Exception): ...
class BrokerPermissionDenied(Error): ...
class BrokerUnreachable(Error): ...
class Disconnected(Error): ...
class Refused(Error): ...
class NoSuchStream(Refused): ...
class StreamExists(Refused): ...
class CreditsRefused(Refused): ...
class NotPermitted(Refused): ...
class LimitReached(Refused): ...
class InvalidArgument(Error): ...
class PublisherGone(Error): ...
class PublisherBack(Error): ...
class StreamClosed(Error): ...
class Detached(Error): ...
class CreditsExhausted(Error): ...
class WouldBlock(Error): ...
class Timeout(Error): ...
class Corrupt(Error): ...
class Forked(Error): ...
