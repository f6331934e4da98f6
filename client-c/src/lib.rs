//! The memsock client as a C library: `libmemsock.so` (soname
//! `libmemsock.so.0`) and `libmemsock.a`, declared in
//! `client-c/include/memsock.h` (generated from this crate by cbindgen and
//! committed, so C users never need cbindgen).
//!
//! # Conventions
//! - Every name starts with `memsock_`; handles are opaque pointers.
//! - Every fallible function returns a [`memsock_status`]: `MEMSOCK_OK` (0)
//!   or what went wrong; [`memsock_last_error`] then gives the reason (the
//!   broker's own, where it refused), per thread.
//! - NULL or otherwise bad arguments give `MEMSOCK_INVALID_ARGUMENT`, never
//!   a crash; no Rust panic crosses into C (one becomes
//!   `MEMSOCK_INTERNAL`).
//!
//! # Map
//! - this module: status codes, the last error, version, connecting, stats
//!   and closing streams.

#![allow(non_camel_case_types)] // C names, as C users write them

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

use memsock_rs::control::ControlError;
use memsock_rs::{
    Client, ClientError, OverflowPolicy, Publisher, StreamConfig, SubscribeOptions, Subscriber, WaitStrategy, shm,
};

/// What came of a call. `MEMSOCK_OK` is 0; every other value names what
/// went wrong, and `memsock_last_error()` says more.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum memsock_status {
    /// Done.
    MEMSOCK_OK = 0,
    /// The timeout passed first.
    MEMSOCK_TIMEOUT = 1,
    /// Not now: a lossless subscriber has no room (try again), or nothing
    /// to receive yet.
    MEMSOCK_WOULD_BLOCK = 2,
    /// `memsock_subscriber_interrupt` was called.
    MEMSOCK_INTERRUPTED = 3,
    /// The stream's publisher went away (the stream stays for another).
    MEMSOCK_PUBLISHER_GONE = 4,
    /// A publisher came back to the stream.
    MEMSOCK_PUBLISHER_BACK = 5,
    /// The stream was closed.
    MEMSOCK_CLOSED = 6,
    /// The broker refused the request (the last error says why).
    MEMSOCK_REFUSED = 7,
    /// No stream of that name.
    MEMSOCK_NO_SUCH_STREAM = 8,
    /// A NULL or otherwise invalid argument.
    MEMSOCK_INVALID_ARGUMENT = 9,
    /// The connection to the broker is gone.
    MEMSOCK_DISCONNECTED = 10,
    /// No broker answers at the socket (or it admits no one of this user).
    MEMSOCK_BROKER_UNREACHABLE = 11,
    /// A limit of the broker was reached (the last error names it).
    MEMSOCK_LIMIT_REACHED = 12,
    /// The stream's shared memory could not be opened or mapped.
    MEMSOCK_SHARED_MEMORY = 13,
    /// A bug in libmemsock (a panic, caught): please report it. A publisher
    /// whose send it cut short refuses every later loan and send with this
    /// status too: free it, and the next publisher finishes the frame.
    MEMSOCK_INTERNAL = 14,
    /// The subscriber holds as many samples as it has credits: release
    /// one before receiving more.
    MEMSOCK_CREDITS_EXHAUSTED = 15,
    /// The handle was made before this process forked: in the child it is
    /// the parent's (the child calls `memsock_connect` for its own).
    MEMSOCK_FORKED = 16,
}

use memsock_status::*;

/// A failure on its way to C: its status and its message.
#[derive(Debug)]
struct Failure {
    status: memsock_status,
    /// Fixed text where a failure is routine (an empty poll), so that it
    /// allocates nothing.
    message: std::borrow::Cow<'static, str>,
}

impl Failure {
    #[cold]
    #[inline(never)]
    fn invalid(what: &str) -> Self {
        Self { status: MEMSOCK_INVALID_ARGUMENT, message: what.to_owned().into() }
    }

    #[cold]
    #[inline(never)]
    fn fixed(status: memsock_status, message: &'static str) -> Self {
        Self { status, message: message.into() }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let status = match &e {
            ClientError::Connect { .. } | ClientError::PermissionDenied { .. } | ClientError::Autostart { .. } => {
                MEMSOCK_BROKER_UNREACHABLE
            }
            ClientError::Disconnected(_) | ClientError::Protocol(_) => MEMSOCK_DISCONNECTED,
            ClientError::Timeout(_) => MEMSOCK_TIMEOUT,
            ClientError::Forked { .. } => MEMSOCK_FORKED,
            ClientError::OpenPublisher(_) | ClientError::OpenSubscriber(_) => MEMSOCK_SHARED_MEMORY,
            ClientError::Refused(refusal) => match refusal {
                ControlError::NoSuchStream(_) => MEMSOCK_NO_SUCH_STREAM,
                ControlError::StreamClosed(_) => MEMSOCK_CLOSED,
                ControlError::InvalidName(_) | ControlError::InvalidConfig(_) => MEMSOCK_INVALID_ARGUMENT,
                ControlError::LimitReached { .. } => MEMSOCK_LIMIT_REACHED,
                _ => MEMSOCK_REFUSED,
            },
            _ => MEMSOCK_INTERNAL,
        };
        Self { status, message: e.to_string().into() }
    }
}

