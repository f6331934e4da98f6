//! What the broker knows: streams, who publishes and subscribes to them,
//! and the clients whose leases hold them. Synchronous and free of socket
//! I/O: every operation returns the messages to send, which the server
//! routes.
//!
//! # Who may write a stream
//! The writer role lives in the stream's shared memory; the broker takes
//! it from a publisher (to recover and hand it on) only once that
//! publisher's process is known to be dead: its pidfd, taken when it
//! connected, says so. A live publisher keeps the role until it exits or
//! lets go — even after its connection ends or the stream is closed —
//! so it never writes into a slot a successor has delivered. Where no pidfd
//! can be had (a kernel before 5.3; a peer in another pid namespace on a
//! kernel before 6.5), the connection is the lease, as it was: when it
//! ends the role is taken back, and a publisher that lives on gets
//! `Replaced` at its next loan or send. Until then it may race the owner's
//! recovery: a sample it was writing may still reach subscribers, and a
//! slot may be reused under a sample a subscriber holds. A writer the
//! broker never tracked (dropped between its Publish reply and its attach)
//! is judged by the pid it wrote into the segment, which is only right in
//! the broker's pid namespace.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use memsock_proto::control::{
    ChannelGrant, ConfigProblem, ControlError, Event, LatencyReport, LatencySummary, Limit, PatternSubscription, Reply,
    SegmentStep, ServerMessage, StatsReport, StreamInfo, StreamReport, SubscriberGrant, SubscriberReport, WatchChange,
    latency_report_buckets, valid_stream_name,
};
use memsock_proto::pattern::Pattern;
use memsock_proto::platform::{self, MAX_FDS_PER_MESSAGE, ProcessHandle};
use memsock_proto::shm::layout::{Layout, PAGE, channel_len};
use memsock_proto::shm::{
    AddSubscriberError, AdmitError, BarrierPassed, CreateError, EndProgress, LatencyCounts, StreamConfig,
    StreamSegment, StreamStats, SubscriberOpError, SubscriberOptions, SubscriberTicket,
};

use crate::limits::Limits;
use std::sync::Arc;

/// A client connection's id.
pub type ConnId = u64;

/// A message for one connection, with the descriptors that go with it.
#[derive(Debug)]
pub struct Outgoing {
    pub conn: ConnId,
    pub message: ServerMessage,
    pub fds: Vec<OwnedFd>,
}

impl Outgoing {
    pub fn reply(conn: ConnId, id: u64, result: Result<Reply, ControlError>, fds: Vec<OwnedFd>) -> Self {
        Self { conn, message: ServerMessage::Reply { id, result }, fds }
    }

    pub fn event(conn: ConnId, event: Event) -> Self {
        Self { conn, message: ServerMessage::Event(event), fds: Vec::new() }
    }
}

#[derive(Debug)]
struct Stream {
    segment: Segment,
    /// The configuration it was created with (for listings).
    config: StreamConfig,
    publisher: Option<ConnId>,
    /// The token of the current publication (meaningful while `publisher`
    /// is some): what an `Unpublish` must name.
    publication: u64,
    /// A publisher whose connection ended while its process lives on and
    /// holds the writer role: nobody else may publish until it exits or
    /// lets go (see the module docs).
    lingering: Option<Holder>,
    /// Subscription ids.
    subscribers: Vec<u64>,
    /// Counters a second ago and now, for rates.
    rates: Rates,
    /// The user of the client that created it (see [`Registry::close`]).
    creator_uid: u32,
    /// The client that created it (its limits count the stream while it
    /// is connected).
    creator: ConnId,
    /// Bytes of shared memory it takes (for the limits).
    bytes: u64,
    /// Descriptors the broker holds for it (for the limits).
    fds: u64,
    /// Since when it has been kept for its history with neither publisher
    /// nor subscriber (see `drop_if_unused`).
    retained_since: Option<Instant>,
}

impl Stream {
    /// Nobody publishes, holds the publisher role or subscribes.
    fn unused(&self) -> bool {
        self.publisher.is_none() && self.lingering.is_none() && self.subscribers.is_empty()
    }

    /// The frames its history holds (0 without history).
    fn history_held(&self) -> u32 {
        if self.config.history == 0 { 0 } else { self.segment.stats().history_held }
    }
}

#[derive(Debug, Default)]
struct Rates {
    at: Option<Instant>,
    published: u64,
    bytes: u64,
    /// Per subscriber index: frames delivered and dropped.
    subscribers: HashMap<u32, (u64, u64)>,
    msgs_per_s: f64,
    bytes_per_s: f64,
    /// Per subscriber index: frames delivered and dropped per second.
    subscriber_rates: HashMap<u32, (f64, f64)>,
    /// Per subscriber (index and generation: another subscriber at that
    /// index starts from zero): its latency histogram at the last look.
    latency: HashMap<(u32, u64), Box<LatencyCounts>>,
    /// Per subscriber: its latency over the last second.
    latency_interval: HashMap<(u32, u64), LatencySummary>,
    /// The count of frames as last seen, and when it was first seen so.
    seen: Option<(u64, Instant)>,
}

impl Rates {
    /// Notes the count of frames published as seen at `now`.
    fn observe(&mut self, published: u64, now: Instant) {
        if self.seen.is_none_or(|(count, _)| count != published) {
            self.seen = (published > 0).then_some((published, now));
        }
    }

    /// Time since the count of frames last moved.
    fn idle_ns(&self, now: Instant) -> Option<u64> {
        self.seen.map(|(_, at)| now.saturating_duration_since(at).as_nanos() as u64)
    }
}

#[derive(Debug)]
struct Subscription {
    stream: String,
    index: u32,
    conn: ConnId,
}

/// Whom a subscriber's admission is told to: the Subscribe request's
/// reply, or a watch's event ([`WatchChange::Subscribed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Reply(u64),
    Watch(u64),
}

/// A subscriber to admit: whose, how, and whom to tell.
#[derive(Debug, Clone, Copy)]
struct Admission {
    conn: ConnId,
    answer: Answer,
    options: SubscriberOptions,
    /// Take fewer credits than asked if the pool cannot give them all.
    credits_up_to: bool,
}

impl Admission {
    /// The refusal, to whom it is owed.
    fn refuse(&self, stream: &str, e: ControlError) -> Outgoing {
        match self.answer {
            Answer::Reply(id) => Outgoing::reply(self.conn, id, Err(e), Vec::new()),
            Answer::Watch(watch) => {
                let change = WatchChange::SubscribeFailed { stream: stream.into(), error: e };
                Outgoing::event(self.conn, Event::Watch { watch, change })
            }
        }
    }
}

/// A client following the streams whose names match a pattern.
#[derive(Debug)]
struct Watch {
    conn: ConnId,
    pattern: Pattern,
    subscribe: Option<PatternSubscription>,
}

/// A subscriber being attached to a stream with a publisher: its channel
/// went to the publisher's client ([`Event::Channel`]), and it is
/// attached once that client says it has it ([`Registry::channel_taken`]).
#[derive(Debug)]
struct Joining {
    /// Its options with the credits it was granted.
    admission: Admission,
    stream: String,
    index: u32,
    generation: u64,
    publication: u64,
    since: Instant,
}

/// How long a publisher's client has to take a new subscriber's channel.
pub const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
struct Pending {
    admission: Admission,
    stream: String,
}

#[derive(Debug)]
struct Client {
    holder: Holder,
    /// The user it runs as.
    uid: u32,
    /// The name it gave in its `Hello` (see [`client_name`]).
    name: String,
}

/// The longest client name kept, in characters.
const MAX_CLIENT_NAME: usize = 64;

/// A client's name as the broker keeps it for stats: what it sent, with
/// control characters (which would garble a terminal or a metrics label)
/// replaced, and at most [`MAX_CLIENT_NAME`] characters.
fn client_name(sent: &str) -> String {
    let name: String =
        sent.chars().take(MAX_CLIENT_NAME).map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect();
    if name.is_empty() { "?".into() } else { name }
}

/// A client's process, as far as the broker can tell whether it lives.
#[derive(Debug, Clone)]
struct Holder {
    pid: u32,
    /// Its pidfd; `None` where none could be had (the connection is then
    /// the lease).
    process: Option<Arc<ProcessHandle>>,
}

impl Holder {
    /// Known to have exited.
    fn exited(&self) -> bool {
        self.process.as_ref().is_some_and(|p| p.has_exited())
    }

    /// Known to be alive.
    fn alive(&self) -> bool {
        self.process.as_ref().is_some_and(|p| !p.has_exited())
    }
}

/// A closed stream whose publisher has not acknowledged the close yet.
#[derive(Debug)]
struct Closing {
    at: Instant,
    segment: Segment,
    holder: Option<Holder>,
    /// The publisher's connection, if it was connected at the close.
    conn: Option<ConnId>,
}

/// How a publisher left, as far as its writer role goes.
#[derive(Debug, Clone, Copy)]
enum Departure {
    /// Its process is dead (or, without a pidfd, its connection ended):
    /// the role may be taken back.
    Died,
    /// It let go of the role itself and may live on: take nothing.
    LetGo,
}

/// Whether `holder` holds the stream's writer role in shared memory, by
/// the pid it gave there (a pid of 0 — a peer in a pid namespace we
/// cannot see — matches any).
fn holds_role(stream: &Stream, holder: &Holder) -> bool {
    stream.segment.publisher_attached().is_some_and(|pid| holder.pid == 0 || pid == holder.pid)
}

