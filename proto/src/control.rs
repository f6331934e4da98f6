//! The control protocol between clients and the broker: message types and
//! their framing.
//!
//! A connection carries frames, each a little-endian `u32` length followed
//! by that many bytes of a postcard-encoded message; a frame longer than
//! [`MAX_FRAME_LEN`] is a protocol error. The client speaks first, with
//! [`Request::Hello`] carrying [`PROTOCOL_VERSION`]; the broker answers
//! [`Reply::Welcome`] or an error and closes. Every later request carries
//! an id that its reply repeats, so events ([`Event`]) can come in between.
//!
//! Frame bytes never travel here: replies that hand out a stream carry its
//! segment files as descriptors attached to the frame (`SCM_RIGHTS`);
//! [`ServerMessage::fd_count`] says how many belong to each message.

use serde::{Deserialize, Serialize};

mod framing;
pub use framing::{FrameReader, FrameWriter, Framed};

use crate::pattern::PatternError;
use crate::shm::layout::MAX_SEGMENT_LEN;
use crate::shm::{CreateError, LayoutError, MapError, OverflowPolicy, StreamConfig, SubscriberOptions};

/// Version of this protocol; a client and a broker must agree on it.
pub const PROTOCOL_VERSION: u32 = 7;

/// Longest frame either side accepts, in bytes (length prefix excluded).
pub const MAX_FRAME_LEN: u32 = 256 * 1024;

/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME: usize = 255;

/// What a client asks the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientMessage {
    /// Chosen by the client; the reply carries it back.
    pub id: u64,
    /// The request.
    pub request: Request,
}

/// The requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// First message on every connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// A name for logs and stats (program name).
        client_name: String,
    },
    /// Create stream `stream` and become its publisher, or take over an
    /// existing stream of the same geometry whose publisher is gone.
    Publish {
        /// Stream name.
        stream: String,
        /// Geometry and memory options.
        config: StreamConfig,
    },
    /// End a publication (the stream stays, for a new publisher). Named by
    /// the token [`Reply::Published`] gave, never by the stream's name: a
    /// late Unpublish cannot end a newer publication of the same stream.
    Unpublish {
        /// The publication, as [`Reply::Published`] named it.
        publication: u64,
    },
    /// Attach a subscriber to `stream`.
    Subscribe {
        /// Stream name.
        stream: String,
        /// Credits, policy and wait strategy.
        options: SubscriberOptions,
        /// If the stream does not exist yet, wait for it instead of failing.
        wait_for_stream: bool,
        /// Take fewer credits than `options.credits` (at least 1) if the
        /// pool cannot give them all, instead of being refused;
        /// [`Reply::Subscribed`] says how many.
        credits_up_to: bool,
    },
    /// Change a subscriber's credits.
    Credit {
        /// The subscription, as [`Reply::Subscribed`] named it.
        subscription: u64,
        /// New credits.
        credits: u32,
    },
    /// Detach a subscriber; its slots go back to the pool.
    Unsubscribe {
        /// The subscription.
        subscription: u64,
    },
    /// Close `stream` for good: the publisher's next send fails, subscribers
    /// get `Closed` after the frames already sent.
    Close {
        /// Stream name.
        stream: String,
    },
    /// Counters of all streams, or of one.
    Stats {
        /// Only this stream.
        stream: Option<String>,
    },
    /// The streams whose names match `pattern` (see [`crate::pattern`]).
    List {
        /// The pattern.
        pattern: String,
    },
    /// Follow the streams whose names match `pattern`: the reply lists
    /// those there are; [`Event::Watch`] tells of each created or removed
    /// later. With `subscribe`, also attach a subscriber to each, those
    /// there are and each at the moment it is created (before its
    /// publisher can send a frame), every one announced by an
    /// [`WatchChange::Subscribed`] with its two descriptors.
    Watch {
        /// The pattern.
        pattern: String,
        /// Subscribe to every match, with these options.
        subscribe: Option<PatternSubscription>,
    },
    /// Stop a watch: no more events or subscribers from it (the
    /// subscribers it attached stay, each ended by its own Unsubscribe).
    Unwatch {
        /// The watch, as [`Reply::Watching`] named it.
        watch: u64,
    },
    /// The publisher's client has mapped the channel an
    /// [`Event::Channel`] brought: the broker may attach its subscriber.
    /// No reply.
    ChannelTaken {
        /// The publication the event named.
        publication: u64,
        /// Subscriber index.
        index: u32,
        /// Subscriber generation.
        generation: u64,
    },
}

/// How a watch subscribes to the streams it matches ([`Request::Watch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternSubscription {
    /// Credits, policy and wait strategy of each subscriber.
    pub options: SubscriberOptions,
    /// Take what credits a pool can give, up to `options.credits`, as
    /// [`Request::Subscribe`]'s `credits_up_to`.
    pub credits_up_to: bool,
}

