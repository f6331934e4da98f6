//! The subscriber's handles: [`Subscriber`], the samples it lends
//! ([`Sample`], [`OwnedSample`]) and the [`Watcher`] that waits for it, over
//! the lock-free core (`core::subscriber`).

use std::cell::Cell;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::core::mem::{ChannelMem, StreamMem};
use super::core::owner::SubscriberTicket;
use super::core::subscriber::{
    FrameInfo, KeepAlive, Position, RecvError, ReturnBoard, SubAttachRefusal, SubCore, TryRecvError, wake_sleeper,
};
use super::core::wait::Backoff;
use super::map::{ChannelMap, MapError, StreamMap};
use crate::platform::ForkStamp;
use crate::shm::layout::{ChannelLatency, OverflowPolicy, WaitStrategy, latency_bucket};

/// Why a subscriber could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenSubscriberError {
    /// A segment file could not be mapped or is invalid.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The ticket does not match an attached subscriber of this stream.
    #[error("subscriber #{index} (generation {generation}) is not attached to this stream")]
    NotAttached {
        /// Ticket index.
        index: u32,
        /// Ticket generation.
        generation: u64,
    },
    /// The ticket was already used to open a subscriber.
    #[error("subscriber #{0} is already open: a ticket opens one subscriber")]
    AlreadyOpen(u32),
}

/// The receiving end of a stream, created by the owner with
/// [`StreamSegment::add_subscriber`](crate::shm::StreamSegment::add_subscriber).
///
/// `Send` but not `Sync`: samples are released on the thread that receives.
#[derive(Debug)]
pub struct Subscriber {
    core: Core,
    wait: WaitStrategy,
    /// Slots of samples given up with [`Sample::forget`], a bit per slot:
    /// only those may be given back by number ([`Subscriber::release_slot`]).
    forgotten: Box<[std::cell::Cell<u64>]>,
    latency: LatencySampler,
    /// When it opened: in a child forked since, the channel is the
    /// parent's, and this copy must not touch it.
    forks: ForkStamp,
}

/// Which frames' latency a subscriber measures: the first published at
/// least [`LATENCY_EVERY_NS`] after the last one measured — told by its
/// publish time, no clock read — else one in [`LATENCY_ONE_IN`]. Slow
/// streams are sampled too, and no frame between samples costs a clock
/// read.
#[derive(Debug)]
struct LatencySampler {
    /// Publish time from which the next frame is measured.
    next_ns: Cell<u64>,
    /// Frames until one is measured whatever its time.
    countdown: Cell<u32>,
}

/// See [`LatencySampler`].
const LATENCY_EVERY_NS: u64 = 1_000_000;
/// See [`LatencySampler`].
const LATENCY_ONE_IN: u32 = 64;

impl LatencySampler {
    fn new() -> Self {
        Self { next_ns: Cell::new(0), countdown: Cell::new(LATENCY_ONE_IN) }
    }

    /// Notes a frame published at `stamp_ns` (0: the stream has no
    /// timestamps) just received.
    #[inline]
    fn note(&self, stamp_ns: u64, histogram: &ChannelLatency) {
        if stamp_ns == 0 {
            return;
        }
        let countdown = self.countdown.get();
        if stamp_ns < self.next_ns.get() && countdown > 1 {
            self.countdown.set(countdown - 1);
            return;
        }
        self.measure(stamp_ns, histogram);
    }

    #[cold]
    fn measure(&self, stamp_ns: u64, histogram: &ChannelLatency) {
        let latency = crate::platform::now_ns().saturating_sub(stamp_ns);
        // Only this subscriber writes its histogram (the handle is not
        // `Sync`); Relaxed: readers want the counts, not an order.
        histogram.buckets[latency_bucket(latency)].fetch_add(1, Relaxed);
        histogram.sum_ns.fetch_add(latency, Relaxed);
        self.next_ns.set(stamp_ns.saturating_add(LATENCY_EVERY_NS));
        self.countdown.set(LATENCY_ONE_IN);
    }
}

type Core = SubCore<Arc<StreamMap>, Arc<ChannelMap>>;
type Board = ReturnBoard<Arc<StreamMap>, Arc<ChannelMap>>;

pub(crate) fn backoff(wait: WaitStrategy) -> Backoff {
    match wait {
        WaitStrategy::Spin => Backoff { spin: Duration::MAX, park: false },
        WaitStrategy::SpinThenPark { spin_us } => Backoff { spin: Duration::from_micros(spin_us.into()), park: true },
        WaitStrategy::Park => Backoff { spin: Duration::ZERO, park: true },
    }
}