/// A stream's segment, unmapped and closed on the reaper thread when
/// dropped, never under the registry's lock: for a large pre-faulted
/// segment the kernel takes hundreds of milliseconds to free its pages.
#[derive(Debug)]
struct Segment(Option<StreamSegment>);

impl std::ops::Deref for Segment {
    type Target = StreamSegment;
    fn deref(&self) -> &StreamSegment {
        self.0.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Segment {
    fn deref_mut(&mut self) -> &mut StreamSegment {
        self.0.as_mut().expect("present until dropped")
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        use std::sync::mpsc::{Sender, channel};
        static REAPER: std::sync::OnceLock<Option<Sender<StreamSegment>>> = std::sync::OnceLock::new();
        let Some(segment) = self.0.take() else { return };
        let reaper = REAPER.get_or_init(|| {
            let (tx, rx) = channel::<StreamSegment>();
            let spawned = std::thread::Builder::new().name("memsock-reaper".into()).spawn(move || {
                for segment in rx {
                    tracing::debug!(stream = segment.name(), "segment unmapped");
                }
            });
            spawned.ok().map(|_| tx)
        });
        // Without the thread (it could not start), here and now.
        if let Some(tx) = reaper {
            let _ = tx.send(segment);
        }
    }
}

/// What a `Publish` needs next ([`Registry::publish`]).
#[derive(Debug)]
pub enum PublishStep {
    /// Answered: route these.
    Done(Vec<Outgoing>),
    /// Create the segment outside the registry's lock
    /// ([`Creation::create`]), then call [`Registry::created`].
    Create(Creation),
}

/// A name reserved while its segment is created.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    conn: ConnId,
    uid: u32,
    bytes: u64,
    fds: u64,
}

/// Bytes of shared memory a stream of `config` takes: its data file and
/// a channel file per subscriber index.
fn stream_bytes(name: &str, config: &StreamConfig) -> Result<u64, ControlError> {
    let geometry = config.geometry().map_err(|e| ControlError::from_layout(name, &e))?;
    let layout = Layout::new(geometry, PAGE).map_err(|e| ControlError::from_layout(name, &e))?;
    let channels = u64::from(geometry.max_subscribers) * channel_len(geometry.queue_capacity) as u64;
    Ok(layout.total_len as u64 + channels)
}

/// A stream to create for a Publish, its name reserved meanwhile.
#[derive(Debug, Clone)]
pub struct Creation {
    conn: ConnId,
    id: u64,
    name: String,
    config: StreamConfig,
}

impl Creation {
    /// Creates (and, as configured, pre-faults and locks) the segment.
    ///
    /// # Errors
    /// As [`StreamSegment::create`].
    pub fn create(&self) -> Result<StreamSegment, CreateError> {
        StreamSegment::create(&self.name, &self.config)
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Who the broker is, for stats.
#[derive(Debug, Clone, Copy)]
pub struct BrokerIdent {
    /// Its process id.
    pub pid: u32,
    /// When it started.
    pub started: Instant,
}

/// The broker's state.
#[derive(Debug, Default)]
pub struct Registry {
    streams: HashMap<String, Stream>,
    subscriptions: HashMap<u64, Subscription>,
    pending: Vec<Pending>,
    joining: Vec<Joining>,
    watches: HashMap<u64, Watch>,
    next_watch: u64,
    clients: HashMap<ConnId, Client>,
    next_subscription: u64,
    next_publication: u64,
    /// Names whose segment is being created, outside the lock, for the
    /// connection that will publish it.
    reserved: HashMap<String, Reserved>,
    limits: Limits,
    /// Closed streams whose publisher may still be attached (see
    /// [`Registry::finish_closing`]).
    closing: Vec<Closing>,
    shutting_down: bool,
}

fn dup(fd: impl AsFd) -> io::Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned()
}

impl Registry {
    /// A client completed its handshake. `process` is its pidfd, if one
    /// could be had.
    pub fn connect(&mut self, conn: ConnId, pid: u32, uid: u32, process: Option<ProcessHandle>, name: &str) {
        let holder = Holder { pid, process: process.map(Arc::new) };
        let name = client_name(name);
        tracing::info!(conn, pid, uid, client = name.as_str(), "client connected");
        self.clients.insert(conn, Client { holder, uid, name });
    }

    /// Every connection, for a shutdown notice.
    pub fn connections(&self) -> Vec<ConnId> {
        self.clients.keys().copied().collect()
    }

    fn pid(&self, conn: ConnId) -> u32 {
        self.clients.get(&conn).map_or(0, |c| c.holder.pid)
    }

    fn uid(&self, conn: ConnId) -> u32 {
        self.clients.get(&conn).map_or(u32::MAX, |c| c.uid)
    }

    /// A broker with these limits.
    pub fn with_limits(limits: Limits) -> Self {
        Self { limits, ..Self::default() }
    }

    /// The cap on connections.
    pub fn connection_cap(&self) -> u64 {
        self.limits.connections
    }

    /// Refuses a handshake past the cap on connections.
    ///
    /// # Errors
    /// [`ControlError::LimitReached`] with the numbers.
    pub fn check_connection_cap(&self) -> Result<(), ControlError> {
        let (used, max) = (self.clients.len() as u64, self.limits.connections);
        if used >= max {
            return Err(ControlError::LimitReached {
                limit: Limit::Connections,
                scope: memsock_proto::control::LimitScope::Broker,
                used,
                asked: 1,
                max,
            });
        }
        Ok(())
    }

    /// What `count` counts for `conn`, for its user, and for everybody:
    /// `count` is given a test of whether a connection is in the scope.
    fn usage(&self, conn: ConnId, count: impl Fn(&Self, &dyn Fn(ConnId) -> bool) -> u64) -> [u64; 3] {
        let uid = self.uid(conn);
        [count(self, &|c| c == conn), count(self, &|c| self.uid(c) == uid), count(self, &|_| true)]
    }

    /// Refuses a new stream past the creating client's, its user's or the
    /// broker's budget of streams or memory; else what to reserve.
    fn check_create_budget(&self, conn: ConnId, name: &str, config: &StreamConfig) -> Result<Reserved, ControlError> {
        let uid = self.uid(conn);
        let bytes = stream_bytes(name, config)?;
        // Streams and reservations, by creator: (connection, user, bytes).
        // A stream holds its data file; a channel file per subscriber
        // counts against that subscriber (see `add_subscriber`).
        let fds = 1;
        let created = || {
            let streams = self.streams.values().map(|s| (s.creator, s.creator_uid, s.bytes, s.fds));
            streams.chain(self.reserved.values().map(|r| (r.conn, r.uid, r.bytes, r.fds)))
        };
        let in_scope = |(c, u, _, _): &(ConnId, u32, u64, u64), scope: usize| match scope {
            0 => *c == conn,
            1 => *u == uid,
            _ => true,
        };
        let count = |scope| created().filter(|e| in_scope(e, scope)).count() as u64;
        let bytes_of = |scope| created().filter(|e| in_scope(e, scope)).map(|e| e.2).sum::<u64>();
        let fds_of = |scope| created().filter(|e| in_scope(e, scope)).map(|e| e.3).sum::<u64>();
        self.limits.check(Limit::Streams, uid, 1, [count(0), count(1), count(2)])?;
        self.limits.check(Limit::Memory, uid, bytes, [bytes_of(0), bytes_of(1), bytes_of(2)])?;
        self.limits.check(Limit::Descriptors, uid, fds, [fds_of(0), fds_of(1), fds_of(2)])?;
        Ok(Reserved { conn, uid, bytes, fds })
    }

    fn holder(&self, conn: ConnId) -> Holder {
        self.clients.get(&conn).map_or(Holder { pid: 0, process: None }, |c| c.holder.clone())
    }

    /// Refuses a new publisher while a live process holds stream `name`'s
    /// writer role; takes the role back from one that died (whether or not
    /// its connection has ended: a child may have inherited it), so the
    /// new publisher takes over at once.
    fn check_holder(&mut self, name: &str, out: &mut Vec<Outgoing>) -> Result<(), ControlError> {
        let Some(stream) = self.streams.get(name) else { return Ok(()) };
        let exists = |pid| Err(ControlError::PublisherExists { stream: name.into(), pid });
        let departure = match (stream.publisher, &stream.lingering) {
            (Some(conn), _) => {
                let holder = self.holder(conn);
                if !holder.exited() {
                    return exists(holder.pid);
                }
                Departure::Died
            }
            (None, Some(holder)) if holder.exited() => Departure::Died,
            (None, Some(holder)) if holds_role(stream, holder) => return exists(holder.pid),
            (None, Some(_)) => Departure::LetGo,
            // A writer the broker does not know of (a client dropped between
            // its Publish and its attach): its own pid says whether it lives.
            (None, None) => match stream.segment.publisher_attached() {
                Some(pid) if platform::process_alive(pid) => return exists(pid),
                Some(_) => Departure::Died,
                None => return Ok(()),
            },
        };
        tracing::info!(stream = name, ?departure, "the publisher is gone: its role is free");
        self.publisher_gone(name, departure, out);
        Ok(())
    }

    /// Connections that use `stream`: its subscribers', and its
    /// publisher's with `with_publisher`; each once.
    fn users(&self, stream: &Stream, with_publisher: bool) -> Vec<ConnId> {
        let mut conns: Vec<ConnId> =
            stream.subscribers.iter().filter_map(|s| self.subscriptions.get(s)).map(|s| s.conn).collect();
        if with_publisher {
            conns.extend(stream.publisher);
        }
        conns.sort_unstable();
        conns.dedup();
        conns
    }