/// A subscriber the broker attached ([`Reply::Subscribed`],
/// [`WatchChange::Subscribed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberGrant {
    /// Names the subscription in later requests.
    pub subscription: u64,
    /// Stream name.
    pub stream: String,
    /// Subscriber index in the stream.
    pub index: u32,
    /// Attach generation of that index.
    pub generation: u64,
    /// The stream has a publisher right now.
    pub publisher_attached: bool,
    /// Credits granted (fewer than asked only with `credits_up_to`).
    pub credits: u32,
    /// Frames the stream had published when the subscriber was attached:
    /// the sequence number from which on it receives (frames in flight
    /// as it attached may still come before it). A first frame numbered
    /// above it follows frames the subscriber lost.
    pub first_seq: u64,
}

/// A stream as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream name.
    pub name: String,
    /// The configuration it was created with (its geometry, and the memory
    /// options of its creator).
    pub config: StreamConfig,
    /// The pid of its publisher, if one is attached.
    pub publisher_pid: Option<u32>,
    /// Subscribers attached.
    pub subscribers: u32,
}

/// What a watch reports ([`Event::Watch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WatchChange {
    /// A matching stream was created.
    Created(StreamInfo),
    /// A matching stream was closed, or removed when nothing used it any
    /// more.
    Removed {
        /// Stream name.
        stream: String,
        /// It was closed (else removed unused).
        closed: bool,
    },
    /// The watch's subscriber of a matching stream is attached. Descriptors:
    /// the stream's data file (read-only), then the subscriber's channel
    /// file, as with [`Reply::Subscribed`].
    Subscribed {
        /// The subscriber.
        grant: SubscriberGrant,
        /// The stream's configuration.
        config: StreamConfig,
    },
    /// The watch could not subscribe to a matching stream.
    SubscribeFailed {
        /// Stream name.
        stream: String,
        /// Why.
        error: ControlError,
    },
}

/// A channel file that travels with [`Reply::Published`]: which
/// subscriber's it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelGrant {
    /// Subscriber index.
    pub index: u32,
    /// The subscriber generation the file was created for.
    pub generation: u64,
}

/// What the broker sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServerMessage {
    /// The answer to request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// What came of it.
        result: Result<Reply, ControlError>,
    },
    /// Something happened to a stream this client uses.
    Event(Event),
}

impl ServerMessage {
    /// How many descriptors travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            ServerMessage::Reply { result: Ok(Reply::Published { channels, .. }), .. } => 1 + channels.len(),
            ServerMessage::Reply { result: Ok(Reply::Subscribed(_)), .. } => 2,
            ServerMessage::Event(Event::Channel { .. }) => 1,
            ServerMessage::Event(Event::Watch { change: WatchChange::Subscribed { .. }, .. }) => 2,
            _ => 0,
        }
    }
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reply {
    /// The handshake succeeded.
    Welcome {
        /// The broker's protocol version.
        version: u32,
        /// The broker's process id.
        broker_pid: u32,
    },
    /// The client is the stream's publisher. Descriptors: the stream's data
    /// file (read-write), then the channel file of each subscriber there is
    /// (attached, or being attached), as `channels` lists them. Channels of
    /// subscribers attached later come as [`Event::Channel`].
    Published {
        /// Names the publication in a later [`Request::Unpublish`]; unique
        /// for the broker's life.
        publication: u64,
        /// Stream name.
        stream: String,
        /// Whose the channel files after the data file are, in order.
        channels: Vec<ChannelGrant>,
        /// The stream existed and this client took it over.
        takeover: bool,
    },
    /// The client has a subscriber. Descriptors: the stream's data file
    /// (read-only), then the subscriber's channel file.
    Subscribed(SubscriberGrant),
    /// Done, nothing to report.
    Done,
    /// Counters.
    Stats(StatsReport),
    /// The streams a [`Request::List`] matched, by name.
    Streams(Vec<StreamInfo>),
    /// A watch is in place.
    Watching {
        /// Names the watch in its events and in [`Request::Unwatch`].
        watch: u64,
        /// The matching streams there are, by name (a subscribing watch's
        /// subscribers of them follow as events).
        streams: Vec<StreamInfo>,
    },
}

/// Things that happen to a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// The publisher of `stream` is gone (its connection ended); the
    /// stream stays and a new publisher may take over.
    PublisherGone {
        /// Stream name.
        stream: String,
    },
    /// A publisher attached to `stream` after the previous one left.
    PublisherBack {
        /// Stream name.
        stream: String,
    },
    /// `stream` was closed.
    StreamClosed {
        /// Stream name.
        stream: String,
    },
    /// The broker is shutting down; every stream ends.
    BrokerShutdown,
    /// For a publisher: a subscriber is being attached to its stream, and
    /// this is its channel file (the one descriptor with the event). Map
    /// it and answer [`Request::ChannelTaken`]; the subscriber is attached
    /// then, so the publisher delivers to it from its next send on.
    Channel {
        /// The publication this is for.
        publication: u64,
        /// Subscriber index.
        index: u32,
        /// Subscriber generation.
        generation: u64,
    },
    /// News from a watch of this client.
    Watch {
        /// The watch, as [`Reply::Watching`] named it.
        watch: u64,
        /// What happened.
        change: WatchChange,
    },
    /// For a publisher of a stream with history: a subscriber was attached
    /// and is to be handed the history now, though this publisher may not
    /// send for a while — its client does it on the publisher's behalf
    /// (`ChannelInbox::serve`).
    Serve {
        /// The publication this is for.
        publication: u64,
    },
}

