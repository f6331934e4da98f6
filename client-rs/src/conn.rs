//! The control connection to the broker: one Unix socket, a reader thread
//! that routes replies to their requests and keeps events, and the lease
//! that lasts as long as the connection.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use memsock_proto::control::{
    self, ClientMessage, ControlError, Event, FrameError, PROTOCOL_VERSION, Reply, Request, ServerMessage,
};
use memsock_proto::platform;

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
    Disconnected(String),
    /// The broker refused the request.
    #[error(transparent)]
    Refused(#[from] ControlError),
    /// The broker sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The handed-out segment could not be opened.
    #[error("cannot open the stream's shared memory: {0}")]
    Open(String),
}

type Delivery = (ServerMessage, Vec<OwnedFd>);

/// State the reader thread shares with the requesters.
#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<u64, SyncSender<Delivery>>>,
    /// Serialises writers (requesters, and the reader undoing late replies).
    write_lock: Mutex<()>,
    events: Mutex<VecDeque<Event>>,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
}

/// One connection to the broker. Dropping it ends the lease: the broker
/// reclaims everything opened through it.
#[derive(Debug)]
pub(crate) struct Conn {
    socket: UnixStream,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: Option<JoinHandle<()>>,
    pub(crate) broker_pid: u32,
    timeout: Duration,
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
        let mut conn =
            Self { socket, shared, next_id: AtomicU64::new(1), reader: Some(reader), broker_pid: 0, timeout };
        let hello = Request::Hello { version: PROTOCOL_VERSION, client_name: client_name.to_owned() };
        match conn.request(hello)? {
            (Reply::Welcome { broker_pid, .. }, _) => conn.broker_pid = broker_pid,
            (other, _) => return Err(ClientError::Protocol(format!("expected Welcome, got {other:?}"))),
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
        let got = wait_reply(&rx, timeout);
        lock(&self.shared.pending).remove(&id);
        match got {
            Ok((ServerMessage::Reply { result, .. }, fds)) => Ok((result?, fds)),
            Ok((other, _)) => Err(ClientError::Protocol(format!("expected a reply, got {other:?}"))),
            Err(WaitError::Timeout) => Err(ClientError::Timeout(timeout.unwrap_or_default())),
            Err(WaitError::Gone) => Err(self.disconnected()),
        }
    }

    /// Sends `request` without waiting for the reply (used while
    /// dropping handles, where nothing could be done with an error).
    pub(crate) fn notify(&self, request: Request) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.send(&ClientMessage { id, request }) {
            tracing::debug!("could not tell the broker: {e}");
        }
    }

    fn send(&self, message: &ClientMessage) -> Result<(), ClientError> {
        send_on(&self.socket, &self.shared, message)
    }

    fn disconnected(&self) -> ClientError {
        let reason = lock(&self.shared.close_reason).clone();
        ClientError::Disconnected(reason.unwrap_or_else(|| "closed by the broker".into()))
    }

    /// The next event the broker sent, if any.
    pub(crate) fn try_event(&self) -> Option<Event> {
        lock(&self.shared.events).pop_front()
    }

    /// Whether the broker closed the connection.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Ends the lease; the reader sees end-of-file and stops.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn send_on(socket: &UnixStream, shared: &Shared, message: &ClientMessage) -> Result<(), ClientError> {
    let mut frame = Vec::new();
    control::encode(message, &mut frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let _guard = lock(&shared.write_lock);
    (&*socket).write_all(&frame).map_err(|e| ClientError::Disconnected(e.to_string()))
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
        ServerMessage::Reply { result: Ok(Reply::Subscribed { subscription, .. }), .. } => {
            Request::Unsubscribe { subscription: *subscription }
        }
        ServerMessage::Reply { result: Ok(Reply::Published { stream, .. }), .. } => {
            Request::Unpublish { stream: stream.clone() }
        }
        _ => return,
    };
    tracing::debug!(?request, "undoing a reply that came too late");
    let _ = send_on(socket, shared, &ClientMessage { id: 0, request });
}

/// Reads frames until the connection ends, routing replies and events.
fn read_loop(socket: UnixStream, shared: &Shared) {
    let reason = match read_frames(&socket, shared) {
        Ok(()) => "the broker closed the connection".to_owned(),
        Err(e) => e,
    };
    tracing::debug!("control connection ended: {reason}");
    *lock(&shared.close_reason) = Some(reason);
    shared.closed.store(true, Ordering::Release);
    // Nothing more will be read: make requests fail instead of waiting.
    let _ = socket.shutdown(std::net::Shutdown::Both);
    // Requesters waiting for a reply see their channel close.
    lock(&shared.pending).clear();
}

fn read_frames(socket: &UnixStream, shared: &Shared) -> Result<(), String> {
    let mut buf = Vec::with_capacity(4096);
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut received = Vec::new();
        let n = match platform::recv_with_fds(socket.as_fd(), &mut chunk, &mut received) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        fds.extend(received);
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let message: ServerMessage = match control::decode(&mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(FrameError::TooLarge(len)) => return Err(format!("the broker sent a frame of {len} bytes")),
                Err(e) => return Err(e.to_string()),
            };
            let want = message.fd_count();
            if fds.len() < want {
                return Err(format!("a reply needs {want} descriptors, {} came", fds.len()));
            }
            let mine: Vec<OwnedFd> = fds.drain(..want).collect();
            match message {
                ServerMessage::Reply { id, .. } => {
                    let waiting = lock(&shared.pending).remove(&id);
                    match waiting {
                        Some(tx) => {
                            let _ = tx.try_send((message, mine));
                        }
                        // Nobody waits any more (timed out): undo what the
                        // broker granted, or it would hold it for our lease.
                        None => undo_late_reply(socket, shared, &message),
                    }
                }
                ServerMessage::Event(event) => {
                    tracing::debug!(?event, "broker event");
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
