//! The broker daemon: the control socket, one task per client connection,
//! leases, and shutdown. Frame bytes never pass through here.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use memsock_proto::control::{
    ClientMessage, ControlError, Event, FrameError, FrameReader, FrameWriter, Malformation, PROTOCOL_VERSION, Reply,
    Request, ServerMessage,
};
use memsock_proto::platform::{self, ProcessHandle};
use memsock_proto::shm::CreateError;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{Notify, mpsc};

use crate::limits::Limits;
use crate::registry::{BrokerIdent, ConnId, Outgoing, PublishStep, Registry};

/// Messages queued for one client before it counts as stuck and is dropped.
const QUEUE_PER_CLIENT: usize = 1024;
/// How long after a close an idle publisher is declared gone (a send in
/// progress takes microseconds), and how often the broker looks.
const CLOSE_GRACE: Duration = Duration::from_millis(100);
/// How long a new connection may take to say Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections past the cap that are still let in to hear a refusal at
/// their Hello (each holds a socket for at most [`HANDSHAKE_TIMEOUT`]);
/// past those, a connection is closed as it is accepted, so a flood of
/// connections that never say Hello cannot take the broker's descriptors.
const UNGREETED_SLACK: u64 = 64;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A live broker listens on the socket already.
    #[error("a memsock broker is already running on {0}")]
    AlreadyRunning(PathBuf),
    /// Another broker put its socket in place while this one set up.
    #[error("another broker started on {0} meanwhile")]
    StartedMeanwhile(PathBuf),
    /// Something that is not a socket has the socket's path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The socket's directory is writable by others, who could swap the
    /// socket under us.
    #[error("{0} is writable by others; choose another socket directory")]
    UnsafeDirectory(PathBuf),
    /// The socket's directory belongs to another user.
    #[error("{path} belongs to uid {uid}, not to us")]
    ForeignDirectory {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// `--group` names no group.
    #[error("no group named {0:?}")]
    NoSuchGroup(String),
    /// A file operation on the way failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("listen on", "create", ...).
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] io::Error),
}

/// A [`ServeError::Io`] maker for `map_err`.
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ServeError {
    let path = path.to_owned();
    move |source| ServeError::Io { action, path, source }
}

/// How the broker is set up.
#[derive(Debug)]
pub struct Options {
    /// The control socket's path.
    pub socket: PathBuf,
    /// Admit this group's members too (socket mode 0660 instead of 0600).
    pub group: Option<String>,
    /// What clients may hold (see [`crate::limits`]).
    pub limits: Limits,
    /// Exit after this long without a client (None: run until signalled).
    pub idle_exit: Option<Duration>,
    /// The lock file beside the socket, opened and locked already by the
    /// client that started this broker (see
    /// [`broker_lock_path`](memsock_proto::control::broker_lock_path));
    /// `None`: the broker takes it itself.
    pub inherited_lock: Option<OwnedFd>,
    /// Started by a client (autostart): said in the log.
    pub autostarted_by: Option<u32>,
}

impl Options {
    /// A broker on `socket` with the default limits, run until signalled.
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            group: None,
            limits: Limits::default(),
            idle_exit: None,
            inherited_lock: None,
            autostarted_by: None,
        }
    }
}

#[derive(Debug)]
struct ConnHandle {
    tx: mpsc::Sender<Outgoing>,
    kill: Arc<Notify>,
    /// Descriptors queued for it and not written yet.
    queued_fds: Arc<AtomicUsize>,
}

/// Most descriptors queued for one connection: a client that asks for
/// more without reading its replies (say, a Publish of a stream with many
/// subscribers, over and over) is dropped, as one whose queue is full,
/// rather than allowed to fill the broker's descriptor table with them.
/// (A reply carries at most `MAX_FDS_PER_MESSAGE`.)
const MAX_QUEUED_FDS: usize = 2048;