/// Why a request failed. Every variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The client speaks another protocol version.
    #[error("protocol version mismatch: client speaks {client}, broker speaks {broker}")]
    VersionMismatch {
        /// Client version.
        client: u32,
        /// Broker version.
        broker: u32,
    },
    /// The first message was not a Hello, or a second Hello came.
    #[error("expected a Hello as the first message and only then")]
    HandshakeExpected,
    /// The message could not be decoded, or broke a protocol rule.
    #[error("malformed message: {0}")]
    Malformed(Malformation),
    /// A frame announced more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A stream name is empty, too long or not printable.
    #[error("invalid stream name {0:?}: 1 to 255 bytes of printable characters")]
    InvalidName(String),
    /// A stream-name pattern is malformed.
    #[error("invalid pattern {pattern:?}: {problem}")]
    InvalidPattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        problem: PatternError,
    },
    /// No watch of this client has this id.
    #[error("no watch #{0} on this connection")]
    NoSuchWatch(u64),
    /// No stream has this name.
    #[error("no stream named {0:?}")]
    NoSuchStream(String),
    /// The stream exists with another geometry.
    #[error(
        "stream {stream:?} exists with {slot_count} slots of {slot_size} bytes and a history of {history}; \
         asked for {asked_count} of {asked_size} and a history of {asked_history}"
    )]
    GeometryMismatch {
        /// Stream name.
        stream: String,
        /// Its slot size.
        slot_size: u32,
        /// Its slot count.
        slot_count: u32,
        /// Requested slot size.
        asked_size: u32,
        /// Requested slot count.
        asked_count: u32,
        /// Its history.
        history: u32,
        /// Requested history.
        asked_history: u32,
    },
    /// Another live client publishes the stream.
    #[error("stream {stream:?} already has a publisher (pid {pid})")]
    PublisherExists {
        /// Stream name.
        stream: String,
        /// Its publisher's pid.
        pid: u32,
    },
    /// The stream's publisher did not take the new subscriber's channel
    /// in time (its process is stopped, or not reading its connection):
    /// the subscriber is not attached. Try again.
    #[error(
        "the publisher of stream {stream:?} (pid {pid}) did not take the new subscriber's channel within {waited_ms} ms"
    )]
    PublisherUnresponsive {
        /// Stream name.
        stream: String,
        /// The publisher's pid.
        pid: u32,
        /// How long the broker waited.
        waited_ms: u64,
    },
    /// The stream's publisher lives on without its connection to the
    /// broker (see the README on publishers that outlive their lease): it
    /// cannot be handed a new subscriber's channel. Subscribe with
    /// `wait_for_stream` to be attached once it exits or lets go.
    #[error(
        "the publisher of stream {stream:?} (pid {pid}) lives on without its broker connection and cannot take new subscribers; wait for the stream to attach once it exits"
    )]
    PublisherDisconnected {
        /// Stream name.
        stream: String,
        /// The publisher's pid.
        pid: u32,
    },
    /// No publication of this client has this token (it ended, or the
    /// token names another client's).
    #[error("no publication #{0} on this connection")]
    NoSuchPublication(u64),
    /// The pool cannot honour the requested credits.
    #[error(
        "stream {stream:?}: {requested} credits refused, {available} available ({slot_count} slots, {committed} promised to subscribers, the rest kept for the publisher's loans and the stream's history)"
    )]
    CreditsRefused {
        /// Stream name.
        stream: String,
        /// Credits asked for.
        requested: u32,
        /// Credits still available.
        available: u32,
        /// Slots in the pool.
        slot_count: u32,
        /// Credits already promised to subscribers.
        committed: u32,
    },
    /// The stream has its maximum number of subscribers.
    #[error("stream {stream:?} has its maximum of {max} subscribers")]
    TooManySubscribers {
        /// Stream name.
        stream: String,
        /// The limit.
        max: u32,
    },
    /// No subscription of this client has this id.
    #[error("no subscription #{0} on this connection")]
    NoSuchSubscription(u64),
    /// The stream was closed.
    #[error("stream {0:?} is closed")]
    StreamClosed(String),
    /// The configuration is invalid.
    #[error("invalid stream configuration: {0}")]
    InvalidConfig(ConfigProblem),
    /// The broker could not create, map or hand out the stream's shared
    /// memory.
    #[error("segment error for stream {stream:?}: {step} failed{}", os_error_text(*os_error))]
    Segment {
        /// Stream name.
        stream: String,
        /// What the broker was doing.
        step: SegmentStep,
        /// The system's error number, if a system call failed.
        os_error: Option<i32>,
    },
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// A limit would be passed (see `memsock broker --limit`).
    #[error("limit reached: {scope} may hold {max} {limit}; it holds {used} and asked for {asked} more")]
    LimitReached {
        /// What the limit counts.
        limit: Limit,
        /// Whose limit it is.
        scope: LimitScope,
        /// In use now.
        used: u64,
        /// Asked for.
        asked: u64,
        /// The limit.
        max: u64,
    },
    /// This client may not close the stream. Its publisher may, and so
    /// may a client running as the broker's user; once it has no
    /// publisher, a client running as the user who created it too.
    #[error(
        "this client (uid {uid}) may not close stream {stream:?}: only its publisher{}, or a client of the broker's uid {broker_uid}, may",
        if *has_publisher { String::new() } else { format!(" (it has none now: a client of its creator's uid {creator_uid})") }
    )]
    CloseNotPermitted {
        /// Stream name.
        stream: String,
        /// The uid this client runs as.
        uid: u32,
        /// The uid of the client that created the stream.
        creator_uid: u32,
        /// The broker's uid.
        broker_uid: u32,
        /// Whether a client publishes the stream now.
        has_publisher: bool,
    },
}

