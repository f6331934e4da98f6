//! Support for memsock's cross-process tests: deterministic frame contents
//! that a receiver can check byte for byte, and peer processes started
//! with inherited descriptors that report JSON lines.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod fuzz;

use anyhow::{Context, Result, bail};
use memsock_proto::platform::{adopt_inherited_fd, dup_for_child};
use serde_json::Value;

/// Environment variable carrying a peer's role and parameters (JSON).
pub const PEER_ENV: &str = "MEMSOCK_TEST_PEER";

/// SplitMix64: a fast, well-mixed sequence, so every frame's bytes differ.
#[inline]
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Length of frame `seq`: 1 ..= `slot_size`, pseudo-random.
#[inline]
pub fn frame_len(seq: u64, slot_size: usize) -> usize {
    1 + (mix(seq ^ 0xa5a5) % slot_size as u64) as usize
}

/// Fills `buf` with frame `seq`'s contents.
#[inline]
pub fn fill_frame(seq: u64, buf: &mut [u8]) {
    let mut state = mix(seq);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        state = mix(state);
        c.copy_from_slice(&state.to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = mix(state).to_le_bytes();
    rest.copy_from_slice(&last[..rest.len()]);
}

/// Whether `bytes` are exactly frame `seq` for a stream of `slot_size`.
pub fn check_frame(seq: u64, slot_size: usize, bytes: &[u8], scratch: &mut [u8]) -> bool {
    let len = frame_len(seq, slot_size);
    if bytes.len() != len {
        return false;
    }
    fill_frame(seq, &mut scratch[..len]);
    bytes == &scratch[..len]
}

/// How long a peer may take to report its next line before the test
/// counts it as hung: generous, so that it only ever catches a hang.
pub const PEER_REPORT_DEADLINE: Duration = Duration::from_secs(120);

/// A peer process and its report channel.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    /// Lines of its standard output, read by a thread of their own so that
    /// waiting for one can have a deadline; closed at its end.
    lines: mpsc::Receiver<std::io::Result<String>>,
}

impl Peer {
    /// Starts the peer binary `exe` with `spec` (which names its `"role"`),
    /// letting it inherit `fds`; their numbers are added to the spec.
    pub fn spawn(exe: &str, spec: &Value, fds: &[BorrowedFd<'_>]) -> Result<Self> {
        Self::spawn_command(Command::new(exe), exe, spec, fds)
    }

    /// [`spawn`](Self::spawn), running as `user` (with its groups): needs
    /// root, and `setpriv`.
    pub fn spawn_as(user: &str, exe: &str, spec: &Value) -> Result<Self> {
        let mut command = Command::new("setpriv");
        command.args([&format!("--reuid={user}"), "--regid=users", "--init-groups", exe]);
        Self::spawn_command(command, exe, spec, &[])
    }

    fn spawn_command(mut command: Command, exe: &str, spec: &Value, fds: &[BorrowedFd<'_>]) -> Result<Self> {
        // Duplicates without close-on-exec are inherited by this child only
        // (they are closed here once it has started).
        let dups: Vec<OwnedFd> = fds.iter().map(|fd| dup_for_child(*fd)).collect::<Result<_, _>>()?;
        let mut spec = spec.clone();
        spec["fds"] = dups.iter().map(|fd| fd.as_raw_fd()).collect::<Vec<_>>().into();
        let mut child = command
            .env(PEER_ENV, spec.to_string())
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {exe}"))?;
        drop(dups);
        let out = BufReader::new(child.stdout.take().expect("piped"));
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new().name(format!("peer-{}", child.id())).spawn(move || forward_lines(out, &tx))?;
        Ok(Self { child, lines })
    }

    /// The peer's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next JSON line the peer reports. A peer silent for
    /// [`PEER_REPORT_DEADLINE`] is taken for hung: an error, not a hang.
    pub fn read(&mut self) -> Result<Value> {
        let line = match self.lines.recv_timeout(PEER_REPORT_DEADLINE) {
            Ok(line) => line?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("peer {} reported nothing for {PEER_REPORT_DEADLINE:?}: hung", self.child.id())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait()?;
                bail!("peer {} ended without reporting ({status})", self.child.id());
            }
        };
        serde_json::from_str(line.trim()).with_context(|| format!("peer said {line:?}"))
    }

    /// Reads lines until one has `key`.
    pub fn read_until(&mut self, key: &str) -> Result<Value> {
        loop {
            let v = self.read()?;
            if !v[key].is_null() {
                return Ok(v);
            }
        }
    }

    /// Sends the peer one line on its standard input (a go-ahead for a
    /// peer that waits for one).
    pub fn tell(&mut self, line: &str) -> Result<()> {
        use std::io::Write as _;
        let stdin = self.child.stdin.as_mut().context("the peer's stdin")?;
        writeln!(stdin, "{line}")?;
        Ok(stdin.flush()?)
    }

    /// Waits for the peer to exit successfully and returns its final report.
    pub fn finish(mut self) -> Result<Value> {
        let report = self.read_until("report")?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("peer failed ({status}): {report}");
        }
        Ok(report["report"].clone())
    }

