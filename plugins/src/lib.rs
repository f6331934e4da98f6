//! memsock plugins: extra subscribers that attach to live streams without
//! disturbing them, each in a process of its own beside the broker.
//!
//! A plugin implements [`Plugin`]: which streams it wants (patterns, see
//! [`memsock::pattern`]) and how to subscribe to them, and hooks for a
//! stream opened, each frame, a publisher gone or back, a stream closed,
//! a periodic tick and shutdown. A [`Host`] runs it against a broker: it
//! subscribes to every matching stream as the stream is created (so none
//! of its first frames is missed), polls all of them from one thread, and
//! reports the plugin's [`Health`].
//!
//! The per-frame hook is synchronous and takes the frame by value (an
//! [`OwnedSample`]: a slot of the stream's shared memory, no copy, no
//! allocation); every other hook is async. A plugin that cannot take a
//! frame now hands it back ([`Delivery::Busy`]): the host offers it again
//! later and meanwhile takes nothing more from that stream — which, for a
//! lossless subscriber, is back-pressure on the publisher, and for any
//! other leaves the frames to the subscriber's own overflow policy.
//!
//! Two plugins come with the crate: the MCAP [`record`]er and the
//! [`replay`]er (a publisher, run by `memsock replay`).

#![deny(missing_docs)]

use std::time::Duration;

pub use async_trait::async_trait;
pub use memsock::OwnedSample;
use memsock::{ControlError, StreamConfig, SubscribeOptions};

mod host;
pub mod mcap_seq;
pub mod record;
pub mod replay;

pub use host::{Health, Host, HostError, HostOptions, StopHandle, StreamHealth};

/// Streams a plugin wants, and how to subscribe to them.
#[derive(Debug, Clone)]
pub struct Interest {
    /// A stream-name pattern.
    pub pattern: String,
    /// How to subscribe to each match (`wait_for_stream` is implied;
    /// `credits_up_to` lets a busy pool give fewer credits rather than
    /// refuse).
    pub options: SubscribeOptions,
}

/// The host's number for a stream it follows, dense from 0, never reused
/// in one run (a stream closed and created again gets a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

/// A stream the host subscribed to for the plugin.
#[derive(Debug, Clone)]
pub struct StreamOpened {
    /// The host's number for it.
    pub id: StreamId,
    /// Its name.
    pub name: String,
    /// Its configuration (geometry, timestamps).
    pub config: StreamConfig,
    /// The credits the subscriber got.
    pub credits: u32,
    /// It had a publisher as the subscriber attached.
    pub publisher_attached: bool,
}

/// A frame's stamps, as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    /// The stream's number.
    pub stream: StreamId,
    /// Stream sequence number.
    pub seq: u64,
    /// Frames the subscriber lost just before this one (a sequence gap:
    /// upstream of the plugin).
    pub gap: u64,
    /// Publish time, monotonic nanoseconds (0 if the stream does not stamp).
    pub publish_ns: u64,
    /// When the host took it, monotonic nanoseconds.
    pub receive_ns: u64,
}

/// What became of a frame offered to [`Plugin::frame`].
#[derive(Debug)]
pub enum Delivery {
    /// Taken (kept, or dropped on purpose and counted by the plugin).
    Taken,
    /// Not now: the host keeps it, offers it again later, and takes
    /// nothing more from its stream meanwhile.
    Busy(OwnedSample),
}

/// A change of a stream's publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherChange {
    /// The publisher left, every frame it sent delivered.
    Gone,
    /// A publisher is back; its frames follow.
    Back,
}

/// A plugin's own failure, reported in its health and by the host.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PluginError(pub String);

impl PluginError {
    /// An error with this text.
    pub fn new(text: impl std::fmt::Display) -> Self {
        Self(text.to_string())
    }
}

/// An extra subscriber. Every hook runs on the host's one thread; async
/// hooks may await I/O (the host's runtime is tokio's current-thread one).
#[async_trait]
pub trait Plugin: Send + 'static {
    /// The streams it wants.
    fn interests(&self) -> Vec<Interest>;

    /// A stream is subscribed; its frames follow.
    async fn stream_opened(&mut self, stream: &StreamOpened) -> Result<(), PluginError>;

    /// A subscription to a matching stream was refused (no credit left in
    /// its pool, its maximum of subscribers). Logged by default.
    async fn stream_refused(&mut self, stream: &str, error: &ControlError) -> Result<(), PluginError> {
        tracing::warn!(stream, "not subscribed: {error}");
        Ok(())
    }

    /// One frame. Synchronous, on the host's hot path: no allocation is
    /// needed to get here, keep it so.
    fn frame(&mut self, meta: FrameMeta, frame: OwnedSample) -> Delivery;

    /// A polling round found nothing new: a moment to hand on what the
    /// plugin held back. Synchronous, cheap; nothing by default.
    fn idle(&mut self) {}

    /// A stream's publisher left or came back (in order with its frames).
    async fn publisher_changed(&mut self, stream: StreamId, change: PublisherChange) -> Result<(), PluginError>;

    /// A stream ended: closed, or its subscriber detached. No more frames.
    async fn stream_closed(&mut self, stream: StreamId) -> Result<(), PluginError>;

    /// Called every [`HostOptions::tick`] with the host's view.
    async fn tick(&mut self, _health: &Health) -> Result<(), PluginError> {
        Ok(())
    }

    /// The host is stopping (shutdown asked, or the broker went away):
    /// finish up. Frames held are the plugin's to release.
    async fn shutdown(&mut self) -> Result<(), PluginError>;
}

/// A recording's file failed: the system refused it, or its MCAP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The system refused to create, open, map or write it.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The MCAP writer or reader failed.
    #[error("{path}: {source}")]
    Mcap {
        /// The file.
        path: std::path::PathBuf,
        /// What it said.
        source: mcap::McapError,
    },
}

/// How long the host's idle polling sleeps at most between looks: the
/// upper bound of a plugin's wake latency when every stream is quiet.
pub const MAX_IDLE_SLEEP: Duration = Duration::from_micros(1000);