impl Subscriber {
    /// Opens subscriber `ticket` from the stream's data file (read-only
    /// is enough, and what a subscriber should be given) and the
    /// subscriber's own channel file.
    ///
    /// # Errors
    /// [`OpenSubscriberError`] if a file is invalid or the ticket is stale.
    pub fn open(
        data: BorrowedFd<'_>,
        channel: BorrowedFd<'_>,
        ticket: SubscriberTicket,
    ) -> Result<Self, OpenSubscriberError> {
        let stream = Arc::new(StreamMap::open(data, false)?);
        let g = stream.layout().geometry;
        let not_attached = OpenSubscriberError::NotAttached { index: ticket.index, generation: ticket.generation };
        if ticket.index >= g.max_subscribers {
            return Err(not_attached);
        }
        let channel = Arc::new(ChannelMap::open(channel, ticket.index, g.queue_capacity, stream.flags())?);
        let core = SubCore::attach(stream, channel, ticket.index as usize, ticket.generation, backoff(ticket.wait))
            .map_err(|refusal| match refusal {
                SubAttachRefusal::NotAttached => not_attached,
                SubAttachRefusal::AlreadyOpen => OpenSubscriberError::AlreadyOpen(ticket.index),
            })?;
        let forgotten = (0..g.slot_count.div_ceil(64)).map(|_| std::cell::Cell::new(0)).collect();
        Ok(Self { core, wait: ticket.wait, forgotten, latency: LatencySampler::new(), forks: ForkStamp::now() })
    }

    /// Whether this is a copy in a child forked since it opened: the
    /// parent receives on the channel, and a receive here would race it.
    /// Every receive then fails with `Forked`, and nothing this copy or
    /// its samples do reaches shared memory.
    #[inline]
    pub fn is_forked(&self) -> bool {
        self.forks.forked()
    }

    /// Takes the next frame if one is queued.
    ///
    /// # Errors
    /// [`TryRecvError::Empty`] if none is, or another [`TryRecvError`].
    #[inline]
    pub fn try_recv(&self) -> Result<Sample<'_>, TryRecvError> {
        if self.is_forked() {
            return Err(TryRecvError::Forked);
        }
        self.core.try_take().map(|info| self.sample(info))
    }

    /// Waits for the next frame, as the subscriber's [`WaitStrategy`] says.
    ///
    /// # Errors
    /// Any [`RecvError`] but `Timeout`.
    ///
    /// # Examples
    /// ```no_run
    /// # fn demo(subscriber: &memsock_proto::shm::Subscriber) -> Result<(), memsock_proto::shm::RecvError> {
    /// let sample = subscriber.recv()?;
    /// println!("frame {} of {} bytes", sample.seq(), sample.len());
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn recv(&self) -> Result<Sample<'_>, RecvError> {
        if self.is_forked() {
            return Err(RecvError::Forked);
        }
        self.core.take(None).map(|info| self.sample(info))
    }

    /// Waits up to `timeout` for the next frame.
    ///
    /// # Errors
    /// [`RecvError::Timeout`], or another [`RecvError`].
    #[inline]
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Sample<'_>, RecvError> {
        if self.is_forked() {
            return Err(RecvError::Forked);
        }
        self.core.take(Instant::now().checked_add(timeout)).map(|info| self.sample(info))
    }

    #[inline]
    fn sample(&self, info: FrameInfo) -> Sample<'_> {
        if !info.history {
            // A history frame was sent before we joined: its age is no latency.
            self.latency.note(info.timestamp_ns, &self.core.channel().header().latency);
        }
        Sample { subscriber: self, ptr: self.core.stream().payload_ptr(info.slot), info }
    }

    /// This subscriber's index in the stream.
    pub fn index(&self) -> u32 {
        self.core.index() as u32
    }

    /// The overflow policy the subscriber was created with.
    pub fn policy(&self) -> OverflowPolicy {
        self.core.policy()
    }

    /// How blocking receives wait.
    pub fn wait_strategy(&self) -> WaitStrategy {
        self.wait
    }

    /// Current credits: the most samples it may hold, queued plus borrowed.
    pub fn credits(&self) -> u32 {
        self.core.credits()
    }

    /// Samples currently borrowed.
    pub fn borrowed(&self) -> u32 {
        self.core.borrowed()
    }

    /// Protocol violations this subscriber has seen from its peers.
    pub fn faults(&self) -> u64 {
        self.core.faults()
    }

    /// The stream's publisher generation: how many times a publisher
    /// has arrived or left, odd while one is attached. Unlike
    /// `PublisherGone`/`PublisherBack`, which a receive reports once,
    /// it can be read at any time and compared with an earlier reading:
    /// if they differ, the publisher changed in between (its last
    /// frames may still be queued).
    pub fn publisher_generation(&self) -> u64 {
        self.core.publisher_generation()
    }

    /// Bytes per slot: the largest frame.
    pub fn slot_size(&self) -> usize {
        self.core.stream().layout().geometry.slot_size as usize
    }

    /// Gives back the slot of a sample given up with [`Sample::forget`]
    /// (for callers that cannot hold a `Sample`, such as the C library).
    /// Returns false, changing nothing, unless `slot` is the slot of a
    /// sample forgotten and not given back yet: a number given twice, made
    /// up, or another subscriber's is refused here, before it could free
    /// a slot somebody still reads.
    #[inline]
    pub fn release_slot(&self, slot: u32) -> bool {
        if self.is_forked() {
            return false;
        }
        let Some(word) = self.forgotten.get(slot as usize / 64) else { return false };
        let bit = 1u64 << (slot % 64);
        if word.get() & bit == 0 {
            return false;
        }
        word.set(word.get() & !bit);
        self.core.return_slot(slot);
        true
    }

    /// Hands back now the slots of detached samples dropped since the
    /// last receive (receives do this themselves).
    pub fn hand_back(&self) {
        if !self.is_forked() {
            self.core.hand_back();
        }
    }

    /// Keeps `keep` alive as long as this subscriber or any sample
    /// detached from it later exists. A client passes its lease here,
    /// so that the slots a detached sample reads are not reclaimed
    /// under it. Set it before detaching samples.
    pub fn set_keep_alive(&mut self, keep: KeepAlive) {
        self.core.set_keep_alive(keep);
    }

    /// Where the subscriber stands: pass it to [`Watcher::wait`] after
    /// a receive found nothing.
    pub fn position(&self) -> Position {
        self.core.position()
    }

    /// A watcher that can wait for this subscriber's next frame on
    /// another thread, so that an async task need not block.
    pub fn watcher(&self) -> Watcher {
        Watcher { core: self.core.watcher(), forks: self.forks }
    }
}