/// What a limit counts ([`ControlError::LimitReached`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Limit {
    /// Clients connected at once.
    #[error("connections")]
    Connections,
    /// Streams created that still exist.
    #[error("streams created")]
    Streams,
    /// Subscriptions.
    #[error("subscriptions")]
    Subscriptions,
    /// Subscriptions waiting for their stream to be created.
    #[error("waits for a stream")]
    Waits,
    /// Bytes of shared memory of the streams created.
    #[error("bytes of shared memory")]
    Memory,
    /// Descriptors the broker holds for the streams created (one per
    /// file: the data file and a channel file per subscriber index).
    #[error("descriptors for streams")]
    Descriptors,
}

/// Whose limit it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum LimitScope {
    /// This client's (this connection's).
    #[error("this client")]
    Client,
    /// All clients of one user together.
    #[error("user {uid}")]
    User {
        /// The user.
        uid: u32,
    },
    /// Everybody's together.
    #[error("the broker")]
    Broker,
}

/// What was wrong with a message ([`ControlError::Malformed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Malformation {
    /// The frame's bytes are not a message of this protocol version.
    #[error("the bytes are not a message of protocol version {PROTOCOL_VERSION} ({0})")]
    Undecodable(DecodeFailure),
    /// A request this broker does not serve.
    #[error("unknown request")]
    UnknownRequest,
    /// Descriptors came with a message that carries none.
    #[error("descriptors came with a message that carries none")]
    StrayDescriptors,
    /// The reply would not fit in a frame.
    #[error("the reply would be {len} bytes, more than a frame holds")]
    ReplyTooLarge {
        /// Its encoded length.
        len: u64,
    },
}

/// Where decoding a message failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeFailure {
    /// The frame ended inside the message.
    #[error("unexpected end")]
    UnexpectedEnd,
    /// A variable-length integer is invalid.
    #[error("bad varint")]
    BadVarint,
    /// A boolean is neither 0 nor 1.
    #[error("bad bool")]
    BadBool,
    /// A string is not UTF-8, or a char is not a char.
    #[error("bad text")]
    BadText,
    /// An option or enum tag names no variant.
    #[error("bad tag")]
    BadTag,
    /// Anything else the decoder refused.
    #[error("bad encoding")]
    BadEncoding,
}

impl From<&postcard::Error> for DecodeFailure {
    fn from(e: &postcard::Error) -> Self {
        use postcard::Error as E;
        match e {
            E::DeserializeUnexpectedEnd => Self::UnexpectedEnd,
            E::DeserializeBadVarint => Self::BadVarint,
            E::DeserializeBadBool => Self::BadBool,
            E::DeserializeBadChar | E::DeserializeBadUtf8 => Self::BadText,
            E::DeserializeBadOption | E::DeserializeBadEnum => Self::BadTag,
            _ => Self::BadEncoding,
        }
    }
}

/// What is wrong with a stream configuration ([`ControlError::InvalidConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    /// A field is out of its range.
    #[error("{field} = {value} is out of range ({min} ..= {max})")]
    OutOfRange {
        /// Which field.
        field: String,
        /// The offending value.
        value: u64,
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// The queue capacity is not a power of two.
    #[error("queue capacity {0} is not a power of two")]
    NotPowerOfTwo(u32),
    /// The segment would be larger than a segment may be.
    #[error("the segment would be {bytes} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Its length.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// More subscribers than descriptors fit in one reply.
    #[error("at most {max} subscribers per stream through the broker, asked for {asked}")]
    TooManySubscribers {
        /// Asked for.
        asked: u32,
        /// The limit.
        max: u32,
    },
    /// Credits out of the stream's range.
    #[error("credits must be between 1 and {max}, got {credits}")]
    CreditsOutOfRange {
        /// Asked for.
        credits: u32,
        /// The stream's queue capacity.
        max: u32,
    },
}

