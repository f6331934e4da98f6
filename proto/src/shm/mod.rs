//! Streams in shared memory: the layout, and the lock-free algorithms of
//! the publisher, the subscribers and the owner.
//!
//! # Map
//! - [`layout`]: every shared structure, its constants and offsets.
//! - `mem`: typed access to mapped files (the only pointer arithmetic).
//! - `publisher`: loans, delivery, overflow policies, taking slots back,
//!   crash recovery; [`Publisher`] and [`SampleMut`].
//! - `subscriber`: taking frames, returning slots, waiting; [`Subscriber`]
//!   and [`Sample`].
//! - `owner`: creation, admission by credits, detach and reclamation,
//!   statistics; [`StreamSegment`].
//! - `wait`: spin-then-park and its wake-up protocol.
//! - `crash`: the points where a killed writer may stop, and the test hook
//!   that stops one there (`crash_tests`, `recovery_tests`).
//!
//! # Who maps what
//! A stream is one data file plus one channel file per subscriber index,
//! all `memfd`s created by the owner and passed as descriptors:
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

mod crash;
pub mod layout;
mod mem;
mod owner;
mod publisher;
mod subscriber;
mod wait;

#[cfg(all(test, not(loom)))]
mod crash_tests;
#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod recovery_tests;
#[cfg(all(test, not(loom)))]
mod tests;

pub use crate::primitive::{BarrierPassed, system_barrier};
pub use layout::{Geometry, LayoutError, OverflowPolicy, WaitStrategy};
pub use mem::MapError;
pub use owner::{
    AddSubscriberError, EndProgress, StreamConfig, StreamStats, SubscriberOpError, SubscriberOptions, SubscriberStats,
    SubscriberTicket,
};
pub use publisher::{LoanError, SendInfo};
pub use subscriber::{FrameInfo, KeepAlive, Position, RecvError, TryRecvError};

#[cfg(not(loom))]
pub use mem::{ChannelMap, StreamMap};
#[cfg(not(loom))]
pub use owner::{CreateError, OpenLocalError, StreamSegment};
#[cfg(not(loom))]
pub use publisher::{Loan, OpenPublisherError, Publisher, SampleMut, SendError, Unsent};
#[cfg(not(loom))]
pub use subscriber::{Interrupter, OpenSubscriberError, OwnedSample, Sample, Subscriber, Watcher};