/// Waits, on a thread of its own, for news for a subscriber: a frame, a
/// change of publisher, a close, or detached samples to hand back. It
/// never takes anything: the subscriber's next `try_recv` does. What an
/// async wrapper parks instead of the task.
#[derive(Debug)]
pub struct Watcher {
    core: Core,
    forks: ForkStamp,
}

impl Watcher {
    /// Blocks until the subscriber, at `from`, would find something on
    /// its next receive, or `stop()` holds (checked after
    /// [`Interrupter::interrupt`]), or `deadline` passes. Spins or
    /// sleeps as the subscriber's [`WaitStrategy`] says. Returns false
    /// only on the deadline. In a child forked since the subscriber
    /// opened, returns true at once, touching nothing: the receive that
    /// follows reports `Forked`.
    pub fn wait(&self, from: Position, deadline: Option<Instant>, stop: impl Fn() -> bool) -> bool {
        if self.forks.forked() {
            return true;
        }
        self.core.watch(from, deadline, stop)
    }

    /// A handle that wakes a [`wait`](Self::wait) in progress from
    /// another thread.
    pub fn interrupter(&self) -> Interrupter {
        Interrupter { channel: self.core.channel().clone(), forks: self.forks }
    }
}

/// Wakes a [`Watcher::wait`] in progress, on any thread.
#[derive(Debug, Clone)]
pub struct Interrupter {
    channel: Arc<ChannelMap>,
    forks: ForkStamp,
}

impl Interrupter {
    /// Makes a waiting watcher check its `stop()`: make that true first.
    /// (Nothing in a child forked since: the channel's sleeper is the
    /// parent's.)
    pub fn interrupt(&self) {
        if !self.forks.forked() {
            wake_sleeper(&self.channel);
        }
    }
}

/// A received frame: derefs to its bytes, read in place in shared memory.
/// The slot goes back to the publisher when the sample is dropped.
#[derive(Debug)]
pub struct Sample<'s> {
    subscriber: &'s Subscriber,
    ptr: *const u8,
    info: FrameInfo,
}