thread_local! {
    /// The last failure's message on this thread, NUL-terminated; its
    /// buffer is reused, so a routine failure allocates nothing.
    static LAST_ERROR: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn set_last_error(message: &str) {
    // A message with a NUL in it is cut there.
    let message = message.split('\0').next().unwrap_or_default();
    // (Not during the thread's teardown, when there is no storage left.)
    let _ = LAST_ERROR.try_with(|last| {
        let mut last = last.borrow_mut();
        last.clear();
        last.extend_from_slice(message.as_bytes());
        last.push(0);
    });
}

/// Runs `f` for C: its failure becomes a status and the last error, and a
/// panic `MEMSOCK_INTERNAL` (it must not unwind into C).
///
/// The status, not the `Result`, crosses `catch_unwind` (which passes its
/// closure's result through memory): a success is a register, never a
/// 32-byte value stored in parts and reloaded whole on the per-frame path
/// (a load the processor cannot forward, which waits for every earlier
/// store, those to lines another process holds included).
#[inline(always)]
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> memsock_status {
    let status = catch_unwind(AssertUnwindSafe(|| match f() {
        Ok(()) => MEMSOCK_OK,
        Err(failure) => failed(failure),
    }));
    status.unwrap_or_else(|_| {
        set_last_error("internal error: libmemsock panicked (please report it)");
        MEMSOCK_INTERNAL
    })
}

/// Records `failure` as the thread's last error; its status.
#[cold]
#[inline(never)]
fn failed(failure: Failure) -> memsock_status {
    set_last_error(&failure.message);
    failure.status
}

/// A C string argument as UTF-8; `what` names it in the error.
///
/// # Safety
/// `s` is NULL or points to a NUL-terminated string that lives as long as
/// the borrow.
unsafe fn text<'a>(s: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if s.is_null() {
        return Err(Failure::invalid(&format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(s) };
    s.to_str().map_err(|_| Failure::invalid(&format!("{what} is not UTF-8")))
}

/// A connection to the broker: the lease of everything opened through it.
///
/// Thread-safety: may be shared between threads (every call on it is
/// safe from any thread); free it once, after every publisher and
/// subscriber made through it.
#[derive(Debug)]
pub struct memsock_client {
    inner: Client,
}

/// The library's version, `"MAJOR.MINOR.PATCH"` (static storage).
#[unsafe(no_mangle)]
pub extern "C" fn memsock_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A short fixed description of `status`, a `memsock_status` (static
/// storage; "unknown status" for a number that is none: taken as an `int`
/// so that any number is safe to pass).
#[unsafe(no_mangle)]
pub extern "C" fn memsock_status_str(status: c_int) -> *const c_char {
    const ALL: [memsock_status; 17] = [
        MEMSOCK_OK,
        MEMSOCK_TIMEOUT,
        MEMSOCK_WOULD_BLOCK,
        MEMSOCK_INTERRUPTED,
        MEMSOCK_PUBLISHER_GONE,
        MEMSOCK_PUBLISHER_BACK,
        MEMSOCK_CLOSED,
        MEMSOCK_REFUSED,
        MEMSOCK_NO_SUCH_STREAM,
        MEMSOCK_INVALID_ARGUMENT,
        MEMSOCK_DISCONNECTED,
        MEMSOCK_BROKER_UNREACHABLE,
        MEMSOCK_LIMIT_REACHED,
        MEMSOCK_SHARED_MEMORY,
        MEMSOCK_INTERNAL,
        MEMSOCK_CREDITS_EXHAUSTED,
        MEMSOCK_FORKED,
    ];
    let Some(&status) = ALL.iter().find(|&&s| s as c_int == status) else {
        return c"unknown status".as_ptr();
    };
    let text: &'static str = match status {
        MEMSOCK_OK => "ok\0",
        MEMSOCK_TIMEOUT => "timed out\0",
        MEMSOCK_WOULD_BLOCK => "would block\0",
        MEMSOCK_INTERRUPTED => "interrupted\0",
        MEMSOCK_PUBLISHER_GONE => "the publisher is gone\0",
        MEMSOCK_PUBLISHER_BACK => "a publisher is back\0",
        MEMSOCK_CLOSED => "the stream is closed\0",
        MEMSOCK_REFUSED => "refused by the broker\0",
        MEMSOCK_NO_SUCH_STREAM => "no such stream\0",
        MEMSOCK_INVALID_ARGUMENT => "invalid argument\0",
        MEMSOCK_DISCONNECTED => "disconnected from the broker\0",
        MEMSOCK_BROKER_UNREACHABLE => "the broker is unreachable\0",
        MEMSOCK_LIMIT_REACHED => "a limit of the broker was reached\0",
        MEMSOCK_SHARED_MEMORY => "cannot open the stream's shared memory\0",
        MEMSOCK_INTERNAL => "internal error\0",
        MEMSOCK_CREDITS_EXHAUSTED => "every credit is held: release a sample\0",
        MEMSOCK_FORKED => "made before a fork: the child connects anew\0",
    };
    text.as_ptr().cast()
}

/// The message of the last failure on this thread ("" if none yet). Valid
/// until the next failing call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn memsock_last_error() -> *const c_char {
    let last = LAST_ERROR.try_with(|last| {
        let last = last.borrow();
        if last.is_empty() { c"".as_ptr() } else { last.as_ptr().cast() }
    });
    last.unwrap_or(c"".as_ptr())
}

/// Connects to the broker at `socket_path_or_null` (NULL: `$MEMSOCK_SOCKET`,
/// else the default path, where a per-user broker is started if none
/// answers, unless `MEMSOCK_AUTOSTART=0`) and stores the client in `*out`.
///
/// # Safety
/// `socket_path_or_null` is NULL or a NUL-terminated string; `out` is NULL
/// (refused) or points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_connect(
    socket_path_or_null: *const c_char,
    out: *mut *mut memsock_client,
) -> memsock_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        let client = if socket_path_or_null.is_null() {
            Client::connect()?
        } else {
            // SAFETY: not NULL; NUL-terminated by the contract.
            Client::connect_to(unsafe { text(socket_path_or_null, "socket_path_or_null") }?)?
        };
        let client = Box::into_raw(Box::new(memsock_client { inner: client }));
        // SAFETY: `out` is not NULL and writable by the contract.
        unsafe { out.write(client) };
        Ok(())
    })
}

