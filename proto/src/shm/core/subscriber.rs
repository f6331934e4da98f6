//! The subscriber side: taking frames from the delivery ring, handing slots
//! back through the return ring, waiting, and the checks that keep a bad
//! peer from causing more than an error.
//!
//! # Algorithm
//!
//! The subscriber polls the ring entry at its `head`: it is ready when the
//! stamp in its word is `head + 1` (the publisher stores the word last,
//! with `Release`). It reads the entry, then takes it by advancing `head` —
//! with a plain `Release` store, or for `KeepLatest` with a compare-and-swap,
//! because the publisher may be evicting that very entry; losing the CAS
//! means the entry was evicted (and what was read may be torn) and the
//! subscriber retries at the new head. Polling the entry rather than a
//! separate tail index costs one cache miss per frame instead of two.
//!
//! The entry cannot be overwritten while it is being read: the publisher
//! reuses ring position `p` for `p + capacity` only after the subscriber has
//! returned a slot taken at or after `p` (held ≤ credits ≤ capacity), or,
//! under `KeepLatest`, after winning the CAS on `queue_head`, which the reader then
//! loses.
//!
//! The subscriber maps the data file read-only, and Rust promises only
//! `Relaxed` atomic loads on read-only memory (an `Acquire` load may be a
//! read-modify-write on some targets). So every load from the data file is
//! `Relaxed`, followed by an `Acquire` fence where the value orders later
//! reads; the fence sits after the check, on the path that uses the value.
//! Loads from the subscriber's own channel, mapped read-write, are ordinary.
//!
//! Everything read from shared memory — slot numbers, lengths, stamps — is
//! checked before use, so a faulty publisher yields [`TryRecvError::Corrupt`],
//! never an out-of-bounds access.

use std::cell::{Cell, OnceCell};
use std::sync::Arc;
use std::time::Instant;

use super::mem::{ChannelMem, StreamMem};
use super::wait::{self, Backoff};
use crate::primitive::Ordering::{AcqRel, Acquire, Relaxed, Release};
use crate::primitive::fence;
use crate::primitive::{AtomicU32, AtomicU64};
use crate::shm::layout::{
    ENTRY_HISTORY, HEAD_CLAIMED, OverflowPolicy, STREAM_CLOSED, STREAM_OPEN, SUB_ACTIVE, entry_stamp, split_entry,
};

/// A frame taken from the ring: where it is and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Pool slot holding the payload.
    pub slot: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Stream sequence number.
    pub seq: u64,
    /// Publish time, nanoseconds on the monotonic clock (0 if the stream
    /// does not stamp its frames).
    pub timestamp_ns: u64,
    /// The frame comes from the stream's history: it was sent before this
    /// subscriber joined (see `StreamConfig::history`).
    pub history: bool,
}

/// Why [`try_recv`](crate::shm::Subscriber::try_recv) returned no frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TryRecvError {
    /// Nothing is queued.
    #[error("no frame is queued")]
    Empty,
    /// The subscriber already holds as many samples as it has credits.
    #[error("holding {held} samples with {credits} credits: release one before receiving more")]
    CreditsExhausted {
        /// Samples currently borrowed.
        held: u32,
        /// The subscriber's credits.
        credits: u32,
    },
    /// The owner detached this subscriber; its queued frames are gone.
    #[error("the subscriber was detached from the stream")]
    Detached,
    /// The owner closed the stream and every queued frame has been received.
    #[error("the stream is closed")]
    Closed,
    /// The publisher left (detached, or declared gone after a crash) and
    /// every frame it sent has been received. Reported once; receiving
    /// again waits for a new publisher. Not reported once the subscriber
    /// sees the stream closing: the close supersedes a departure it has
    /// not reported yet.
    #[error("the publisher is gone")]
    PublisherGone,
    /// A publisher attached after [`PublisherGone`](Self::PublisherGone) was
    /// reported; its frames follow.
    #[error("a publisher is back")]
    PublisherBack,
    /// The shared memory holds something the protocol does not allow.
    #[error("corrupt stream: {0}")]
    Corrupt(&'static str),
    /// This is a copy of the subscriber in a child forked since it opened:
    /// its channel is the parent's. The child subscribes itself.
    #[error("this subscriber was opened before a fork: in the forked child, connect and subscribe anew")]
    Forked,
}