impl ConfigProblem {
    /// The problem a layout error names, if it is one of a configuration
    /// (the others are about a segment's contents).
    pub fn from_layout(e: &LayoutError) -> Option<Self> {
        match *e {
            LayoutError::OutOfRange { field, value, min, max } => {
                Some(Self::OutOfRange { field: field.into(), value, min, max })
            }
            LayoutError::NotPowerOfTwo(n) => Some(Self::NotPowerOfTwo(n)),
            LayoutError::TooLarge(bytes) => Some(Self::TooLarge { bytes, max: MAX_SEGMENT_LEN }),
            _ => None,
        }
    }
}

/// What the broker was doing when a stream's shared memory failed it
/// ([`ControlError::Segment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentStep {
    /// Creating a shared-memory file.
    #[error("creating shared memory")]
    Create,
    /// Mapping it.
    #[error("mapping shared memory")]
    Map,
    /// Locking it in memory (`mlock`; see `ulimit -l`).
    #[error("locking {len} bytes in memory")]
    Lock {
        /// Bytes to lock.
        len: u64,
    },
    /// Its header did not hold what the broker wrote.
    #[error("checking the segment's layout")]
    Layout,
    /// Duplicating a descriptor to hand out.
    #[error("duplicating a descriptor")]
    Duplicate,
    /// Changing a subscriber's credits in shared memory.
    #[error("changing credits")]
    Credit,
}

impl ControlError {
    /// The refusal for a stream that could not be created: a bad
    /// configuration, or the step whose system call failed.
    pub fn from_create(stream: &str, e: &CreateError) -> Self {
        match e {
            CreateError::Config(layout) => Self::from_layout(stream, layout),
            CreateError::Io { source, .. } => Self::segment(stream, SegmentStep::Create, source),
            CreateError::Map(map) => Self::from_map(stream, map),
        }
    }

    /// A layout error: a configuration's, or a segment not as written.
    pub fn from_layout(stream: &str, e: &LayoutError) -> Self {
        match ConfigProblem::from_layout(e) {
            Some(problem) => Self::InvalidConfig(problem),
            None => Self::Segment { stream: stream.into(), step: SegmentStep::Layout, os_error: None },
        }
    }

    fn from_map(stream: &str, e: &MapError) -> Self {
        match e {
            MapError::Io(source) => Self::segment(stream, SegmentStep::Map, source),
            MapError::Lock { len, source } => Self::segment(stream, SegmentStep::Lock { len: *len as u64 }, source),
            MapError::Layout(layout) => Self::from_layout(stream, layout),
        }
    }

    /// A system call failed at `step`.
    pub fn segment(stream: &str, step: SegmentStep, e: &std::io::Error) -> Self {
        Self::Segment { stream: stream.into(), step, os_error: e.raw_os_error() }
    }
}

fn os_error_text(os_error: Option<i32>) -> String {
    os_error.map_or_else(String::new, |n| format!(": {}", std::io::Error::from_raw_os_error(n)))
}

/// Counters of the broker's streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StatsReport {
    /// The broker's process id.
    pub broker_pid: u32,
    /// How long the broker has run, nanoseconds.
    pub uptime_ns: u64,
    /// Connected clients.
    pub clients: u32,
    /// Subscribers waiting for a stream that does not exist yet.
    pub waiting_subscribers: u32,
    /// Descriptors the broker has open (each stream holds one per
    /// subscriber index, plus its data file).
    pub descriptors: u64,
    /// The most it may open (its `RLIMIT_NOFILE`, raised at start).
    pub descriptor_limit: u64,
    /// The streams.
    pub streams: Vec<StreamReport>,
}

/// One stream's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// Stream name.
    pub name: String,
    /// Publisher pid, if one is attached.
    pub publisher_pid: Option<u32>,
    /// The name its publisher's client gave in its `Hello`, if one is
    /// connected.
    pub publisher_name: Option<String>,
    /// Slot size in bytes.
    pub slot_size: u32,
    /// Slots in the pool.
    pub slot_count: u32,
    /// Slots no subscriber holds.
    pub free_slots: u32,
    /// Frames published.
    pub published: u64,
    /// Payload bytes published.
    pub bytes: u64,
    /// Frames per second over the last second.
    pub msgs_per_s: f64,
    /// Payload bytes per second over the last second.
    pub bytes_per_s: f64,
    /// Time since the broker last saw its count of frames move (it looks
    /// once a second, and at each stats request), nanoseconds; `None`
    /// before its first frame.
    pub idle_ns: Option<u64>,
    /// The stream is closed.
    pub closed: bool,
    /// Frames it keeps for late joiners (`StreamConfig::history`).
    pub history: u32,
    /// Frames its history holds now.
    pub history_held: u32,
    /// Kept for its history with neither publisher nor subscriber: for
    /// how long so far, nanoseconds.
    pub retained_ns: Option<u64>,
    /// Subscribers.
    pub subscribers: Vec<SubscriberReport>,
}