    fn tell_subscribers(&self, stream: &Stream, event: &Event, out: &mut Vec<Outgoing>) {
        out.extend(self.users(stream, false).into_iter().map(|c| Outgoing::event(c, event.clone())));
    }

    /// `Publish`: hands an existing stream to a new publisher, or reserves
    /// the name and asks the caller to create the segment — outside the
    /// registry's lock, since creating and pre-faulting a large one takes
    /// long — and then to call [`created`](Self::created).
    pub fn publish(&mut self, conn: ConnId, id: u64, name: &str, config: &StreamConfig) -> PublishStep {
        let mut out = Vec::new();
        let result = match self.check_publish(conn, name, config, &mut out) {
            Ok(true) => self.attach_publisher(conn, name, true, &mut out),
            Ok(false) => match self.check_create_budget(conn, name, config) {
                Ok(reserved) => {
                    self.reserved.insert(name.into(), reserved);
                    tracing::debug!(stream = name, conn, "name reserved while its segment is created");
                    return PublishStep::Create(Creation { conn, id, name: name.into(), config: *config });
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        PublishStep::Done(Self::reply_first(conn, id, result, out))
    }

    /// The segment of a reserved name is created (or failed): the stream
    /// is registered and published, and subscribers waiting for it attach.
    /// Nothing happens if the publisher's connection ended meanwhile (the
    /// segment is dropped; waiting subscribers go on waiting).
    pub fn created(&mut self, creation: &Creation, segment: Result<StreamSegment, CreateError>) -> Vec<Outgoing> {
        let Creation { conn, id, ref name, .. } = *creation;
        let Some(reserved) = self.reserved.get(name).copied().filter(|r| r.conn == conn) else {
            tracing::debug!(stream = name, conn, "created for a connection that has ended: dropped");
            drop(segment.map(|s| Segment(Some(s))));
            return Vec::new();
        };
        self.reserved.remove(name);
        let mut out = Vec::new();
        let result = if self.shutting_down {
            // Unmapped on the reaper thread, as every segment that goes.
            drop(segment.map(|s| Segment(Some(s))));
            Err(ControlError::ShuttingDown)
        } else {
            match segment {
                Err(e) => Err(ControlError::from_create(name, &e)),
                Ok(segment) => {
                    let stream = Stream {
                        segment: Segment(Some(segment)),
                        config: creation.config,
                        publisher: None,
                        publication: 0,
                        lingering: None,
                        subscribers: Vec::new(),
                        rates: Rates::default(),
                        creator_uid: reserved.uid,
                        creator: conn,
                        bytes: reserved.bytes,
                        fds: reserved.fds,
                        retained_since: None,
                    };
                    self.streams.insert(name.clone(), stream);
                    // Before the publisher is attached: their channels go
                    // with its reply, so they miss none of its frames.
                    self.admit_watchers(name, &mut out);
                    self.attach_publisher(conn, name, false, &mut out)
                }
            }
        };
        Self::reply_first(conn, id, result, out)
    }

    /// The reply, with its descriptors, before anything it caused reaches
    /// others.
    fn reply_first(
        conn: ConnId,
        id: u64,
        result: Result<(Reply, Vec<OwnedFd>), ControlError>,
        mut out: Vec<Outgoing>,
    ) -> Vec<Outgoing> {
        let (result, fds) = match result {
            Ok((reply, fds)) => (Ok(reply), fds),
            Err(e) => (Err(e), Vec::new()),
        };
        out.insert(0, Outgoing::reply(conn, id, result, fds));
        out
    }

    /// Checks a Publish; `Ok(true)` if the stream exists to be taken over,
    /// `Ok(false)` if it is to be created.
    fn check_publish(
        &mut self,
        conn: ConnId,
        name: &str,
        config: &StreamConfig,
        out: &mut Vec<Outgoing>,
    ) -> Result<bool, ControlError> {
        if !valid_stream_name(name) {
            return Err(ControlError::InvalidName(name.into()));
        }
        if config.max_subscribers as usize >= MAX_FDS_PER_MESSAGE {
            return Err(ControlError::InvalidConfig(ConfigProblem::TooManySubscribers {
                asked: config.max_subscribers,
                max: MAX_FDS_PER_MESSAGE as u32 - 1,
            }));
        }
        config.geometry().map_err(|e| ControlError::from_layout(name, &e))?;
        if let Some(creator) = self.reserved.get(name) {
            // Another client is creating it and will be its publisher.
            return Err(ControlError::PublisherExists { stream: name.into(), pid: self.pid(creator.conn) });
        }
        self.check_holder(name, out)?;
        let Some(stream) = self.streams.get(name) else { return Ok(false) };
        let g = stream.segment.geometry();
        let same = (g.slot_size, g.slot_count, g.history) == (config.slot_size, config.slot_count, config.history);
        if !same && stream.retained_since.is_some() && stream.unused() && self.check_may_close(conn, name).is_ok() {
            // Kept only for its history: a producer restarted with another
            // geometry, who may close it, replaces it (the old history goes).
            tracing::info!(stream = name, "a stream kept for its history is replaced by one of another geometry");
            self.streams.remove(name);
            self.tell_watchers_removed(name, false, out);
            return Ok(false);
        }
        if !same {
            return Err(ControlError::GeometryMismatch {
                stream: name.into(),
                slot_size: g.slot_size,
                slot_count: g.slot_count,
                asked_size: config.slot_size,
                asked_count: config.slot_count,
                history: g.history,
                asked_history: config.history,
            });
        }
        Ok(true)
    }

    /// Makes `conn` the publisher of registered stream `name`: its reply
    /// and descriptors, and the news for subscribers.
    fn attach_publisher(
        &mut self,
        conn: ConnId,
        name: &str,
        takeover: bool,
        out: &mut Vec<Outgoing>,
    ) -> Result<(Reply, Vec<OwnedFd>), ControlError> {
        // Attached before the publisher is: their channels go with its reply.
        self.admit_pending(name, out);
        let stream = self.streams.get_mut(name).expect("registered");
        let channel_fds = stream.segment.channel_fds();
        let channels: Vec<ChannelGrant> =
            channel_fds.iter().map(|&(index, generation, _)| ChannelGrant { index, generation }).collect();
        let fds = std::iter::once(stream.segment.data_fd())
            .chain(channel_fds.into_iter().map(|(_, _, fd)| fd))
            .map(dup)
            .collect::<Result<Vec<_>, _>>();
        let fds = match fds {
            Ok(fds) => fds,
            Err(e) => {
                self.drop_if_unused(name, out);
                return Err(ControlError::segment(name, SegmentStep::Duplicate, &e));
            }
        };
        self.next_publication += 1;
        let publication = self.next_publication;
        stream.publisher = Some(conn);
        stream.publication = publication;
        if takeover {
            let stream = &self.streams[name];
            self.tell_subscribers(stream, &Event::PublisherBack { stream: name.into() }, out);
        }
        tracing::info!(stream = name, conn, publication, takeover, "publisher attached");
        Ok((Reply::Published { publication, stream: name.into(), channels, takeover }, fds))
    }

    /// Subscribers that were waiting for stream `name` to exist.
    fn admit_pending(&mut self, name: &str, out: &mut Vec<Outgoing>) {
        let (now, later): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending).into_iter().partition(|p| p.stream == name);
        self.pending = later;
        for p in now {
            self.add_subscriber(p.admission, name, true, out);
        }
    }

    /// Stream `name` was just created: the watches it matches hear of it,
    /// and those that subscribe get their subscriber.
    fn admit_watchers(&mut self, name: &str, out: &mut Vec<Outgoing>) {
        let mut matching: Vec<(u64, ConnId, Option<PatternSubscription>)> = self
            .watches
            .iter()
            .filter(|(_, w)| w.pattern.matches(name))
            .map(|(&id, w)| (id, w.conn, w.subscribe))
            .collect();
        // In the order they were made.
        matching.sort_unstable_by_key(|m| m.0);
        let info = self.info(name, &self.streams[name]);
        for (watch, conn, subscribe) in matching {
            out.push(Outgoing::event(conn, Event::Watch { watch, change: WatchChange::Created(info.clone()) }));
            if let Some(sub) = subscribe {
                let admission = Admission {
                    conn,
                    answer: Answer::Watch(watch),
                    options: sub.options,
                    credits_up_to: sub.credits_up_to,
                };
                self.add_subscriber(admission, name, true, out);
            }
        }
    }

    /// Stream `name` is gone (closed, or removed unused): the watches it
    /// matched hear of it.
    fn tell_watchers_removed(&self, name: &str, closed: bool, out: &mut Vec<Outgoing>) {
        for (&watch, w) in &self.watches {
            if w.pattern.matches(name) {
                let change = WatchChange::Removed { stream: name.into(), closed };
                out.push(Outgoing::event(w.conn, Event::Watch { watch, change }));
            }
        }
    }

    /// A stream as listings show it.
    fn info(&self, name: &str, stream: &Stream) -> StreamInfo {
        StreamInfo {
            name: name.into(),
            config: stream.config,
            publisher_pid: stream.publisher.map(|c| self.pid(c)).or_else(|| stream.lingering.as_ref().map(|h| h.pid)),
            subscribers: stream.subscribers.len() as u32,
        }
    }

    /// The streams matching `pattern`, by name.
    fn matching(&self, pattern: &Pattern) -> Vec<StreamInfo> {
        let mut found: Vec<StreamInfo> =
            self.streams.iter().filter(|(n, _)| pattern.matches(n)).map(|(n, s)| self.info(n, s)).collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found
    }

    /// `List`.
    pub fn list(&self, conn: ConnId, id: u64, pattern: &str) -> Vec<Outgoing> {
        let result = parse_pattern(pattern).map(|p| Reply::Streams(self.matching(&p)));
        vec![Outgoing::reply(conn, id, result, Vec::new())]
    }

    /// `Watch`: the reply lists the matching streams; with `subscribe`,
    /// a subscriber of each follows it.
    pub fn watch(
        &mut self,
        conn: ConnId,
        id: u64,
        pattern: &str,
        subscribe: Option<PatternSubscription>,
    ) -> Vec<Outgoing> {
        let pattern = match parse_pattern(pattern) {
            Ok(p) => p,
            Err(e) => return vec![Outgoing::reply(conn, id, Err(e), Vec::new())],
        };
        // A watch is a standing wait: it counts with the waits.
        if let Err(e) = self.limits.check(Limit::Waits, self.uid(conn), 1, self.usage(conn, Self::waits)) {
            return vec![Outgoing::reply(conn, id, Err(e), Vec::new())];
        }
        self.next_watch += 1;
        let watch = self.next_watch;
        let streams = self.matching(&pattern);
        tracing::info!(conn, watch, pattern = pattern.as_str(), subscribe = subscribe.is_some(), "watch");
        self.watches.insert(watch, Watch { conn, pattern, subscribe });
        let mut out =
            vec![Outgoing::reply(conn, id, Ok(Reply::Watching { watch, streams: streams.clone() }), Vec::new())];
        if let Some(sub) = subscribe {
            for info in streams {
                let admission = Admission {
                    conn,
                    answer: Answer::Watch(watch),
                    options: sub.options,
                    credits_up_to: sub.credits_up_to,
                };
                self.add_subscriber(admission, &info.name, true, &mut out);
            }
        }
        out
    }

    /// `Unwatch`.
    pub fn unwatch(&mut self, conn: ConnId, id: u64, watch: u64) -> Vec<Outgoing> {
        let result = if self.watches.get(&watch).is_some_and(|w| w.conn == conn) {
            self.end_watch(watch);
            Ok(Reply::Done)
        } else {
            Err(ControlError::NoSuchWatch(watch))
        };
        vec![Outgoing::reply(conn, id, result, Vec::new())]
    }

    /// Ends a watch and the admissions it has under way.
    fn end_watch(&mut self, watch: u64) {
        self.watches.remove(&watch);
        self.pending.retain(|p| p.admission.answer != Answer::Watch(watch));
        self.give_up_joining(|j| j.admission.answer == Answer::Watch(watch), None);
        tracing::info!(watch, "watch ended");
    }

    /// Waits for a stream and watches, for the limits.
    fn waits(&self, scope: &dyn Fn(ConnId) -> bool) -> u64 {
        let pending = self.pending.iter().filter(|p| scope(p.admission.conn)).count();
        (pending + self.watches.values().filter(|w| scope(w.conn)).count()) as u64
    }

    /// A process holding stream `name`'s writer role without a connection
    /// to us (one that outlived its lease, or one we never tracked): it
    /// cannot be handed new channels. Its pid.
    fn unreachable_writer(&self, name: &str) -> Option<u32> {
        let stream = self.streams.get(name)?;
        if stream.publisher.is_some() {
            return None;
        }
        stream.lingering.as_ref().map(|h| h.pid).or_else(|| stream.segment.publisher_attached())
    }

    /// Subscriber `p` waits for stream `name` (again).
    fn wait_for(&mut self, p: Pending) {
        tracing::debug!(stream = p.stream, conn = p.admission.conn, "subscriber waits for the stream");
        self.pending.push(p);
    }

    /// `Subscribe`.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        id: u64,
        name: &str,
        options: &SubscriberOptions,
        wait_for_stream: bool,
        credits_up_to: bool,
    ) -> Vec<Outgoing> {
        if !valid_stream_name(name) {
            return vec![Outgoing::reply(conn, id, Err(ControlError::InvalidName(name.into())), Vec::new())];
        }
        let admission = Admission { conn, answer: Answer::Reply(id), options: *options, credits_up_to };
        if !self.streams.contains_key(name) {
            if wait_for_stream {
                if let Err(e) = self.limits.check(Limit::Waits, self.uid(conn), 1, self.usage(conn, Self::waits)) {
                    return vec![Outgoing::reply(conn, id, Err(e), Vec::new())];
                }
                self.wait_for(Pending { admission, stream: name.into() });
                return Vec::new();
            }
            return vec![Outgoing::reply(conn, id, Err(ControlError::NoSuchStream(name.into())), Vec::new())];
        }
        let mut out = Vec::new();
        self.add_subscriber(admission, name, wait_for_stream, &mut out);
        out
    }

    /// Admits a subscriber to stream `name`: attaches it at once if the
    /// stream has no publisher connected (one that attaches later gets its
    /// channel with its reply), else hands its channel to the publisher's
    /// client first ([`Joining`]). The reply goes to `out` when attached.
    ///
    /// While a publisher that cannot be handed its channel holds the stream
    /// ([`unreachable_writer`](Self::unreachable_writer)), a subscriber
    /// that may wait waits (until that publisher exits or lets go); one
    /// that may not is refused.
    fn add_subscriber(&mut self, admission: Admission, name: &str, wait: bool, out: &mut Vec<Outgoing>) {
        let conn = admission.conn;
        if let Some(pid) = self.unreachable_writer(name) {
            if wait {
                match self.limits.check(Limit::Waits, self.uid(conn), 1, self.usage(conn, Self::waits)) {
                    Ok(()) => self.wait_for(Pending { admission, stream: name.into() }),
                    Err(e) => out.push(admission.refuse(name, e)),
                }
            } else {
                out.push(admission.refuse(name, ControlError::PublisherDisconnected { stream: name.into(), pid }));
            }
            return;
        }
        let result = self.reserve_subscriber(admission, name, out);
        match result {
            Ok(None) => {}
            Ok(Some((index, admission))) => {
                let stream = self.streams.get_mut(name).expect("just reserved in it");
                let result = stream.segment.activate_subscriber(index).map_err(|e| credit_error(name, e));
                out.push(self.subscribed(&admission, name, result));
            }
            Err(e) => out.push(admission.refuse(name, e)),
        }
    }

    /// Checks the limits and reserves a place with its channel. Returns the
    /// index to activate now (and the admission with the credits granted),
    /// or `None` if its channel went to the publisher's client (the reply
    /// waits for [`channel_taken`](Self::channel_taken)).
    fn reserve_subscriber(
        &mut self,
        admission: Admission,
        name: &str,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<(u32, Admission)>, ControlError> {
        let conn = admission.conn;
        let pid = self.pid(conn);
        let uid = self.uid(conn);
        let count = |r: &Self, scope: &dyn Fn(ConnId) -> bool| {
            let subscribed = r.subscriptions.values().filter(|s| scope(s.conn)).count();
            (subscribed + r.joining.iter().filter(|j| scope(j.admission.conn)).count()) as u64
        };
        let used = self.usage(conn, count);
        self.limits.check(Limit::Subscriptions, uid, 1, used)?;
        self.check_descriptors(conn, 1)?;
        let stream = self.streams.get_mut(name).ok_or_else(|| ControlError::NoSuchStream(name.into()))?;
        let mut admission = admission;
        // "Up to N credits": at most twice more, with what the refusal said
        // there is (the queue's capacity, then the pool's free credits).
        let mut tries = if admission.credits_up_to { 3 } else { 1 };
        let reservation = loop {
            tries -= 1;
            let refused = match stream.segment.reserve_subscriber(&admission.options, pid) {
                Ok(reservation) => break reservation,
                Err(AdmitError::Refused(e)) => e,
                Err(AdmitError::Channel(e)) => return Err(ControlError::from_create(name, &e)),
                Err(_) => {
                    return Err(ControlError::Segment {
                        stream: name.into(),
                        step: SegmentStep::Credit,
                        os_error: None,
                    });
                }
            };
            let fewer = match refused {
                AddSubscriberError::CreditsOutOfRange { credits, max } if credits > max => max,
                AddSubscriberError::CreditsRefused { available, .. } if available > 0 => available,
                _ => 0,
            };
            if tries == 0 || fewer == 0 || fewer >= admission.options.credits {
                return Err(credit_error(name, refused));
            }
            tracing::debug!(
                stream = name,
                asked = admission.options.credits,
                granted = fewer,
                "fewer credits, as allowed"
            );
            admission.options.credits = fewer;
        };
        let Some(publisher) = stream.publisher else { return Ok(Some((reservation.index, admission))) };
        let channel = stream.segment.channel_fd(reservation.index).map(dup);
        let Some(Ok(fd)) = channel else {
            stream.segment.give_up_subscriber(reservation.index);
            let e = channel.and_then(Result::err).unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound));
            return Err(ControlError::segment(name, SegmentStep::Duplicate, &e));
        };
        let publication = stream.publication;
        let (index, generation) = (reservation.index, reservation.generation);
        let event = Event::Channel { publication, index, generation };
        out.push(Outgoing { conn: publisher, message: ServerMessage::Event(event), fds: vec![fd] });
        let since = Instant::now();
        let joining = Joining { admission, stream: name.into(), index, generation, publication, since };
        tracing::debug!(stream = name, conn, index, generation, "subscriber's channel sent to the publisher");
        self.joining.push(joining);
        Ok(None)
    }