/// Ends the connection (and the lease of whatever was opened through it).
/// NULL is ignored.
///
/// # Safety
/// `client` is NULL or was returned by `memsock_connect` and not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_client_free(client: *mut memsock_client) {
    if !client.is_null() {
        // SAFETY: it came from `Box::into_raw` in `memsock_connect`, once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(client) })));
    }
}

/// The client behind a handle.
///
/// # Safety
/// `client` is NULL or a live handle from `memsock_connect`.
unsafe fn client_ref<'a>(client: *const memsock_client) -> Result<&'a Client, Failure> {
    // SAFETY: NULL or live, by the caller's contract.
    unsafe { client.as_ref() }.map(|c| &c.inner).ok_or_else(|| Failure::invalid("client is NULL"))
}

/// Closes stream `name` for good: its publisher's next send fails and its
/// subscribers get `MEMSOCK_CLOSED` after the frames already sent.
///
/// # Safety
/// `client` is NULL or a live handle; `name` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_close_stream(client: *const memsock_client, name: *const c_char) -> memsock_status {
    guard(|| {
        // SAFETY: by the contract.
        let (client, name) = unsafe { (client_ref(client)?, text(name, "name")?) };
        Ok(client.close_stream(name)?)
    })
}

/// The broker's statistics as one JSON document (what `memsock stats
/// --json` prints), of every stream or of `stream_or_null` only, in a
/// string to free with `memsock_string_free`.
///
/// # Safety
/// `client` is NULL or a live handle; `stream_or_null` NULL or a
/// NUL-terminated string; `out` NULL (refused) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_stats_json(
    client: *const memsock_client,
    stream_or_null: *const c_char,
    out: *mut *mut c_char,
) -> memsock_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: by the contract.
        let client = unsafe { client_ref(client)? };
        let stream = if stream_or_null.is_null() {
            None
        } else {
            // SAFETY: not NULL; NUL-terminated by the contract.
            Some(unsafe { text(stream_or_null, "stream_or_null")? })
        };
        let report = client.stats(stream)?;
        let json = serde_json::to_string(&report)
            .map_err(|e| Failure { status: MEMSOCK_INTERNAL, message: format!("encoding stats: {e}").into() })?;
        let json = CString::new(json).map_err(|_| Failure::fixed(MEMSOCK_INTERNAL, "stats hold a NUL byte"))?;
        // SAFETY: `out` is not NULL and writable by the contract.
        unsafe { out.write(json.into_raw()) };
        Ok(())
    })
}

/// Frees a string this library returned. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a string from this library, not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: it came from `CString::into_raw` here, once.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// How to create a stream: fill it with `memsock_stream_config_init`,
/// then change what you need. `size` is the struct's size as your header
/// has it (set by the init function): a later library that grows the
/// struct reads only what your program knows.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct memsock_stream_config {
    /// `sizeof(memsock_stream_config)`, set by `memsock_stream_config_init`.
    pub size: usize,
    /// Bytes per slot: the largest frame.
    pub slot_size: u32,
    /// Slots in the pool.
    pub slot_count: u32,
    /// Most subscribers at once.
    pub max_subscribers: u32,
    /// Lock the segment in memory (`mlock`) in every process that maps it.
    pub mlock: bool,
    /// Back the pool with 2 MiB huge pages if the system has them.
    pub huge_pages: bool,
    /// Fault every page in when mapping.
    pub prefault: bool,
    /// Stamp every frame with its send time.
    pub timestamps: bool,
    /// Frames kept for subscribers that come later (they get them first,
    /// flagged `MEMSOCK_SAMPLE_HISTORY`); 0 keeps none, 1 the last value.
    /// The stream then stays after its publisher is gone, until closed or
    /// `history_idle_ms` without publisher or subscriber.
    pub history: u32,
    /// See `history`; 0: until closed.
    pub history_idle_ms: u64,
}

/// Fills `config` with the defaults (4,096-byte slots, 16 of them, up to
/// 32 subscribers, pre-faulted, time-stamped) and its size.
///
/// # Safety
/// `config` is NULL (refused) or points to a `memsock_stream_config`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_stream_config_init(config: *mut memsock_stream_config) -> memsock_status {
    guard(|| {
        if config.is_null() {
            return Err(Failure::invalid("config is NULL"));
        }
        let d = StreamConfig::new(4096, 16);
        let c = memsock_stream_config {
            size: std::mem::size_of::<memsock_stream_config>(),
            slot_size: d.slot_size,
            slot_count: d.slot_count,
            max_subscribers: d.max_subscribers,
            mlock: d.mlock,
            huge_pages: d.huge_pages,
            prefault: d.prefault,
            timestamps: d.timestamps,
            history: d.history,
            history_idle_ms: d.history_idle_ms,
        };
        // SAFETY: not NULL, and a `memsock_stream_config` by the contract.
        unsafe { config.write(c) };
        Ok(())
    })
}

