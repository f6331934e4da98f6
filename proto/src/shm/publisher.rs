//! The publisher's handles: [`Publisher`], the sample it writes
//! ([`SampleMut`]) and a loan detached from it ([`Loan`]), over the
//! lock-free core (`core::publisher`).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::core::mem::StreamMem;
use super::core::publisher::{AttachRefusal, Chan, CommitRefusal, Inbox, LoanError, PubCore, SendInfo};
use super::core::served::Served;
use super::core::wait::Backoff;
use super::map::{ChannelMap, MapError, Payloads, StreamMap};
use crate::platform;
use crate::shm::layout::FLAG_TIMESTAMPS;

/// How long a blocked `send_timeout` polls before sleeping.
const PUBLISHER_SPIN: Duration = Duration::from_micros(20);

/// Why a publisher could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenPublisherError {
    /// A segment file could not be mapped or is invalid.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The data file descriptor is read-only.
    #[error("the stream's data file was passed read-only; a publisher needs it read-write")]
    ReadOnly,
    /// A channel file was given for an index the stream does not have.
    #[error("channel file for subscriber #{index}, but the stream has {max} places")]
    ChannelIndex {
        /// The index given.
        index: u32,
        /// The stream's subscriber capacity.
        max: u32,
    },
    /// Another publisher is attached: a stream has one at a time.
    #[error("stream already has a publisher (pid {pid})")]
    PublisherExists {
        /// Its process id.
        pid: u32,
    },
    /// The owner kept the stream busy reclaiming slots for too long.
    #[error("stream is busy with reclamation; try again")]
    Busy,
    /// The owner closed the stream.
    #[error("the stream is closed")]
    Closed,
}

/// Why a frame was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// A lossless subscriber has no credit left: nothing was sent to
    /// anyone. Retry later, or use `send_timeout`.
    #[error("lossless subscriber #{subscriber} has no room")]
    WouldBlock {
        /// Index of the subscriber that blocked.
        subscriber: u32,
    },
    /// `send_timeout` waited its whole timeout for a lossless subscriber.
    #[error("timed out waiting for a lossless subscriber to make room")]
    Timeout,
    /// The payload does not fit in a slot.
    #[error("frame of {len} bytes does not fit the {slot_size}-byte slots")]
    TooLarge {
        /// Bytes offered.
        len: usize,
        /// The stream's slot size.
        slot_size: usize,
    },
    /// No slot could be loaned.
    #[error(transparent)]
    Loan(#[from] LoanError),
    /// The owner closed the stream.
    #[error("the stream is closed")]
    Closed,
    /// The owner declared this publisher gone (another may have taken
    /// over).
    #[error("this publisher was declared gone; it may no longer publish")]
    Replaced,
    /// This is a copy of the publisher in a child forked since it opened.
    #[error("this publisher was opened before a fork: in the forked child, connect and publish anew")]
    Forked,
    /// A panic cut one of this publisher's loans or sends short (see
    /// [`LoanError::Poisoned`]): drop it.
    #[error("a loan or send of this publisher panicked part-way; drop it, and the stream is repaired")]
    Poisoned,
}

/// A frame that could not be sent, handed back with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Unsent<'p> {
    /// Why it was not sent.
    pub error: SendError,
    /// The frame, still loaned: send it again later or drop it.
    pub sample: SampleMut<'p>,
}

/// The publisher's core, as a [`Publisher`] holds it.
type Core = PubCore<StreamMap, ChannelMap>;

/// Where a [`Publisher`] keeps its core: in place if nobody else ever
/// touches it (a stream without history), else shared with the thread
/// that may serve it.
// In place on purpose: a boxed core would cost a load on every call, and
// there is one publisher per stream.
#[allow(clippy::large_enum_variant)]
enum CoreCell {
    Plain(std::cell::UnsafeCell<Core>),
    Shared(Arc<Served<Core>>),
}

impl std::fmt::Debug for CoreCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(_) => f.write_str("CoreCell::Plain"),
            Self::Shared(s) => s.fmt(f),
        }
    }
}

