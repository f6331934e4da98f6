//! Streams in shared memory: the layout, and the lock-free algorithms of
//! the publisher, the subscribers and the owner.
//!
//! # Map
//! - [`layout`]: every shared structure, its constants and offsets.
//! - `core`: the lock-free algorithms of the publisher, the subscribers and
//!   the owner, over any memory implementing the layout (what loom and
//!   proptest run), with the wake-up protocol and the crash points.
//! - `map`: mappings of the shared files (the only pointer arithmetic on
//!   shared memory).
//! - `publisher`: the user's handles [`Publisher`], [`SampleMut`], [`Loan`].
//! - `subscriber`: [`Subscriber`], [`Sample`], [`Watcher`].
//! - `owner`: [`StreamSegment`], the owner's handle on a stream's files.
//!
//! # Who maps what
//! A stream is one data file plus a channel file per subscriber, created
//! when it is admitted and closed when its index is free again (or, for an
//! owner that starts its peers itself, one per index up front), all
//! `memfd`s created by the owner and passed as descriptors:
//!
//! | file | owner | publisher | subscriber *i* |
//! |---|---|---|---|
//! | data (header, table, rings, masks, pool) | read-write | read-write | **read-only** |
//! | channel *i* (head, return ring, wake words) | read-write | read-write | read-write |
//! | channel *j ≠ i* | read-write | read-write | — |
//!
//! A subscriber gets a read-only descriptor of the data file (re-opened
//! through `/proc/self/fd`), so the kernel refuses it a writable mapping:
//! it cannot change frames, rings or counters that others read. What it can
//! write — its channel — the publisher validates before use. Files are sealed
//! against resizing, so no peer can make another's access fault.
//!
//! Why `memfd` and descriptors rather than named files in `/dev/shm`:
//! access is a capability (a process can map only what it was handed, and
//! only as writable as the descriptor allows), nothing needs cleaning up
//! after a crash (the memory goes with the last descriptor or mapping), and
//! no two streams can collide on a name.

mod core;
pub mod layout;
#[cfg(not(loom))]
mod map;
#[cfg(not(loom))]
mod owner;
#[cfg(not(loom))]
mod publisher;
#[cfg(not(loom))]
mod subscriber;

#[cfg(all(test, not(loom)))]
mod tests;

pub use self::core::owner::{
    AddSubscriberError, EndProgress, LatencyCounts, StreamConfig, StreamStats, SubscriberOpError, SubscriberOptions,
    SubscriberStats, SubscriberTicket,
};
pub use self::core::publisher::{LoanError, SendInfo};
pub use self::core::subscriber::{FrameInfo, KeepAlive, Position, RecvError, TryRecvError};
pub use crate::primitive::{BarrierPassed, system_barrier};
pub use layout::{Geometry, LayoutError, OverflowPolicy, WaitStrategy};

#[cfg(not(loom))]
pub use map::{ChannelMap, MapError, StreamMap};
#[cfg(not(loom))]
pub use owner::{AdmitError, CreateError, OpenLocalError, StreamSegment};
#[cfg(not(loom))]
pub use publisher::{ChannelInbox, Loan, OpenPublisherError, Publisher, SampleMut, SendError, Unsent};
#[cfg(not(loom))]
pub use subscriber::{Interrupter, OpenSubscriberError, OwnedSample, Sample, Subscriber, Watcher};
