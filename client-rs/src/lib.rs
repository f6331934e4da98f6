//! memsock: streams of frames between processes through shared memory,
//! zero-copy, with per-subscriber overflow policies and credits.
//!
//! A stream has one publisher and any number of subscribers. The
//! publisher loans a slot, writes the frame in place and sends it; each
//! subscriber receives a [`Sample`] that reads the frame where it lies and
//! hands the slot back when dropped.
//!
//! ```
//! use memsock::{OverflowPolicy, StreamConfig, StreamSegment, SubscriberOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The owner creates the stream (normally the broker does this).
//! let mut stream = StreamSegment::create("camera", &StreamConfig::new(1 << 20, 8))?;
//! let subscriber = stream.open_subscriber(&SubscriberOptions {
//!     credits: 4,
//!     policy: OverflowPolicy::KeepLatest,
//!     ..SubscriberOptions::default()
//! })?;
//! let mut publisher = stream.open_publisher()?;
//!
//! let mut frame = publisher.loan()?;
//! frame.as_mut_slice()[..4].copy_from_slice(&[1, 2, 3, 4]);
//! frame.set_len(4);
//! frame.send()?;
//!
//! let sample = subscriber.recv()?;
//! assert_eq!(&*sample, &[1, 2, 3, 4]);
//! assert_eq!(sample.seq(), 0);
//! # Ok(()) }
//! ```
//!
//! Across processes, the owner hands the stream's files to the publisher
//! ([`StreamSegment::data_fd`], [`StreamSegment::channel_fds`]) and to each
//! subscriber ([`StreamSegment::read_only_data_fd`],
//! [`StreamSegment::channel_fd`] and a [`SubscriberTicket`]), which open
//! them with [`Publisher::open`] and [`Subscriber::open`].

#![deny(missing_docs)]

pub use memsock_proto::shm::{
    AddSubscriberError, CreateError, FrameInfo, Geometry, LoanError, OpenLocalError, OpenPublisherError,
    OpenSubscriberError, OverflowPolicy, Publisher, RecvError, Sample, SampleMut, SendError, SendInfo, StreamConfig,
    StreamSegment, StreamStats, Subscriber, SubscriberOpError, SubscriberOptions, SubscriberStats, SubscriberTicket,
    TryRecvError, Unsent, WaitStrategy,
};

/// Nanoseconds on the monotonic clock: the clock of [`Sample::timestamp_ns`].
pub fn now_ns() -> u64 {
    memsock_proto::platform::now_ns()
}