    /// Refuses `asked` more descriptors past the client's, its user's or
    /// the broker's budget: a stream's data file counts against its
    /// creator, a channel file against its subscriber.
    fn check_descriptors(&self, conn: ConnId, asked: u64) -> Result<(), ControlError> {
        let count = |r: &Self, scope: &dyn Fn(ConnId) -> bool| {
            let streams = r.streams.values().filter(|s| scope(s.creator)).count();
            let creating = r.reserved.values().filter(|c| scope(c.conn)).count();
            let subscribed = r.subscriptions.values().filter(|s| scope(s.conn)).count();
            (streams + creating + subscribed + r.joining.iter().filter(|j| scope(j.admission.conn)).count()) as u64
        };
        let used = self.usage(conn, count);
        self.limits.check(Limit::Descriptors, self.uid(conn), asked, used)
    }

    /// `ChannelTaken`: the publisher's client has the channel of a joining
    /// subscriber: attach it and answer it.
    pub fn channel_taken(&mut self, conn: ConnId, publication: u64, index: u32, generation: u64) -> Vec<Outgoing> {
        let found = self.joining.iter().position(|j| {
            j.publication == publication
                && j.index == index
                && j.generation == generation
                && self.streams.get(&j.stream).is_some_and(|s| s.publisher == Some(conn))
        });
        let Some(at) = found else {
            tracing::debug!(conn, publication, index, generation, "a channel taken for nobody (given up)");
            return Vec::new();
        };
        let j = self.joining.swap_remove(at);
        let history = self.streams.get(&j.stream).is_some_and(|s| s.config.history > 0);
        let mut out = vec![self.activate_joining(j)];
        if history {
            // The publisher may be idle: its client hands the history over.
            out.push(Outgoing::event(conn, Event::Serve { publication }));
        }
        out
    }