#[derive(Debug)]
struct Broker {
    registry: Mutex<Registry>,
    conns: Mutex<HashMap<ConnId, ConnHandle>>,
    next_conn: AtomicU64,
    pid: u32,
    started: std::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Broker {
    /// Queues messages for their connections. A client whose queue is full
    /// is not reading: it is dropped (its lease ends) rather than allowed
    /// to make the broker buffer without bound.
    ///
    /// An event for a full queue is dropped instead (the data plane tells
    /// subscribers about publishers too), so that nobody can get another
    /// client dropped by provoking events.
    ///
    /// Called with the registry locked, so messages leave in the order of
    /// the changes they report.
    fn route(&self, out: Vec<Outgoing>) {
        let conns = lock(&self.conns);
        for o in out {
            if let ServerMessage::Reply { id, result: Err(e) } = &o.message {
                // Every refusal, with its reason, for whoever runs the broker.
                tracing::info!(conn = o.conn, request = id, reason = %e, "refused");
            }
            let Some(handle) = conns.get(&o.conn) else { continue };
            let (conn, is_event) = (o.conn, matches!(o.message, ServerMessage::Event(_)));
            let fds = o.fds.len();
            if fds > 0 && handle.queued_fds.fetch_add(fds, Ordering::Relaxed) + fds > MAX_QUEUED_FDS {
                tracing::warn!(conn, "client does not read the descriptors sent to it: dropping it");
                handle.kill.notify_one();
                continue;
            }
            match handle.tx.try_send(o) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) if is_event => {
                    tracing::warn!(conn, "client does not read its messages: event dropped");
                }
                Err(e) => {
                    if matches!(e, mpsc::error::TrySendError::Full(_)) {
                        tracing::warn!(conn, "client does not read its replies: dropping it");
                    }
                    handle.kill.notify_one();
                }
            }
        }
    }
}

/// Runs the broker until SIGINT or SIGTERM.
///
/// # Errors
/// If the socket cannot be set up (another broker is live there, the
/// directory is unsafe), or the signal handlers cannot be installed.
pub async fn serve(options: Options) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    // A descriptor per stream file for many clients.
    platform::raise_fd_limit();
    let gid = options.group.as_deref().map(group_id).transpose()?;
    let (listener, _lock) = bind(&options.socket, gid, options.inherited_lock)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    let broker = Arc::new(Broker {
        registry: Mutex::new(Registry::with_limits(options.limits)),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        pid: platform::current_pid(),
        started: std::time::Instant::now(),
    });
    tracing::info!(socket = %options.socket.display(), pid = broker.pid, "memsock broker listening");
    if let Some(pid) = options.autostarted_by {
        let idle_exit_s = options.idle_exit.map(|d| d.as_secs_f64());
        tracing::info!(by = pid, idle_exit_s, "autostarted by a client: exits once it has had no client for a while");
    }
    let mut idle = tokio::time::interval(Duration::from_millis(250));
    let mut idle_since = Some(std::time::Instant::now());

    let sampler = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CLOSE_GRACE);
            for n in 0u64.. {
                tick.tick().await;
                {
                    let mut registry = lock(&broker.registry);
                    let mut out = registry.watch_publishers();
                    out.extend(registry.expire_joining());
                    out.extend(registry.expire_history());
                    broker.route(out);
                    if n % 10 == 0 {
                        registry.sample_rates();
                    }
                }
                end_closes(&broker, CLOSE_GRACE).await;
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    idle_since = None;
                    let broker = broker.clone();
                    tasks.spawn(async move { connection(broker, stream).await });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = idle.tick(), if options.idle_exit.is_some() => {
                let clients = !lock(&broker.conns).is_empty();
                // A stream kept for its history counts as a client: the
                // state someone asked to keep stays until it is closed.
                if clients || lock(&broker.registry).retains_history() {
                    idle_since = None;
                } else {
                    let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                    if options.idle_exit.is_some_and(|limit| since.elapsed() >= limit) {
                        tracing::info!(idle_s = since.elapsed().as_secs_f64(), "no client for a while: exiting");
                        break;
                    }
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    tracing::info!("shutting down");
    drop(listener);
    if let Err(e) = std::fs::remove_file(&options.socket) {
        tracing::warn!(socket = %options.socket.display(), "cannot remove the socket: {e}");
    }
    sampler.abort();
    {
        let mut registry = lock(&broker.registry);
        registry.close_all();
        let notices = registry.connections().into_iter().map(|c| Outgoing::event(c, Event::BrokerShutdown));
        broker.route(notices.collect());
    }
    // Publishers in the middle of a send finish it; then every close is
    // final (one caught mid-delivery gets a second until its frame is out).
    tokio::time::sleep(CLOSE_GRACE).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        end_closes(&broker, Duration::ZERO).await;
        if lock(&broker.registry).closes_pending() == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let every connection flush its notice and end.
    for handle in lock(&broker.conns).values() {
        handle.kill.notify_one();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while tasks.join_next().await.is_some() {} }).await;
    tracing::info!("broker stopped");
    Ok(())
}

/// Ends the closes begun at least `grace` ago. Ending one under a live
/// publisher takes a system-wide memory barrier (milliseconds), run here
/// outside the registry's lock.
async fn end_closes(broker: &Broker, grace: Duration) {
    if !lock(&broker.registry).finish_closing(grace, None) {
        return;
    }
    match tokio::task::spawn_blocking(memsock_proto::shm::system_barrier).await {
        Ok(barrier) => {
            lock(&broker.registry).finish_closing(grace, Some(barrier));
        }
        Err(e) => tracing::error!("the memory barrier for a close failed: {e}"),
    }
}

/// Takes the lock file beside the socket (or the one the starting client
/// locked and passed): held for the broker's life, it makes a second
/// broker on the same socket refuse to start, and so whatever socket is
/// there with the lock taken is a dead broker's.
fn take_lock(path: &Path, inherited: Option<OwnedFd>) -> Result<std::fs::File, ServeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock_path = memsock_proto::control::broker_lock_path(path);
    let file = match inherited {
        Some(fd) => std::fs::File::from(fd),
        None => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error("open the lock file", &lock_path))?,
    };
    match platform::try_lock_exclusive(file.as_fd()) {
        Ok(true) => Ok(file),
        Ok(false) => Err(ServeError::AlreadyRunning(path.to_owned())),
        Err(e) => Err(io_error("lock", &lock_path)(e)),
    }
}