/// The publishing end of a stream. One per stream at a time.
///
/// `Send` but not `Sync`: move it to the thread that publishes.
#[derive(Debug)]
pub struct Publisher {
    /// The core, which the client's connection thread may serve while this
    /// publisher is idle (a stream with history: see `Served`).
    served: CoreCell,
    /// The payload addresses, in the core's mapping (which lives as long
    /// as this publisher: `drop` drops the core).
    payloads: Payloads,
    /// One thread uses a publisher (`Served::enter`'s contract).
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
    /// Whether frames carry their send time (`FLAG_TIMESTAMPS`).
    stamps: bool,
    /// Where dropped [`Loan`]s leave their slots.
    dropped: Arc<DroppedLoans>,
    /// Tells this publisher's detached loans from others'.
    id: u64,
    /// When it opened: in a child forked since, the writer role is the
    /// parent's, and this copy must not write.
    forks: platform::ForkStamp,
    /// Where channels of subscribers admitted later arrive.
    inbox: ChannelInbox,
    /// The loan set aside by [`SampleMut::park`]: its slot and length.
    parked: Option<(u32, u32)>,
}

/// Where the channel files of subscribers admitted after a [`Publisher`]
/// opened are handed to it, from any thread (the one talking to the
/// owner): [`Publisher::channel_inbox`]. The publisher picks them up when
/// the owner activates their subscribers, off its per-frame path.
#[derive(Debug, Clone)]
pub struct ChannelInbox {
    pub(crate) inner: Arc<Inbox<ChannelMap>>,
    capacity: u32,
    max: u32,
    flags: u32,
    /// The publisher's core, for [`serve`](Self::serve) (a stream with
    /// history only).
    served: Option<std::sync::Weak<Served<Core>>>,
}

impl ChannelInbox {
    /// Maps subscriber `index`'s channel file, created for its generation
    /// `generation`, and hands it to the publisher. Do it before the owner
    /// activates the subscriber: the publisher delivers only to
    /// subscribers whose channel it has.
    ///
    /// # Errors
    /// [`OpenPublisherError::ChannelIndex`] for an index the stream does not
    /// have, [`OpenPublisherError::Map`] if the file cannot be mapped.
    pub fn deliver(&self, index: u32, generation: u64, fd: BorrowedFd<'_>) -> Result<(), OpenPublisherError> {
        if index >= self.max {
            return Err(OpenPublisherError::ChannelIndex { index, max: self.max });
        }
        let map = ChannelMap::open_for_publisher(fd, self.capacity, self.flags)?;
        // (As in `open`: 0 is a file serving every generation.)
        self.inner.push(index, Chan { generation: (generation != 0).then_some(generation), map });
        Ok(())
    }

