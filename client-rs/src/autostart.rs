//! Starting a per-user broker when none answers at the default socket
//! (see [`Client::connect`](crate::Client::connect)).
//!
//! Exactly one broker starts however many processes connect at once: the
//! one that takes the lock file beside the socket (an exclusive `flock`,
//! which every broker holds for its whole life) starts it, passing it the
//! locked file, and the others wait for it to listen.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{Duration, Instant};

use memsock_proto::control::{broker_lock_path, broker_log_path};
use memsock_proto::platform;

use crate::conn::ClientError;

/// Environment variable: `0` turns autostart off.
pub const AUTOSTART_ENV: &str = "MEMSOCK_AUTOSTART";
/// Environment variable naming the `memsock` binary to start.
pub const BROKER_ENV: &str = "MEMSOCK_BROKER";

/// How long a connect waits for a broker (its own or another process's)
/// to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The bundled binary: null, or a leaked `PathBuf` never freed (a reader
/// may still hold the one a later call replaced). Not a lock, which a
/// thread of a forked parent could hold forever in the child.
static BUNDLED: AtomicPtr<PathBuf> = AtomicPtr::new(std::ptr::null_mut());

/// Names the `memsock` binary shipped with a package (the Python wheel's),
/// which autostart prefers to `$MEMSOCK_BROKER` and `PATH`. The last call
/// wins; each call leaks its path (a package makes one, as it loads).
pub fn set_bundled_broker(path: PathBuf) {
    // Release: pairs with the Acquire in `bundled`, which reads the path.
    BUNDLED.store(Box::into_raw(Box::new(path)), Ordering::Release);
}

fn bundled() -> Option<&'static Path> {
    // Acquire: pairs with the Release in `set_bundled_broker`.
    let ptr = BUNDLED.load(Ordering::Acquire);
    // SAFETY: null or from `Box::into_raw` in `set_bundled_broker`, never
    // freed nor written after: a valid `PathBuf` for the rest of the process.
    unsafe { ptr.as_ref() }.map(PathBuf::as_path)
}

/// Whether a connect to the default socket may start a broker: not when
/// `$MEMSOCK_SOCKET` names the socket, nor with `MEMSOCK_AUTOSTART=0`.
pub(crate) fn allowed() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    !set(crate::SOCKET_ENV) && std::env::var_os(AUTOSTART_ENV).is_none_or(|v| v != "0")
}

/// The binary to start, and what was looked at, in order.
fn find_broker() -> (Option<PathBuf>, Vec<String>) {
    let mut tried = Vec::new();
    let runnable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(bundled) = bundled() {
        if runnable(bundled) {
            return (Some(bundled.to_path_buf()), tried);
        }
        tried.push(format!("the bundled {} (not runnable)", bundled.display()));
    }
    match std::env::var_os(BROKER_ENV).filter(|v| !v.is_empty()).map(PathBuf::from) {
        // Made absolute: the broker starts in `/`.
        Some(named) if runnable(&named) => return (Some(std::fs::canonicalize(&named).unwrap_or(named)), tried),
        Some(named) => tried.push(format!("${BROKER_ENV}={} (not runnable)", named.display())),
        None => tried.push(format!("${BROKER_ENV} (unset)")),
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("memsock")).find(|p| runnable(p)));
    match on_path.flatten() {
        Some(found) => (Some(found), tried),
        None => {
            tried.push("`memsock` on PATH (none)".into());
            (None, tried)
        }
    }
}

/// Makes sure a broker listens at `socket`, starting one if no broker is
/// alive there; returns once one accepts connections.
pub(crate) fn ensure_broker(socket: &Path) -> Result<(), ClientError> {
    let (binary, mut tried) = find_broker();
    let fail = |reason: String, tried: &[String]| ClientError::Autostart {
        path: socket.to_owned(),
        reason,
        tried: tried.join(", "),
    };
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display()), &tried))?;
        // One another user made first (/tmp/memsock-<uid>) is not ours to
        // write in.
        platform::check_private_dir(dir).map_err(|e| fail(e, &tried))?;
    }
    let lock_path = broker_lock_path(socket);
    let log = broker_log_path(socket);
    let deadline = Instant::now() + START_TIMEOUT;
    let mut started = false;
    let mut nap = Duration::from_millis(1);
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        // A fresh open file description each time: the lock it takes is
        // its own, not one this process shares with a broker it started.
        let lock = platform::open_private_file(&lock_path, false)
            .map_err(|e| fail(format!("cannot open {}: {e}", lock_path.display()), &tried))?;
        let free = platform::try_lock_exclusive(lock.as_fd())
            .map_err(|e| fail(format!("cannot lock {}: {e}", lock_path.display()), &tried))?;
        if free {
            // No broker is alive here (each holds this lock): start one.
            if started {
                return Err(fail(format!("the broker started exited at once (see {})", log.display()), &tried));
            }
            let Some(binary) = &binary else {
                return Err(fail("no memsock binary to start".into(), &tried));
            };
            tried.push(binary.display().to_string());
            start(binary, socket, &lock, &log).map_err(|e| fail(e, &tried))?;
            started = true;
            tracing::info!(socket = %socket.display(), binary = %binary.display(), "started a memsock broker");
        }
        drop(lock);
        if Instant::now() >= deadline {
            let whose = if started { "the broker started" } else { "another process's broker" };
            return Err(fail(
                format!("{whose} did not listen within {START_TIMEOUT:?} (see {})", log.display()),
                &tried,
            ));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

/// Starts `binary` as a detached broker on `socket` that takes over `lock`
/// (locked) and logs to `log`.
fn start(binary: &Path, socket: &Path, lock: &File, log: &Path) -> Result<(), String> {
    let log_file = platform::open_private_file(log, true).map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let stderr = log_file.try_clone().map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let lock_fd = lock.as_raw_fd();
    let mut command = Command::new(binary);
    command
        .arg("--socket")
        .arg(socket)
        .arg("broker")
        .arg("--detach")
        .arg("--lock-fd")
        .arg(lock_fd.to_string())
        .arg("--autostarted-by")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(stderr)
        .current_dir("/");
    // SAFETY: the hook makes only async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || platform::exec_keeping_only(lock_fd));
    }
    // The broker forks at once and its first process exits: reaped here
    // (a binary that does not is not waited for long).
    let mut child = command.spawn().map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(format!("{} broker exited with {status} (see {})", binary.display(), log.display()));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} broker did not detach within 10 s", binary.display()));
            }
            // SIGCHLD ignored: the kernel reaped it; whether the broker
            // runs is for the caller's wait to find.
            Err(e) if e.raw_os_error() == Some(platform::ECHILD) => return Ok(()),
            Err(e) => return Err(format!("cannot wait for {}: {e}", binary.display())),
        }
    }
}
