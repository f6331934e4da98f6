//! The control connection to the broker: one Unix socket, a reader thread
//! that routes replies to their requests and keeps events, and the lease
//! that lasts as long as the connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use memsock_proto::control::{
    ClientMessage, ControlError, DecodeFailure, Event, FrameError, FrameReader, FrameWriter, PROTOCOL_VERSION, Reply,
    Request, ServerMessage, WatchChange,
};
use memsock_proto::{platform, shm};

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No broker listens on the socket.
    #[error("cannot reach the memsock broker at {path}: {source} (is `memsock broker` running?)")]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The socket exists but this user may not connect to it.
    #[error(
        "permission denied on the memsock broker's socket {path}: it admits only its own user and, if started with `--group G`, members of G"
    )]
    PermissionDenied {
        /// The socket path tried.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The connection failed or the broker closed it.
    #[error("the connection to the broker is gone: {0}")]
    Disconnected(Disconnect),
    /// The broker refused the request.
    #[error(transparent)]
    Refused(#[from] ControlError),
    /// The broker sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(ProtocolViolation),
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The stream's shared memory, as handed out, could not be opened as
    /// a publisher.
    #[error("cannot open the stream's shared memory: {0}")]
    OpenPublisher(#[source] shm::OpenPublisherError),
    /// The stream's shared memory, as handed out, could not be opened as
    /// a subscriber.
    #[error("cannot open the stream's shared memory: {0}")]
    OpenSubscriber(#[source] shm::OpenSubscriberError),
    /// No broker answered at the default socket, and starting one (see
    /// [`Client::connect`](crate::Client::connect)) failed.
    #[error("no memsock broker answers at {path}, and starting one failed: {reason} (tried: {tried})")]
    Autostart {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
        /// The binaries looked for, in order.
        tried: String,
    },
    /// This connection was made before a fork: in the forked child it is
    /// the parent's lease, which the child must not use.
    #[error(
        "this memsock connection was made in process {parent} before it forked: a forked child makes its own connection"
    )]
    Forked {
        /// The process that connected.
        parent: u32,
    },
    /// The blocking task running an async request panicked or was
    /// cancelled.
    #[error("the task running the request {}", if *panicked { "panicked" } else { "was cancelled" })]
    TaskFailed {
        /// It panicked (else it was cancelled).
        panicked: bool,
    },
}

/// How the connection to the broker ended ([`ClientError::Disconnected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Disconnect {
    /// The broker closed the connection (it dropped this client, or went
    /// away without a word).
    #[error("the broker closed the connection")]
    Closed,
    /// The broker announced that it was shutting down, then closed.
    #[error("the broker shut down")]
    BrokerShutdown,
    /// Reading from or writing to the socket failed.
    #[error("{}", io_text(*kind, *os_error))]
    Io {
        /// The kind of error.
        kind: io::ErrorKind,
        /// The system's error number, if there was one.
        os_error: Option<i32>,
    },
    /// The broker broke the protocol, so this client hung up.
    #[error("{0}")]
    Protocol(ProtocolViolation),
}

impl Disconnect {
    fn io(e: &io::Error) -> Self {
        Self::Io { kind: e.kind(), os_error: e.raw_os_error() }
    }
}

fn io_text(kind: io::ErrorKind, os_error: Option<i32>) -> String {
    os_error.map_or_else(|| io::Error::from(kind).to_string(), |n| io::Error::from_raw_os_error(n).to_string())
}

/// What the broker sent that this client cannot accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// A reply of another kind than the request calls for.
    #[error("expected a {expected} reply, got another")]
    UnexpectedReply {
        /// The reply the request calls for.
        expected: &'static str,
    },
    /// A reply with another number of descriptors than it announces.
    #[error("a reply needs {expected} descriptors, {got} came")]
    Descriptors {
        /// Announced.
        expected: usize,
        /// Received.
        got: usize,
    },
    /// A frame over the protocol's limit.
    #[error("a frame of {len} bytes, over the limit")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
    },
    /// Bytes that are not a message.
    #[error("an undecodable message ({0})")]
    Undecodable(DecodeFailure),
}

