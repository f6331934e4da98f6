//! Linux implementation of [`crate::platform`], on `rustix`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::io::FdFlags;
use rustix::thread::futex;
use rustix::time::Timespec;

/// Granularity of a huge-page backed segment (2 MiB pages).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Creates an anonymous shared-memory file of `len` bytes.
///
/// With `huge_pages` the file is backed by 2 MiB huge pages (`len` must be
/// a multiple of [`HUGE_PAGE_SIZE`]); that needs pages reserved in
/// `/proc/sys/vm/nr_hugepages`, and the reservation is only checked when the
/// file is first mapped, so callers map it at once and fall back on failure.
///
/// The file's mode is set to 0400, so the read-only descriptors made by
/// [`reopen_read_only`] cannot be turned back into writable ones.
///
/// The file is sealed against shrinking and growing: a peer holding a
/// writable descriptor cannot truncate it under the others (which would turn
/// their next access into `SIGBUS`).
///
/// # Errors
/// Whatever `memfd_create`, `ftruncate` or `fcntl` report.
pub fn create_shared_file(name: &str, len: u64, huge_pages: bool) -> io::Result<OwnedFd> {
    let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    if huge_pages {
        flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    }
    // The name is only a label (in /proc/*/fd); the kernel takes 249 bytes.
    let mut end = name.len().min(249);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let fd = rustix::fs::memfd_create(&name[..end], flags)?;
    rustix::fs::ftruncate(&fd, len)?;
    // Owner read-only. Descriptors already open keep their mode, but a
    // read-only one handed to a subscriber can no longer be re-opened
    // read-write through /proc/self/fd (a memfd is created 0777, which would
    // allow exactly that). Processes with CAP_DAC_OVERRIDE are not stopped.
    rustix::fs::fchmod(&fd, Mode::RUSR)?;
    // hugetlbfs does not support sealing beyond F_SEAL_SEAL on older kernels;
    // it cannot be resized by a peer anyway (sizes are page-granular and the
    // reservation is fixed), so a refusal there is not an error.
    match rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL) {
        Ok(()) => {}
        Err(e) if huge_pages && e == rustix::io::Errno::INVAL => {}
        Err(e) => return Err(e.into()),
    }
    Ok(fd)
}

/// Opens a new, read-only description of the file behind `fd`.
///
/// A process given only this descriptor cannot map the file writable
/// (`mmap` and `mprotect` refuse with `EACCES`): this is how subscribers get
/// the frame pool read-only.
///
/// # Errors
/// Whatever `open("/proc/self/fd/N")` reports (e.g. `/proc` not mounted).
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Size in bytes of the file behind `fd`.
///
/// # Errors
/// Whatever `fstat` reports.
pub fn file_len(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_size as u64)
}

/// Whether the file behind `fd` was opened for writing.
///
/// # Errors
/// Whatever `fcntl(F_GETFL)` reports.
pub fn is_writable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mode = rustix::fs::fcntl_getfl(fd)? & OFlags::RWMODE;
    Ok(mode == OFlags::RDWR || mode == OFlags::WRONLY)
}

/// A duplicate of `fd` that survives `exec`: spawn the child process while
/// it is open, pass the child its number (`as_raw_fd`), then drop it.
/// Together with [`adopt_inherited_fd`] in the child this hands a stream's
/// files to another process without a broker.
///
/// # Errors
/// Whatever `dup` reports.
pub fn dup_for_child(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // `dup` never sets close-on-exec on the new descriptor.
    Ok(rustix::io::dup(fd)?)
}

/// Takes ownership of descriptor `raw`, inherited from the parent process
/// (see [`dup_for_child`]), and marks it close-on-exec.
///
/// # Errors
/// `EBADF` if no such descriptor is open.
///
/// # Safety
/// `raw` must be a descriptor this process owns and that nothing else in
/// it uses or will close: typically a number the parent passed on the
/// command line or in the environment, adopted once.
pub unsafe fn adopt_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the caller guarantees exclusive ownership of `raw`; it is
    // only borrowed to check that it is open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    rustix::io::fcntl_setfd(borrowed, FdFlags::CLOEXEC)?;
    // SAFETY: as above; it is open (fcntl succeeded).
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sleeps while `word` holds `expected`, at most `timeout` (forever if
/// `None`). Returns on a wake-up, a timeout, a signal or a changed value;
/// callers re-check their condition either way.
///
/// The word may live in a `MAP_SHARED` mapping: the wait is process-shared
/// (no `FUTEX_PRIVATE_FLAG`), so a waker in another process mapping the same
/// file finds it.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout
        .map(|d| Timespec { tv_sec: d.as_secs().min(i64::MAX as u64) as i64, tv_nsec: i64::from(d.subsec_nanos()) });
    // EAGAIN (value changed), ETIMEDOUT and EINTR all mean "re-check".
    let _ = futex::wait(word, futex::Flags::empty(), expected, ts.as_ref());
}