/// Why a blocking receive returned no frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// `recv_timeout` waited its whole timeout.
    #[error("timed out waiting for a frame")]
    Timeout,
    /// The subscriber already holds as many samples as it has credits.
    #[error("holding {held} samples with {credits} credits: release one before receiving more")]
    CreditsExhausted {
        /// Samples currently borrowed.
        held: u32,
        /// The subscriber's credits.
        credits: u32,
    },
    /// The owner detached this subscriber.
    #[error("the subscriber was detached from the stream")]
    Detached,
    /// The owner closed the stream and every queued frame has been received.
    #[error("the stream is closed")]
    Closed,
    /// The publisher left and every frame it sent has been received.
    /// Reported once; receiving again waits for a new publisher. Not
    /// reported once the subscriber sees the stream closing: the close
    /// supersedes a departure it has not reported yet.
    #[error("the publisher is gone")]
    PublisherGone,
    /// A publisher attached after `PublisherGone` was reported.
    #[error("a publisher is back")]
    PublisherBack,
    /// The shared memory holds something the protocol does not allow.
    #[error("corrupt stream: {0}")]
    Corrupt(&'static str),
    /// A copy of the subscriber in a child forked since it opened.
    #[error("this subscriber was opened before a fork: in the forked child, connect and subscribe anew")]
    Forked,
}

impl RecvError {
    /// Whether this reports a change of publisher rather than a failure:
    /// receiving again goes on with the stream.
    pub fn is_publisher_event(&self) -> bool {
        matches!(self, Self::PublisherGone | Self::PublisherBack)
    }
}

impl TryRecvError {
    /// Whether this reports a change of publisher rather than a failure.
    pub fn is_publisher_event(&self) -> bool {
        matches!(self, Self::PublisherGone | Self::PublisherBack)
    }
}

impl From<TryRecvError> for RecvError {
    fn from(e: TryRecvError) -> Self {
        match e {
            TryRecvError::Empty => RecvError::Timeout,
            TryRecvError::CreditsExhausted { held, credits } => RecvError::CreditsExhausted { held, credits },
            TryRecvError::Detached => RecvError::Detached,
            TryRecvError::Closed => RecvError::Closed,
            TryRecvError::PublisherGone => RecvError::PublisherGone,
            TryRecvError::PublisherBack => RecvError::PublisherBack,
            TryRecvError::Corrupt(what) => RecvError::Corrupt(what),
            TryRecvError::Forked => RecvError::Forked,
        }
    }
}

/// How far `stamp` is past the stamp expected at `head`: 0 when the entry
/// for `head` is ready, negative while it is not written yet, positive if
/// the ring moved past `head` (eviction, or a faulty publisher).
#[inline]
fn stamp_ahead(stamp: u32, head: u64) -> i32 {
    stamp.wrapping_sub(entry_stamp(head)) as i32
}

/// The subscriber algorithm over any memory implementing the layout.
///
/// Not `Sync`: one thread receives (samples may be released from the
/// same thread only; interior mutability through `Cell`).
#[derive(Debug)]
pub(crate) struct SubCore<S: StreamMem, C: ChannelMem> {
    stream: S,
    channel: C,
    index: usize,
    generation: u64,
    policy: OverflowPolicy,
    backoff: Backoff,
    cap_mask: u64,
    /// Next position to take (own copy; `KeepLatest` reads the shared one).
    head: Cell<u64>,
    /// Next return-ring position to write, and the last publisher
    /// `collected` seen.
    returned: Cell<u64>,
    collected_seen: Cell<u64>,
    /// Samples currently borrowed.
    borrowed: Cell<u32>,
    /// Protocol violations this side has seen.
    faults: Cell<u64>,
    /// `publisher_changes` as last accounted for, and whether a
    /// `PublisherGone` was reported that a `PublisherBack` should answer.
    publisher_seen: Cell<u64>,
    gone_reported: Cell<bool>,
    /// Where samples released on other threads wait to be handed back;
    /// created by the first [`detach`](Self::detach).
    board: OnceCell<Arc<ReturnBoard<S, C>>>,
    /// Kept alive by the subscriber and every detached sample.
    keep: Option<KeepAlive>,
}