/// Creates the listening socket, replacing a stale one and refusing to
/// displace a live broker; returns it with the lock file, held.
fn bind(
    path: &Path,
    gid: Option<u32>,
    inherited_lock: Option<OwnedFd>,
) -> Result<(interprocess::local_socket::tokio::Listener, std::fs::File), ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir, gid)?;
    }
    let lock = take_lock(path, inherited_lock)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::AlreadyRunning(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::warn!(socket = %path.display(), "removing the stale socket of a dead broker");
                std::fs::remove_file(path).map_err(io_error("remove the stale socket", path))?;
            }
            Err(e) => return Err(io_error("check the existing socket", path)(e)),
        },
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("inspect", path)(e)),
    }
    // The socket is made under a private name, given its group and mode,
    // and only then linked into place (a link, unlike a rename, never
    // replaces a broker that started meanwhile): nobody can connect to it
    // before it has both. (The mode asked of the listener is masked by the
    // umask, 0640 under the usual 022, and members of the group need write
    // permission to connect: it is set outright.)
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.new", platform::current_pid()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = staging
        .as_path()
        .to_fs_name::<GenericFilePath>()
        .and_then(|name| ListenerOptions::new().name(name).mode(mode).reclaim_name(false).create_tokio())
        .map_err(io_error("listen on", &staging))?;
    let placed = (|| {
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&staging, None, Some(gid)).map_err(io_error("give the group", &staging))?;
        }
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
            .map_err(io_error("set the mode of", &staging))?;
        std::fs::hard_link(&staging, path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ServeError::StartedMeanwhile(path.to_owned()),
            _ => io_error("put the socket at", path)(e),
        })
    })();
    let _ = std::fs::remove_file(&staging);
    placed.map(|()| (listener, lock))
}