    /// Hands the stream's history to subscribers the owner attached since
    /// the publisher last looked, on its behalf: at once if the publisher's
    /// thread is not in a call (it may not send for a while), else as that
    /// call ends. The owner asks for it after attaching a subscriber to a
    /// stream with history (`Event::Serve`). Nothing for a stream without
    /// history, a publisher gone, or in a child forked since it opened.
    pub fn serve(&self) {
        // (`request` does nothing in a child forked since.)
        if let Some(served) = self.served.as_ref().and_then(std::sync::Weak::upgrade) {
            served.request(Core::serve);
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if self.forked() {
            // The parent holds the role: leave shared memory alone. (No
            // thread but this one survived the fork: nobody serves.)
            match &self.served {
                CoreCell::Plain(core) => core_mut(core).disown(),
                // SAFETY: the owner, with no requester in this process.
                CoreCell::Shared(served) => unsafe { served.get_mut() }.disown(),
            }
            return;
        }
        if let Some((slot, _)) = self.parked.take() {
            // As a `SampleMut` dropped unsent.
            self.with_core(|c| c.abandon(slot));
        }
        // No request is served from now on, and the core comes back to be
        // dropped (a `Plain` one goes with the publisher, just after).
        if let CoreCell::Shared(served) = &self.served {
            // SAFETY: the owner, once. The core goes here, on this thread:
            // the role is let go of before `drop` returns.
            drop(unsafe { served.close() });
        }
    }
}

/// The core of a `CoreCell::Plain`, for its publisher's one thread.
#[inline(always)]
#[allow(clippy::mut_from_ref)]
fn core_mut(core: &std::cell::UnsafeCell<Core>) -> &mut Core {
    // SAFETY: only the publisher reaches it (nobody else is given it), from
    // its one thread (`Publisher` is not `Sync`), never in a nested call.
    unsafe { &mut *core.get() }
}

/// Source of [`Publisher`] ids.
static NEXT_PUBLISHER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Slots of [`Loan`]s dropped unsent, possibly on other threads, until
/// the publisher's next loan takes them back. Touched only when a loan
/// is dropped: the loan path loads one flag.
#[derive(Debug, Default)]
struct DroppedLoans {
    pending: AtomicBool,
    slots: Mutex<Vec<u32>>,
}

/// A loaned slot detached from the borrow of its publisher
/// ([`SampleMut::detach`]), e.g. to be held by a Python object: give it
/// back to [`Publisher::resume`] to write and send it, or drop it to
/// discard it (its publisher takes the slot and the loan back on its
/// next loan). It counts against the publisher's loan budget until then.
#[derive(Debug)]
pub struct Loan {
    slot: u32,
    len: u32,
    publisher: u64,
    /// `None` once resumed.
    dropped: Option<Arc<DroppedLoans>>,
    /// Its publisher's: in a child forked since, the slot is the parent's.
    forks: platform::ForkStamp,
}

impl Drop for Loan {
    fn drop(&mut self) {
        if self.forks.forked() {
            // The parent's loan: its list may be locked by a thread the
            // fork left behind, and the slot is not ours to give back.
            return;
        }
        if let Some(dropped) = self.dropped.take() {
            // A poisoned lock only means another dropper panicked: the list is fine.
            dropped.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(self.slot);
            dropped.pending.store(true, Ordering::Release);
        }
    }
}

impl Loan {
    /// Whether this process is a child forked since the loan was made:
    /// its slot is the parent's ([`Publisher::resume`] refuses it), and
    /// writing it would change a frame the parent is writing or has sent.
    #[inline]
    pub fn is_forked(&self) -> bool {
        self.forks.forked()
    }