/// Wakes the threads sleeping on `word`, in any process.
pub fn futex_wake(word: &AtomicU32) {
    // Only EFAULT is possible here, and `word` is a valid reference.
    let _ = futex::wake(word, futex::Flags::empty(), u32::MAX);
}

/// Asks the CPU to fetch the cache line at `addr` for writing, ahead of
/// time: the publisher uses it on slots and ring entries it will write a
/// few frames later, so that taking the lines back from the subscribers'
/// caches overlaps with other work instead of stalling its stores.
#[inline(always)]
pub fn prefetch_for_write(addr: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address,
    // and changes no architectural state. (CPUs without PREFETCHW execute
    // it as a no-op.)
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) addr, options(nostack, preserves_flags, readonly));
    }
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    let _ = addr;
}

/// Asks the CPU to fetch the cache line at `addr` for reading, ahead of time.
#[inline(always)]
pub fn prefetch_for_read(addr: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address,
    // and changes no architectural state.
    unsafe {
        std::arch::asm!("prefetcht0 [{0}]", in(reg) addr, options(nostack, preserves_flags, readonly));
    }
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    let _ = addr;
}

/// Nanoseconds on the monotonic clock, the clock of every frame timestamp.
///
/// `CLOCK_MONOTONIC` is system-wide, so timestamps taken in different
/// processes compare. Served by the vDSO: no system call.
///
/// Through the C library's `clock_gettime`, not rustix's: rustix finds
/// the vDSO itself from the auxiliary vector, which valgrind rewrites
/// (it read unmapped memory there and died), so that a C program using
/// libmemsock could not be checked with memcheck. glibc's call goes to the
/// same vDSO function.
#[inline]
pub fn now_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail (and `t` stays zero if it
    // somehow did).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t) };
    (t.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(t.tv_nsec as u64)
}

/// Whether a process with this id exists (it may belong to another user).
pub fn process_alive(pid: u32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else { return false };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// The calling process's real user id.
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The calling process's id.
pub fn current_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Most descriptors one control message carries (the kernel's
/// `SCM_MAX_FD`, less a margin).
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// Sends `bytes` on a connected Unix stream socket, with `fds` attached to
/// its first byte (`SCM_RIGHTS`). Returns how many bytes went out; the
/// descriptors go with the first byte, so a caller resending the rest
/// passes no descriptors again. Never raises `SIGPIPE`.
///
/// # Errors
/// Whatever `sendmsg` reports (`WouldBlock` on a non-blocking socket that
/// is full), or `InvalidInput` for more than [`MAX_FDS_PER_MESSAGE`].
pub fn send_with_fds(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors for one message"));
    }
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small for the descriptors"));
    }
    let iov = [io::IoSlice::new(bytes)];
    Ok(rustix::net::sendmsg(socket, &iov, &mut control, SendFlags::NOSIGNAL)?)
}

/// Receives bytes from a connected Unix stream socket into `buf`, appending
/// any descriptors that came with them to `fds` (close-on-exec). Returns the
/// byte count; 0 means the peer closed the connection.
///
/// # Errors
/// Whatever `recvmsg` reports, or `InvalidData` if the peer sent more
/// descriptors than one message may carry (they are closed).
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "peer sent more descriptors than allowed"));
    }
    Ok(msg.bytes)
}

/// The credentials the kernel recorded for the peer of a connected Unix
/// socket when the connection was made.
fn peer_credentials(socket: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid, correctly sized out-parameters for
    // SO_PEERCRED, and `socket` is an open descriptor for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// The process id of the peer of a connected Unix socket; 0 if the peer
/// lives in a pid namespace this process cannot see.
///
/// # Errors
/// Whatever `getsockopt(SO_PEERCRED)` reports.
pub fn peer_pid(socket: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(peer_credentials(socket)?.pid.max(0) as u32)
}

/// The user id of the peer of a connected Unix socket.
///
/// # Errors
/// Whatever `getsockopt(SO_PEERCRED)` reports.
pub fn peer_uid(socket: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(peer_credentials(socket)?.uid)
}

/// Shuts a connected socket down both ways: the peer sees end-of-file and
/// every later read or write here fails, whoever else holds the descriptor.
///
/// # Errors
/// Whatever `shutdown` reports.
pub fn shutdown_socket(socket: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(socket, rustix::net::Shutdown::Both)?)
}

/// Descriptors this process has open, and the most it may open.
pub fn descriptors_in_use() -> (u64, u64) {
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    // The directory read held one more while counting.
    (open.saturating_sub(1), limit)
}