/// An option struct from C, `what` by name, once its first field — its
/// size, as the caller's header has it, set by `init` — says it is this
/// version's (a struct of an older header may be shorter: it is read no
/// further).
///
/// # Safety
/// `ptr` is NULL or points to a struct that begins with its size.
unsafe fn sized<'a, T>(ptr: *const T, what: &str, init: &str) -> Result<&'a T, Failure> {
    if ptr.is_null() {
        return Err(Failure::invalid(&format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and every version of the struct begins with its size.
    let size = unsafe { ptr.cast::<usize>().read() };
    if size != std::mem::size_of::<T>() {
        let want = std::mem::size_of::<T>();
        return Err(Failure::invalid(&format!("{what}.size is {size}, not {want}: fill it with {init}")));
    }
    // SAFETY: as large as this version's, by its size.
    Ok(unsafe { &*ptr })
}

/// A stream's configuration from C.
///
/// # Safety
/// `config` is NULL or points to a `memsock_stream_config`.
unsafe fn stream_config(config: *const memsock_stream_config) -> Result<StreamConfig, Failure> {
    // SAFETY: by the contract.
    let c = unsafe { sized(config, "config", "memsock_stream_config_init")? };
    let mut config = StreamConfig::new(c.slot_size, c.slot_count);
    config.max_subscribers = c.max_subscribers;
    config.mlock = c.mlock;
    config.huge_pages = c.huge_pages;
    config.prefault = c.prefault;
    config.timestamps = c.timestamps;
    config.history = c.history;
    config.history_idle_ms = c.history_idle_ms;
    Ok(config)
}

/// The publishing end of a stream, with its current loan.
///
/// Thread-safety: use it from one thread at a time (it may move between
/// threads); free it before its client.
#[derive(Debug)]
pub struct memsock_publisher {
    /// Holds the loan `memsock_publisher_loan` gave parked
    /// (`SampleMut::park`) until it is sent or discarded.
    inner: Publisher,
}

/// A wait without end, in pieces of this.
const FOREVER: Duration = Duration::from_secs(3600);

/// Becomes the publisher of stream `name`, creating it with `config` (or
/// taking it over, same geometry, if its publisher is gone).
///
/// # Safety
/// `client` NULL or live; `name` NULL or NUL-terminated; `config` NULL or a
/// `memsock_stream_config`; `out` NULL (refused) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_create(
    client: *const memsock_client,
    name: *const c_char,
    config: *const memsock_stream_config,
    out: *mut *mut memsock_publisher,
) -> memsock_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: by the contract.
        let (client, name, config) = unsafe { (client_ref(client)?, text(name, "name")?, stream_config(config)?) };
        let inner = client.publisher(name, &config)?;
        let publisher = Box::into_raw(Box::new(memsock_publisher { inner }));
        // SAFETY: `out` is not NULL and writable by the contract.
        unsafe { out.write(publisher) };
        Ok(())
    })
}

/// The publisher behind a handle.
///
/// # Safety
/// `publisher` is NULL or a live handle used by this thread only.
unsafe fn publisher_mut<'a>(publisher: *mut memsock_publisher) -> Result<&'a mut memsock_publisher, Failure> {
    // SAFETY: NULL or live and unshared, by the caller's contract.
    unsafe { publisher.as_mut() }.ok_or_else(|| Failure::invalid("publisher is NULL"))
}

impl From<shm::LoanError> for Failure {
    fn from(e: shm::LoanError) -> Self {
        let status = match e {
            shm::LoanError::Closed => MEMSOCK_CLOSED,
            shm::LoanError::TooManyLoans { .. } => MEMSOCK_INVALID_ARGUMENT,
            shm::LoanError::Poisoned => MEMSOCK_INTERNAL,
            shm::LoanError::Forked => MEMSOCK_FORKED,
            _ => MEMSOCK_REFUSED,
        };
        Self { status, message: e.to_string().into() }
    }
}

impl From<shm::SendError> for Failure {
    fn from(e: shm::SendError) -> Self {
        let status = match e {
            // Routine while a lossless subscriber catches up: no allocation.
            shm::SendError::WouldBlock { .. } => {
                return Self::fixed(MEMSOCK_WOULD_BLOCK, "a lossless subscriber has no room yet");
            }
            shm::SendError::Timeout => {
                return Self::fixed(MEMSOCK_TIMEOUT, "timed out waiting for a lossless subscriber to make room");
            }
            shm::SendError::TooLarge { .. } => MEMSOCK_INVALID_ARGUMENT,
            shm::SendError::Closed => MEMSOCK_CLOSED,
            shm::SendError::Loan(e) => return e.into(),
            shm::SendError::Poisoned => MEMSOCK_INTERNAL,
            shm::SendError::Forked => MEMSOCK_FORKED,
            _ => MEMSOCK_REFUSED,
        };
        Self { status, message: e.to_string().into() }
    }
}

/// Loans a slot to write the next frame in place: `*data` gets its
/// address, `*capacity` its size. The loan stays current until sent
/// (`memsock_publisher_send`) or discarded; loaning again meanwhile gives
/// the same slot.
///
/// # Safety
/// `publisher` NULL or live (this thread's); `data` and `capacity` NULL
/// (refused) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_loan(
    publisher: *mut memsock_publisher,
    data: *mut *mut c_void,
    capacity: *mut usize,
) -> memsock_status {
    guard(|| {
        if data.is_null() || capacity.is_null() {
            return Err(Failure::invalid("data or capacity is NULL"));
        }
        // SAFETY: by the contract.
        let p = unsafe { publisher_mut(publisher)? };
        let (ptr, cap) = p.inner.loan_parked()?;
        // SAFETY: both writable by the contract.
        unsafe {
            data.write(ptr.cast());
            capacity.write(cap);
        }
        Ok(())
    })
}

/// `send_current` without end: after each `FOREVER` waited, again.
#[cold]
#[inline(never)]
fn send_forever(p: &mut memsock_publisher, len: usize) -> Option<Result<shm::SendInfo, shm::SendError>> {
    loop {
        match p.inner.send_parked_timeout(len, FOREVER) {
            Some(Err(shm::SendError::Timeout)) => {}
            sent => return sent,
        }
    }
}