    /// Attaches a joining subscriber and builds its reply.
    fn activate_joining(&mut self, j: Joining) -> Outgoing {
        let stream = self.streams.get_mut(&j.stream).expect("a joining subscriber's stream is registered");
        let result = stream.segment.activate_subscriber(j.index).map_err(|e| credit_error(&j.stream, e));
        tracing::debug!(stream = j.stream, index = j.index, waited = ?j.since.elapsed(), "subscriber's channel taken");
        self.subscribed(&j.admission, &j.stream, result)
    }

    /// Attaches the subscribers joining stream `name` without waiting: its
    /// publisher has left (a next one gets their channels with its reply).
    fn activate_joining_of(&mut self, name: &str, out: &mut Vec<Outgoing>) {
        let (now, later): (Vec<Joining>, Vec<Joining>) =
            std::mem::take(&mut self.joining).into_iter().partition(|j| j.stream == name);
        self.joining = later;
        for j in now {
            out.push(self.activate_joining(j));
        }
    }

    /// Gives up subscribers whose publisher did not take their channel
    /// within [`JOIN_TIMEOUT`]. Called every few hundred milliseconds.
    pub fn expire_joining(&mut self) -> Vec<Outgoing> {
        let (late, waiting): (Vec<Joining>, Vec<Joining>) =
            std::mem::take(&mut self.joining).into_iter().partition(|j| j.since.elapsed() >= JOIN_TIMEOUT);
        self.joining = waiting;
        let mut out = Vec::new();
        for j in late {
            let Some(stream) = self.streams.get_mut(&j.stream) else { continue };
            stream.segment.give_up_subscriber(j.index);
            let pid = stream.publisher.map_or(0, |c| self.pid(c));
            tracing::warn!(stream = j.stream, pid, "the publisher did not take a subscriber's channel in time");
            let e = ControlError::PublisherUnresponsive {
                stream: j.stream.clone(),
                pid,
                waited_ms: JOIN_TIMEOUT.as_millis() as u64,
            };
            out.push(j.admission.refuse(&j.stream, e));
        }
        out
    }

    /// Gives up the joining subscribers `keep` rejects, answering each
    /// with `error` (if any).
    fn give_up_joining(&mut self, drop: impl Fn(&Joining) -> bool, error: Option<&ControlError>) -> Vec<Outgoing> {
        let (gone, kept): (Vec<Joining>, Vec<Joining>) =
            std::mem::take(&mut self.joining).into_iter().partition(|j| drop(j));
        self.joining = kept;
        let mut out = Vec::new();
        for j in gone {
            if let Some(stream) = self.streams.get_mut(&j.stream) {
                stream.segment.give_up_subscriber(j.index);
            }
            if let Some(e) = error {
                out.push(j.admission.refuse(&j.stream, e.clone()));
            }
        }
        out
    }

    /// The reply to an admitted subscriber (and its subscription), or the
    /// refusal.
    fn subscribed(
        &mut self,
        admission: &Admission,
        name: &str,
        ticket: Result<SubscriberTicket, ControlError>,
    ) -> Outgoing {
        let conn = admission.conn;
        match (self.attach_subscriber(conn, name, admission.options.credits, ticket), admission.answer) {
            (Ok((grant, fds)), Answer::Reply(id)) => Outgoing::reply(conn, id, Ok(Reply::Subscribed(grant)), fds),
            (Ok((grant, fds)), Answer::Watch(watch)) => {
                let change = WatchChange::Subscribed { grant, config: self.streams[name].config };
                Outgoing { conn, message: ServerMessage::Event(Event::Watch { watch, change }), fds }
            }
            (Err(e), _) => admission.refuse(name, e),
        }
    }

    fn attach_subscriber(
        &mut self,
        conn: ConnId,
        name: &str,
        credits: u32,
        ticket: Result<SubscriberTicket, ControlError>,
    ) -> Result<(SubscriberGrant, Vec<OwnedFd>), ControlError> {
        let ticket = ticket?;
        let stream = self.streams.get_mut(name).ok_or_else(|| ControlError::NoSuchStream(name.into()))?;
        let channel = stream.segment.channel_fd(ticket.index).map(dup);
        let fds = match (stream.segment.read_only_data_fd(), channel) {
            (Ok(data), Some(Ok(channel))) => vec![data, channel],
            (data, channel) => {
                let _ = stream.segment.remove_subscriber(ticket.index);
                stream.segment.reclaim();
                let e = data.err().or(channel.and_then(Result::err)).unwrap_or_else(|| io::ErrorKind::NotFound.into());
                return Err(ControlError::segment(name, SegmentStep::Duplicate, &e));
            }
        };
        self.next_subscription += 1;
        let subscription = self.next_subscription;
        stream.subscribers.push(subscription);
        let publisher_attached = stream.publisher.is_some();
        self.subscriptions.insert(subscription, Subscription { stream: name.into(), index: ticket.index, conn });
        tracing::info!(stream = name, conn, subscription, index = ticket.index, "subscriber attached");
        let grant = SubscriberGrant {
            subscription,
            stream: name.into(),
            index: ticket.index,
            generation: ticket.generation,
            publisher_attached,
            credits,
            // Read after the subscriber was attached: no frame it misses
            // is below it.
            first_seq: stream.segment.stats().published,
        };
        Ok((grant, fds))
    }

    /// `Credit`.
    pub fn credit(&mut self, conn: ConnId, id: u64, subscription: u64, credits: u32) -> Vec<Outgoing> {
        let result = match self.subscriptions.get(&subscription).filter(|s| s.conn == conn) {
            None => Err(ControlError::NoSuchSubscription(subscription)),
            Some(sub) => match self.streams.get_mut(&sub.stream) {
                None => Err(ControlError::StreamClosed(sub.stream.clone())),
                Some(stream) => match stream.segment.set_credits(sub.index, credits) {
                    Ok(()) => Ok(Reply::Done),
                    Err(SubscriberOpError::Credits(e)) => Err(credit_error(&sub.stream, e)),
                    // The index is no longer attached: the subscription has ended.
                    Err(_) => Err(ControlError::NoSuchSubscription(subscription)),
                },
            },
        };
        vec![Outgoing::reply(conn, id, result, Vec::new())]
    }

    /// `Unsubscribe`.
    pub fn unsubscribe(&mut self, conn: ConnId, id: u64, subscription: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let result = if self.subscriptions.get(&subscription).is_some_and(|s| s.conn == conn) {
            // Its client let go of it: the index may serve anyone at once.
            self.remove_subscription(subscription, true, &mut out);
            Ok(Reply::Done)
        } else {
            Err(ControlError::NoSuchSubscription(subscription))
        };
        out.insert(0, Outgoing::reply(conn, id, result, Vec::new()));
        out
    }

    /// Ends a subscription; `released` if its own client gave it up (else
    /// its lease ended, and its index waits for its process to end).
    fn remove_subscription(&mut self, subscription: u64, released: bool, out: &mut Vec<Outgoing>) {
        let Some(sub) = self.subscriptions.remove(&subscription) else { return };
        if let Some(stream) = self.streams.get_mut(&sub.stream) {
            stream.subscribers.retain(|&s| s != subscription);
            let removed = if released {
                stream.segment.release_subscriber(sub.index)
            } else {
                stream.segment.remove_subscriber(sub.index)
            };
            if let Err(e) = removed {
                tracing::warn!(stream = sub.stream, "removing subscriber #{}: {e}", sub.index);
            }
            // With no publisher attached nobody else would finish it.
            stream.segment.reclaim();
            tracing::info!(stream = sub.stream, subscription, "subscriber detached");
            self.drop_if_unused(&sub.stream, out);
        }
    }

