//! The client API: connect to the broker, publish and subscribe by name.

use std::ops::{Deref, DerefMut};
use std::os::fd::AsFd;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use memsock_proto::control::{Event, PatternSubscription, Reply, Request, StatsReport, StreamInfo, SubscriberGrant};
use memsock_proto::shm::{self, OverflowPolicy, StreamConfig, SubscriberOptions, SubscriberTicket, WaitStrategy};

use crate::conn::{ClientError, Conn, Disconnect, ProtocolViolation};

pub(crate) fn unexpected(expected: &'static str) -> ClientError {
    ClientError::Protocol(ProtocolViolation::UnexpectedReply { expected })
}

/// Environment variable naming the broker's socket.
pub const SOCKET_ENV: &str = "MEMSOCK_SOCKET";

/// How long a request waits for the broker's answer by default.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the broker listens unless told otherwise: `$MEMSOCK_SOCKET` if
/// set, else `$XDG_RUNTIME_DIR/memsock/broker.sock`, else (no runtime
/// directory, e.g. a system service or a container) the per-user
/// `/tmp/memsock-<uid>/broker.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return path.into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|d| d.is_absolute()) {
        Some(dir) => dir.join("memsock").join("broker.sock"),
        None => PathBuf::from(format!("/tmp/memsock-{}", memsock_proto::platform::current_uid())).join("broker.sock"),
    }
}

/// The running program's file name, else "client".
fn program_name() -> String {
    let name = std::env::args().next().unwrap_or_default();
    Path::new(&name).file_name().map_or("client".into(), |n| n.to_string_lossy().into_owned())
}

/// A connection to the memsock broker: the lease under which this process
/// publishes and subscribes. Cloning shares the connection; when the last
/// clone and every publisher and subscriber opened through it are gone
/// (or the process dies), the broker reclaims all of it.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

/// How a subscriber wants its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Most frames it may hold at once, queued plus borrowed.
    pub credits: u32,
    /// What happens to frames when its credits are used up.
    pub policy: OverflowPolicy,
    /// How its blocking receives wait.
    pub wait: WaitStrategy,
    /// If the stream does not exist yet, wait for a publisher to create it
    /// instead of failing with `NoSuchStream`.
    pub wait_for_stream: bool,
    /// Take fewer credits than `credits` (at least 1) if the stream's pool
    /// cannot give them all, instead of being refused:
    /// [`Subscriber::credits`] says how many it got.
    pub credits_up_to: bool,
    /// Of a stream that keeps a history (`StreamConfig::history`), receive
    /// first at most this many of its latest frames, within the credits
    /// (flagged [`Sample::is_history`](memsock_proto::shm::Sample::is_history)),
    /// then the live ones. `u32::MAX` (the default) takes all; 0 declines.
    pub history: u32,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        let o = SubscriberOptions::default();
        Self {
            credits: o.credits,
            policy: o.policy,
            wait: o.wait,
            wait_for_stream: false,
            credits_up_to: false,
            history: o.history,
        }
    }
}

impl SubscribeOptions {
    fn wire(&self) -> SubscriberOptions {
        SubscriberOptions { credits: self.credits, policy: self.policy, wait: self.wait, history: self.history }
    }
}

impl Client {
    /// Connects to the broker at [`default_socket_path`], under the
    /// program's name. If no broker answers there, starts a per-user one
    /// and connects to it (autostart): exactly one however many processes
    /// connect at once (an `flock` on the lock file beside the socket,
    /// which every broker holds for its life, decides), found as the
    /// binary a package bundles ([`set_bundled_broker`](crate::set_bundled_broker)),
    /// else `$MEMSOCK_BROKER`, else `memsock` on `PATH`. It runs detached
    /// (its own session, its output in `<socket>.log`), and exits after 60 s
    /// without a client (`MEMSOCK_IDLE_EXIT` seconds, if set). Never when
    /// `$MEMSOCK_SOCKET` names the socket or `MEMSOCK_AUTOSTART=0`.
    ///
    /// # Errors
    /// [`ClientError::Connect`] if no broker answers there (and none may
    /// be started), [`ClientError::Autostart`] (saying what was tried) if
    /// starting one failed, or a handshake error.
    pub fn connect() -> Result<Self, ClientError> {
        Self::connect_default_named(&program_name())
    }