/// Sends the first `len` bytes of the current loan, waiting at most
/// `timeout_ns` (negative: forever; 0: not at all) for a lossless
/// subscriber to make room. On `MEMSOCK_WOULD_BLOCK` or `MEMSOCK_TIMEOUT`
/// the loan stays current: send it again, or discard it.
#[inline(always)]
fn send_current(p: &mut memsock_publisher, len: usize, timeout_ns: i64) -> Result<(), Failure> {
    // One try, and only if a lossless subscriber is full the waiting (out
    // of line in the data plane), as a Rust sender's.
    let sent = match timeout_ns {
        0 => p.inner.try_send_parked(len),
        t => {
            let timeout = if t < 0 { FOREVER } else { Duration::from_nanos(t as u64) };
            match p.inner.send_parked_timeout(len, timeout) {
                Some(Err(shm::SendError::Timeout)) if t < 0 => send_forever(p, len),
                sent => sent,
            }
        }
    };
    match sent {
        None => Err(Failure::invalid("no current loan: call memsock_publisher_loan")),
        Some(Ok(_)) => Ok(()),
        Some(Err(shm::SendError::TooLarge { len, slot_size })) => {
            Err(Failure::invalid(&format!("len {len} is more than the slot's {slot_size} bytes")))
        }
        Some(Err(e)) => Err(e.into()),
    }
}

/// Sends the first `len` bytes of the current loan without waiting: a
/// full lossless subscriber gives `MEMSOCK_WOULD_BLOCK`. The loan stays
/// current after `MEMSOCK_WOULD_BLOCK` (and `MEMSOCK_TIMEOUT` from
/// `memsock_publisher_send_timeout`) and after `MEMSOCK_INVALID_ARGUMENT`
/// for a `len` above the slot; after any other failure (`MEMSOCK_CLOSED`,
/// ...) it is gone: loan again.
///
/// # Safety
/// `publisher` NULL or live (this thread's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_send(publisher: *mut memsock_publisher, len: usize) -> memsock_status {
    // SAFETY: by the contract.
    guard(|| send_current(unsafe { publisher_mut(publisher)? }, len, 0))
}

/// As `memsock_publisher_send`, waiting at most `timeout_ns` for room
/// (negative: forever); `MEMSOCK_TIMEOUT` leaves the loan current.
///
/// # Safety
/// `publisher` NULL or live (this thread's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_send_timeout(
    publisher: *mut memsock_publisher,
    len: usize,
    timeout_ns: i64,
) -> memsock_status {
    // SAFETY: by the contract.
    guard(|| send_current(unsafe { publisher_mut(publisher)? }, len, timeout_ns))
}

/// Drops the current loan unsent (nothing if there is none).
///
/// # Safety
/// `publisher` NULL or live (this thread's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_discard(publisher: *mut memsock_publisher) -> memsock_status {
    guard(|| {
        // SAFETY: by the contract.
        let p = unsafe { publisher_mut(publisher)? };
        // Dropped unsent: the slot goes straight back.
        drop(p.inner.unpark());
        Ok(())
    })
}

/// Copies `len` bytes into a slot and sends them, waiting at most
/// `timeout_ns` for room (negative: forever; 0: not at all). A current
/// loan is left as it is.
///
/// # Safety
/// `publisher` NULL or live (this thread's); `bytes` NULL only if `len`
/// is 0, else `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_send_copy(
    publisher: *mut memsock_publisher,
    bytes: *const c_void,
    len: usize,
    timeout_ns: i64,
) -> memsock_status {
    guard(|| {
        // SAFETY: by the contract.
        let p = unsafe { publisher_mut(publisher)? };
        let payload: &[u8] = match (bytes.is_null(), len) {
            (_, 0) => &[],
            (true, _) => return Err(Failure::invalid("bytes is NULL")),
            // SAFETY: `len` readable bytes at `bytes` by the contract.
            (false, _) => unsafe { std::slice::from_raw_parts(bytes.cast(), len) },
        };
        match timeout_ns {
            t if t < 0 => loop {
                match p.inner.send_timeout(payload, FOREVER) {
                    Err(shm::SendError::Timeout) => continue,
                    r => return Ok(r.map(drop)?),
                }
            },
            0 => Ok(p.inner.send(payload).map(drop)?),
            t => Ok(p.inner.send_timeout(payload, Duration::from_nanos(t as u64)).map(drop)?),
        }
    })
}

/// Stops publishing: the stream stays, for another publisher. Drops a
/// current loan. NULL is ignored.
///
/// # Safety
/// `publisher` NULL or a live handle from `memsock_publisher_create`, not
/// freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_free(publisher: *mut memsock_publisher) {
    if !publisher.is_null() {
        // SAFETY: it came from `Box::into_raw` in `memsock_publisher_create`, once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(publisher) })));
    }
}

/// `memsock_subscribe_options.policy`: a full subscriber loses the newest
/// frame.
pub const MEMSOCK_DROP_NEWEST: u32 = 0;
/// `policy`: a full subscriber loses its oldest queued frame.
pub const MEMSOCK_KEEP_LATEST: u32 = 1;
/// `policy`: a full subscriber makes the publisher wait (or fail with
/// `MEMSOCK_WOULD_BLOCK`): it loses nothing.
pub const MEMSOCK_LOSSLESS: u32 = 2;
/// `memsock_subscribe_options.wait`: a blocking receive sleeps in the
/// kernel (futex) until a frame comes.
pub const MEMSOCK_WAIT_PARK: u32 = 0;
/// `wait`: spins `spin_us` microseconds, then sleeps.
pub const MEMSOCK_WAIT_SPIN_THEN_PARK: u32 = 1;
/// `wait`: spins, never sleeps (a core per subscriber, the least latency).
pub const MEMSOCK_WAIT_SPIN: u32 = 2;