    /// Kills the peer with SIGKILL and reaps it.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Whether the peer has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// Sends each line of `out` to `tx` until its end (or until nobody listens).
fn forward_lines(out: BufReader<ChildStdout>, tx: &mpsc::Sender<std::io::Result<String>>) {
    for line in out.lines() {
        let failed = line.is_err();
        if tx.send(line).is_err() || failed {
            return;
        }
    }
}

impl Drop for Peer {
    /// A peer still running when its test gives up is killed, so that no
    /// process outlives a failed test.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// In a peer: the descriptors the parent passed, in order.
pub fn inherited_fds(spec: &Value) -> Vec<OwnedFd> {
    spec["fds"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    let fd = n.as_i64().expect("descriptor number") as RawFd;
                    // SAFETY: the parent duplicated these descriptors for this
                    // process alone and passed each number once.
                    unsafe { adopt_inherited_fd(fd) }.expect("inherited descriptor")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `cond` every millisecond until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// The `memsock` binary of this build (target/<profile>/memsock), which
/// `scripts/test-all` builds before running the tests.
pub fn memsock_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/memsock
    let beside = exe.with_file_name("memsock");
    let path = if beside.exists() {
        beside
    } else {
        exe.parent().and_then(Path::parent).expect("target directory").join("memsock")
    };
    assert!(
        path.exists(),
        "{} is missing: build the broker in the same profile first (`cargo build -p memsock-broker`; scripts/test-all does)",
        path.display()
    );
    path
}

/// A private directory for one test, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory (mode 0700) under the system's temp dir.
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("memsock-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(Self(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real `memsock broker` process on a private socket.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl Broker {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> Result<Self> {
        let dir = TempDir::new("broker")?;
        let socket = dir.path().join("run").join("broker.sock");
        Self::start_at(dir, socket)
    }

    /// Starts a broker on `socket` (inside `dir`, which it keeps).
    pub fn start_at(dir: TempDir, socket: PathBuf) -> Result<Self> {
        Self::start_with(dir, socket, &[])
    }

    /// Starts a broker on `socket` with extra `memsock broker` options,
    /// under the usual umask 022 whatever this process's is.
    pub fn start_with(dir: TempDir, socket: PathBuf, options: &[&str]) -> Result<Self> {
        let log = std::fs::File::create(dir.path().join("broker.log"))?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"umask 022; exec "$@""#)
            .arg("sh")
            .arg(memsock_exe())
            .arg("--socket")
            .arg(&socket)
            .arg("broker")
            .args(options)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the broker")?;
        let mut broker = Self { child, socket, dir };
        // Up once it says it listens (logged after the socket is bound). Not
        // by connecting: a probe connection the broker is still closing
        // would count among its descriptors in the test that follows.
        let up = eventually(Duration::from_secs(10), || {
            broker.log().contains("memsock broker listening") || broker.exited()
        });
        if !up || broker.exited() {
            bail!("the broker did not start: {}", broker.log());
        }
        Ok(broker)
    }

    /// Its control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends `signal` and waits (up to 10 s) for it to exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> Result<ExitStatus> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).context("pid")?;
        let sig = rustix::process::Signal::from_named_raw(signal).context("signal")?;
        rustix::process::kill_process(pid, sig)?;
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("the broker did not exit after signal {signal}")
    }

    /// Descriptors the broker holds that are shared-memory files.
    pub fn memfd_count(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())) else { return 0 };
        dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("/memfd:"))
            .count()
    }

    /// Hands the directory over (to start another broker in it).
    pub fn into_dir(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        std::mem::forget(self);
        dir
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_deterministic_and_distinct() {
        let mut a = vec![0; 300];
        let mut b = vec![0; 300];
        for seq in 0..100 {
            let len = frame_len(seq, 300);
            assert!((1..=300).contains(&len));
            fill_frame(seq, &mut a[..len]);
            assert!(check_frame(seq, 300, &a[..len], &mut b));
            assert!(!check_frame(seq + 1, 300, &a[..len], &mut b));
        }
    }
}

/// A connection to the broker speaking the control protocol by hand, on
/// the same frame reader and writer as the broker and the client: for
/// tests that send what no client would, or in an order none would.
#[derive(Debug)]
pub struct RawConn {
    socket: std::os::unix::net::UnixStream,
    reader: memsock_proto::control::FrameReader<memsock_proto::control::ServerMessage>,
    takes_channels: bool,
}