    /// `Unpublish`: ends publication `publication` of this connection, and
    /// nothing else (a late one names a publication that has ended).
    pub fn unpublish(&mut self, conn: ConnId, id: u64, publication: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let name = self
            .streams
            .iter()
            .find(|(_, s)| s.publisher == Some(conn) && s.publication == publication)
            .map(|(name, _)| name.clone());
        let result = match name {
            Some(name) => {
                self.publisher_left(&name, &mut out);
                Ok(Reply::Done)
            }
            None => Err(ControlError::NoSuchPublication(publication)),
        };
        out.insert(0, Outgoing::reply(conn, id, result, Vec::new()));
        out
    }

    /// A publisher's lease ended (its connection, or its Unpublish). A
    /// process that lives on and still holds the writer role keeps it.
    fn publisher_left(&mut self, name: &str, out: &mut Vec<Outgoing>) {
        let Some(conn) = self.streams.get(name).and_then(|s| s.publisher) else { return };
        let holder = self.holder(conn);
        let stream = self.streams.get_mut(name).expect("just found");
        stream.publisher = None;
        let departure = if holder.alive() {
            if holds_role(stream, &holder) {
                tracing::info!(
                    stream = name,
                    pid = holder.pid,
                    "the publisher's lease ended, its process lives and keeps the stream until it exits or lets go"
                );
                stream.lingering = Some(holder);
                // It will never take their channels: they wait for it to go.
                let (now, later): (Vec<Joining>, Vec<Joining>) =
                    std::mem::take(&mut self.joining).into_iter().partition(|j| j.stream == name);
                self.joining = later;
                let stream = self.streams.get_mut(name).expect("just found");
                for j in now {
                    stream.segment.give_up_subscriber(j.index);
                    self.pending.push(Pending { admission: j.admission, stream: j.stream });
                }
                return;
            }
            Departure::LetGo
        } else {
            // Dead, or no pidfd: then the connection was the lease.
            Departure::Died
        };
        self.publisher_gone(name, departure, out);
    }

    /// The publisher died (or its lease ended and only the lease tells) or
    /// let go: after a death, take the writer role back (recovering what it
    /// left half done); either way, tell the subscribers.
    fn publisher_gone(&mut self, name: &str, departure: Departure, out: &mut Vec<Outgoing>) {
        let Some(stream) = self.streams.get_mut(name) else { return };
        stream.publisher = None;
        stream.lingering = None;
        // Nobody is left to take their channels: attach them now (a next
        // publisher gets the channels with its reply), and those that
        // waited for this one to go.
        self.activate_joining_of(name, out);
        let stream = self.streams.get_mut(name).expect("just found");
        match departure {
            // A crashed publisher still holds the writer role: take it back.
            Departure::Died => stream.segment.publisher_gone(),
            // A live one let go: take nothing from anybody.
            Departure::LetGo => stream.segment.publisher_released(),
        }
        tracing::info!(stream = name, ?departure, "publisher gone: its lease is reclaimed");
        let stream = &self.streams[name];
        self.tell_subscribers(stream, &Event::PublisherGone { stream: name.into() }, out);
        self.admit_pending(name, out);
        self.drop_if_unused(name, out);
    }

    /// Forgets a stream nobody uses any more: its memory goes once the
    /// last process that mapped it lets go. A stream whose history holds
    /// frames stays (for late joiners: the state outlives its writer) until
    /// it is closed or its `history_idle_ms` passes (`expire_history`).
    fn drop_if_unused(&mut self, name: &str, out: &mut Vec<Outgoing>) {
        let Some(stream) = self.streams.get_mut(name) else { return };
        if !stream.unused() || self.joining.iter().any(|j| j.stream == name) {
            return;
        }
        let held = stream.history_held();
        if held > 0 {
            if stream.retained_since.is_none() {
                stream.retained_since = Some(Instant::now());
                tracing::info!(stream = name, held, "stream kept for its history");
            }
            return;
        }
        self.streams.remove(name);
        tracing::info!(stream = name, "stream removed");
        self.tell_watchers_removed(name, false, out);
    }

    /// Removes the streams kept for their history whose idle time has
    /// passed, and forgets the time of those in use again.
    pub fn expire_history(&mut self) -> Vec<Outgoing> {
        let now = Instant::now();
        let mut expired = Vec::new();
        for (name, stream) in &mut self.streams {
            if !stream.unused() {
                stream.retained_since = None;
                continue;
            }
            let idle = Duration::from_millis(stream.config.history_idle_ms);
            if stream.retained_since.is_some_and(|since| !idle.is_zero() && now.duration_since(since) >= idle) {
                expired.push(name.clone());
            }
        }
        let mut out = Vec::new();
        for name in expired {
            if self.joining.iter().any(|j| j.stream == name) {
                continue;
            }
            self.streams.remove(&name);
            tracing::info!(stream = name, "stream kept for its history removed: its idle time passed");
            self.tell_watchers_removed(&name, false, &mut out);
        }
        out
    }

    /// Whether a stream is kept for its history with no client using it:
    /// an autostarted broker waits for it before it exits idle.
    pub fn retains_history(&self) -> bool {
        self.streams.values().any(|s| s.retained_since.is_some())
    }

    /// Refuses a Close unless `conn` publishes the stream or runs as the
    /// broker's user, or, once the stream has no publisher, as the user
    /// who created it. (Clients of the broker's own user could as well
    /// ptrace each other; with `--group`, members may be other users.)
    fn check_may_close(&self, conn: ConnId, name: &str) -> Result<(), ControlError> {
        let Some(stream) = self.streams.get(name) else { return Err(ControlError::NoSuchStream(name.into())) };
        let uid = self.clients.get(&conn).map_or(u32::MAX, |c| c.uid);
        let broker_uid = platform::current_uid();
        let has_publisher = stream.publisher.is_some();
        if uid == broker_uid || stream.publisher == Some(conn) || (!has_publisher && uid == stream.creator_uid) {
            return Ok(());
        }
        Err(ControlError::CloseNotPermitted {
            stream: name.into(),
            uid,
            creator_uid: stream.creator_uid,
            broker_uid,
            has_publisher,
        })
    }

    /// `Close`.
    pub fn close(&mut self, conn: ConnId, id: u64, name: &str) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let allowed = self.check_may_close(conn, name);
        if allowed.is_ok() {
            let closed = ControlError::StreamClosed(name.into());
            out.extend(self.give_up_joining(|j| j.stream == name, Some(&closed)));
        }
        let stream =
            allowed.and_then(|()| self.streams.remove(name).ok_or_else(|| ControlError::NoSuchStream(name.into())));
        let result = match stream {
            Err(e) => Err(e),
            Ok(mut stream) => {
                stream.segment.close();
                let event = Event::StreamClosed { stream: name.into() };
                out.extend(self.users(&stream, true).into_iter().map(|c| Outgoing::event(c, event.clone())));
                for s in &stream.subscribers {
                    self.subscriptions.remove(s);
                }
                let holder = stream.publisher.map(|c| self.holder(c)).or(stream.lingering);
                let conn = stream.publisher;
                self.closing.push(Closing { at: Instant::now(), segment: stream.segment, holder, conn });
                tracing::info!(stream = name, conn, "stream closed");
                self.tell_watchers_removed(name, true, &mut out);
                Ok(Reply::Done)
            }
        };
        out.insert(0, Outgoing::reply(conn, id, result, Vec::new()));
        out
    }

    /// A connection ended: its lease is over. Reclaims everything it held.
    pub fn disconnect(&mut self, conn: ConnId, reason: &str) -> Vec<Outgoing> {
        match self.clients.get(&conn) {
            Some(c) => tracing::info!(
                conn,
                pid = c.holder.pid,
                uid = c.uid,
                client = c.name.as_str(),
                reason,
                "client disconnected"
            ),
            None => tracing::debug!(conn, reason, "connection ended before its handshake"),
        }
        let mut out = Vec::new();
        self.pending.retain(|p| p.admission.conn != conn);
        self.reserved.retain(|_, r| r.conn != conn);
        self.give_up_joining(|j| j.admission.conn == conn, None);
        self.watches.retain(|_, w| w.conn != conn);
        let published: Vec<String> =
            self.streams.iter().filter(|(_, s)| s.publisher == Some(conn)).map(|(n, _)| n.clone()).collect();
        for name in published {
            self.publisher_left(&name, &mut out);
        }
        let subs: Vec<u64> = self.subscriptions.iter().filter(|(_, s)| s.conn == conn).map(|(&id, _)| id).collect();
        for s in subs {
            self.remove_subscription(s, false, &mut out);
        }
        self.clients.remove(&conn);
        out.retain(|o| o.conn != conn);
        out
    }