/// How to subscribe: fill it with `memsock_subscribe_options_init`, then
/// change what you need. `size` as for `memsock_stream_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct memsock_subscribe_options {
    /// `sizeof(memsock_subscribe_options)`, set by the init function.
    pub size: usize,
    /// Most frames it may hold at once, queued plus borrowed.
    pub credits: u32,
    /// `MEMSOCK_DROP_NEWEST`, `MEMSOCK_KEEP_LATEST` or `MEMSOCK_LOSSLESS`.
    pub policy: u32,
    /// `MEMSOCK_WAIT_PARK`, `MEMSOCK_WAIT_SPIN_THEN_PARK` or `MEMSOCK_WAIT_SPIN`.
    pub wait: u32,
    /// Spin time for `MEMSOCK_WAIT_SPIN_THEN_PARK`, in microseconds.
    pub spin_us: u32,
    /// If the stream does not exist yet, wait for it (else
    /// `MEMSOCK_NO_SUCH_STREAM`).
    pub wait_for_stream: bool,
    /// Of a stream that keeps a history, receive at most this many of its
    /// latest frames first (`UINT32_MAX`, the default: all; 0: none).
    pub history: u32,
}

/// Fills `options` with the defaults (4 credits, drop-newest, park, do not
/// wait for the stream) and its size.
///
/// # Safety
/// `options` is NULL (refused) or points to a `memsock_subscribe_options`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscribe_options_init(options: *mut memsock_subscribe_options) -> memsock_status {
    guard(|| {
        if options.is_null() {
            return Err(Failure::invalid("options is NULL"));
        }
        let o = memsock_subscribe_options {
            size: std::mem::size_of::<memsock_subscribe_options>(),
            credits: SubscribeOptions::default().credits,
            policy: MEMSOCK_DROP_NEWEST,
            wait: MEMSOCK_WAIT_PARK,
            spin_us: 50,
            wait_for_stream: false,
            history: u32::MAX,
        };
        // SAFETY: not NULL, and a `memsock_subscribe_options` by the contract.
        unsafe { options.write(o) };
        Ok(())
    })
}

/// Subscription options from C.
///
/// # Safety
/// `options` is NULL or points to a `memsock_subscribe_options`.
unsafe fn subscribe_options(options: *const memsock_subscribe_options) -> Result<SubscribeOptions, Failure> {
    // SAFETY: by the contract.
    let o = unsafe { sized(options, "options", "memsock_subscribe_options_init")? };
    let policy = match o.policy {
        MEMSOCK_DROP_NEWEST => OverflowPolicy::DropNewest,
        MEMSOCK_KEEP_LATEST => OverflowPolicy::KeepLatest,
        MEMSOCK_LOSSLESS => OverflowPolicy::Lossless,
        other => return Err(Failure::invalid(&format!("policy {other} is none of the MEMSOCK_* policies"))),
    };
    let wait = match o.wait {
        MEMSOCK_WAIT_PARK => WaitStrategy::Park,
        MEMSOCK_WAIT_SPIN_THEN_PARK => WaitStrategy::SpinThenPark { spin_us: o.spin_us },
        MEMSOCK_WAIT_SPIN => WaitStrategy::Spin,
        other => return Err(Failure::invalid(&format!("wait {other} is none of the MEMSOCK_WAIT_* strategies"))),
    };
    Ok(SubscribeOptions {
        credits: o.credits,
        policy,
        wait,
        wait_for_stream: o.wait_for_stream,
        credits_up_to: false,
        history: o.history,
    })
}

/// A subscriber of a stream.
///
/// Thread-safety: use it from one thread at a time (it may move between
/// threads, without samples out); free it before its client. The one
/// exception is `memsock_subscriber_interrupt`, which any thread or a
/// signal handler may call while the handle is live.
#[derive(Debug)]
pub struct memsock_subscriber {
    /// Set by `memsock_subscriber_interrupt`, cleared by the receive that
    /// reports it.
    interrupted: AtomicBool,
    /// Wakes a receive asleep on the subscriber's channel.
    interrupter: shm::Interrupter,
    /// Waits for the next frame when a receive finds none, stopping early
    /// on `interrupted`.
    watcher: shm::Watcher,
    inner: Subscriber,
}

impl memsock_subscriber {
    /// Reports an interrupt once: true if one was pending (now taken).
    #[inline]
    fn take_interrupt(&self) -> bool {
        // Relaxed first: a receive pays a plain load when nothing is
        // pending. The swap's Acquire pairs with the Release store in
        // `memsock_subscriber_interrupt` (nothing else is published with
        // it, but a caller may rely on what it wrote before interrupting).
        self.interrupted.load(Relaxed) && self.interrupted.swap(false, Acquire)
    }
}

/// A received frame, in storage the caller owns: `data` points into the
/// stream's shared memory (read-only), `len` bytes, until
/// `memsock_sample_release`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct memsock_sample {
    /// The frame's bytes (NULL once released).
    pub data: *const c_void,
    /// Its length.
    pub len: usize,
    /// Its sequence number in the stream: a jump shows frames lost.
    pub seq: u64,
    /// When it was sent (monotonic clock, ns; 0 if the stream has no
    /// timestamps).
    pub timestamp_ns: u64,
    /// For `memsock_sample_release`: do not change.
    pub slot: u32,
    /// `MEMSOCK_SAMPLE_*` bits.
    pub flags: u32,
}

/// `memsock_sample.flags`: the frame comes from the stream's history (sent
/// before this subscriber came, received first).
pub const MEMSOCK_SAMPLE_HISTORY: u32 = 1;

