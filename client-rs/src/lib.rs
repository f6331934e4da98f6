//! memsock: shared memory that feels like a local socket. Streams of
//! frames between processes, zero-copy, with per-subscriber overflow
//! policies and credits; a broker hands out the shared memory over a small
//! control socket and reclaims it when a process goes away.
//!
//! ```no_run
//! use memsock::{Client, OverflowPolicy, StreamConfig, SubscribeOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In the camera process:
//! let client = Client::connect()?; // `memsock broker` must be running
//! let mut publisher = client.publisher("camera", &StreamConfig::new(1 << 20, 8))?;
//! let mut frame = publisher.loan()?;
//! frame.as_mut_slice()[..4].copy_from_slice(&[1, 2, 3, 4]);
//! frame.set_len(4);
//! frame.send()?;
//!
//! // In a viewer process:
//! let client = Client::connect()?;
//! let options = SubscribeOptions { credits: 2, policy: OverflowPolicy::KeepLatest, ..Default::default() };
//! let subscriber = client.subscriber("camera", &options)?;
//! let sample = subscriber.recv()?;
//! println!("frame {} of {} bytes", sample.seq(), sample.len());
//! # Ok(()) }
//! ```
//!
//! The data plane underneath works without a broker too: [`shm`] has the
//! stream segment, its owner operations and the file-level `open`s.

#![deny(missing_docs)]

#[cfg(feature = "tokio")]
mod asynk;
mod autostart;
mod client;
mod conn;
mod watch;

#[cfg(feature = "tokio")]
pub use asynk::AsyncSubscriber;
pub use autostart::{AUTOSTART_ENV, BROKER_ENV, set_bundled_broker};
pub use client::{Client, Publisher, SOCKET_ENV, SubscribeOptions, Subscriber, default_socket_path};
pub use conn::{ClientError, Disconnect, ProtocolViolation};
pub use memsock_proto::control::{
    ConfigProblem, ControlError, DecodeFailure, Event, LatencyReport, LatencySummary, Malformation, SegmentStep,
    StatsReport, StreamInfo, StreamReport, SubscriberReport,
};
pub use memsock_proto::shm::{
    FrameInfo, LoanError, OverflowPolicy, OwnedSample, RecvError, Sample, SampleMut, SendError, SendInfo, StreamConfig,
    TryRecvError, Unsent, WaitStrategy,
};
pub use watch::{Watch, WatchEvent};

/// The data plane on its own: stream segments, their owner operations and
/// file-level publishers and subscribers (what the broker builds on).
pub mod shm {
    pub use memsock_proto::shm::*;
}

/// Stream-name patterns: `*` within a part, `**` across parts.
pub mod pattern {
    pub use memsock_proto::pattern::*;
}

/// The control protocol (for tools that speak to the broker directly).
pub mod control {
    pub use memsock_proto::control::*;
}

/// Nanoseconds on the monotonic clock: the clock of [`Sample::timestamp_ns`].
pub fn now_ns() -> u64 {
    memsock_proto::platform::now_ns()
}