    /// Looks at every publisher's process: one that exited while its
    /// connection lives on (a child inherited it), one that outlived its
    /// lease and has now exited or let go, or a writer the broker does not
    /// know of that died, leaves its stream here. Called every few hundred
    /// milliseconds (a `poll` per publisher).
    pub fn watch_publishers(&mut self) -> Vec<Outgoing> {
        let gone: Vec<(String, Departure)> = self
            .streams
            .iter()
            .filter_map(|(n, s)| {
                let departure = match (s.publisher, &s.lingering) {
                    (Some(conn), _) => self.holder(conn).exited().then_some(Departure::Died)?,
                    (None, Some(h)) if h.exited() => Departure::Died,
                    (None, Some(h)) if !holds_role(s, h) => Departure::LetGo,
                    (None, Some(_)) => return None,
                    (None, None) => {
                        let pid = s.segment.publisher_attached()?;
                        (!platform::process_alive(pid)).then_some(Departure::Died)?
                    }
                };
                Some((n.clone(), departure))
            })
            .collect();
        let mut out = Vec::new();
        for (name, departure) in gone {
            tracing::info!(stream = name, ?departure, "the publisher is gone");
            self.publisher_gone(&name, departure, &mut out);
        }
        // A writer we never tracked that let go: those waiting for it attach.
        let mut free: Vec<String> = self
            .pending
            .iter()
            .filter(|p| self.streams.get(&p.stream).is_some_and(|s| s.publisher.is_none()))
            .filter(|p| self.unreachable_writer(&p.stream).is_none())
            .map(|p| p.stream.clone())
            .collect();
        free.dedup();
        for name in free {
            self.admit_pending(&name, &mut out);
        }
        out
    }

    /// Closes every stream (the broker is shutting down).
    /// Whether [`close_all`](Self::close_all) ran: requests are refused.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    pub fn close_all(&mut self) {
        self.shutting_down = true;
        self.give_up_joining(|_| true, None);
        let streams: Vec<(String, Stream)> = self.streams.drain().collect();
        for (name, mut stream) in streams {
            stream.segment.close();
            tracing::info!(stream = name, "stream closed for shutdown");
            let holder = stream.publisher.map(|c| self.holder(c)).or(stream.lingering);
            let conn = stream.publisher;
            self.closing.push(Closing { at: Instant::now(), segment: stream.segment, holder, conn });
        }
        self.subscriptions.clear();
        self.pending.clear();
        self.watches.clear();
    }

    /// Ends the closes begun at least `grace` ago. Returns whether one
    /// needs a [`system_barrier`](memsock_proto::shm::system_barrier)
    /// (run it outside the registry's lock, then call again with it).
    ///
    /// A close takes effect for subscribers once the publisher has
    /// acknowledged it, which it does at its next loan or send, so that a
    /// frame it is sending right then still arrives. An idle publisher
    /// would leave its subscribers waiting: after the grace period the
    /// close ends for them anyway. A dead publisher (or one whose lease
    /// was its connection) is declared gone; a live one keeps its role —
    /// its next send fails with `Closed` — and a frame it is delivering
    /// right then arrives before the end (the next tick tries again).
    pub fn finish_closing(&mut self, grace: std::time::Duration, barrier: Option<BarrierPassed>) -> bool {
        let mut needs_barrier = false;
        let clients = &self.clients;
        self.closing.retain_mut(|c| {
            if c.at.elapsed() < grace {
                return true;
            }
            let dead = match &c.holder {
                Some(h) if h.process.is_none() => !c.conn.is_some_and(|conn| clients.contains_key(&conn)),
                Some(h) => h.exited(),
                None => c.segment.publisher_attached().is_some_and(|pid| !platform::process_alive(pid)),
            };
            if dead {
                // Dead (or, without a pidfd, its connection ended): recover
                // what it left half done, which ends the close too.
                c.segment.publisher_gone();
                return false;
            }
            match c.segment.end_for_subscribers(barrier) {
                EndProgress::NeedsBarrier => {
                    needs_barrier = true;
                    true
                }
                EndProgress::Delivering => true,
                EndProgress::Ended | EndProgress::Open => false,
            }
        });
        needs_barrier
    }

    /// Closes still waiting for their publisher.
    pub fn closes_pending(&self) -> usize {
        self.closing.len()
    }

    /// Samples every stream's counters for the per-second rates, and
    /// closes the channels of places free again. Called once a second:
    /// reads shared memory, no messages.
    pub fn sample_rates(&mut self) {
        let now = Instant::now();
        for stream in self.streams.values_mut() {
            // Channels of places its publisher has reclaimed since: closed.
            stream.segment.sweep_channels();
            let stats = stream.segment.stats();
            let r = &mut stream.rates;
            r.observe(stats.published, now);
            if let Some(at) = r.at {
                let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                r.msgs_per_s = stats.published.saturating_sub(r.published) as f64 / dt;
                r.bytes_per_s = stats.bytes.saturating_sub(r.bytes) as f64 / dt;
                r.subscriber_rates = stats
                    .subscribers
                    .iter()
                    .map(|s| {
                        let (delivered, dropped) =
                            r.subscribers.get(&s.index).copied().unwrap_or((s.delivered, s.dropped));
                        let per_s = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
                        (s.index, (per_s(s.delivered, delivered), per_s(s.dropped, dropped)))
                    })
                    .collect();
            }
            r.at = Some(now);
            r.published = stats.published;
            r.bytes = stats.bytes;
            r.subscribers = stats.subscribers.iter().map(|s| (s.index, (s.delivered, s.dropped))).collect();
            let mut latency = HashMap::new();
            r.latency_interval.clear();
            for s in &stats.subscribers {
                let Some(now) = &s.latency else { continue };
                let key = (s.index, s.generation);
                let before = r.latency.get(&key).map_or(&[][..], |counts| &counts.buckets[..]);
                if let Some(summary) = LatencySummary::between(before, &now.buckets) {
                    r.latency_interval.insert(key, summary);
                }
                latency.insert(key, now.clone());
            }
            r.latency = latency;
        }
    }

    /// `Stats`.
    pub fn stats(&mut self, conn: ConnId, id: u64, name: Option<&str>, broker: BrokerIdent) -> Vec<Outgoing> {
        let result = match name {
            Some(n) if !self.streams.contains_key(n) => Err(ControlError::NoSuchStream(n.into())),
            _ => {
                let now = Instant::now();
                let mut streams: Vec<StreamReport> = Vec::new();
                for (n, s) in &mut self.streams {
                    if name.is_none_or(|want| want == n.as_str()) {
                        let stats = s.segment.stats();
                        s.rates.observe(stats.published, now);
                        streams.push(Self::report(&self.subscriptions, &self.clients, n, s, stats, now));
                    }
                }
                streams.sort_by(|a, b| a.name.cmp(&b.name));
                let (descriptors, descriptor_limit) = platform::descriptors_in_use();
                Ok(Reply::Stats(StatsReport {
                    broker_pid: broker.pid,
                    uptime_ns: now.saturating_duration_since(broker.started).as_nanos() as u64,
                    clients: self.clients.len() as u32,
                    waiting_subscribers: self.pending.len() as u32,
                    descriptors,
                    descriptor_limit,
                    streams,
                }))
            }
        };
        vec![Outgoing::reply(conn, id, result, Vec::new())]
    }

    fn report(
        subscriptions: &HashMap<u64, Subscription>,
        clients: &HashMap<ConnId, Client>,
        name: &str,
        stream: &Stream,
        stats: StreamStats,
        now: Instant,
    ) -> StreamReport {
        let client_name = |conn: ConnId| clients.get(&conn).map(|c| c.name.clone());
        let by_index: HashMap<u32, (u64, ConnId)> =
            subscriptions.iter().filter(|(_, s)| s.stream == name).map(|(&id, s)| (s.index, (id, s.conn))).collect();
        let subscribers = stats
            .subscribers
            .iter()
            .filter(|s| !s.detaching)
            .map(|s| {
                let (subscription, conn) = by_index.get(&s.index).copied().unzip();
                let (msgs_per_s, dropped_per_s) =
                    stream.rates.subscriber_rates.get(&s.index).copied().unwrap_or_default();
                SubscriberReport {
                    subscription: subscription.unwrap_or(0),
                    index: s.index,
                    attach_seq: s.attach_seq,
                    pid: s.pid,
                    client_name: conn.and_then(client_name).unwrap_or_default(),
                    policy: s.policy,
                    credits: s.credits,
                    delivered: s.delivered,
                    dropped: s.dropped,
                    evicted: s.evicted,
                    queued: s.queued,
                    lag_ns: s.lag_ns,
                    msgs_per_s,
                    dropped_per_s,
                    faults: s.faults,
                    latency: s.latency.as_ref().map(|counts| LatencyReport {
                        last_interval: stream.rates.latency_interval.get(&(s.index, s.generation)).copied(),
                        buckets: latency_report_buckets(&counts.buckets),
                        sum_ns: counts.sum_ns,
                    }),
                }
            })
            .collect();
        StreamReport {
            name: name.into(),
            publisher_pid: (stats.publisher_pid != 0).then_some(stats.publisher_pid),
            publisher_name: stream.publisher.and_then(client_name),
            slot_size: stats.slot_size,
            slot_count: stats.slot_count,
            free_slots: stats.free_slots,
            published: stats.published,
            bytes: stats.bytes,
            msgs_per_s: stream.rates.msgs_per_s,
            bytes_per_s: stream.rates.bytes_per_s,
            idle_ns: stream.rates.idle_ns(now),
            closed: stats.closed,
            history: stats.history,
            history_held: stats.history_held,
            retained_ns: stream.retained_since.map(|since| since.elapsed().as_nanos() as u64),
            subscribers,
        }
    }
}