/// Subscribes to stream `name`.
///
/// # Safety
/// `client` NULL or live; `name` NULL or NUL-terminated; `options` NULL or
/// a `memsock_subscribe_options`; `out` NULL (refused) or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_create(
    client: *const memsock_client,
    name: *const c_char,
    options: *const memsock_subscribe_options,
    out: *mut *mut memsock_subscriber,
) -> memsock_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: by the contract.
        let (client, name, options) =
            unsafe { (client_ref(client)?, text(name, "name")?, subscribe_options(options)?) };
        let inner = client.subscriber(name, &options)?;
        let watcher = inner.watcher();
        let interrupter = watcher.interrupter();
        let subscriber = Box::into_raw(Box::new(memsock_subscriber {
            interrupted: AtomicBool::new(false),
            interrupter,
            watcher,
            inner,
        }));
        // SAFETY: `out` is not NULL and writable by the contract.
        unsafe { out.write(subscriber) };
        Ok(())
    })
}

/// The subscriber behind a handle.
///
/// # Safety
/// `subscriber` is NULL or a live handle used by this thread only.
unsafe fn subscriber_ref<'a>(subscriber: *const memsock_subscriber) -> Result<&'a memsock_subscriber, Failure> {
    // SAFETY: NULL or live, by the caller's contract.
    unsafe { subscriber.as_ref() }.ok_or_else(|| Failure::invalid("subscriber is NULL"))
}

#[cold]
fn interrupted() -> Failure {
    Failure::fixed(MEMSOCK_INTERRUPTED, "interrupted by memsock_subscriber_interrupt")
}

#[cold]
fn recv_failure(e: shm::RecvError) -> Failure {
    let status = match e {
        // Routine: no allocation.
        shm::RecvError::Timeout => return Failure::fixed(MEMSOCK_TIMEOUT, "timed out waiting for a frame"),
        shm::RecvError::PublisherGone => return Failure::fixed(MEMSOCK_PUBLISHER_GONE, "the publisher is gone"),
        shm::RecvError::PublisherBack => return Failure::fixed(MEMSOCK_PUBLISHER_BACK, "a publisher is back"),
        shm::RecvError::CreditsExhausted { .. } => MEMSOCK_CREDITS_EXHAUSTED,
        shm::RecvError::Detached => MEMSOCK_DISCONNECTED,
        shm::RecvError::Closed => MEMSOCK_CLOSED,
        shm::RecvError::Forked => MEMSOCK_FORKED,
        _ => MEMSOCK_SHARED_MEMORY,
    };
    Failure { status, message: e.to_string().into() }
}

/// Hands a sample to C: its slot stays taken until `memsock_sample_release`.
///
/// # Safety
/// `out` is writable.
unsafe fn hand_out(sample: shm::Sample<'_>, out: *mut memsock_sample) {
    let (data, info) = sample.forget();
    let sample = memsock_sample {
        data: data.cast(),
        len: info.len as usize,
        seq: info.seq,
        timestamp_ns: info.timestamp_ns,
        slot: info.slot,
        flags: if info.history { MEMSOCK_SAMPLE_HISTORY } else { 0 },
    };
    // SAFETY: writable by the contract.
    unsafe { out.write(sample) };
}

/// Takes the next frame if one is queued (`MEMSOCK_WOULD_BLOCK` if none),
/// without waiting. Publisher news (`MEMSOCK_PUBLISHER_GONE`, `_BACK`)
/// and `MEMSOCK_CLOSED` come in order with the frames.
///
/// # Safety
/// `subscriber` NULL or live (this thread's); `out` NULL (refused) or a
/// writable `memsock_sample`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_try_recv(
    subscriber: *const memsock_subscriber,
    out: *mut memsock_sample,
) -> memsock_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: by the contract.
        let sub = unsafe { subscriber_ref(subscriber)? };
        if sub.take_interrupt() {
            return Err(interrupted());
        }
        let sample = sub.inner.try_recv().map_err(|e| match e {
            shm::TryRecvError::Empty => Failure::fixed(MEMSOCK_WOULD_BLOCK, "no frame is queued"),
            e => recv_failure(e.into()),
        })?;
        // SAFETY: `out` is not NULL and writable by the contract.
        unsafe { hand_out(sample, out) };
        Ok(())
    })
}

/// Waits up to `timeout_ns` (negative: without end) for the next frame.
/// Returns `MEMSOCK_INTERRUPTED` instead, at once, if
/// `memsock_subscriber_interrupt` was called since the last receive that
/// returned it (also before this call began: no interrupt is lost).
///
/// # Safety
/// As `memsock_subscriber_try_recv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_recv(
    subscriber: *const memsock_subscriber,
    timeout_ns: i64,
    out: *mut memsock_sample,
) -> memsock_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::invalid("out is NULL"));
        }
        // SAFETY: by the contract.
        let sub = unsafe { subscriber_ref(subscriber)? };
        // A frame that is queued costs what `try_recv` does: the waiting,
        // and the clock, out of line.
        if sub.take_interrupt() {
            return Err(interrupted());
        }
        match sub.inner.try_recv() {
            Ok(sample) => {
                // SAFETY: `out` is not NULL and writable by the contract.
                unsafe { hand_out(sample, out) };
                Ok(())
            }
            // SAFETY: `out` was checked not NULL above and is writable by
            // the contract: what `wait_and_recv` requires.
            Err(shm::TryRecvError::Empty) => unsafe { wait_and_recv(sub, timeout_ns, out) },
            Err(e) => Err(recv_failure(e.into())),
        }
    })
}