/// Something kept alive as long as a subscriber or any sample detached from
/// it exists (the client's lease, whose end reclaims the slots).
pub type KeepAlive = Arc<dyn std::fmt::Debug + Send + Sync>;

/// Slots released by detached samples, possibly on other threads, until
/// the subscriber hands them back through its single-writer return ring.
///
/// One bit per pool slot, set by [`post`](Self::post) and cleared by
/// [`flush`](Self::flush); a summary word has bit `w % 64` set when word
/// `w` may hold bits, so the subscriber's check costs one load. A bit is
/// always set before its summary bit and the summary is swapped before the
/// words, so a posted slot is never missed: at worst a summary bit outlives
/// its word's bits and one flush finds nothing.
pub(crate) struct ReturnBoard<S, C> {
    /// Keeps the payloads mapped while detached samples read them.
    stream: S,
    /// Holds the wake word of the subscriber (or its watcher) asleep.
    channel: C,
    bits: Box<[AtomicU64]>,
    summary: AtomicU64,
    /// Posts of a slot already posted and not yet flushed: a publisher
    /// (faulty or hostile) handed the same slot out in two samples.
    duplicates: AtomicU32,
    /// Dropped with the last detached sample or the subscriber.
    _keep: Option<KeepAlive>,
}

impl<S, C> std::fmt::Debug for ReturnBoard<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReturnBoard").field("summary", &self.summary.load(Relaxed)).finish_non_exhaustive()
    }
}

impl<S: StreamMem, C: ChannelMem> ReturnBoard<S, C> {
    fn new(stream: S, channel: C, keep: Option<KeepAlive>) -> Self {
        let words = (stream.layout().geometry.slot_count as usize).div_ceil(64);
        Self {
            stream,
            channel,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: AtomicU64::new(0),
            duplicates: AtomicU32::new(0),
            _keep: keep,
        }
    }

    /// The stream memory the detached samples read.
    pub(crate) fn stream(&self) -> &S {
        &self.stream
    }

    /// Posts `slot` (held by this subscriber, detached, now released) for
    /// the subscriber to hand back, and wakes the subscriber if it sleeps:
    /// until it hands the slot back, the publisher counts it as held.
    pub(crate) fn post(&self, slot: u32) {
        let (word, bit) = (slot as usize / 64, slot % 64);
        // Release pairs with the Acquire swap in `flush`: this thread's
        // reads of the slot happen before the subscriber returns it to the
        // publisher (which writes it next).
        let old = self.bits[word].fetch_or(1 << bit, Release);
        if old & (1 << bit) != 0 {
            // The same slot in two samples (a faulty or hostile publisher
            // queued it twice), both posted between two flushes: it goes
            // back once; the second sample only stops counting as borrowed.
            // (Posted across a flush, it goes back twice: the publisher
            // counts a fault. Only this subscriber suffers either way.)
            // Release pairs with the Acquire swap in `flush`.
            self.duplicates.fetch_add(1, Release);
        }
        // Release pairs with the Acquire swap in `flush`.
        self.summary.fetch_or(1 << (word % 64), Release);
        // The sleeper announces itself, fences and then checks `pending`:
        // see `wait` for the protocol.
        wait::fence_before_wake();
        wait::wake_if_waiting(&self.channel.header().waiting);
    }

    /// Whether posted slots may be waiting.
    #[inline]
    fn pending(&self) -> bool {
        self.summary.load(Relaxed) != 0
    }

    /// Takes every posted slot; returns how many posts were duplicates
    /// (see `duplicates`).
    fn flush(&self, mut each: impl FnMut(u32)) -> u32 {
        // Acquire pairs with the Release `fetch_or` of the summary in `post`.
        let mut summary = self.summary.swap(0, Acquire);
        while summary != 0 {
            let first = summary.trailing_zeros() as usize;
            summary &= summary - 1;
            for word in (first..self.bits.len()).step_by(64) {
                // Acquire pairs with the Release `fetch_or` in `post`.
                let mut bits = self.bits[word].swap(0, Acquire);
                while bits != 0 {
                    let bit = bits.trailing_zeros();
                    bits &= bits - 1;
                    each(word as u32 * 64 + bit);
                }
            }
        }
        // Acquire pairs with the Release `fetch_add` in `post`.
        self.duplicates.swap(0, Acquire)
    }
}