/// A reply as [`RawConn::ask`] returns it: the result and its descriptors.
pub type RawReply = (Result<memsock_proto::control::Reply, memsock_proto::control::ControlError>, Vec<OwnedFd>);

impl RawConn {
    /// Connects, without a handshake; reads give up after 10 s (a hang).
    ///
    /// # Errors
    /// If the socket refuses.
    pub fn connect(socket: &Path) -> Result<Self> {
        let socket = std::os::unix::net::UnixStream::connect(socket)?;
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { socket, reader: memsock_proto::control::FrameReader::new(), takes_channels: true })
    }

    /// Sends request `request` as message `id`.
    ///
    /// # Errors
    /// If the write fails.
    pub fn send(&self, id: u64, request: memsock_proto::control::Request) -> Result<()> {
        let mut writer = memsock_proto::control::FrameWriter::new();
        writer.start(&memsock_proto::control::ClientMessage { id, request }, Vec::new())?;
        writer.write_to(self.socket.as_fd())?;
        Ok(())
    }

    /// Sends raw bytes.
    ///
    /// # Errors
    /// If the write fails.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        std::io::Write::write_all(&mut &self.socket, bytes)?;
        Ok(())
    }

    /// The next message from the broker, or `None` once it has closed.
    ///
    /// # Errors
    /// A read error or a frame the reader refuses.
    pub fn next_message(&mut self) -> Result<Option<(memsock_proto::control::ServerMessage, Vec<OwnedFd>)>> {
        loop {
            if let Some(message) = self.reader.next_message()? {
                return Ok(Some(message));
            }
            if self.reader.fill_from(self.socket.as_fd())? == 0 {
                return Ok(None);
            }
        }
    }

    /// The socket itself, to read raw bytes from.
    pub fn into_socket(self) -> std::os::unix::net::UnixStream {
        self.socket
    }

    /// Leaves the channels of joining subscribers unanswered (see
    /// [`ask`](Self::ask)), as a publisher's client that hangs would.
    pub fn ignore_channels(&mut self) {
        self.takes_channels = false;
    }

    /// Sends request `request` as message `id` and returns its reply,
    /// skipping events and the replies to other messages, and answering
    /// the channels of subscribers joining a stream it publishes with
    /// `ChannelTaken` (unless told to [`ignore_channels`](Self::ignore_channels)).
    ///
    /// # Errors
    /// If the broker closes first, or as [`next_message`](Self::next_message).
    pub fn ask(&mut self, id: u64, request: memsock_proto::control::Request) -> Result<RawReply> {
        self.send(id, request)?;
        loop {
            match self.next_message()? {
                Some((memsock_proto::control::ServerMessage::Reply { id: got, result }, fds)) if got == id => {
                    return Ok((result, fds));
                }
                Some((memsock_proto::control::ServerMessage::Event(event), _)) if self.takes_channels => {
                    // As a client publishing would (it maps nothing: a raw
                    // connection publishes no frames).
                    if let memsock_proto::control::Event::Channel { publication, index, generation } = event {
                        let taken = memsock_proto::control::Request::ChannelTaken { publication, index, generation };
                        self.send(0, taken)?;
                    }
                }
                Some(_) => {}
                None => bail!("the broker closed the connection before answering #{id}"),
            }
        }
    }

    /// Says Hello with this build's protocol version.
    ///
    /// # Errors
    /// If the broker does not welcome it.
    pub fn hello(&mut self) -> Result<()> {
        let version = memsock_proto::control::PROTOCOL_VERSION;
        let hello = memsock_proto::control::Request::Hello { version, client_name: "raw".into() };
        self.ask(0, hello)?.0?;
        Ok(())
    }

    /// Reads until the broker closes; returns the last error it replied.
    pub fn error_then_close(&mut self) -> Option<memsock_proto::control::ControlError> {
        let mut last = None;
        while let Ok(Some((message, _))) = self.next_message() {
            if let memsock_proto::control::ServerMessage::Reply { result: Err(e), .. } = message {
                last = Some(e);
            }
        }
        last
    }
}

impl AsFd for RawConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Options of a lossless subscriber with `credits` that parks while it
/// waits and waits for its stream to exist.
pub fn lossless(credits: u32) -> memsock::SubscribeOptions {
    memsock::SubscribeOptions {
        credits,
        policy: memsock::OverflowPolicy::Lossless,
        wait: memsock::WaitStrategy::Park,
        wait_for_stream: true,
        credits_up_to: false,
        history: u32::MAX,
    }
}
