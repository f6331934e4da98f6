//! Following the streams whose names match a pattern: their creation and
//! removal, and with a pattern subscription a subscriber of each.

use std::sync::Arc;
use std::time::Duration;

use memsock_proto::control::{ControlError, PatternSubscription, Reply, Request, StreamInfo, WatchChange};
use memsock_proto::shm::{StreamConfig, WaitStrategy};

use crate::client::{Subscriber, unexpected};
use crate::conn::{ClientError, Conn, WatchQueue};

/// What a [`Watch`] reports.
#[derive(Debug)]
#[non_exhaustive]
// A few events per stream, never per frame: their size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum WatchEvent {
    /// A matching stream was created (a pattern subscription's subscriber
    /// of it follows).
    Created(StreamInfo),
    /// A matching stream was closed, or removed when nothing used it.
    Removed {
        /// Stream name.
        stream: String,
        /// It was closed (else removed unused).
        closed: bool,
    },
    /// A pattern subscription's subscriber of a matching stream: of a
    /// stream created after the watch began, attached before its publisher
    /// could send a frame. Its credits: [`Subscriber::credits`].
    Subscribed {
        /// The subscriber.
        subscriber: Subscriber,
        /// The stream's configuration.
        config: StreamConfig,
        /// The stream had a publisher as it attached.
        publisher_attached: bool,
    },
    /// A pattern subscription could not subscribe to a matching stream
    /// (its pool could give no credit, it has its maximum of subscribers).
    SubscribeFailed {
        /// Stream name.
        stream: String,
        /// The broker's reason.
        error: ControlError,
    },
}

/// A watch of a pattern, from [`Client::watch`](crate::Client::watch) or
/// [`Client::subscribe_pattern`](crate::Client::subscribe_pattern).
/// Dropping it ends the watch (the subscribers it gave live on).
#[derive(Debug)]
pub struct Watch {
    conn: Arc<Conn>,
    watch: u64,
    queue: Arc<WatchQueue>,
    streams: Vec<StreamInfo>,
    wait: WaitStrategy,
}

impl Watch {
    pub(crate) fn start(
        conn: &Arc<Conn>,
        pattern: &str,
        subscribe: Option<PatternSubscription>,
    ) -> Result<Self, ClientError> {
        let wait = subscribe.map(|s| s.options.wait).unwrap_or_default();
        let (reply, _) = conn.request(Request::Watch { pattern: pattern.into(), subscribe })?;
        let Reply::Watching { watch, streams } = reply else { return Err(unexpected("Watching")) };
        let Some(queue) = conn.watch_queue(watch) else {
            // The connection ended as the reply came.
            return Err(ClientError::Disconnected(crate::Disconnect::Closed));
        };
        tracing::debug!(pattern, watch, streams = streams.len(), "watching");
        Ok(Self { conn: conn.clone(), watch, queue, streams, wait })
    }

    /// The matching streams there were when the watch began, by name.
    pub fn streams(&self) -> &[StreamInfo] {
        &self.streams
    }

    /// The next event if one has come, without waiting.
    ///
    /// # Errors
    /// [`ClientError::Disconnected`] once the connection has ended and
    /// every event before it was taken; an error opening a subscriber.
    pub fn try_next(&self) -> Result<Option<WatchEvent>, ClientError> {
        self.next_within(None)
    }

    /// The next event, waiting at most `timeout` for one (`Ok(None)` if
    /// none came).
    ///
    /// # Errors
    /// As [`try_next`](Self::try_next).
    pub fn next_timeout(&self, timeout: Duration) -> Result<Option<WatchEvent>, ClientError> {
        self.next_within(Some(timeout))
    }

    fn next_within(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, ClientError> {
        self.conn.check_fork()?;
        let Ok(item) = self.queue.pop(timeout) else {
            return Err(ClientError::Disconnected(crate::Disconnect::Closed));
        };
        item.map(|(change, fds)| self.event(change, fds)).transpose()
    }

    fn event(&self, change: WatchChange, fds: Vec<std::os::fd::OwnedFd>) -> Result<WatchEvent, ClientError> {
        Ok(match change {
            WatchChange::Created(info) => WatchEvent::Created(info),
            WatchChange::Removed { stream, closed } => WatchEvent::Removed { stream, closed },
            WatchChange::Subscribed { grant, config } => {
                let subscriber = Subscriber::open(&self.conn, &grant, self.wait, &fds)?;
                WatchEvent::Subscribed { subscriber, config, publisher_attached: grant.publisher_attached }
            }
            WatchChange::SubscribeFailed { stream, error } => WatchEvent::SubscribeFailed { stream, error },
            _ => return Err(unexpected("a known watch event")),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.conn.forked() {
            return; // the parent's watch
        }
        self.conn.forget_watch(self.watch);
        self.conn.notify(Request::Unwatch { watch: self.watch });
        // Subscribers announced and never opened go back.
        for (change, _) in self.queue.drain() {
            if let WatchChange::Subscribed { grant, .. } = change {
                self.conn.notify(Request::Unsubscribe { subscription: grant.subscription });
            }
        }
    }
}