fn parse_pattern(pattern: &str) -> Result<Pattern, ControlError> {
    Pattern::parse(pattern).map_err(|problem| ControlError::InvalidPattern { pattern: pattern.into(), problem })
}

fn credit_error(stream: &str, e: AddSubscriberError) -> ControlError {
    match e {
        AddSubscriberError::CreditsRefused { requested, available, slot_count, committed } => {
            ControlError::CreditsRefused { stream: stream.into(), requested, available, slot_count, committed }
        }
        AddSubscriberError::Full { max } => ControlError::TooManySubscribers { stream: stream.into(), max },
        AddSubscriberError::Closed => ControlError::StreamClosed(stream.into()),
        AddSubscriberError::CreditsOutOfRange { credits, max } => {
            ControlError::InvalidConfig(ConfigProblem::CreditsOutOfRange { credits, max })
        }
        // A refusal this broker does not know how to name (a newer proto).
        _ => ControlError::Segment { stream: stream.into(), step: SegmentStep::Credit, os_error: None },
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use memsock_proto::shm::{LoanError, Publisher, system_barrier};

    use super::*;

    fn config() -> StreamConfig {
        let mut c = StreamConfig::new(64, 8);
        c.max_subscribers = 2;
        c
    }

    /// Publishes `name` on `conn` and attaches a publisher in this process
    /// with the descriptors of the reply.
    /// What a Publish leads to, its segment created as the server does.
    fn publish_out(registry: &mut Registry, conn: ConnId, name: &str) -> Vec<Outgoing> {
        match registry.publish(conn, 1, name, &config()) {
            PublishStep::Done(out) => out,
            PublishStep::Create(creation) => registry.created(&creation, creation.create()),
        }
    }

    fn publish(registry: &mut Registry, conn: ConnId, name: &str) -> Result<Publisher, ControlError> {
        let mut out = publish_out(registry, conn, name);
        let reply = out.remove(0);
        let channels = granted(&reply)?;
        Ok(Publisher::open(reply.fds[0].as_fd(), &channels).expect("attach"))
    }

    /// The channels a Published reply grants, with their descriptors.
    fn granted(reply: &Outgoing) -> Result<Vec<(u32, u64, std::os::fd::BorrowedFd<'_>)>, ControlError> {
        let ServerMessage::Reply { result, .. } = &reply.message else { panic!("a reply first") };
        let Reply::Published { channels, .. } = result.clone()? else { panic!("a Published reply") };
        Ok(channels.iter().zip(&reply.fds[1..]).map(|(c, fd)| (c.index, c.generation, fd.as_fd())).collect())
    }

    /// Review finding: a publisher without a pidfd whose connection lives
    /// is not revoked at the close grace — the connection is its lease —
    /// yet the close ends for its subscribers. (It was revoked: its next
    /// loan said `Replaced`.)
    #[test]
    fn the_close_grace_takes_no_role_from_a_publisher_whose_lease_holds() {
        let mut registry = Registry::default();
        registry.connect(1, platform::current_pid(), platform::current_uid(), None, "test");
        registry.connect(2, platform::current_pid(), platform::current_uid(), None, "test");
        let mut publisher = publish(&mut registry, 1, "s").unwrap();
        registry.close(2, 1, "s");
        let mut barrier = None;
        while registry.finish_closing(Duration::ZERO, barrier) {
            barrier = Some(system_barrier());
        }
        assert_eq!(registry.closes_pending(), 0, "the close ended");
        assert_eq!(publisher.loan().err(), Some(LoanError::Closed));
    }

    /// Review finding: a writer the broker does not know of — its client
    /// was dropped between the Publish reply and its attach — holds the
    /// stream while it lives: a new Publish is refused with its pid rather
    /// than given a stream it cannot attach to.
    #[test]
    fn an_unknown_live_writer_keeps_its_stream() {
        let mut registry = Registry::default();
        let me = platform::current_pid();
        registry.connect(1, me, platform::current_uid(), None, "test");
        let mut out = publish_out(&mut registry, 1, "s");
        let reply = out.remove(0);
        // A subscriber keeps the stream registered.
        registry.connect(3, me, platform::current_uid(), None, "test");
        registry.subscribe(3, 1, "s", &SubscriberOptions::default(), false, false);
        registry.disconnect(1, "test");
        let _late =
            Publisher::open(reply.fds[0].as_fd(), &granted(&reply).unwrap()).expect("attach after the lease ended");
        registry.connect(2, me, platform::current_uid(), ProcessHandle::of_pid(me), "test");
        match publish(&mut registry, 2, "s") {
            Err(ControlError::PublisherExists { pid, .. }) => assert_eq!(pid, me),
            other => panic!("expected the live writer to keep the stream, got {other:?}"),
        }
    }

    fn close_result(registry: &mut Registry, conn: ConnId, name: &str) -> Result<(), ControlError> {
        let ServerMessage::Reply { result, .. } = registry.close(conn, 1, name).remove(0).message else {
            panic!("a reply first")
        };
        result.map(drop)
    }

    /// Issue 10: a client of another user (a `--group` member) may not
    /// close a stream it does not publish; its publisher may, and so may
    /// the broker's user; once it has no publisher, its creator's user
    /// too. (The broker recorded each peer's uid and never checked it.)
    #[test]
    fn only_the_publisher_the_broker_s_user_or_an_orphan_s_creator_may_close() {
        let me = platform::current_pid();
        let ours = platform::current_uid();
        let (alice, bob) = (ours.wrapping_add(1001), ours.wrapping_add(1002));
        let mut registry = Registry::default();
        registry.connect(1, me, alice, None, "test"); // publishes "a"
        registry.connect(2, me, bob, None, "test");
        registry.connect(3, me, alice, None, "test"); // alice's second client
        registry.connect(4, me, ours, None, "test");
        let _a = publish(&mut registry, 1, "a").unwrap();
        for conn in [2, 3] {
            match close_result(&mut registry, conn, "a") {
                Err(ControlError::CloseNotPermitted { uid, creator_uid, has_publisher: true, .. }) => {
                    assert_eq!(creator_uid, alice);
                    assert_eq!(uid, if conn == 2 { bob } else { alice });
                }
                other => panic!("client {conn} may not close another's published stream: {other:?}"),
            }
        }
        assert_eq!(close_result(&mut registry, 1, "a"), Ok(()), "its publisher may");

        let _b = publish(&mut registry, 1, "b").unwrap();
        assert_eq!(close_result(&mut registry, 4, "b"), Ok(()), "the broker's user may");

        // A subscriber keeps "c" registered once its publisher is gone.
        drop(publish(&mut registry, 1, "c").unwrap());
        registry.subscribe(2, 1, "c", &SubscriberOptions::default(), false, false);
        let token = registry.streams["c"].publication;
        registry.unpublish(1, 1, token);
        match close_result(&mut registry, 2, "c") {
            Err(ControlError::CloseNotPermitted { has_publisher: false, .. }) => {}
            other => panic!("bob did not create c: {other:?}"),
        }
        assert_eq!(close_result(&mut registry, 3, "c"), Ok(()), "its creator's user may once it has no publisher");
        assert_eq!(close_result(&mut registry, 2, "missing"), Err(ControlError::NoSuchStream("missing".into())));
    }

    /// Issue 10, part 5: a stream's segment is created outside the lock,
    /// its name reserved: a second Publish meanwhile is refused with the
    /// creator's pid, a subscriber waiting for the name attaches when the
    /// creation completes, and a creator gone meanwhile leaves the name
    /// free (its segment dropped, the subscriber still waiting).
    #[test]
    fn a_name_is_reserved_while_its_segment_is_created_outside_the_lock() {
        let me = platform::current_pid();
        let uid = platform::current_uid();
        let mut registry = Registry::default();
        for conn in 1..=3 {
            registry.connect(conn, me + conn as u32, uid, None, "test");
        }
        let PublishStep::Create(creation) = registry.publish(1, 1, "big", &config()) else {
            panic!("a new stream is created outside the lock")
        };
        match registry.publish(2, 1, "big", &config()) {
            PublishStep::Done(out) => match &out[0].message {
                ServerMessage::Reply { result: Err(ControlError::PublisherExists { pid, .. }), .. } => {
                    assert_eq!(*pid, me + 1, "the creator's pid");
                }
                other => panic!("expected PublisherExists, got {other:?}"),
            },
            PublishStep::Create(_) => panic!("the name is reserved"),
        }
        assert!(registry.subscribe(3, 7, "big", &SubscriberOptions::default(), true, false).is_empty(), "waits");
        let out = registry.created(&creation, creation.create());
        let replies: Vec<_> = out.iter().map(|o| (o.conn, o.fds.len())).collect();
        // The waiting subscriber attaches first: its channel goes with the publisher's reply.
        assert_eq!(replies, [(1, 2), (3, 2)], "the publisher's reply, then the waiting subscriber's");

        // The creator's connection ends while its segment is created.
        let PublishStep::Create(creation) = registry.publish(1, 2, "gone", &config()) else { panic!("created") };
        registry.subscribe(3, 8, "gone", &SubscriberOptions::default(), true, false);
        registry.disconnect(1, "test");
        assert!(registry.created(&creation, creation.create()).is_empty(), "nobody to answer");
        assert!(!registry.streams.contains_key("gone"));
        assert!(matches!(registry.publish(2, 3, "gone", &config()), PublishStep::Create(_)), "the name is free");
        assert_eq!(registry.pending.len(), 1, "the subscriber still waits");
    }
}