/// Where a subscriber stood when it found nothing to take: what a
/// [`Watcher`](crate::shm::Watcher) waits to move past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    head: u64,
    publisher_seen: u64,
}

/// Wakes whoever sleeps on the subscriber's wake word in `channel`: a
/// subscriber or its watcher, which then re-checks its condition.
pub(crate) fn wake_sleeper<C: ChannelMem>(channel: &C) {
    wait::wake(&channel.header().waiting);
}

/// Why the core could not attach as a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubAttachRefusal {
    /// The index is not active, or active for another generation.
    NotAttached,
    /// The ticket was already opened once.
    AlreadyOpen,
}

impl<S: StreamMem, C: ChannelMem> SubCore<S, C> {
    /// Attaches to subscriber index `index` of generation `generation`,
    /// which the owner set up.
    pub(crate) fn attach(
        stream: S,
        channel: C,
        index: usize,
        generation: u64,
        backoff: Backoff,
    ) -> Result<Self, SubAttachRefusal> {
        let g = stream.layout().geometry;
        if index >= g.max_subscribers as usize {
            return Err(SubAttachRefusal::NotAttached);
        }
        let cfg = &stream.record(index).config;
        if cfg.state.load(Relaxed) != SUB_ACTIVE || cfg.generation.load(Relaxed) != generation {
            return Err(SubAttachRefusal::NotAttached);
        }
        // Pairs with the owner's Release store of SUB_ACTIVE: the record
        // and channel it set up are visible.
        fence(Acquire);
        let policy = OverflowPolicy::from_raw(cfg.policy.load(Relaxed)).unwrap_or_default();
        let ch = channel.header();
        // One handle per ticket: two would hand the same slots back twice.
        if ch.ident.claimed.compare_exchange(0, 1, AcqRel, Relaxed).is_err() {
            return Err(SubAttachRefusal::AlreadyOpen);
        }
        let changes = stream.header().control.publisher_changes.load(Relaxed);
        // Pairs with the publisher's Release store in `attach`.
        fence(Acquire);
        // A stream whose publisher left before we came: the next one to
        // attach is "back".
        let gone = changes % 2 == 0 && changes > 0;
        let this = Self {
            publisher_seen: Cell::new(changes),
            gone_reported: Cell::new(gone),
            index,
            generation,
            policy,
            backoff,
            cap_mask: u64::from(g.queue_capacity) - 1,
            head: Cell::new(ch.queue_head.load(Acquire)),
            returned: Cell::new(ch.returned.load(Relaxed)),
            collected_seen: Cell::new(ch.collected.load(Acquire)),
            borrowed: Cell::new(0),
            faults: Cell::new(0),
            board: OnceCell::new(),
            keep: None,
            stream,
            channel,
        };
        Ok(this)
    }

    /// Keeps `keep` alive as long as this subscriber or any sample
    /// detached from it afterwards.
    pub(crate) fn set_keep_alive(&mut self, keep: KeepAlive) {
        self.keep = Some(keep);
    }

    /// The board of detached samples, created on first use. A detached
    /// sample stays counted as borrowed until `flush_board` hands it back.
    pub(crate) fn board(&self) -> &Arc<ReturnBoard<S, C>>
    where
        S: Clone,
        C: Clone,
    {
        self.board
            .get_or_init(|| Arc::new(ReturnBoard::new(self.stream.clone(), self.channel.clone(), self.keep.clone())))
    }

    /// Where the subscriber stands now (for a [`Position`] watcher).
    pub(crate) fn position(&self) -> Position {
        Position { head: self.head.get(), publisher_seen: self.publisher_seen.get() }
    }