    /// The frame length set so far.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether no length was set yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Publisher {
    /// Attaches as the publisher of the stream whose data file (opened
    /// read-write) and channel files — each with its subscriber index and
    /// generation (0: the file serves every generation of its index), a
    /// later one replacing an earlier one of the same index — are given. Channels of subscribers admitted later are handed over
    /// through its [`channel_inbox`](Self::channel_inbox).
    ///
    /// # Errors
    /// [`OpenPublisherError`] if the files are not a valid stream, the
    /// data file is read-only, another publisher is attached or the
    /// stream is closed.
    pub fn open(data: BorrowedFd<'_>, channels: &[(u32, u64, BorrowedFd<'_>)]) -> Result<Self, OpenPublisherError> {
        if !platform::is_writable(data).map_err(MapError::Io)? {
            return Err(OpenPublisherError::ReadOnly);
        }
        let stream = StreamMap::open(data, true)?;
        let payloads = stream.payloads();
        let g = stream.layout().geometry;
        let mut maps: Vec<Option<Chan<ChannelMap>>> = (0..g.max_subscribers).map(|_| None).collect();
        for &(index, generation, fd) in channels {
            let place = maps
                .get_mut(index as usize)
                .ok_or(OpenPublisherError::ChannelIndex { index, max: g.max_subscribers })?;
            let map = ChannelMap::open_for_publisher(fd, g.queue_capacity, stream.flags())?;
            // (Generations start at 1: 0 is a file serving every one.)
            *place = Some(Chan { generation: (generation != 0).then_some(generation), map });
        }
        let forks = platform::ForkStamp::now();
        let flags = stream.flags();
        let mut inbox = ChannelInbox {
            inner: Arc::default(),
            capacity: g.queue_capacity,
            max: g.max_subscribers,
            flags,
            served: None,
        };
        let attached = PubCore::attach_with(stream, maps, Some(inbox.inner.clone()), platform::current_pid());
        let core = attached.map_err(|r| match r {
            AttachRefusal::Closed => OpenPublisherError::Closed,
            AttachRefusal::Busy => OpenPublisherError::Busy,
            AttachRefusal::PublisherExists { pid } => OpenPublisherError::PublisherExists { pid },
        })?;
        let stamps = flags & FLAG_TIMESTAMPS != 0;
        let id = NEXT_PUBLISHER_ID.fetch_add(1, Ordering::Relaxed);
        let history = g.history > 0;
        let served = if history {
            let served = Arc::new(Served::new(core));
            inbox.served = Some(Arc::downgrade(&served));
            CoreCell::Shared(served)
        } else {
            CoreCell::Plain(std::cell::UnsafeCell::new(core))
        };
        Ok(Self {
            served,
            payloads,
            _not_sync: std::marker::PhantomData,
            stamps,
            dropped: Arc::default(),
            id,
            forks,
            inbox,
            parked: None,
        })
    }

    /// Runs `f` on the core, as its one user (see `Served`).
    #[inline(always)]
    fn with_core<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        // One call of `f`, on one path (two would have their results
        // merged through memory: a stalled load on every send).
        let (core, shared) = match &self.served {
            CoreCell::Plain(core) => (core_mut(core), None),
            CoreCell::Shared(served) => {
                // SAFETY: this thread is the owner — `Publisher` is not
                // `Sync`, and no call of it runs inside another — and `end`
                // follows below with the token.
                let entered = unsafe { served.begin(Core::serve) };
                // SAFETY: between `begin` and `end`, as the owner; the
                // reference is not used after `end`.
                let core = unsafe { served.get_mut() };
                (core, Some((served, entered)))
            }
        };
        let r = f(core);
        if let Some((served, entered)) = shared {
            // SAFETY: as for `begin`; `core` is no longer used.
            unsafe { served.end(entered, Core::serve) };
        }
        r
    }

    /// Where the channels of subscribers admitted from now on are to be
    /// handed over (a handle: clone it to another thread).
    pub fn channel_inbox(&self) -> &ChannelInbox {
        &self.inbox
    }

    /// Takes a detached loan back to write and send it.
    ///
    /// # Errors
    /// The loan, if another publisher made it, or in a child forked since
    /// the publisher opened ([`Loan::is_forked`]).
    pub fn resume(&mut self, mut loan: Loan) -> Result<SampleMut<'_>, Loan> {
        if loan.publisher != self.id || self.forked() {
            return Err(loan);
        }
        loan.dropped = None; // resumed: the sample owns the slot now
        Ok(self.sample(loan.slot, loan.len))
    }

    /// Whether a loan is parked ([`SampleMut::park`]) that
    /// [`unpark`](Self::unpark) would give.
    #[inline]
    pub fn has_parked(&self) -> bool {
        self.parked.is_some() && !self.forked()
    }

    /// Takes back the loan [`SampleMut::park`] set aside, if any. Never in
    /// a copy forked since the publisher opened: the slot is the parent's
    /// to fill (as [`loan`](Self::loan) refuses there).
    #[inline]
    pub fn unpark(&mut self) -> Option<SampleMut<'_>> {
        if self.forked() {
            return None;
        }
        let (slot, len) = self.parked.take()?;
        Some(self.sample(slot, len))
    }

    /// The parked loan's address and capacity, loaning a slot and parking
    /// it first if nothing is parked: the C library's loan, as
    /// [`unpark`](Self::unpark), [`loan`](Self::loan) and
    /// [`SampleMut::park`] would do it, without moving a sample around.
    ///
    /// # Errors
    /// As [`loan`](Self::loan) (in a copy forked since the publisher
    /// opened, [`LoanError::Forked`], whatever is parked).
    #[inline(always)]
    pub fn loan_parked(&mut self) -> Result<(*mut u8, usize), LoanError> {
        if self.forked() {
            return Err(LoanError::Forked);
        }
        let slot = match self.parked {
            Some((slot, _)) => slot,
            None => {
                if self.dropped.pending.load(Ordering::Acquire) {
                    self.take_back_dropped_loans();
                }
                let slot = self.with_core(
                    #[inline(always)]
                    |c| c.loan(),
                )?;
                self.parked = Some((slot, 0));
                slot
            }
        };
        Ok((self.payloads.ptr(slot), self.slot_size()))
    }

    /// Sends the first `len` bytes of the parked loan without waiting, as
    /// `unpark`, `set_len` and `SampleMut::try_send` would, but without
    /// moving a sample around (the C library's send). `None` if nothing
    /// is parked. The loan stays parked after [`SendError::TooLarge`] and
    /// (with `len` set) [`SendError::WouldBlock`]; after any other
    /// refusal its slot is given back as a dropped sample's. (A panic in
    /// the send poisons the publisher, which then frees nothing: see
    /// `PubCore::step`.) In a copy forked since the publisher opened, a
    /// parked loan is the parent's: [`SendError::Forked`], leaving it
    /// alone.
    #[inline(always)]
    pub fn try_send_parked(&mut self, len: usize) -> Option<Result<SendInfo, SendError>> {
        if self.forked() {
            return self.parked.map(|_| Err(SendError::Forked));
        }
        let (slot, _) = self.parked?;
        let slot_size = self.slot_size();
        if len > slot_size {
            return Some(Err(SendError::TooLarge { len, slot_size }));
        }
        let ts = self.timestamp();
        // Out of `parked` while it is sent: should the send panic, the
        // poisoned publisher must not offer the slot again.
        self.parked = None;
        Some(match self.with_core(|c| c.commit(slot, len as u32, ts)) {
            Ok(info) => Ok(info),
            Err(refusal @ CommitRefusal::WouldBlock { .. }) => {
                self.parked = Some((slot, len as u32));
                Err(refusal.into())
            }
            Err(refusal) => Err(self.refuse_parked(slot, refusal)),
        })
    }

    /// As [`try_send_parked`](Self::try_send_parked), waiting up to
    /// `timeout` for a full lossless subscriber as
    /// [`SampleMut::try_send_timeout`] does (one try, then the wait, then
    /// the send: a publisher that keeps meeting a full subscriber reads
    /// its returns once per frame, not twice). On [`SendError::Timeout`]
    /// the loan stays parked; after any other refusal its slot goes back.
    #[inline(always)]
    pub fn send_parked_timeout(&mut self, len: usize, timeout: Duration) -> Option<Result<SendInfo, SendError>> {
        Some(match self.try_send_parked(len)? {
            Err(SendError::WouldBlock { subscriber }) if !timeout.is_zero() => {
                self.wait_and_send_parked(subscriber, timeout)
            }
            done => done,
        })
    }

    /// `send_parked_timeout` once a lossless subscriber was full (the loan
    /// parked, with its length).
    #[cold]
    #[inline(never)]
    fn wait_and_send_parked(&mut self, subscriber: u32, timeout: Duration) -> Result<SendInfo, SendError> {
        let Some(sample) = self.unpark() else { return Err(SendError::WouldBlock { subscriber }) };
        sample.wait_and_send(subscriber, timeout).map_err(|unsent| {
            if unsent.error == SendError::Timeout {
                // Nothing else is parked: it was just unparked.
                let _ = unsent.sample.park();
            }
            unsent.error
        })
    }

    /// `try_send_parked` refused for good: the slot goes back as a dropped
    /// sample's.
    #[cold]
    #[inline(never)]
    fn refuse_parked(&mut self, slot: u32, refusal: CommitRefusal) -> SendError {
        drop(self.sample(slot, 0));
        refusal.into()
    }

    /// Takes back the slots and loans of `Loan`s dropped unsent.
    #[cold]
    fn take_back_dropped_loans(&mut self) {
        self.dropped.pending.store(false, Ordering::Relaxed);
        // Acquire, with the lock: pairs with the Release store in `Loan::drop`.
        let slots = std::mem::take(&mut *self.dropped.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for slot in slots {
            self.with_core(|c| c.abandon(slot));
        }
    }

    /// Bytes per slot: the largest frame.
    pub fn slot_size(&self) -> usize {
        self.payloads.slot_size()
    }

    /// Whether frames carry their send time (`StreamConfig::timestamps`).
    pub fn timestamps(&self) -> bool {
        self.stamps
    }

    /// The send time of a frame sent now: the monotonic clock, or 0 if
    /// the stream does not stamp its frames.
    #[inline]
    fn timestamp(&self) -> u64 {
        if self.stamps { platform::now_ns() } else { 0 }
    }

    /// Sequence number the next frame will get.
    pub fn next_seq(&self) -> u64 {
        self.with_core(|c| c.next_seq())
    }

    /// Number of subscribers currently attached (as of the last loan or send).
    pub fn subscriber_count(&self) -> usize {
        self.with_core(|c| c.subscriber_count())
    }

    /// Loans a slot to write a frame in place; send it with
    /// [`SampleMut::send`]. Dropping the sample unsent frees the slot.
    ///
    /// # Errors
    /// [`LoanError::Closed`], or [`LoanError::PoolExhausted`] if
    /// subscribers hold more than their credits.
    ///
    /// # Examples
    /// ```no_run
    /// # fn demo(publisher: &mut memsock_proto::shm::Publisher) -> Result<(), Box<dyn std::error::Error + '_>> {
    /// let mut sample = publisher.loan()?;
    /// sample.as_mut_slice()[..5].copy_from_slice(b"hello");
    /// sample.set_len(5);
    /// sample.send()?;
    /// # Ok(()) }
    /// ```
    #[inline(always)]
    pub fn loan(&mut self) -> Result<SampleMut<'_>, LoanError> {
        let slot = self.loan_slot()?;
        Ok(self.sample(slot, 0))
    }

    #[inline(always)]
    fn loan_slot(&mut self) -> Result<u32, LoanError> {
        if self.forked() {
            return Err(LoanError::Forked);
        }
        if self.dropped.pending.load(Ordering::Acquire) {
            self.take_back_dropped_loans();
        }
        self.with_core(
            #[inline(always)]
            |c| c.loan(),
        )
    }

    /// Copies `payload` into a slot and sends it.
    ///
    /// # Errors
    /// [`SendError::TooLarge`], a loan error, [`SendError::WouldBlock`]
    /// if a lossless subscriber is full, or [`SendError::Closed`].
    #[inline]
    pub fn send(&mut self, payload: &[u8]) -> Result<SendInfo, SendError> {
        let slot = self.copy_in(payload)?;
        self.sample(slot, payload.len() as u32).send()
    }

    /// Like [`send`](Self::send), but waits up to `timeout` for full
    /// lossless subscribers.
    ///
    /// # Errors
    /// As [`send`](Self::send), with [`SendError::Timeout`] instead of
    /// `WouldBlock`.
    pub fn send_timeout(&mut self, payload: &[u8], timeout: Duration) -> Result<SendInfo, SendError> {
        let slot = self.copy_in(payload)?;
        self.sample(slot, payload.len() as u32).send_timeout(timeout)
    }

    /// Whether this is a copy in a child forked since it opened: the
    /// parent holds the role, and a send here would race its sends.
    #[inline]
    fn forked(&self) -> bool {
        self.forks.forked()
    }

    /// Sends the loaned `slot` (see `PubCore::commit`), stamped if the
    /// stream says so.
    #[inline(always)]
    fn commit(&mut self, slot: u32, len: u32) -> Result<SendInfo, CommitRefusal> {
        if self.forked() {
            return Err(CommitRefusal::Forked);
        }
        let ts = self.timestamp();
        self.with_core(|c| c.commit(slot, len, ts))
    }

    /// Loans a slot and copies `payload` into it; the caller sends it (or
    /// drops it, as a sample).
    #[inline(always)]
    fn copy_in(&mut self, payload: &[u8]) -> Result<u32, SendError> {
        let slot_size = self.slot_size();
        if payload.len() > slot_size {
            return Err(SendError::TooLarge { len: payload.len(), slot_size });
        }
        let slot = self.loan_slot().map_err(|e| match e {
            LoanError::Closed => SendError::Closed,
            LoanError::Replaced => SendError::Replaced,
            LoanError::Forked => SendError::Forked,
            LoanError::Poisoned => SendError::Poisoned,
            e => SendError::Loan(e),
        })?;
        // SAFETY: a loaned slot of `slot_size` bytes (`Payloads::ptr`), at
        // least `payload.len()`; ours alone while loaned, as in
        // `SampleMut::as_mut_slice` (a slot out of shared memory cannot
        // overlap `payload`, which a `&[u8]` borrows immutably).
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), self.payloads.ptr(slot), payload.len()) };
        Ok(slot)
    }

    /// The loaned `slot` as a sample of `len` bytes, made whole at once.
    /// (`copy_in` returns the slot alone for this: a sample moved out of a
    /// call is reloaded, stalled, from the fields it was stored in piece by
    /// piece.)
    #[inline(always)]
    fn sample(&mut self, slot: u32, len: u32) -> SampleMut<'_> {
        let ptr = self.payloads.ptr(slot);
        SampleMut { publisher: self, slot, ptr, len }
    }
}