    /// As [`connect`](Self::connect), under `name` (see
    /// [`connect_named`](Self::connect_named)).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub fn connect_default_named(name: &str) -> Result<Self, ClientError> {
        let path = default_socket_path();
        // No broker there, or one that hung up before the handshake was
        // done (it was exiting, idle, as this client came).
        let no_broker = |e: &ClientError| match e {
            ClientError::Connect { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
            }
            ClientError::Disconnected(_) => true,
            _ => false,
        };
        let mut tries = 0;
        loop {
            match Self::connect_named(&path, name) {
                Err(e) if tries < 3 && no_broker(&e) && crate::autostart::allowed() => {
                    tries += 1;
                    crate::autostart::ensure_broker(&path)?;
                }
                other => return other,
            }
        }
    }

    /// Connects to the broker listening at `path` (never starting one).
    ///
    /// # Errors
    /// [`ClientError::Connect`] if no broker answers there, or a handshake error.
    pub fn connect_to(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_named(path, &program_name())
    }

    /// Connects to the broker listening at `path` under `name`, which stats,
    /// `memsock top` and metrics show for this client (at most 64
    /// characters are kept; [`Client::connect_to`] gives the program's
    /// name).
    ///
    /// # Errors
    /// [`ClientError::Connect`] if no broker answers there, or a handshake error.
    pub fn connect_named(path: impl AsRef<Path>, name: &str) -> Result<Self, ClientError> {
        Ok(Self { conn: Arc::new(Conn::connect(path.as_ref(), name, REQUEST_TIMEOUT)?) })
    }

    /// The broker's process id.
    pub fn broker_pid(&self) -> u32 {
        self.conn.broker_pid
    }

    /// Becomes the publisher of stream `name`, creating it with `config`,
    /// or taking it over (same slot size and count) if its publisher is gone.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with the broker's reason (another publisher,
    /// a different geometry, an invalid configuration), or a connection error.
    pub fn publisher(&self, name: &str, config: &StreamConfig) -> Result<Publisher, ClientError> {
        let (reply, fds) = self.conn.request(Request::Publish { stream: name.into(), config: *config })?;
        let Reply::Published { publication, takeover, channels, .. } = reply else {
            return Err(unexpected("Published"));
        };
        let mut fds = fds.into_iter();
        let data = fds.next().filter(|_| fds.len() == channels.len());
        let Some(data) = data else {
            self.conn.forget_publication(publication);
            self.conn.notify(Request::Unpublish { publication });
            let got = fds.len() + 1;
            return Err(ClientError::Protocol(ProtocolViolation::Descriptors { expected: 1 + channels.len(), got }));
        };
        let channels = channels.iter().zip(fds).map(|(c, fd)| (c.index, c.generation, fd)).collect();
        let inner = self.conn.open_publisher(publication, &data, channels).map_err(|e| {
            // Tell the broker we are not publishing after all.
            self.conn.forget_publication(publication);
            self.conn.notify(Request::Unpublish { publication });
            ClientError::OpenPublisher(e)
        })?;
        tracing::debug!(stream = name, publication, takeover, "publishing");
        Ok(Publisher { inner: Some(inner), conn: self.conn.clone(), stream: name.into(), publication, takeover })
    }

    /// Attaches a subscriber to stream `name`.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with the broker's reason (no such stream,
    /// credits refused with the numbers), or a connection error.
    pub fn subscriber(&self, name: &str, options: &SubscribeOptions) -> Result<Subscriber, ClientError> {
        let request = Request::Subscribe {
            stream: name.into(),
            options: options.wire(),
            wait_for_stream: options.wait_for_stream,
            credits_up_to: options.credits_up_to,
        };
        let timeout = if options.wait_for_stream { None } else { Some(REQUEST_TIMEOUT) };
        let (reply, fds) = self.conn.request_within(request, timeout)?;
        let Reply::Subscribed(grant) = reply else {
            return Err(unexpected("Subscribed"));
        };
        Subscriber::open(&self.conn, &grant, options.wait, &fds)
    }

    /// The streams whose names match `pattern` (see [`crate::pattern`]),
    /// by name: each one's configuration, publisher and subscriber count.
    ///
    /// # Errors
    /// [`ClientError::Refused`] for a malformed pattern, or a connection
    /// error.
    pub fn list(&self, pattern: &str) -> Result<Vec<StreamInfo>, ClientError> {
        match self.conn.request(Request::List { pattern: pattern.into() })? {
            (Reply::Streams(streams), _) => Ok(streams),
            _ => Err(unexpected("Streams")),
        }
    }

    /// Follows the streams whose names match `pattern`: the ones there are
    /// ([`Watch::streams`](crate::Watch::streams)), then each created or
    /// removed, as [`WatchEvent`](crate::WatchEvent)s.
    ///
    /// # Errors
    /// As [`list`](Self::list).
    pub fn watch(&self, pattern: &str) -> Result<crate::Watch, ClientError> {
        crate::Watch::start(&self.conn, pattern, None)
    }

    /// Subscribes to every stream whose name matches `pattern`: those there
    /// are, and each created later from the moment it is created (before
    /// its publisher can send a frame, so none is missed). Each subscriber
    /// comes as a [`WatchEvent::Subscribed`](crate::WatchEvent::Subscribed);
    /// `options.wait_for_stream` is implied. With `options.credits_up_to`
    /// a busy pool gives what it can rather than refusing.
    ///
    /// # Errors
    /// As [`list`](Self::list).
    pub fn subscribe_pattern(&self, pattern: &str, options: &SubscribeOptions) -> Result<crate::Watch, ClientError> {
        let subscribe = PatternSubscription { options: options.wire(), credits_up_to: options.credits_up_to };
        crate::Watch::start(&self.conn, pattern, Some(subscribe))
    }

    /// Closes stream `name` for good: its publisher's next send fails and
    /// its subscribers get `Closed` after the frames already sent.
    ///
    /// # Errors
    /// [`ClientError::Refused`] if there is no such stream or this client
    /// may not close it ([`CloseNotPermitted`](memsock_proto::control::ControlError::CloseNotPermitted): only its
    /// publisher, a client of the broker's user and, once it has no
    /// publisher, one of its creator's user may), or a connection error.
    pub fn close_stream(&self, name: &str) -> Result<(), ClientError> {
        self.conn.request(Request::Close { stream: name.into() }).map(drop)
    }

    /// Counters of every stream, or of stream `name`, read by the broker
    /// from shared memory.
    ///
    /// # Errors
    /// [`ClientError::Refused`] for an unknown stream, or a connection error.
    pub fn stats(&self, name: Option<&str>) -> Result<StatsReport, ClientError> {
        match self.conn.request(Request::Stats { stream: name.map(Into::into) })? {
            (Reply::Stats(report), _) => Ok(report),
            _ => Err(unexpected("Stats")),
        }
    }

    /// The next event the broker announced (publisher gone or back, stream
    /// closed, broker shutting down), if any. Subscribers also see the
    /// changes of publisher as results of their receives.
    pub fn try_event(&self) -> Option<Event> {
        self.conn.try_event()
    }

    /// Whether the broker has closed the connection (it shut down).
    pub fn is_disconnected(&self) -> bool {
        self.conn.is_closed()
    }

    /// Why the broker is gone, once it is (it shut down, crashed or hung
    /// up on this client): `None` while it is there. Publishers and
    /// subscribers opened through this client go on meanwhile — frames
    /// keep flowing through shared memory — but nothing new can be asked
    /// of the broker through this connection, and a new broker knows
    /// none of its streams. A warning is logged (`tracing`) when it
    /// happens. See also [`Publisher::broker_gone`] and
    /// [`Subscriber::broker_gone`].
    pub fn broker_gone(&self) -> Option<Disconnect> {
        self.conn.broker_gone()
    }

    /// Whether this is a copy of the client in a child forked since it
    /// connected: every request then fails with [`ClientError::Forked`],
    /// its publishers and subscribers refuse to send and receive, and
    /// dropping them leaves the parent's lease alone. The child connects
    /// anew.
    pub fn is_forked(&self) -> bool {
        self.conn.forked()
    }
}