/// One subscriber's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriberReport {
    /// Subscription id.
    pub subscription: u64,
    /// Its place among the stream's subscribers (reused once it has left;
    /// below the stream's `max_subscribers`).
    pub index: u32,
    /// The stream's count of frames published when it attached: every frame
    /// since is delivered, dropped or queued.
    pub attach_seq: u64,
    /// Subscriber process id.
    pub pid: u32,
    /// The name its client gave in its `Hello`.
    pub client_name: String,
    /// Overflow policy.
    pub policy: OverflowPolicy,
    /// Credits.
    pub credits: u32,
    /// Frames it took.
    pub delivered: u64,
    /// Frames it lost.
    pub dropped: u64,
    /// Of `dropped`, frames evicted from its queue by newer ones (under
    /// keep-latest); the others were published while it had no credit.
    pub evicted: u64,
    /// Frames in its queue.
    pub queued: u64,
    /// Age of its oldest queued frame, nanoseconds.
    pub lag_ns: u64,
    /// Frames per second it took over the last second.
    pub msgs_per_s: f64,
    /// Frames per second it lost over the last second.
    pub dropped_per_s: f64,
    /// Protocol violations seen from it.
    pub faults: u64,
    /// Publish-to-receive latency on a sample of its frames (`None` for a
    /// stream without timestamps). Measured by the subscriber itself, in
    /// its own channel: only its own report can be wrong (by it, or by
    /// the publisher, which stamps the frames and may write channels).
    pub latency: Option<LatencyReport>,
}

/// A subscriber's latency histogram, and what it said over the broker's
/// last one-second look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Over the last second (`None`: no frame measured in it).
    pub last_interval: Option<LatencySummary>,
    /// Since it attached: samples per report bucket (see
    /// [`latency_report_bucket_end_ns`]), as (bucket, count) for the
    /// buckets with samples. Coarser than the histogram the subscriber
    /// keeps (every other doubling), so a report stays small.
    pub buckets: Vec<(u8, u64)>,
    /// The samples' sum, nanoseconds (wrapping).
    pub sum_ns: u64,
}

/// Buckets of a [`LatencyReport`]: up to 128 ns, then one per two
/// doublings up to 2^37 ns (about 137 s), then the rest.
pub const LATENCY_REPORT_BUCKETS: usize = 17;

/// Where report bucket `k` ends (its latencies are at most that, and above
/// the end of bucket `k - 1`), nanoseconds; `u64::MAX` for the last.
pub const fn latency_report_bucket_end_ns(k: usize) -> u64 {
    if k + 1 >= LATENCY_REPORT_BUCKETS { u64::MAX } else { 1 << (7 + 2 * k) }
}

/// A subscriber's histogram (counts per bucket of
/// [`latency_bucket_range`](crate::shm::layout::latency_bucket_range)) in
/// report buckets, with the buckets that have samples only.
pub fn latency_report_buckets(counts: &[u64]) -> Vec<(u8, u64)> {
    use crate::shm::layout::latency_bucket_range;
    let mut coarse = [0u64; LATENCY_REPORT_BUCKETS];
    for (i, &c) in counts.iter().enumerate() {
        let end = latency_bucket_range(i).1;
        // Every bucket ends at or before a report bucket's end.
        let k = (0..LATENCY_REPORT_BUCKETS).find(|&k| end <= latency_report_bucket_end_ns(k)).unwrap_or(0);
        coarse[k] = coarse[k].saturating_add(c);
    }
    coarse.iter().enumerate().filter(|(_, c)| **c > 0).map(|(k, c)| (k as u8, *c)).collect()
}

/// Latency percentiles of the samples between two looks at a histogram,
/// each as the end of its bucket: the true value is at most that, and over
/// 80 % of it (a bucket is a quarter of a doubling wide) — except under
/// 128 ns (the first bucket: 0 to 128 ns) and past 2^38 ns (the last: there
/// the figure is where it starts, a lower bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Frames measured.
    pub samples: u64,
    /// Median, nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile, nanoseconds.
    pub p99_ns: u64,
    /// The largest, nanoseconds.
    pub max_ns: u64,
}