/// A loaned slot being written by the publisher.
///
/// Derefs to the payload written so far (`len` bytes); write through
/// [`as_mut_slice`](Self::as_mut_slice) and [`set_len`](Self::set_len).
#[derive(Debug)]
pub struct SampleMut<'p> {
    publisher: &'p mut Publisher,
    slot: u32,
    ptr: *mut u8,
    len: u32,
}

impl<'p> SampleMut<'p> {
    /// Detaches the loan from the publisher's borrow; see [`Loan`].
    pub fn detach(self) -> Loan {
        let this = std::mem::ManuallyDrop::new(self);
        Loan {
            slot: this.slot,
            len: this.len,
            publisher: this.publisher.id,
            dropped: Some(this.publisher.dropped.clone()),
            forks: this.publisher.forks,
        }
    }

    /// Sets the loan aside in its publisher, to be taken again with
    /// [`Publisher::unpark`]: for bindings that cannot hold the borrow
    /// between calls (the C library keeps one current loan this way).
    /// Unlike [`detach`](Self::detach) it costs nothing (no shared count
    /// to raise and lower), but the publisher holds one at a time: with
    /// one parked already, the sample comes back. A parked loan still
    /// counts against the loan budget; the publisher gives its slot back
    /// when dropped.
    ///
    /// # Errors
    /// The sample, if another loan is parked.
    #[inline]
    pub fn park(self) -> Result<(), Self> {
        if self.publisher.parked.is_some() {
            return Err(self);
        }
        // Not dropped: the slot stays loaned, now recorded in the publisher.
        let mut this = std::mem::ManuallyDrop::new(self);
        this.publisher.parked = Some((this.slot, this.len));
        Ok(())
    }