    /// A copy of this core that only watches for news from `position`
    /// on: it never takes or releases (it does not claim the ticket).
    pub(crate) fn watcher(&self) -> Self
    where
        S: Clone,
        C: Clone,
    {
        let board = OnceCell::new();
        let _ = board.set(self.board().clone());
        Self {
            stream: self.stream.clone(),
            channel: self.channel.clone(),
            index: self.index,
            generation: self.generation,
            policy: self.policy,
            backoff: self.backoff,
            cap_mask: self.cap_mask,
            head: Cell::new(self.head.get()),
            returned: Cell::new(0),
            collected_seen: Cell::new(0),
            borrowed: Cell::new(0),
            faults: Cell::new(0),
            publisher_seen: Cell::new(self.publisher_seen.get()),
            gone_reported: Cell::new(self.gone_reported.get()),
            board,
            keep: None,
        }
    }

    /// For a watcher: waits until the subscriber at `from` has news — a
    /// frame, a change of publisher, detached samples to hand back, a close
    /// or detach — or `stop()` holds after a [`wake_watcher`](Self::wake_watcher),
    /// or `deadline` passes. Returns whether there was news (or a stop).
    pub(crate) fn watch(&self, from: Position, deadline: Option<Instant>, stop: impl Fn() -> bool) -> bool {
        self.head.set(from.head);
        self.publisher_seen.set(from.publisher_seen);
        wait::wait_for(&self.channel.header().waiting, self.backoff, deadline, || {
            if stop() { wait::Poll::Ready } else { self.poll_news() }
        })
    }

    /// The channel memory (what an interrupter wakes).
    pub(crate) fn channel(&self) -> &C {
        &self.channel
    }

    /// The stream memory.
    pub(crate) fn stream(&self) -> &S {
        &self.stream
    }

    /// This subscriber's index in the stream.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// This subscriber's overflow policy.
    pub(crate) fn policy(&self) -> OverflowPolicy {
        self.policy
    }

    /// Samples currently borrowed.
    pub(crate) fn borrowed(&self) -> u32 {
        self.borrowed.get()
    }

    /// The subscriber's current credits.
    pub(crate) fn credits(&self) -> u32 {
        self.stream.record(self.index).config.credits.load(Relaxed)
    }

    /// Protocol violations this side has seen.
    pub(crate) fn faults(&self) -> u64 {
        self.faults.get()
    }

    /// Publisher arrivals and departures so far (odd while one is attached).
    pub(crate) fn publisher_generation(&self) -> u64 {
        self.stream.header().control.publisher_changes.load(Relaxed)
    }

    /// Whether the owner still has this subscriber attached.
    #[inline]
    fn attached(&self) -> bool {
        let cfg = &self.stream.record(self.index).config;
        // Relaxed: nothing read later depends on it. A detached subscriber
        // only stops; one attached was synchronised with at `attach`.
        cfg.state.load(Relaxed) == SUB_ACTIVE && cfg.generation.load(Relaxed) == self.generation
    }

    /// Where the next frame will be: the shared head under `KeepLatest`,
    /// which the publisher may move, else our own copy.
    #[inline]
    fn current_head(&self) -> u64 {
        if self.policy == OverflowPolicy::KeepLatest {
            // Acquire pairs with the writer's Release store of `head + 1`
            // ending an eviction (`evict_one`, `repair`) and its AcqRel CAS
            // claiming one (`evict_one`).
            self.channel.header().queue_head.load(Acquire)
        } else {
            self.head.get()
        }
    }

    /// Whether a frame is ready to take (for waiting).
    #[inline]
    fn ready(&self) -> bool {
        let head = self.current_head();
        if head & HEAD_CLAIMED != 0 {
            // The writer is evicting the entry at the head; see `poll_news`.
            // (Frames are queued: news of the publisher waits for them.)
            return !self.attached();
        }
        let word = self.stream.ring(self.index)[(head & self.cap_mask) as usize].word.load(Relaxed);
        // A stamp at or past `head + 1` is a frame (or, under KeepLatest, an
        // eviction to catch up with); older ones are stale. (`try_take`
        // loads the entry again with Acquire before using it.)
        stamp_ahead(split_entry(word).0, head) >= 0 || !self.attached() || self.publisher_changed()
    }

    /// Whether receiving would not find the queue plainly empty: a frame,
    /// a publisher change, a close or detach, or detached samples to hand
    /// back. What a sleeper waits for.
    fn has_news(&self) -> bool {
        self.ready()
            || self.board.get().is_some_and(|b| b.pending())
            || self.stream.header().control.state.load(Relaxed) == STREAM_CLOSED
    }