impl LatencySummary {
    /// Of the samples counted in `after` and not yet in `before` (counts
    /// per bucket; a count that went down — a hostile or reset histogram —
    /// counts as none).
    pub fn between(before: &[u64], after: &[u64]) -> Option<Self> {
        use crate::shm::layout::latency_bucket_range;
        let counts: Vec<u64> =
            after.iter().enumerate().map(|(i, a)| a.saturating_sub(before.get(i).copied().unwrap_or(0))).collect();
        let samples = counts.iter().fold(0u64, |sum, c| sum.saturating_add(*c));
        if samples == 0 {
            return None;
        }
        // A bucket's end; the last bucket has none: its start.
        let end = |i: usize| {
            let (start, end) = latency_bucket_range(i);
            if end == u64::MAX { start } else { end }
        };
        let quantile = |q: f64| {
            let rank = ((samples as f64 * q).ceil() as u64).max(1);
            let mut seen = 0u64;
            counts
                .iter()
                .position(|c| {
                    seen = seen.saturating_add(*c);
                    seen >= rank
                })
                .map_or(0, end)
        };
        let max = counts.iter().rposition(|c| *c > 0).map_or(0, end);
        Some(Self { samples, p50_ns: quantile(0.5), p99_ns: quantile(0.99), max_ns: max })
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced length is over the limit.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(u64),
    /// The bytes are not a valid message.
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
    /// A message announces more descriptors than came with it.
    #[error("a message needs {expected} descriptors, {got} came")]
    MissingDescriptors {
        /// Announced.
        expected: usize,
        /// Received and unclaimed.
        got: usize,
    },
    /// Descriptors came that no message claims.
    #[error("{0} descriptors came that no message claims")]
    StrayDescriptors(usize),
}

impl FrameError {
    /// The error to report to the peer.
    pub fn to_control_error(&self) -> ControlError {
        match self {
            FrameError::TooLarge(len) => ControlError::FrameTooLarge { len: *len, max: MAX_FRAME_LEN },
            FrameError::Decode(e) => ControlError::Malformed(Malformation::Undecodable(e.into())),
            FrameError::MissingDescriptors { .. } | FrameError::StrayDescriptors(_) => {
                ControlError::Malformed(Malformation::StrayDescriptors)
            }
        }
    }
}

/// Appends `message` to `out` as one frame.
///
/// # Errors
/// [`FrameError::TooLarge`] if the encoding exceeds [`MAX_FRAME_LEN`]
/// (`out` is then unchanged).
pub fn encode<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let encoded = postcard::to_extend(message, std::mem::take(out));
    *out = encoded?;
    let len = (out.len() - start - 4) as u64;
    if len > u64::from(MAX_FRAME_LEN) {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Whether `name` is acceptable as a stream name.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_STREAM_NAME && name.chars().all(|c| !c.is_control())
}

/// The lock file beside a broker's socket: the broker holds an exclusive
/// `flock` on it for its whole life, so whether a broker is alive there
/// has one answer, and a client starting one (see the client's autostart)
/// starts exactly one.
pub fn broker_lock_path(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    name.into()
}

/// Where a broker started by a client (autostart) writes its log: beside
/// its socket.
pub fn broker_log_path(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".log");
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_reports_fold_the_histogram_into_coarser_buckets() {
        use crate::shm::layout::{LATENCY_BUCKETS, latency_bucket};
        let mut counts = vec![0u64; LATENCY_BUCKETS];
        counts[latency_bucket(100)] = 1; // up to 128 ns: report bucket 0
        counts[latency_bucket(128)] = 2; // (128, 512]: bucket 1
        counts[latency_bucket(511)] = 3;
        counts[latency_bucket(1_000_000)] = 4; // (524 µs, 2.1 ms]: bucket 7
        counts[LATENCY_BUCKETS - 1] = u64::MAX; // the rest: the last
        counts[LATENCY_BUCKETS - 2] = 5;
        assert_eq!(latency_report_buckets(&counts), vec![(0, 1), (1, 5), (7, 4), (16, u64::MAX)]);
        assert_eq!(latency_report_bucket_end_ns(7), 1 << 21);
        assert_eq!(latency_report_bucket_end_ns(16), u64::MAX);
        // 2^38 - 1 ns, in the last fine bucket but one, is past 2^37.
        assert_eq!(latency_report_buckets(&counts[..LATENCY_BUCKETS - 1]).last(), Some(&(16, 5)));
    }

    #[test]
    fn latency_percentiles_are_bucket_ends_of_what_came_between_two_looks() {
        use crate::shm::layout::{LATENCY_BUCKETS, latency_bucket, latency_bucket_range};
        let mut before = vec![0u64; LATENCY_BUCKETS];
        before[latency_bucket(1_000)] = 1_000; // old samples, not counted
        let mut after = before.clone();
        after[latency_bucket(10_000)] += 98;
        after[latency_bucket(5_000_000)] += 1;
        after[latency_bucket(70_000_000)] += 1;
        let s = LatencySummary::between(&before, &after).unwrap();
        assert_eq!(s.samples, 100);
        assert_eq!(s.p50_ns, latency_bucket_range(latency_bucket(10_000)).1);
        assert_eq!(s.p99_ns, latency_bucket_range(latency_bucket(5_000_000)).1);
        assert_eq!(s.max_ns, latency_bucket_range(latency_bucket(70_000_000)).1);
        assert!(s.p50_ns >= 10_000 && s.p50_ns < 12_500, "{s:?}");
        assert_eq!(LatencySummary::between(&after, &after), None);
        // Counts that went down (a hostile subscriber), or overflow: no panic.
        let hostile = vec![u64::MAX; LATENCY_BUCKETS];
        let s = LatencySummary::between(&after, &hostile).unwrap();
        assert_eq!(s.samples, u64::MAX);
        assert_eq!(LatencySummary::between(&hostile, &after), None);
        assert_eq!(LatencySummary::between(&[], &[]), None);
    }
    use crate::shm::WaitStrategy;