/// The most memory mappings a process may have (`vm.max_map_count`), if
/// it can be read.
pub fn mapping_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok()?.trim().parse().ok()
}

/// Raises this process's limit on open descriptors to its hard limit.
pub fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!("cannot raise the descriptor limit: {e}");
        }
    }
}

/// A handle on another process that outlives its pid: a pidfd. Unlike a
/// pid, it can never come to name a different process, so "this process
/// has exited" read from it is final.
#[derive(Debug)]
pub struct ProcessHandle(OwnedFd);

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of a Unix socket's peer, taken when
/// it connected, valid across pid namespaces. (Not yet in `libc`; the
/// value is the same on every architecture Rust targets but SPARC.)
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERPIDFD: libc::c_int = 77;

impl ProcessHandle {
    /// A handle on the process at the other end of a connected Unix
    /// socket, whose pid the socket reported as `pid` (0 if the peer lives
    /// in a pid namespace we cannot see).
    ///
    /// `SO_PEERPIDFD` first; on older kernels `pidfd_open(pid)`, which may
    /// name another process only if the peer exited and its pid was reused
    /// between its `connect` and this call. `None` where neither works (an
    /// old kernel, or a pid of 0): the caller must treat the connection
    /// itself as the peer's lease.
    pub fn of_peer(socket: BorrowedFd<'_>, pid: u32) -> Option<Self> {
        #[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
        {
            let mut fd: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: `fd` and `len` are valid, correctly sized out-parameters
            // for SO_PEERPIDFD, and `socket` is an open descriptor.
            let rc = unsafe {
                libc::getsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_PEERPIDFD,
                    (&raw mut fd).cast::<libc::c_void>(),
                    &mut len,
                )
            };
            if rc == 0 && fd >= 0 {
                // SAFETY: the kernel just created this descriptor for us;
                // nothing else owns it.
                return Some(Self(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        Self::of_pid(pid)
    }

    /// A handle on process `pid` of our pid namespace, if it runs.
    pub fn of_pid(pid: u32) -> Option<Self> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok().map(Self)
    }

    /// Whether the process has exited (a pidfd polls readable from then on).
    pub fn has_exited(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
    }
}

/// The heavy side of an asymmetric fence: returns once every thread of
/// every process running at the time of the call has passed a full memory
/// barrier (`membarrier(MEMBARRIER_CMD_GLOBAL)`). Takes milliseconds; it
/// lets the other side of the fence be a mere compiler fence, which is
/// free on a hot path.
///
/// Where the kernel or a seccomp filter refuses `membarrier`, a full fence
/// and a 10 ms sleep stand in: that relies on store buffers draining within
/// microseconds, as they do on every CPU we know of.
pub fn system_wide_barrier() {
    use rustix::thread::{MembarrierCommand, membarrier};
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if let Err(e) = membarrier(MembarrierCommand::Global) {
        // Refused under `nohz_full` (EINVAL), by old kernels and by some
        // seccomp filters.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| tracing::warn!("membarrier refused ({e}): a fence and a 10 ms wait stand in"));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// A full memory barrier on every thread of this process
/// (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, registered on first
/// use): microseconds, against a system-wide barrier's milliseconds. Where
/// the kernel or a seccomp filter refuses it, [`system_wide_barrier`].
pub fn process_wide_barrier() {
    use rustix::thread::{MembarrierCommand, membarrier};
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let registered = *REGISTERED.get_or_init(|| match membarrier(MembarrierCommand::RegisterPrivateExpedited) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("membarrier private expedited refused ({e}): the system-wide barrier stands in");
            false
        }
    });
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if !registered || membarrier(MembarrierCommand::PrivateExpedited).is_err() {
        system_wide_barrier();
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Forks this process has gone through as the child (see [`watch_forks`]).
static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Descriptors a forked child must not keep (see [`close_in_forked_child`]):
/// -1 marks a free entry.
static CLOSE_IN_CHILD: [std::sync::atomic::AtomicI32; 64] = [const { std::sync::atomic::AtomicI32::new(-1) }; 64];

extern "C" fn count_fork_in_child() {
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for entry in &CLOSE_IN_CHILD {
        let fd = entry.swap(-1, std::sync::atomic::Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: `fd` was registered open by its owner, which
            // unregisters it before closing it; in the child the owner's
            // copy forgets it (see `close_in_forked_child`). `close` is
            // async-signal-safe.
            unsafe { libc::close(fd) };
        }
    }
}

/// Starts counting the forks this process goes through as the child (an
/// `atfork` handler, installed once), so that state inherited from the
/// parent — a publisher's writer role, a subscriber's channel, a
/// connection's lease — can tell it is not its own.
pub fn watch_forks() {
    // Not a `Once`: a fork while another thread ran `call_once` would
    // leave the child's `Once` running for ever.
    static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if INSTALLED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    // SAFETY: the handler only updates atomics and closes registered
    // descriptors (async-signal-safe, as a handler run in the child of a
    // multithreaded fork must be).
    let rc = unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
    if rc != 0 {
        tracing::warn!("cannot watch for forks (pthread_atfork: {rc}): a forked child could use its parent's handles");
    }
}

/// How many forks this process has gone through as the child since
/// [`watch_forks`]: a value taken before and compared after tells whether
/// this is still the same process.
#[inline]
pub fn fork_count() -> u64 {
    FORKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Has a forked child close `fd` as it starts (a connection's socket,
/// whose copy would otherwise keep the parent's lease alive for as long
/// as the child lives). Returns false, registering nothing, if the table
/// is full. The owner must [`keep_in_forked_child`] it before closing
/// it, and in a forked child must forget it rather than close it.
pub fn close_in_forked_child(fd: BorrowedFd<'_>) -> bool {
    watch_forks();
    let fd = fd.as_raw_fd();
    CLOSE_IN_CHILD.iter().any(|entry| {
        entry
            .compare_exchange(-1, fd, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
            .is_ok()
    })
}

/// Undoes [`close_in_forked_child`] (before the descriptor is closed).
pub fn keep_in_forked_child(fd: BorrowedFd<'_>) {
    let fd = fd.as_raw_fd();
    for entry in &CLOSE_IN_CHILD {
        if entry
            .compare_exchange(fd, -1, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

/// The fork count when a handle opened: in a child forked since, the
/// handle is a copy of its parent's.
#[derive(Debug, Clone, Copy)]
pub struct ForkStamp(u64);

impl ForkStamp {
    /// Now (watching forks from now on).
    pub fn now() -> Self {
        watch_forks();
        Self(fork_count())
    }

    /// Whether this process is a child forked since the stamp was taken.
    #[inline]
    pub fn forked(self) -> bool {
        fork_count() != self.0
    }
}

/// Takes an exclusive `flock` on `file` without waiting: true if taken
/// (or already held through this open file description, which a child
/// that inherited it shares), false if another holds it.
///
/// # Errors
/// What `flock` says, other than that it would block.
pub fn try_lock_exclusive(file: BorrowedFd<'_>) -> io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// For a child about to `exec` (a `pre_exec` hook): of the descriptors
/// past stdio, only `keep` crosses the `exec` (every other is marked
/// close-on-exec, where the kernel has `close_range`; the parent's own are
/// so already). Only calls that are async-signal-safe.
///
/// # Errors
/// What `fcntl` says of `keep`.
pub fn exec_keeping_only(keep: RawFd) -> io::Result<()> {
    // SAFETY: plain system calls on descriptor numbers. The first may fail
    // on an old kernel (nothing changed then); the second clears the flag
    // on the one descriptor to keep.
    let rc = unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
        libc::fcntl(keep, libc::F_SETFD, 0)
    };
    if rc == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Leaves the caller's process group and session behind: the process
/// forks, the parent exits at once (whoever started it reaps it and moves
/// on), and the child, adopted by init or a subreaper, leads a session of
/// its own with no controlling terminal. Call before starting any thread.
///
/// # Errors
/// What `fork` or `setsid` says (in the process that called).
pub fn daemonize() -> io::Result<()> {
    // SAFETY: called while the process has one thread (by the contract),
    // so the child may run anything; the parent ends with `_exit`, running
    // no destructor or atexit handler of the child's state.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            rustix::process::setsid()?;
            Ok(())
        }
        // SAFETY: ends this (the original) process; the child goes on.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Opens (creating it, mode 0600) a file of this user's beside a socket:
/// never through a symbolic link, close-on-exec, and never as descriptor
/// 0, 1 or 2 (a process started with stdio closed would hand those out,
/// and a child's stdio would replace them).
///
/// # Errors
/// What `open` or `fcntl` says; `ELOOP` for a symbolic link.
pub fn open_private_file(path: &std::path::Path, append: bool) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(!append)
        .write(!append)
        .append(append)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if file.as_raw_fd() > 2 {
        return Ok(file);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&file, 3)?.into())
}

/// Whether `dir` is a directory (not a link to one) of this user's that
/// nobody else may write into: where a client may create the files of a
/// broker it starts. The reason if not.
pub fn check_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != current_uid() {
        return Err(format!("{} belongs to uid {}, not to us", dir.display(), meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("{} is writable by others", dir.display()));
    }
    Ok(())
}

/// The error number of a wait with no child to wait for.
pub const ECHILD: i32 = libc::ECHILD;