    /// [`has_news`](Self::has_news) for a sleeper: a head the writer has
    /// claimed to evict its entry means frames are queued, and the writer
    /// wakes a subscriber only for a frame into an empty queue — so sleep
    /// briefly rather than until woken (the claim lasts nanoseconds, or
    /// until recovery if the writer died).
    fn poll_news(&self) -> wait::Poll {
        if self.has_news() {
            wait::Poll::Ready
        } else if self.policy == OverflowPolicy::KeepLatest
            && self.channel.header().queue_head.load(Acquire) & HEAD_CLAIMED != 0
        {
            wait::Poll::Soon
        } else {
            wait::Poll::NotYet
        }
    }

    /// Whether the publisher changed since we last looked, in a stream
    /// that is still open (a close supersedes any change not yet reported).
    #[inline]
    fn publisher_changed(&self) -> bool {
        let ctl = &self.stream.header().control;
        ctl.publisher_changes.load(Relaxed) != self.publisher_seen.get() && ctl.state.load(Relaxed) == STREAM_OPEN
    }

    /// A change of publisher to report, if any, with the state to note
    /// once it is reported (`publisher_seen`, `gone_reported`). A first
    /// publisher is noted at once, without an event.
    ///
    /// Once the stream is closing, no change is reported: the close
    /// supersedes a departure the subscriber has not seen yet — including
    /// the one the owner counts when it ends the close of an idle
    /// publisher — and the subscriber waits for `Closed` instead.
    fn publisher_event(&self) -> Option<(TryRecvError, u64, bool)> {
        let ctl = &self.stream.header().control;
        // Acquire pairs with the Release updates of `publisher_changes` by
        // the publisher (`attach`, `drop`) and the owner (`publisher_gone`):
        // frames a departed publisher sent are visible from here on, and so
        // is a close that began before the change was counted (the owner
        // marks the stream closing before it declares a publisher gone).
        let now = ctl.publisher_changes.load(Relaxed);
        let seen = self.publisher_seen.get();
        if now == seen {
            return None;
        }
        fence(Acquire);
        // After the fence: a close begun before the change is seen.
        if ctl.state.load(Relaxed) != STREAM_OPEN {
            return None;
        }
        // The count only grows. A departure happened since `seen` if a
        // publisher was there and the count moved, or if one arrived and
        // the count moved again.
        if seen % 2 == 0 && self.gone_reported.get() {
            // After a reported departure, whoever came since is "back"
            // first, even if it has left again (that is reported next).
            return Some((TryRecvError::PublisherBack, seen + 1, false));
        }
        let departed = if seen % 2 == 1 { now > seen } else { now >= seen.saturating_add(2) };
        if departed {
            // Accounted up to the last departure; a publisher already
            // back (odd count) is reported on the next look.
            return Some((TryRecvError::PublisherGone, now - now % 2, true));
        }
        self.publisher_seen.set(now);
        None
    }

    #[cold]
    fn check_publisher_back(&self) -> Result<(), TryRecvError> {
        match self.publisher_event() {
            Some((event @ TryRecvError::PublisherBack, seen, gone)) => {
                self.publisher_seen.set(seen);
                self.gone_reported.set(gone);
                Err(event)
            }
            _ => Ok(()),
        }
    }