/// `memsock_subscriber_recv` once nothing was queued.
///
/// # Safety
/// `out` is not NULL and writable.
#[cold]
#[inline(never)]
unsafe fn wait_and_recv(sub: &memsock_subscriber, timeout_ns: i64, out: *mut memsock_sample) -> Result<(), Failure> {
    let deadline = match timeout_ns {
        t if t < 0 => None,
        t => Instant::now().checked_add(Duration::from_nanos(t as u64)),
    };
    loop {
        let woke = sub.watcher.wait(sub.inner.position(), deadline, || sub.interrupted.load(Relaxed));
        if !woke && !sub.interrupted.load(Relaxed) {
            return Err(recv_failure(shm::RecvError::Timeout));
        }
        if sub.take_interrupt() {
            return Err(interrupted());
        }
        match sub.inner.try_recv() {
            Ok(sample) => {
                // SAFETY: `out` is not NULL and writable by the caller's
                // contract.
                unsafe { hand_out(sample, out) };
                return Ok(());
            }
            Err(shm::TryRecvError::Empty) => {}
            Err(e) => return Err(recv_failure(e.into())),
        }
    }
}

/// Gives a received frame's slot back (its bytes may be reused from
/// now): every sample once. `sample->data` is NULL afterwards.
///
/// # Safety
/// `subscriber` NULL or live (this thread's); `sample` NULL or a sample
/// it gave.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_sample_release(
    subscriber: *const memsock_subscriber,
    sample: *mut memsock_sample,
) -> memsock_status {
    guard(|| {
        // SAFETY: by the contract.
        let (sub, sample) = unsafe { (subscriber_ref(subscriber)?, sample.as_mut()) };
        let sample = sample.ok_or_else(|| Failure::invalid("sample is NULL"))?;
        if sample.data.is_null() {
            return Err(Failure::invalid("the sample was released already"));
        }
        if sub.inner.is_forked() {
            return Err(recv_failure(shm::RecvError::Forked));
        }
        if !sub.inner.release_slot(sample.slot) {
            return Err(Failure::invalid("not a sample this subscriber holds"));
        }
        sample.data = std::ptr::null();
        Ok(())
    })
}

/// Changes the subscriber's credits (the broker checks the pool can
/// honour them).
///
/// # Safety
/// `subscriber` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_set_credits(
    subscriber: *const memsock_subscriber,
    credits: u32,
) -> memsock_status {
    // SAFETY: by the contract.
    guard(|| Ok(unsafe { subscriber_ref(subscriber)? }.inner.set_credits(credits)?))
}

/// The stream's publisher generation (0 for NULL): odd while a publisher
/// is attached, it changes whenever one comes or goes. Level-triggered,
/// unlike `MEMSOCK_PUBLISHER_GONE` / `_BACK`, which a receive reports
/// once: compare two readings to know whether the publisher changed in
/// between (its last frames may still be queued).
///
/// # Safety
/// `subscriber` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_publisher_generation(subscriber: *const memsock_subscriber) -> u64 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: by the contract.
        unsafe { subscriber_ref(subscriber) }.map_or(0, |s| s.inner.publisher_generation())
    }))
    .unwrap_or(0)
}

/// 1 once the broker that handed out this client's streams is gone (shut
/// down, crashed), else 0 (and 0 for NULL). Its publishers and
/// subscribers go on meanwhile, but nothing new can be asked of the
/// broker through it, and a new broker knows none of its streams; a
/// warning is logged when it happens.
///
/// # Safety
/// `client` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_client_broker_gone(client: *const memsock_client) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: by the contract.
        unsafe { client_ref(client) }.is_ok_and(|c| c.broker_gone().is_some())
    }))
    .map_or(0, c_int::from)
}

/// As `memsock_client_broker_gone`, for the client a publisher was made
/// by: sending goes on meanwhile.
///
/// # Safety
/// `publisher` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_publisher_broker_gone(publisher: *const memsock_publisher) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: NULL or live, by the contract.
        unsafe { publisher.as_ref() }.is_some_and(|p| p.inner.broker_gone().is_some())
    }))
    .map_or(0, c_int::from)
}

/// As `memsock_client_broker_gone`, for the client a subscriber was made
/// by: receiving goes on meanwhile.
///
/// # Safety
/// `subscriber` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_broker_gone(subscriber: *const memsock_subscriber) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: by the contract.
        unsafe { subscriber_ref(subscriber) }.is_ok_and(|s| s.inner.broker_gone().is_some())
    }))
    .map_or(0, c_int::from)
}

/// Makes the subscriber's receive in progress, or else its next one,
/// return `MEMSOCK_INTERRUPTED` (once per interrupt; several before a
/// receive count as one). Safe from any thread and from a signal handler:
/// an atomic store and a futex wake, nothing else (no allocation, no lock,
/// and the last error is not set). Returns `MEMSOCK_INVALID_ARGUMENT` for
/// NULL.
///
/// # Safety
/// `subscriber` NULL or live: not freed before this returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_interrupt(subscriber: *const memsock_subscriber) -> memsock_status {
    // SAFETY: NULL or live by the contract; only fields that are safe to
    // share are touched (an atomic and the channel mapping).
    let Some(sub) = (unsafe { subscriber.as_ref() }) else { return MEMSOCK_INVALID_ARGUMENT };
    // Release pairs with the Acquire swap in `take_interrupt`; the waker's
    // SeqCst fence (in `interrupt`) orders it before the wake, against the
    // sleeper's fence after it announces itself (`wait_for`).
    sub.interrupted.store(true, Release);
    sub.interrupter.interrupt();
    MEMSOCK_OK
}

/// Unsubscribes. Samples not released are given back, and their `data`
/// no longer points anywhere: release or drop them first. NULL is ignored.
///
/// # Safety
/// `subscriber` NULL or a live handle from `memsock_subscriber_create`, not
/// freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memsock_subscriber_free(subscriber: *mut memsock_subscriber) {
    if !subscriber.is_null() {
        // SAFETY: it came from `Box::into_raw` in `memsock_subscriber_create`, once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(subscriber) })));
    }
}