impl From<&FrameError> for ProtocolViolation {
    fn from(e: &FrameError) -> Self {
        match e {
            FrameError::TooLarge(len) => Self::FrameTooLarge { len: *len },
            FrameError::Decode(e) => Self::Undecodable(e.into()),
            FrameError::MissingDescriptors { expected, got } => Self::Descriptors { expected: *expected, got: *got },
            FrameError::StrayDescriptors(got) => Self::Descriptors { expected: 0, got: *got },
            _ => Self::Undecodable(DecodeFailure::BadEncoding),
        }
    }
}

type Delivery = (ServerMessage, Vec<OwnedFd>);

/// State the reader thread shares with the requesters.
/// Where the channel files of subscribers joining one of our
/// publications go ([`Event::Channel`]).
#[derive(Debug)]
enum Channels {
    /// The Published reply came, the publisher is not open yet: kept for
    /// its open.
    Waiting(Vec<(u32, u64, OwnedFd)>),
    /// Open: handed straight to it.
    Open(shm::ChannelInbox),
}

/// The news of one watch, as the reader thread queues it for the
/// [`Watch`](crate::Watch) handle: unbounded, since a subscriber announced
/// there holds a grant at the broker until it is opened or given back.
#[derive(Debug, Default)]
pub(crate) struct WatchQueue {
    items: Mutex<WatchItems>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct WatchItems {
    queue: VecDeque<(WatchChange, Vec<OwnedFd>)>,
    /// No more will come (the connection ended).
    ended: bool,
}

impl WatchQueue {
    fn push(&self, item: (WatchChange, Vec<OwnedFd>)) {
        lock(&self.items).queue.push_back(item);
        self.ready.notify_all();
    }

    fn end(&self) {
        lock(&self.items).ended = true;
        self.ready.notify_all();
    }

    /// The next item, waiting at most `timeout` (`None`: not at all).
    /// `Err(())` once the connection ended and the queue is empty.
    pub(crate) fn pop(&self, timeout: Option<Duration>) -> Result<Option<(WatchChange, Vec<OwnedFd>)>, ()> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut items = lock(&self.items);
        loop {
            if let Some(item) = items.queue.pop_front() {
                return Ok(Some(item));
            }
            if items.ended {
                return Err(());
            }
            let Some(left) = deadline.and_then(|d| d.checked_duration_since(std::time::Instant::now())) else {
                return Ok(None);
            };
            items = self.ready.wait_timeout(items, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Everything queued.
    pub(crate) fn drain(&self) -> Vec<(WatchChange, Vec<OwnedFd>)> {
        lock(&self.items).queue.drain(..).collect()
    }
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<u64, SyncSender<Delivery>>>,
    /// Our watches, by id.
    watches: Mutex<HashMap<u64, Arc<WatchQueue>>>,
    /// Our publications, by token.
    publications: Mutex<HashMap<u64, Channels>>,
    /// Serialises writers (requesters, and the reader undoing late replies).
    write_lock: Mutex<()>,
    events: Mutex<VecDeque<Event>>,
    closed: AtomicBool,
    /// The broker sent `BrokerShutdown` (read by the reader thread only).
    shutdown_announced: AtomicBool,
    /// This side hung up (the connection was dropped): its end is no news.
    hung_up: AtomicBool,
    close_reason: Mutex<Option<Disconnect>>,
}

/// One connection to the broker. Dropping it ends the lease: the broker
/// reclaims everything opened through it.
#[derive(Debug)]
pub(crate) struct Conn {
    /// Dropped by `Drop`, except in a forked child (whose copy of the
    /// descriptor was closed as it started).
    socket: ManuallyDrop<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: Option<JoinHandle<()>>,
    pub(crate) broker_pid: u32,
    timeout: Duration,
    /// The process that connected, and when: in a child forked since, the
    /// lease is the parent's.
    pid: u32,
    forks: platform::ForkStamp,
}

impl Conn {
    /// Connects and performs the handshake.
    pub(crate) fn connect(path: &Path, client_name: &str, timeout: Duration) -> Result<Self, ClientError> {
        let connect_err = |source: io::Error| match source.kind() {
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: path.to_owned(), source },
            _ => ClientError::Connect { path: path.to_owned(), source },
        };
        let socket = connect_socket(path).map_err(connect_err)?;
        let shared = Arc::new(Shared::default());
        let reader_socket = socket.try_clone().map_err(connect_err)?;
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("memsock-control".into())
            .spawn(move || read_loop(reader_socket, &reader_shared))
            .map_err(connect_err)?;
        let (pid, forks) = (std::process::id(), platform::ForkStamp::now());
        // A child forked from now on closes its copy of the socket as it
        // starts (`Drop` undoes this before closing it; the reader thread
        // does the same for its own copy).
        platform::close_in_forked_child(socket.as_fd());
        let mut conn = Self {
            socket: ManuallyDrop::new(socket),
            shared,
            next_id: AtomicU64::new(1),
            reader: Some(reader),
            broker_pid: 0,
            timeout,
            pid,
            forks,
        };
        let hello = Request::Hello { version: PROTOCOL_VERSION, client_name: client_name.to_owned() };
        match conn.request(hello)? {
            (Reply::Welcome { broker_pid, .. }, _) => conn.broker_pid = broker_pid,
            _ => return Err(ClientError::Protocol(ProtocolViolation::UnexpectedReply { expected: "Welcome" })),
        }
        Ok(conn)
    }

    /// Sends `request` and waits for its reply and descriptors.
    pub(crate) fn request(&self, request: Request) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
        self.request_within(request, Some(self.timeout))
    }