    /// Takes the next frame, if one is queued.
    #[inline(always)]
    pub(crate) fn try_take(&self) -> Result<FrameInfo, TryRecvError> {
        self.hand_back();
        let cfg = &self.stream.record(self.index).config;
        // As `attached` and `credits`, with one look-up.
        if cfg.state.load(Relaxed) != SUB_ACTIVE || cfg.generation.load(Relaxed) != self.generation {
            return Err(TryRecvError::Detached);
        }
        if self.gone_reported.get() && !self.history_queued() {
            // After `PublisherGone`, the news of a new publisher comes
            // before its frames (but after the history of the old one).
            self.check_publisher_back()?;
        }
        let credits = cfg.credits.load(Relaxed);
        if self.borrowed.get() >= credits {
            return Err(TryRecvError::CreditsExhausted { held: self.borrowed.get(), credits });
        }
        let ring = self.stream.ring(self.index);
        let ch = self.channel.header();
        let mut head = self.current_head();
        // Under KeepLatest every retry means the publisher evicted an entry;
        // bound the loop so a hostile head cannot spin us forever.
        for _ in 0..=self.cap_mask + 64 {
            if head & HEAD_CLAIMED != 0 {
                // An eviction is under way: the writer moves the head on
                // in a moment (or recovery does, if it died). Frames are
                // queued, so no news is reported meanwhile; a waiting
                // receive sleeps briefly (`poll_news`).
                crate::primitive::spin_hint();
                head = ch.queue_head.load(Acquire);
                if head & HEAD_CLAIMED != 0 {
                    return Err(if self.attached() { TryRecvError::Empty } else { TryRecvError::Detached });
                }
                continue;
            }
            let e = &ring[(head & self.cap_mask) as usize];
            let (stamp, slot) = split_entry(e.word.load(Relaxed));
            let next = head.wrapping_add(1);
            if stamp != entry_stamp(head) {
                let ahead = stamp_ahead(stamp, head);
                if ahead > 0 && self.policy == OverflowPolicy::KeepLatest {
                    // Overwritten after an eviction: find the new head. The
                    // fence pairs with the Release store of the newer entry
                    // in `push`, which the writer made after moving the head
                    // past this one (the Release store of `head + 1` in
                    // `evict_one` or `repair`): the head loaded next is at
                    // least that. One that has not moved is a publisher
                    // overrunning the queue, not an eviction: a receive
                    // retrying it would never reach its deadline.
                    fence(Acquire);
                    let now = ch.queue_head.load(Acquire);
                    if now == head {
                        return Err(self.corrupt("the publisher overran the queue"));
                    }
                    head = now;
                    continue;
                }
                if ahead > 0 {
                    return Err(self.corrupt("the publisher overran the queue"));
                }
                match self.empty() {
                    // Closing synchronised us with everything published
                    // before it: the entry may be ready after all.
                    TryRecvError::Closed if stamp_ahead(split_entry(e.word.load(Relaxed)).0, head) >= 0 => continue,
                    TryRecvError::Empty => {}
                    err => return Err(err),
                }
                if let Some((event, seen, gone)) = self.publisher_event() {
                    // Likewise for a publisher leaving: its last frames
                    // come before the news.
                    if event == TryRecvError::PublisherGone
                        && stamp_ahead(split_entry(e.word.load(Relaxed)).0, head) >= 0
                    {
                        continue;
                    }
                    self.publisher_seen.set(seen);
                    self.gone_reported.set(gone);
                    return Err(event);
                }
                return Err(TryRecvError::Empty);
            }
            // Pairs with the publisher's Release store of the entry's word
            // in `push`: the entry's other fields are complete.
            fence(Acquire);
            let len = e.len.load(Relaxed);
            let info = FrameInfo {
                slot,
                len: len & !ENTRY_HISTORY,
                seq: e.seq.load(Relaxed),
                timestamp_ns: e.timestamp_ns.load(Relaxed),
                history: len & ENTRY_HISTORY != 0,
            };
            if self.policy == OverflowPolicy::KeepLatest {
                // AcqRel pairs with the publisher's CAS in `evict_one`:
                // whoever moves `queue_head` past this entry owns it. Losing means
                // it was evicted (and the fields above may be torn).
                if let Err(now) = ch.queue_head.compare_exchange(head, next, AcqRel, Acquire) {
                    head = now;
                    continue;
                }
            } else {
                // Release pairs with the publisher's and owner's Acquire
                // loads of `queue_head` (statistics, eviction).
                ch.queue_head.store(next, Release);
            }
            self.head.set(next);
            let g = self.stream.layout().geometry;
            if slot >= g.slot_count {
                return Err(self.corrupt("slot number out of range"));
            }
            self.borrowed.set(self.borrowed.get() + 1);
            if info.len > g.slot_size {
                return Err(self.refuse_too_long(info.slot));
            }
            return Ok(info);
        }
        Err(TryRecvError::Empty)
    }