    fn roundtrip<T: Serialize + Framed + PartialEq + Clone + std::fmt::Debug>(m: T) {
        let mut buf = Vec::new();
        encode(&m, &mut buf).unwrap();
        encode(&m, &mut buf).unwrap();
        // Byte by byte: a frame is only complete with its last byte.
        let mut reader = FrameReader::<T>::new();
        let mut got = Vec::new();
        for &b in &buf {
            reader.push(&[b]);
            while let Some((x, _)) = reader.next_message().unwrap() {
                got.push(x);
            }
        }
        assert_eq!(got, vec![m.clone(), m]);
    }

    #[test]
    fn messages_roundtrip() {
        roundtrip(ClientMessage {
            id: 7,
            request: Request::Hello { version: PROTOCOL_VERSION, client_name: "cam".into() },
        });
        roundtrip(ClientMessage {
            id: 8,
            request: Request::Subscribe {
                stream: "video".into(),
                options: SubscriberOptions {
                    credits: 3,
                    policy: OverflowPolicy::KeepLatest,
                    wait: WaitStrategy::SpinThenPark { spin_us: 20 },
                    history: u32::MAX,
                },
                wait_for_stream: true,
                credits_up_to: true,
            },
        });
        roundtrip(ClientMessage {
            id: 12,
            request: Request::Watch {
                pattern: "camera/**".into(),
                subscribe: Some(PatternSubscription { options: SubscriberOptions::default(), credits_up_to: true }),
            },
        });
        roundtrip(ServerMessage::Event(Event::Watch {
            watch: 3,
            change: WatchChange::SubscribeFailed {
                stream: "camera/left".into(),
                error: ControlError::InvalidPattern { pattern: "a**".into(), problem: PatternError::TrailingEscape },
            },
        }));
        roundtrip(ClientMessage {
            id: 9,
            request: Request::Publish { stream: "video".into(), config: StreamConfig::new(1 << 20, 8) },
        });
        roundtrip(ServerMessage::Reply {
            id: 9,
            result: Err(ControlError::CreditsRefused {
                stream: "video".into(),
                requested: 9,
                available: 2,
                slot_count: 8,
                committed: 5,
            }),
        });
        roundtrip(ServerMessage::Event(Event::PublisherGone { stream: "video".into() }));
        roundtrip(ClientMessage { id: 10, request: Request::Unpublish { publication: 3 } });
        // Refusals are typed values, their numbers intact.
        for error in [
            ControlError::Segment { stream: "v".into(), step: SegmentStep::Lock { len: 4096 }, os_error: Some(12) },
            ControlError::InvalidConfig(ConfigProblem::TooManySubscribers { asked: 99, max: 63 }),
            ControlError::Malformed(Malformation::Undecodable(DecodeFailure::BadVarint)),
            ControlError::NoSuchPublication(3),
        ] {
            roundtrip(ServerMessage::Reply { id: 11, result: Err(error) });
        }
    }

    #[test]
    fn segment_errors_name_the_step_and_the_system_s_reason() {
        let e = ControlError::from_create(
            "cam",
            &CreateError::Io { name: "cam".into(), source: std::io::Error::from_raw_os_error(24) },
        );
        assert_eq!(e, ControlError::Segment { stream: "cam".into(), step: SegmentStep::Create, os_error: Some(24) });
        let text = e.to_string();
        assert!(text.contains("creating shared memory") && text.contains("Too many open files"), "{text}");
        let e = ControlError::from_layout("cam", &LayoutError::NotPowerOfTwo(3));
        assert_eq!(e, ControlError::InvalidConfig(ConfigProblem::NotPowerOfTwo(3)));
        let e = ControlError::from_layout("cam", &LayoutError::BadMagic("data"));
        assert!(matches!(e, ControlError::Segment { step: SegmentStep::Layout, os_error: None, .. }));
    }

    #[test]
    fn fd_counts_follow_the_reply() {
        let published = ServerMessage::Reply {
            id: 1,
            result: Ok(Reply::Published {
                publication: 1,
                stream: "s".into(),
                channels: (0..32).map(|index| ChannelGrant { index, generation: 1 }).collect(),
                takeover: false,
            }),
        };
        assert_eq!(published.fd_count(), 33);
        let err = ServerMessage::Reply { id: 1, result: Err(ControlError::ShuttingDown) };
        assert_eq!(err.fd_count(), 0);
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let read = |bytes: &[u8]| {
            let mut reader = FrameReader::<ClientMessage>::new();
            reader.push(bytes);
            reader.next_message().map(|m| m.map(|(m, _)| m))
        };
        assert!(matches!(read(&(MAX_FRAME_LEN + 1).to_le_bytes()), Err(FrameError::TooLarge(_))));
        let err = read(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err.to_control_error(), ControlError::Malformed(_)), "{err}");
        assert!(read(&[1, 0]).unwrap().is_none(), "a partial prefix waits for more");
    }

    #[test]
    fn stream_names() {
        assert!(valid_stream_name("camera/front"));
        assert!(!valid_stream_name(""));
        assert!(!valid_stream_name("a\nb"));
        assert!(!valid_stream_name(&"x".repeat(256)));
    }
}