    /// Like [`request`](Self::request), waiting at most `timeout` (for ever if `None`).
    pub(crate) fn request_within(
        &self,
        request: Request,
        timeout: Option<Duration>,
    ) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
        self.check_fork()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        lock(&self.shared.pending).insert(id, tx);
        if self.is_closed() {
            // The reader may have cleared the table before we inserted.
            lock(&self.shared.pending).remove(&id);
            return Err(self.disconnected());
        }
        if let Err(e) = self.send(&ClientMessage { id, request }) {
            lock(&self.shared.pending).remove(&id);
            return Err(e);
        }
        match collect_reply(&self.shared, id, &rx, timeout) {
            Ok((ServerMessage::Reply { result, .. }, fds)) => Ok((result?, fds)),
            Ok(_) => Err(ClientError::Protocol(ProtocolViolation::UnexpectedReply { expected: "request's" })),
            Err(WaitError::Timeout) => Err(ClientError::Timeout(timeout.unwrap_or_default())),
            Err(WaitError::Gone) => Err(self.disconnected()),
        }
    }

    /// Sends `request` without waiting for the reply (used while
    /// dropping handles, where nothing could be done with an error).
    pub(crate) fn notify(&self, request: Request) {
        if self.forked() {
            return; // the parent's lease: nothing to tell from here
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.send(&ClientMessage { id, request }) {
            tracing::debug!("could not tell the broker: {e}");
        }
    }

    /// Whether this is a copy in a child forked since it connected.
    pub(crate) fn forked(&self) -> bool {
        self.forks.forked()
    }

    /// [`ClientError::Forked`] in a child forked since it connected.
    pub(crate) fn check_fork(&self) -> Result<(), ClientError> {
        if self.forked() { Err(ClientError::Forked { parent: self.pid }) } else { Ok(()) }
    }

    fn send(&self, message: &ClientMessage) -> Result<(), ClientError> {
        send_on(&self.socket, &self.shared, message)
    }

    fn disconnected(&self) -> ClientError {
        let reason = *lock(&self.shared.close_reason);
        ClientError::Disconnected(reason.unwrap_or(Disconnect::Closed))
    }

    /// The next event the broker sent, if any.
    /// Opens the publisher of publication `publication` with the channels
    /// its reply brought and those that came since, and routes later ones
    /// to it. Holds the table meanwhile, so no channel slips between.
    pub(crate) fn open_publisher(
        &self,
        publication: u64,
        data: &OwnedFd,
        channels: Vec<(u32, u64, OwnedFd)>,
    ) -> Result<shm::Publisher, shm::OpenPublisherError> {
        let mut publications = lock(&self.shared.publications);
        let mut channels = channels;
        if let Some(Channels::Waiting(later)) = publications.remove(&publication) {
            channels.extend(later);
        }
        let borrowed: Vec<_> = channels.iter().map(|(i, g, fd)| (*i, *g, fd.as_fd())).collect();
        let publisher = shm::Publisher::open(data.as_fd(), &borrowed)?;
        publications.insert(publication, Channels::Open(publisher.channel_inbox().clone()));
        Ok(publisher)
    }

    /// Publication `publication` has ended: its channels go nowhere.
    pub(crate) fn forget_publication(&self, publication: u64) {
        if self.forked() {
            return; // the table may be locked by a thread the fork left behind
        }
        lock(&self.shared.publications).remove(&publication);
    }

    pub(crate) fn try_event(&self) -> Option<Event> {
        if self.forked() {
            return None;
        }
        lock(&self.shared.events).pop_front()
    }

    /// The queue of watch `watch` (the reader made it as the reply came).
    pub(crate) fn watch_queue(&self, watch: u64) -> Option<Arc<WatchQueue>> {
        lock(&self.shared.watches).get(&watch).cloned()
    }

    /// Watch `watch` has ended here: later news of it is undone.
    pub(crate) fn forget_watch(&self, watch: u64) {
        if self.forked() {
            return;
        }
        lock(&self.shared.watches).remove(&watch);
    }

    /// Whether the broker closed the connection.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Why the connection to the broker ended, once it has.
    pub(crate) fn broker_gone(&self) -> Option<Disconnect> {
        if self.forked() || !self.is_closed() {
            return None;
        }
        Some(lock(&self.shared.close_reason).unwrap_or(Disconnect::Closed))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.forked() {
            // The parent's connection: shutting the socket down would end
            // its lease, and its reader thread does not exist here (joining
            // it would panic). The child closed its copies of the
            // descriptors as it started, and their numbers may be in use
            // again: forget them (a copy that could not be registered
            // stays open until the child exits).
            std::mem::forget(self.reader.take());
            return;
        }
        platform::keep_in_forked_child(self.socket.as_fd());
        self.shared.hung_up.store(true, Ordering::Relaxed);
        // Ends the lease; the reader sees end-of-file and stops.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        // SAFETY: dropped once, here, and not used again.
        unsafe { ManuallyDrop::drop(&mut self.socket) };
    }
}

fn send_on(socket: &UnixStream, shared: &Shared, message: &ClientMessage) -> Result<(), ClientError> {
    let mut writer = FrameWriter::new();
    writer.start(message, Vec::new()).map_err(|e| ClientError::Protocol((&e).into()))?;
    let _guard = lock(&shared.write_lock);
    writer.write_to(socket.as_fd()).map_err(|e| ClientError::Disconnected(Disconnect::io(&e)))
}

fn connect_socket(path: &Path) -> io::Result<UnixStream> {
    use interprocess::local_socket::traits::Stream as _;
    use interprocess::local_socket::{GenericFilePath, ToFsName};
    let name = path.to_fs_name::<GenericFilePath>()?;
    let interprocess::local_socket::Stream::UdSocket(stream) = interprocess::local_socket::Stream::connect(name)?;
    // Descriptors travel with replies: `recvmsg` on the Unix socket itself.
    stream.inner().try_clone()
}

enum WaitError {
    Timeout,
    Gone,
}

/// Waits for the reply to request `id` and withdraws the request.
fn collect_reply(
    shared: &Shared,
    id: u64,
    rx: &Receiver<Delivery>,
    timeout: Option<Duration>,
) -> Result<Delivery, WaitError> {
    let got = wait_reply(rx, timeout);
    if lock(&shared.pending).remove(&id).is_none() && matches!(got, Err(WaitError::Timeout)) {
        // The reader took the entry just as we gave up: its reply is on its
        // way (or the connection ended). Take it rather than lose it — a
        // lost Subscribed or Published would hold its grant at the broker
        // for the whole lease.
        return rx.recv().map_err(|_| WaitError::Gone);
    }
    got
}

fn wait_reply(rx: &Receiver<Delivery>, timeout: Option<Duration>) -> Result<Delivery, WaitError> {
    match timeout {
        Some(t) => rx.recv_timeout(t).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => WaitError::Timeout,
            std::sync::mpsc::RecvTimeoutError::Disconnected => WaitError::Gone,
        }),
        None => rx.recv().map_err(|_| WaitError::Gone),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn undo_late_reply(socket: &UnixStream, shared: &Shared, message: &ServerMessage) {
    let request = match message {
        ServerMessage::Reply { result: Ok(Reply::Subscribed(grant)), .. } => {
            Request::Unsubscribe { subscription: grant.subscription }
        }
        ServerMessage::Reply { result: Ok(Reply::Published { publication, .. }), .. } => {
            Request::Unpublish { publication: *publication }
        }
        ServerMessage::Reply { result: Ok(Reply::Watching { watch, .. }), .. } => {
            lock(&shared.watches).remove(watch);
            Request::Unwatch { watch: *watch }
        }
        ServerMessage::Event(Event::Watch { change: WatchChange::Subscribed { grant, .. }, .. }) => {
            Request::Unsubscribe { subscription: grant.subscription }
        }
        _ => return,
    };
    tracing::debug!(?request, "undoing a reply that came too late");
    let _ = send_on(socket, shared, &ClientMessage { id: 0, request });
}

/// Reads frames until the connection ends, routing replies and events.
/// A subscriber joins one of our publications: hands its channel to the
/// publisher (or keeps it for the publisher's open), then tells the broker,
/// which attaches the subscriber only then.
fn take_channel(
    socket: &UnixStream,
    shared: &Shared,
    publication: u64,
    index: u32,
    generation: u64,
    mut fds: Vec<OwnedFd>,
) {
    let Some(fd) = fds.pop() else { return };
    let taken = match lock(&shared.publications).get_mut(&publication) {
        Some(Channels::Waiting(later)) => {
            // Only the newest of an index can be attached: one per index.
            later.retain(|(i, _, _)| *i != index);
            later.push((index, generation, fd));
            true
        }
        Some(Channels::Open(inbox)) => match inbox.deliver(index, generation, fd.as_fd()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(publication, index, "cannot map a new subscriber's channel: {e}");
                false
            }
        },
        // Ended meanwhile: the broker attaches it when it learns so.
        None => false,
    };
    if taken {
        let request = Request::ChannelTaken { publication, index, generation };
        if let Err(e) = send_on(socket, shared, &ClientMessage { id: 0, request }) {
            tracing::debug!("could not tell the broker: {e}");
        }
    }
}