/// Makes sure the socket's directory exists, belongs to us and is not
/// writable by others (a directory someone else controls could swap the
/// socket under us).
fn prepare_dir(dir: &Path, gid: Option<u32>) -> Result<(), ServeError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
            let mode = if gid.is_some() { 0o750 } else { 0o700 };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(io_error("set the mode of", dir))?;
            if let Some(gid) = gid {
                std::os::unix::fs::chown(dir, None, Some(gid)).map_err(io_error("give the group", dir))?;
            }
        }
        Err(e) => return Err(io_error("inspect", dir)(e)),
        Ok(meta) => {
            let ours = meta.uid() == platform::current_uid();
            let sticky = meta.mode() & 0o1000 != 0;
            if meta.mode() & 0o022 != 0 && !(sticky && meta.uid() == 0) {
                return Err(ServeError::UnsafeDirectory(dir.to_owned()));
            }
            if !ours && meta.uid() != 0 {
                return Err(ServeError::ForeignDirectory { path: dir.to_owned(), uid: meta.uid() });
            }
        }
    }
    Ok(())
}

fn group_id(name: &str) -> Result<u32, ServeError> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let groups = Path::new("/etc/group");
    for line in std::fs::read_to_string(groups).map_err(io_error("read", groups))?.lines() {
        let mut fields = line.split(':');
        if fields.next() == Some(name) {
            if let Some(gid) = fields.nth(1).and_then(|g| g.parse().ok()) {
                return Ok(gid);
            }
        }
    }
    Err(ServeError::NoSuchGroup(name.into()))
}

/// One client, from handshake to the end of its lease.
async fn connection(broker: Arc<Broker>, stream: interprocess::local_socket::tokio::Stream) {
    let interprocess::local_socket::tokio::Stream::UdSocket(stream) = stream;
    let socket = match OwnedFd::try_from(stream).map(std::os::unix::net::UnixStream::from) {
        Ok(s) => s,
        Err(e) => return tracing::warn!("cannot take the connection's socket: {e}"),
    };
    let cap = lock(&broker.registry).connection_cap();
    let open = lock(&broker.conns).len() as u64;
    if open >= cap.saturating_add(UNGREETED_SLACK) {
        tracing::warn!(open, cap, "too many connections: one closed as it came");
        return;
    }
    let socket = match socket.set_nonblocking(true).and_then(|()| UnixStream::from_std(socket)) {
        Ok(s) => Arc::new(s),
        Err(e) => return tracing::warn!("cannot register the connection: {e}"),
    };
    let pid = platform::peer_pid(socket.as_fd()).unwrap_or(0);
    // A peer whose uid cannot be read is nobody's: it may close nothing
    // but what it publishes.
    let uid = platform::peer_uid(socket.as_fd()).unwrap_or(u32::MAX);
    // Taken now, while the peer is surely the process that connected.
    let process = ProcessHandle::of_peer(socket.as_fd(), pid);
    if process.is_none() {
        tracing::info!(pid, "no pidfd for this client: its connection is its lease");
    }
    let conn = broker.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(QUEUE_PER_CLIENT);
    let kill = Arc::new(Notify::new());
    let queued_fds = Arc::new(AtomicUsize::new(0));
    lock(&broker.conns).insert(conn, ConnHandle { tx, kill: kill.clone(), queued_fds: queued_fds.clone() });
    let writer = tokio::spawn(write_loop(socket.clone(), rx, kill.clone(), queued_fds));
    tracing::debug!(conn, pid, uid, "connection accepted");

    let reason = tokio::select! {
        r = read_loop(&broker, &socket, conn, pid, uid, process) => r,
        () = kill.notified() => "dropped by the broker".to_owned(),
    };
    // The lease ends: reclaim, tell the others, stop writing to this one
    // (after what is queued for it, such as a final error).
    {
        let mut registry = lock(&broker.registry);
        let out = registry.disconnect(conn, &reason);
        lock(&broker.conns).remove(&conn);
        broker.route(out);
    }
    // The writer ends once the queue is drained; a client that does not
    // read any more cannot keep it (and the descriptors queued) alive.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(1), &mut writer).await.is_err() {
        writer.abort();
    }
    let _ = platform::shutdown_socket(socket.as_fd());
}