impl Sample<'_> {
    /// Detaches the sample from the subscriber's borrow: the result may
    /// be kept, and dropped on any thread. Its slot counts against the
    /// subscriber's credits until it is dropped and the subscriber's
    /// next receive hands it back (dropping it wakes a sleeping
    /// receive for that).
    pub fn detach(self) -> OwnedSample {
        let this = std::mem::ManuallyDrop::new(self);
        OwnedSample {
            board: this.subscriber.core.board().clone(),
            ptr: this.ptr,
            info: this.info,
            forks: this.subscriber.forks,
        }
    }

    /// Gives the sample up without giving its slot back: its bytes stay
    /// readable at the returned address, `info().len` long, until
    /// [`Subscriber::release_slot`] with its slot (or until the subscriber
    /// is dropped).
    #[inline]
    pub fn forget(self) -> (*const u8, FrameInfo) {
        let this = std::mem::ManuallyDrop::new(self);
        // The slot is in range (`try_take` checked it): its bit exists.
        let word = &this.subscriber.forgotten[this.info.slot as usize / 64];
        word.set(word.get() | 1 << (this.info.slot % 64));
        (this.ptr, this.info)
    }

    /// Stream sequence number; a jump shows frames this subscriber lost.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.info.seq
    }

    /// When the frame was sent: nanoseconds on the monotonic clock
    /// (`CLOCK_MONOTONIC`, comparable across processes); 0 if the
    /// stream does not stamp its frames (`StreamConfig::timestamps`).
    #[inline]
    pub fn timestamp_ns(&self) -> u64 {
        self.info.timestamp_ns
    }

    /// Whether the frame comes from the stream's history: sent before this
    /// subscriber joined (`StreamConfig::history`), received first.
    #[inline]
    pub fn is_history(&self) -> bool {
        self.info.history
    }

    /// Where and what the frame is.
    #[inline]
    pub fn info(&self) -> FrameInfo {
        self.info
    }
}

impl std::ops::Deref for Sample<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is the start of slot `info.slot` in the
        // subscriber's read-only mapping (StreamMap::payload_ptr checked
        // the index) and `info.len <= slot_size` was checked in
        // `try_take`. The slot carries this subscriber's holder bit until
        // the sample is dropped, so a publisher keeping the protocol does
        // not write it meanwhile. (The owner clears the bit only when it
        // removes the subscriber, which it does once the subscriber has
        // gone: see `StreamSegment::remove_subscriber`.)
        unsafe { std::slice::from_raw_parts(self.ptr, self.info.len as usize) }
    }
}

impl Drop for Sample<'_> {
    #[inline]
    fn drop(&mut self) {
        // A sample inherited by a forked child is the parent's to return.
        if !self.subscriber.is_forked() {
            self.subscriber.core.return_slot(self.info.slot);
        }
    }
}

/// A received frame that does not borrow its subscriber
/// ([`Sample::detach`]): `Send` and `Sync`, it can move to another
/// thread or task. Derefs to its bytes in shared memory; the slot goes
/// back when it is dropped. The mapping, and the subscriber's lease
/// (see [`Subscriber::set_keep_alive`]), last as long as it does.
#[derive(Debug)]
pub struct OwnedSample {
    board: Arc<Board>,
    ptr: *const u8,
    info: FrameInfo,
    /// Its subscriber's: a copy in a forked child leaves the slot alone.
    forks: ForkStamp,
}

// SAFETY: `ptr` points into the mapping that `board` keeps alive; the
// bytes are only read, and the slot is ours until `post` in `drop`
// hands it back, which any thread may do (the board is atomic).
unsafe impl Send for OwnedSample {}
// SAFETY: shared access only reads the slot, as above.
unsafe impl Sync for OwnedSample {}

impl OwnedSample {
    /// Stream sequence number; a jump shows frames the subscriber lost.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.info.seq
    }

    /// When the frame was sent: nanoseconds on the monotonic clock; 0
    /// if the stream does not stamp its frames.
    #[inline]
    pub fn timestamp_ns(&self) -> u64 {
        self.info.timestamp_ns
    }

    /// Whether the frame comes from the stream's history (see
    /// [`Sample::is_history`]).
    #[inline]
    pub fn is_history(&self) -> bool {
        self.info.history
    }

    /// Where and what the frame is.
    #[inline]
    pub fn info(&self) -> FrameInfo {
        self.info
    }
}

impl std::ops::Deref for OwnedSample {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        debug_assert_eq!(self.ptr, self.board.stream().payload_ptr(self.info.slot).cast_const());
        // SAFETY: as for `Sample`: `ptr` is slot `info.slot` of the
        // mapping `board` keeps alive, `info.len <= slot_size` was
        // checked when it was taken, and the slot keeps this
        // subscriber's holder bit until `drop` posts it back (the owner
        // reclaims it only after the lease in the board has ended).
        unsafe { std::slice::from_raw_parts(self.ptr, self.info.len as usize) }
    }
}

impl Drop for OwnedSample {
    fn drop(&mut self) {
        // Posting wakes the subscriber's sleeper: in a forked child, the
        // parent's, whose slot this is.
        if !self.forks.forked() {
            self.board.post(self.info.slot);
        }
    }
}