fn read_loop(socket: UnixStream, shared: &Shared) {
    /// Undoes the registration before the copy closes, even on a panic.
    struct Registered(UnixStream);
    impl Drop for Registered {
        fn drop(&mut self) {
            platform::keep_in_forked_child(self.0.as_fd());
        }
    }
    // A child forked from now on closes this copy as it starts (it would
    // keep the lease alive while the child lives).
    platform::close_in_forked_child(socket.as_fd());
    let socket = Registered(socket);
    read_loop_on(&socket.0, shared);
}

fn read_loop_on(socket: &UnixStream, shared: &Shared) {
    let reason = match read_frames(socket, shared) {
        Ok(()) if shared.shutdown_announced.load(Ordering::Relaxed) => Disconnect::BrokerShutdown,
        Ok(()) => Disconnect::Closed,
        Err(e) => e,
    };
    if shared.hung_up.load(Ordering::Relaxed) {
        tracing::debug!("control connection ended: {reason}");
    } else {
        tracing::warn!(
            "the memsock broker is gone ({reason}): the streams open here keep flowing, but nothing new can be \
             published or subscribed through this connection, and a new broker knows none of them"
        );
    }
    *lock(&shared.close_reason) = Some(reason);
    shared.closed.store(true, Ordering::Release);
    // Nothing more will be read: make requests fail instead of waiting.
    let _ = socket.shutdown(std::net::Shutdown::Both);
    // Requesters waiting for a reply see their channel close.
    lock(&shared.pending).clear();
    for queue in lock(&shared.watches).values() {
        queue.end();
    }
}