/// Reads and serves requests; returns why the connection ended.
async fn read_loop(
    broker: &Broker,
    socket: &UnixStream,
    conn: ConnId,
    pid: u32,
    uid: u32,
    mut process: Option<ProcessHandle>,
) -> String {
    let mut reader = FrameReader::<ClientMessage>::new();
    let mut greeted = false;
    let mut served = 0u64;
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        // Serve every complete frame first.
        loop {
            let message = match reader.next_message() {
                Ok(Some((m, _))) => m,
                Ok(None) => break,
                Err(e) => {
                    reply_and_close(broker, conn, 0, e.to_control_error());
                    return format!("bad frame: {e}");
                }
            };
            let id = message.id;
            if !greeted {
                match message.request {
                    Request::Hello { version, client_name } if version == PROTOCOL_VERSION => {
                        let mut registry = lock(&broker.registry);
                        if let Err(e) = registry.check_connection_cap() {
                            drop(registry);
                            reply_and_close(broker, conn, id, e);
                            return "too many connections".into();
                        }
                        greeted = true;
                        registry.connect(conn, pid, uid, process.take(), &client_name);
                        let welcome = Reply::Welcome { version: PROTOCOL_VERSION, broker_pid: broker.pid };
                        broker.route(vec![reply(conn, id, Ok(welcome))]);
                        continue;
                    }
                    Request::Hello { version, .. } => {
                        reply_and_close(
                            broker,
                            conn,
                            id,
                            ControlError::VersionMismatch { client: version, broker: PROTOCOL_VERSION },
                        );
                        return format!("protocol version {version}");
                    }
                    _ => {
                        reply_and_close(broker, conn, id, ControlError::HandshakeExpected);
                        return "no handshake".into();
                    }
                }
            }
            serve_request(broker, conn, id, message.request).await;
            served += 1;
            if served % 64 == 0 {
                // A client pipelining requests does not hog a worker.
                tokio::task::yield_now().await;
            }
        }
        let read = async {
            loop {
                socket.readable().await?;
                match socket.try_io(Interest::READABLE, || reader.fill_from(socket.as_fd())) {
                    Ok(n) => return Ok(n),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(e) => return Err(e),
                }
            }
        };
        let n = if greeted {
            read.await
        } else {
            match tokio::time::timeout_at(deadline, read).await {
                Ok(r) => r,
                Err(_) => return "no handshake in time".into(),
            }
        };
        match n {
            Ok(0) => return "connection closed".into(),
            Ok(_) => {}
            Err(e) => return format!("read error: {e}"),
        }
    }
}

fn reply(conn: ConnId, id: u64, result: Result<Reply, ControlError>) -> Outgoing {
    Outgoing { conn, message: ServerMessage::Reply { id, result }, fds: Vec::new() }
}

fn reply_and_close(broker: &Broker, conn: ConnId, id: u64, error: ControlError) {
    broker.route(vec![reply(conn, id, Err(error))]);
}

/// Serves one request and queues what it causes, with the registry locked
/// until everything is queued.
///
/// A Publish that creates a stream creates its segment outside the lock
/// (on the blocking pool: a large one takes long to pre-fault), its name
/// reserved meanwhile, so that nobody else's request waits for it; this
/// connection's next request waits, as its replies keep their order.
async fn serve_request(broker: &Broker, conn: ConnId, id: u64, request: Request) {
    let creation = {
        let mut registry = lock(&broker.registry);
        let step = if registry.shutting_down() {
            PublishStep::Done(vec![reply(conn, id, Err(ControlError::ShuttingDown))])
        } else if let Request::Publish { stream, config } = &request {
            registry.publish(conn, id, stream, config)
        } else {
            PublishStep::Done(dispatch(
                &mut registry,
                BrokerIdent { pid: broker.pid, started: broker.started },
                conn,
                id,
                request,
            ))
        };
        match step {
            PublishStep::Done(out) => return broker.route(out),
            PublishStep::Create(creation) => creation,
        }
    };
    let job = creation.clone();
    let segment = tokio::task::spawn_blocking(move || job.create()).await.unwrap_or_else(|e| {
        tracing::error!(conn, "creating a segment failed: {e}");
        let source = io::Error::other("the thread creating it panicked");
        Err(CreateError::Io { name: creation.name().to_owned(), source })
    });
    let mut registry = lock(&broker.registry);
    let out = registry.created(&creation, segment);
    broker.route(out);
}