    /// Whether the frame at the head is ready and from the history (or an
    /// eviction is under way: frames are queued, and news waits for them).
    #[cold]
    fn history_queued(&self) -> bool {
        let head = self.current_head();
        if head & HEAD_CLAIMED != 0 {
            return true;
        }
        let e = &self.stream.ring(self.index)[(head & self.cap_mask) as usize];
        if split_entry(e.word.load(Relaxed)).0 != entry_stamp(head) {
            return false;
        }
        // Pairs with the writer's Release store of the entry's word in
        // `push`: the length read is this entry's, not a former one's.
        fence(Acquire);
        e.len.load(Relaxed) & ENTRY_HISTORY != 0
    }

    /// Hands back the slots of detached samples released since last time,
    /// if any.
    #[inline]
    pub(crate) fn hand_back(&self) {
        if let Some(board) = self.board.get() {
            if board.pending() {
                self.flush_board(board);
            }
        }
    }

    /// Hands back the slots of detached samples released since last time.
    #[cold]
    fn flush_board(&self, board: &ReturnBoard<S, C>) {
        let duplicates = board.flush(|slot| self.return_slot(slot));
        if duplicates > 0 {
            self.borrowed.set(self.borrowed.get().saturating_sub(duplicates));
        }
    }

    #[cold]
    fn empty(&self) -> TryRecvError {
        if !self.attached() {
            TryRecvError::Detached
        } else if self.stream.header().control.state.load(Relaxed) == STREAM_CLOSED {
            // Pairs with the Release store of STREAM_CLOSED in
            // `acknowledge_close`: frames published before it are visible
            // from here on (the caller re-checks the entry before reporting
            // `Closed`).
            fence(Acquire);
            TryRecvError::Closed
        } else {
            TryRecvError::Empty
        }
    }

    /// A frame claiming more bytes than its slot holds: its slot goes
    /// back unread.
    #[cold]
    #[inline(never)]
    fn refuse_too_long(&self, slot: u32) -> TryRecvError {
        self.return_slot(slot);
        self.corrupt("frame length exceeds the slot size")
    }

    #[cold]
    fn corrupt(&self, what: &'static str) -> TryRecvError {
        self.faults.set(self.faults.get() + 1);
        TryRecvError::Corrupt(what)
    }

    /// Waits for the next frame until `deadline` (forever if `None`).
    pub(crate) fn take(&self, deadline: Option<Instant>) -> Result<FrameInfo, RecvError> {
        loop {
            match self.try_take() {
                Err(TryRecvError::Empty) => {}
                other => return other.map_err(RecvError::from),
            }
            let word = &self.channel.header().waiting;
            if !wait::wait_for(word, self.backoff, deadline, || self.poll_news()) {
                return Err(RecvError::Timeout);
            }
        }
    }

    /// Hands `slot` back to the publisher.
    #[inline(always)]
    pub(crate) fn return_slot(&self, slot: u32) {
        self.borrowed.set(self.borrowed.get() - 1);
        if !self.attached() {
            // The owner reclaimed everything we held; the channel may belong
            // to somebody else soon.
            return;
        }
        let ch = self.channel.header();
        let tail = self.returned.get();
        if tail.wrapping_sub(self.collected_seen.get()) > self.cap_mask {
            // Acquire pairs with the writer's Release store of
            // `collected` in `collect_returns` or `replay_returns`.
            self.collected_seen.set(ch.collected.load(Acquire));
            if tail.wrapping_sub(self.collected_seen.get()) > self.cap_mask {
                // Cannot happen while we hold at most `credits` slots: the
                // publisher reads the ring before giving us more.
                self.faults.set(self.faults.get() + 1);
                return;
            }
        }
        self.channel.returns()[(tail & self.cap_mask) as usize].store(slot, Relaxed);
        // Release pairs with the publisher's Acquire load of `returned` in
        // `collect_returns`: the slot number is visible with it.
        ch.returned.store(tail.wrapping_add(1), Release);
        self.returned.set(tail.wrapping_add(1));
        if self.policy == OverflowPolicy::Lossless {
            // A publisher may be asleep waiting for this very slot.
            wait::fence_before_wake();
            wait::wake_if_waiting(&ch.pub_waiting);
        }
    }
}