fn read_frames(socket: &UnixStream, shared: &Shared) -> Result<(), Disconnect> {
    let mut reader = FrameReader::<ServerMessage>::new();
    loop {
        match reader.fill_from(socket.as_fd()) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Disconnect::io(&e)),
        }
        while let Some((message, mine)) = reader.next_message().map_err(|e| Disconnect::Protocol((&e).into()))? {
            match message {
                ServerMessage::Reply { id, .. } => {
                    let waiting = lock(&shared.pending).remove(&id);
                    match waiting {
                        Some(tx) => {
                            if let ServerMessage::Reply { result: Ok(Reply::Published { publication, .. }), .. } =
                                &message
                            {
                                // Channels for it may follow before it opens.
                                lock(&shared.publications).insert(*publication, Channels::Waiting(Vec::new()));
                            }
                            if let ServerMessage::Reply { result: Ok(Reply::Watching { watch, .. }), .. } = &message {
                                // Its news follows at once.
                                lock(&shared.watches).insert(*watch, Arc::default());
                            }
                            if let Err(e) = tx.try_send((message, mine)) {
                                // It gave up just now: as if nobody waited.
                                let (std::sync::mpsc::TrySendError::Full((message, _))
                                | std::sync::mpsc::TrySendError::Disconnected((message, _))) = e;
                                if let ServerMessage::Reply {
                                    result: Ok(Reply::Published { publication, .. }), ..
                                } = &message
                                {
                                    lock(&shared.publications).remove(publication);
                                }
                                undo_late_reply(socket, shared, &message);
                            }
                        }
                        // Nobody waits any more (timed out): undo what the
                        // broker granted, or it would hold it for our lease.
                        None => undo_late_reply(socket, shared, &message),
                    }
                }
                ServerMessage::Event(Event::Channel { publication, index, generation }) => {
                    take_channel(socket, shared, publication, index, generation, mine);
                }
                ServerMessage::Event(Event::Serve { publication }) => {
                    // A joiner of a stream with history: hand it the
                    // history on the publisher's behalf (it may be idle).
                    let inbox = match lock(&shared.publications).get(&publication) {
                        Some(Channels::Open(inbox)) => Some(inbox.clone()),
                        _ => None,
                    };
                    if let Some(inbox) = inbox {
                        inbox.serve();
                    }
                }
                ServerMessage::Event(Event::Watch { watch, change }) => {
                    // Queued under the table's lock: once `forget_watch`
                    // has removed the watch, nothing more reaches its queue
                    // (the handle drains it after), and its news is undone.
                    let watches = lock(&shared.watches);
                    match watches.get(&watch) {
                        Some(queue) => queue.push((change, mine)),
                        None => {
                            drop(watches);
                            // Ended here: a subscriber it brought goes back.
                            let message = ServerMessage::Event(Event::Watch { watch, change });
                            undo_late_reply(socket, shared, &message);
                        }
                    }
                }
                ServerMessage::Event(event) => {
                    tracing::debug!(?event, "broker event");
                    if event == Event::BrokerShutdown {
                        shared.shutdown_announced.store(true, Ordering::Relaxed);
                    }
                    let mut events = lock(&shared.events);
                    // Bounded: a client that never looks keeps the newest.
                    if events.len() >= 1024 {
                        events.pop_front();
                    }
                    events.push_back(event);
                }
                other => tracing::debug!(?other, "unknown message from the broker"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: a reply the reader had taken off the table just as
    /// the request timed out was lost (and with it a grant the broker then
    /// held for the lease). It is taken, however late it comes.
    #[test]
    fn a_reply_taken_by_the_reader_as_the_request_times_out_is_not_lost() {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = sync_channel(1);
        lock(&shared.pending).insert(7, tx);
        // The reader's two steps, with the request's timeout between them.
        let tx = lock(&shared.pending).remove(&7).expect("waiting");
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = tx.try_send((ServerMessage::Reply { id: 7, result: Ok(Reply::Done) }, Vec::new()));
        });
        let got = collect_reply(&shared, 7, &rx, Some(Duration::from_millis(1)));
        reader.join().unwrap();
        assert!(matches!(got, Ok((ServerMessage::Reply { id: 7, result: Ok(Reply::Done) }, _))));
    }
}