    /// The address of the slot (valid while the publisher lives): for
    /// bindings that expose the loan through another language's buffer
    /// protocol. Writing through it is allowed only while the loan is
    /// held and not resumed elsewhere.
    #[inline]
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// The whole slot, to write the frame into.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is the start of a loaned slot of `capacity()`
        // bytes (StreamMap::payload_ptr). While loaned the slot is in no
        // subscriber's queue, subscribers map the pool read-only, and
        // the `&mut self` borrow makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.capacity()) }
    }

    /// Sets the frame length.
    ///
    /// # Panics
    /// If `len` exceeds [`capacity`](Self::capacity).
    #[inline]
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "frame length {len} exceeds the slot size {}", self.capacity());
        self.len = len as u32;
    }

    /// Bytes in a slot.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.publisher.slot_size()
    }

    /// Sends the frame to every subscriber.
    ///
    /// # Errors
    /// [`SendError::WouldBlock`] if a lossless subscriber is full, or
    /// [`SendError::Closed`]; the frame is discarded (see
    /// [`try_send`](Self::try_send) to keep it).
    #[inline]
    pub fn send(self) -> Result<SendInfo, SendError> {
        self.try_send().map_err(|unsent| unsent.error)
    }

    /// Sends the frame to every subscriber, or gives it back.
    ///
    /// # Errors
    /// [`SendError::WouldBlock`] if a lossless subscriber is full, or
    /// [`SendError::Closed`]; the sample comes back in [`Unsent`].
    #[inline]
    pub fn try_send(self) -> Result<SendInfo, Unsent<'p>> {
        match self.publisher.commit(self.slot, self.len) {
            Ok(info) => {
                std::mem::forget(self);
                Ok(info)
            }
            Err(refusal) => Err(self.unsent(refusal)),
        }
    }

    /// Sends the frame, waiting up to `timeout` for full lossless
    /// subscribers.
    ///
    /// # Errors
    /// [`SendError::Timeout`] or [`SendError::Closed`]; the frame is
    /// discarded.
    pub fn send_timeout(self, timeout: Duration) -> Result<SendInfo, SendError> {
        self.try_send_timeout(timeout).map_err(|unsent| unsent.error)
    }

    /// Like [`send_timeout`](Self::send_timeout), but gives the frame
    /// back on failure.
    ///
    /// # Errors
    /// [`SendError::Timeout`] or [`SendError::Closed`], with the sample.
    #[inline]
    pub fn try_send_timeout(self, timeout: Duration) -> Result<SendInfo, Unsent<'p>> {
        // The first try inline and without the clock: a frame that need
        // not wait costs what `try_send` does.
        match self.publisher.commit(self.slot, self.len) {
            Ok(info) => {
                std::mem::forget(self);
                Ok(info)
            }
            Err(CommitRefusal::WouldBlock { subscriber }) => self.wait_and_send(subscriber, timeout),
            Err(refusal) => Err(self.unsent(refusal)),
        }
    }

    /// `try_send_timeout` once a lossless subscriber was full.
    #[cold]
    fn wait_and_send(self, mut subscriber: u32, timeout: Duration) -> Result<SendInfo, Unsent<'p>> {
        let deadline = Instant::now().checked_add(timeout);
        let backoff = Backoff { spin: PUBLISHER_SPIN, park: true };
        loop {
            if !self.publisher.with_core(|c| c.wait_for_room(subscriber as usize, backoff, deadline)) {
                return Err(Unsent { error: SendError::Timeout, sample: self });
            }
            match self.publisher.commit(self.slot, self.len) {
                Ok(info) => {
                    std::mem::forget(self);
                    return Ok(info);
                }
                Err(CommitRefusal::WouldBlock { subscriber: s }) => subscriber = s,
                Err(refusal) => return Err(self.unsent(refusal)),
            }
        }
    }

    fn unsent(self, refusal: CommitRefusal) -> Unsent<'p> {
        Unsent { error: refusal.into(), sample: self }
    }
}

impl From<CommitRefusal> for SendError {
    fn from(refusal: CommitRefusal) -> Self {
        match refusal {
            CommitRefusal::WouldBlock { subscriber } => SendError::WouldBlock { subscriber },
            CommitRefusal::Closed => SendError::Closed,
            CommitRefusal::Replaced => SendError::Replaced,
            CommitRefusal::Forked => SendError::Forked,
            CommitRefusal::Poisoned => SendError::Poisoned,
        }
    }
}

impl std::ops::Deref for SampleMut<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`; `len <= capacity()`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }
    }
}

impl Drop for SampleMut<'_> {
    fn drop(&mut self) {
        self.publisher.with_core(|c| c.abandon(self.slot));
    }
}

// SAFETY: the raw pointer is into the publisher's mapping, which the
// `&mut Publisher` keeps alive; the sample may move with it.
unsafe impl Send for SampleMut<'_> {}