fn dispatch(registry: &mut Registry, broker: BrokerIdent, conn: ConnId, id: u64, request: Request) -> Vec<Outgoing> {
    match request {
        Request::Hello { .. } => vec![reply(conn, id, Err(ControlError::HandshakeExpected))],
        Request::Unpublish { publication } => registry.unpublish(conn, id, publication),
        Request::Subscribe { stream, options, wait_for_stream, credits_up_to } => {
            registry.subscribe(conn, id, &stream, &options, wait_for_stream, credits_up_to)
        }
        Request::List { pattern } => registry.list(conn, id, &pattern),
        Request::Watch { pattern, subscribe } => registry.watch(conn, id, &pattern, subscribe),
        Request::Unwatch { watch } => registry.unwatch(conn, id, watch),
        Request::Credit { subscription, credits } => registry.credit(conn, id, subscription, credits),
        Request::Unsubscribe { subscription } => registry.unsubscribe(conn, id, subscription),
        Request::Close { stream } => registry.close(conn, id, &stream),
        Request::Stats { stream } => registry.stats(conn, id, stream.as_deref(), broker),
        Request::ChannelTaken { publication, index, generation } => {
            registry.channel_taken(conn, publication, index, generation)
        }
        _ => vec![reply(conn, id, Err(ControlError::Malformed(Malformation::UnknownRequest)))],
    }
}

/// Writes queued messages, descriptors attached to their frame's first byte.
async fn write_loop(
    socket: Arc<UnixStream>,
    mut rx: mpsc::Receiver<Outgoing>,
    kill: Arc<Notify>,
    queued_fds: Arc<AtomicUsize>,
) {
    let mut writer = FrameWriter::new();
    while let Some(out) = rx.recv().await {
        // Taken off the queue: the writer holds them until they are written.
        queued_fds.fetch_sub(out.fds.len(), Ordering::Relaxed);
        if let Err(e) = writer.start(&out.message, out.fds) {
            tracing::error!("cannot encode a message: {e}");
            let ServerMessage::Reply { id, .. } = out.message else { continue };
            let len = if let FrameError::TooLarge(len) = e { len } else { 0 };
            let error =
                ServerMessage::Reply { id, result: Err(ControlError::Malformed(Malformation::ReplyTooLarge { len })) };
            if writer.start(&error, Vec::new()).is_err() {
                continue;
            }
        }
        if let Err(e) = write_frame(&socket, &mut writer).await {
            tracing::debug!(conn = out.conn, "write failed: {e}");
            kill.notify_one();
            return;
        }
    }
}

async fn write_frame(socket: &UnixStream, writer: &mut FrameWriter) -> io::Result<()> {
    while !writer.is_done() {
        socket.writable().await?;
        match socket.try_io(Interest::WRITABLE, || writer.write_to(socket.as_fd())) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10: the broker library reports why it cannot start as a
    /// typed value (it was an `anyhow` string).
    #[test]
    fn setup_failures_are_typed() {
        let dir = std::env::temp_dir().join(format!("memsock-serve-errors-{}", platform::current_pid()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let not_a_socket = dir.join("file");
        std::fs::write(&not_a_socket, b"").unwrap();
        assert!(matches!(bind(&not_a_socket, None, None), Err(ServeError::NotASocket(p)) if p == not_a_socket));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(bind(&dir.join("s"), None, None), Err(ServeError::UnsafeDirectory(p)) if p == dir));
        assert!(matches!(group_id("no-such-group-here"), Err(ServeError::NoSuchGroup(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