/// The publisher of a stream, under this client's lease. Dereferences to
/// the data-plane [`shm::Publisher`]: `loan`, `send`, `send_timeout`.
#[derive(Debug)]
pub struct Publisher {
    inner: Option<shm::Publisher>,
    conn: Arc<Conn>,
    stream: String,
    /// The broker's token for this publication (what `Unpublish` names).
    publication: u64,
    takeover: bool,
}

impl Publisher {
    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Whether this publisher took the stream over from a previous one.
    pub fn took_over(&self) -> bool {
        self.takeover
    }

    /// Why the broker that handed out this stream is gone, once it is (see
    /// [`Client::broker_gone`]): sending goes on meanwhile.
    pub fn broker_gone(&self) -> Option<Disconnect> {
        self.conn.broker_gone()
    }
}

impl Deref for Publisher {
    type Target = shm::Publisher;
    #[inline]
    fn deref(&self) -> &shm::Publisher {
        self.inner.as_ref().expect("present until dropped")
    }
}

impl DerefMut for Publisher {
    #[inline]
    fn deref_mut(&mut self) -> &mut shm::Publisher {
        self.inner.as_mut().expect("present until dropped")
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // Detach from the segment first, then tell the broker.
        drop(self.inner.take());
        self.conn.forget_publication(self.publication);
        self.conn.notify(Request::Unpublish { publication: self.publication });
    }
}

/// A subscriber of a stream, under this client's lease. Dereferences to the
/// data-plane [`shm::Subscriber`]: `recv`, `try_recv`, `recv_timeout`, which
/// also report the publisher gone and back. Samples detached from it
/// ([`Sample::detach`](shm::Sample::detach)) keep the subscription alive
/// until they are dropped too.
#[derive(Debug)]
pub struct Subscriber {
    inner: shm::Subscriber,
    conn: Arc<Conn>,
    subscription: u64,
    stream: String,
    /// Credits granted (as last set).
    credits: AtomicU32,
    /// The stream's frames published before it attached.
    first_seq: u64,
}

/// Ends a subscription at the broker when the subscriber and every sample
/// detached from it are gone (the broker then reclaims its slots).
#[derive(Debug)]
struct SubscriptionLease {
    conn: Arc<Conn>,
    subscription: u64,
}

impl Drop for SubscriptionLease {
    fn drop(&mut self) {
        self.conn.notify(Request::Unsubscribe { subscription: self.subscription });
    }
}

impl Subscriber {
    /// Opens the subscriber the broker granted, with its two descriptors.
    pub(crate) fn open(
        conn: &Arc<Conn>,
        grant: &SubscriberGrant,
        wait: WaitStrategy,
        fds: &[OwnedFd],
    ) -> Result<Self, ClientError> {
        let SubscriberGrant { subscription, ref stream, index, generation, credits, first_seq, .. } = *grant;
        let ticket = SubscriberTicket { index, generation, wait };
        let [data, channel] = fds else {
            conn.notify(Request::Unsubscribe { subscription });
            return Err(ClientError::Protocol(ProtocolViolation::Descriptors { expected: 2, got: fds.len() }));
        };
        // From here on, the lease of the subscription ends with the last of
        // the subscriber and the samples detached from it.
        let lease = Arc::new(SubscriptionLease { conn: conn.clone(), subscription });
        let mut inner =
            shm::Subscriber::open(data.as_fd(), channel.as_fd(), ticket).map_err(ClientError::OpenSubscriber)?;
        inner.set_keep_alive(lease);
        tracing::debug!(stream, subscription, credits, "subscribed");
        let credits = AtomicU32::new(credits);
        Ok(Self { inner, conn: conn.clone(), subscription, stream: stream.clone(), credits, first_seq })
    }

    /// Credits it holds: as asked, or fewer if it subscribed with
    /// `credits_up_to`; as last set by [`set_credits`](Self::set_credits).
    pub fn credits(&self) -> u32 {
        self.credits.load(Ordering::Relaxed)
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The sequence number from which on this subscriber receives: frames
    /// the stream had published when it attached (one in flight then may
    /// still come first). A first frame numbered above it follows frames
    /// it lost.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The broker's id for this subscription.
    pub fn subscription(&self) -> u64 {
        self.subscription
    }

    /// Why the broker that handed out this stream is gone, once it is (see
    /// [`Client::broker_gone`]): receiving goes on meanwhile. A publisher
    /// that lets go is still seen gone (it counts its own departure), but
    /// one that crashes is not: declaring it gone was the broker's work.
    pub fn broker_gone(&self) -> Option<Disconnect> {
        self.conn.broker_gone()
    }

    /// Changes this subscriber's credits while it runs. Raising them is
    /// subject to the same admission check as subscribing.
    ///
    /// # Errors
    /// [`ClientError::Refused`] (credits refused, with the numbers), or a
    /// connection error.
    pub fn set_credits(&self, credits: u32) -> Result<(), ClientError> {
        self.conn.request(Request::Credit { subscription: self.subscription, credits })?;
        self.credits.store(credits, Ordering::Relaxed);
        Ok(())
    }
}

impl Deref for Subscriber {
    type Target = shm::Subscriber;
    #[inline]
    fn deref(&self) -> &shm::Subscriber {
        &self.inner
    }
}
