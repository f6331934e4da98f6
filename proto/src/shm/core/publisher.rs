//! The publisher side: slot loans, delivery to every subscriber's queue,
//! overflow policies, taking slots back, and recovery after a crash.
//!
//! # Algorithm
//!
//! The publisher is the only writer of the holder masks (one bit per
//! subscriber per slot) and of the delivery rings; it keeps the free list
//! and each subscriber's `held` count (bits set = queued + borrowed +
//! returned-but-not-yet-read) in private memory. Sending a frame in slot `x`:
//!
//! 1. for each active subscriber `s` with `held[s] < credits[s]` (after
//!    reading `s`'s return ring if it looked full): write the ring entry at
//!    `pushed[s]` (sequence number, timestamp, length), publish it by
//!    storing its word `(stamp, x)` with `Release`, then set bit `s` of `x`;
//! 2. a subscriber without credit drops the frame (`DropNewest`), has its
//!    oldest queued entry evicted first (`KeepLatest`, by compare-and-swap
//!    on its `queue_head` against the subscriber's own CAS), or — checked before
//!    step 1 so that a frame is never half-sent — makes `send` fail with
//!    `WouldBlock` (`Lossless`);
//! 3. if no bit was set, `x` goes straight back to the free list.
//!
//! Subscribers hand slots back through their own return ring. The
//! publisher reads a ring only when that subscriber looks full or the free
//! list is empty, checks every returned slot against the subscriber's bit
//! (a slot it does not hold, or a second return, is a counted fault and is
//! ignored) and frees a slot when its mask becomes empty.
//!
//! Because `held[s] <= credits[s]` always, and the owner admits subscribers
//! only while `sum(credits) + PUBLISHER_LOANS <= slot_count`, a loan always
//! finds a free slot after the return rings are read — whatever any
//! subscriber does with its own channel. A misbehaving subscriber can only
//! make its own `held` stay high.

use super::crash;
use super::mem::{ChannelMem, StreamMem};
use super::wait::{self, Backoff};
use super::writer::{HolderBit, Writer, holders, is_free};
use crate::primitive::AtomicU32;
use crate::primitive::Ordering::{AcqRel, Acquire, Relaxed, Release};
use crate::shm::layout::{
    ENTRY_HISTORY, HEAD_CLAIMED, INFLIGHT_IDLE, NO_SLOT, OverflowPolicy, STREAM_CLOSED, STREAM_CLOSING, STREAM_ENDING,
    STREAM_OPEN, SUB_ACTIVE, SUB_DETACHING, SUB_FREE, WRITER_NONE, WRITER_OWNER, WRITER_PUBLISHER,
};
use crate::shm::layout::{entry, entry_stamp, inflight, split_entry, split_inflight};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// How many loans ahead the publisher prefetches slots.
const PREFETCH_AHEAD: usize = 4;

/// What became of one sent frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendInfo {
    /// The frame's sequence number.
    pub seq: u64,
    /// Subscribers it was queued for.
    pub delivered: u32,
    /// Subscribers that lost it for lack of credit.
    pub dropped: u32,
}

/// Why the core could not attach as publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachRefusal {
    Closed,
    PublisherExists { pid: u32 },
    Busy,
}

/// Why the core refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitRefusal {
    /// Lossless subscriber `subscriber` has no credit left.
    WouldBlock {
        subscriber: u32,
    },
    Closed,
    Replaced,
    /// A copy of the publisher in a child forked since it opened.
    Forked,
    /// A panic cut short one of this publisher's changes to shared memory.
    Poisoned,
}

/// Why no slot could be loaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoanError {
    /// Every slot is held. Cannot happen while all subscribers keep to
    /// their credits; seen only if credits were lowered below what a
    /// subscriber already held.
    #[error("no free slot: every slot is held by a subscriber")]
    PoolExhausted,
    /// The owner closed the stream.
    #[error("the stream is closed")]
    Closed,
    /// The owner declared this publisher gone and another may have taken
    /// over: this handle may no longer publish.
    #[error("this publisher was declared gone; it may no longer publish")]
    Replaced,
    /// This is a copy of the publisher in a child forked since it opened:
    /// the writer role stays the parent's. The child publishes anew.
    #[error("this publisher was opened before a fork: in the forked child, connect and publish anew")]
    Forked,
    /// A panic cut one of this publisher's loans or sends short: its view
    /// of the stream may no longer match the shared memory, so it refuses
    /// to go on. Drop it; the owner finishes what it left half done.
    #[error("a loan or send of this publisher panicked part-way; drop it, and the stream is repaired")]
    Poisoned,
    /// The publisher already holds as many loans (samples being written
    /// and detached loans) as its stream allows: send or drop one first.
    #[error("the publisher already holds its {budget} loan(s): send or drop one first")]
    TooManyLoans {
        /// The stream's loan budget (`StreamConfig::publisher_loans`).
        budget: u32,
    },
}

/// The publisher's private view of one subscriber index.
#[derive(Debug, Clone, Default)]
struct SubState {
    active: bool,
    generation: u64,
    policy: OverflowPolicy,
    credits: u32,
    parks: bool,
    /// Slots whose mask has this subscriber's bit set.
    held: u32,
    /// Next queue position.
    pushed: u64,
    /// One more than the sequence number last queued for it (0: none yet).
    last_push: u64,
    /// Next return-ring position to read.
    collected: u64,
    dropped: u64,
    evicted: u64,
    faults: u64,
}

/// A subscriber index's channel file as a writer (or the owner) maps it.
#[derive(Debug, Clone)]
pub(crate) struct Chan<C> {
    /// The one subscriber generation the file was created for (a file per
    /// subscription, created at admission); `None`: one file serves every
    /// generation of its index, reset by the owner at each admission.
    pub(crate) generation: Option<u64>,
    pub(crate) map: C,
}

impl<C> Chan<C> {
    /// A file serving every generation of its index.
    pub(crate) fn any(map: C) -> Self {
        Self { generation: None, map }
    }

    /// Whether the file is subscriber generation `generation`'s.
    pub(crate) fn serves(&self, generation: u64) -> bool {
        self.generation.is_none_or(|g| g == generation)
    }

    /// The same file, by reference.
    pub(crate) fn by_ref(&self) -> Chan<&C> {
        Chan { generation: self.generation, map: &self.map }
    }
}

/// The mapped files of a table of channels, in index order.
pub(crate) fn mapped<C>(channels: &[Option<Chan<C>>]) -> impl Iterator<Item = &C> {
    channels.iter().flatten().map(|c| &c.map)
}

/// Channel files created for subscribers admitted after the publisher
/// attached, handed over by another thread (the one talking to the owner)
/// before the owner activates the subscriber. The publisher takes them
/// only when the subscriber table changes (`sync_table_slow`): nothing on
/// the per-frame path looks here.
///
/// The owner activates a subscriber only once the channel is in the inbox
/// of the publisher attached (or given to a publisher at attach), so the
/// publisher's `Acquire` load of the new `table_gen` comes after the push
/// (through whatever told the owner, and this mutex).
#[derive(Debug)]
pub(crate) struct Inbox<C> {
    new: Mutex<Vec<(u32, Chan<C>)>>,
}

impl<C> Default for Inbox<C> {
    fn default() -> Self {
        Self { new: Mutex::new(Vec::new()) }
    }
}

impl<C> Inbox<C> {
    /// Hands over subscriber `index`'s new channel. Only the newest
    /// reservation of an index can be activated, so it replaces one not
    /// taken yet: however often subscribers come and give up before the
    /// publisher looks, the inbox holds at most one file per index.
    pub(crate) fn push(&self, index: u32, chan: Chan<C>) {
        // A poisoned lock only means a pusher panicked: the list is fine.
        let mut new = self.new.lock().unwrap_or_else(PoisonError::into_inner);
        new.retain(|(i, _)| *i != index);
        new.push((index, chan));
    }

    pub(crate) fn take(&self) -> Vec<(u32, Chan<C>)> {
        std::mem::take(&mut *self.new.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The publisher algorithm over any memory implementing the layout.
#[derive(Debug)]
pub(crate) struct PubCore<S: StreamMem, C: ChannelMem> {
    stream: S,
    /// Per subscriber index, its channel if this writer has it. Invariant:
    /// every index in `active` has the channel of its generation.
    channels: Vec<Option<Chan<C>>>,
    /// Where channels of newly admitted subscribers arrive.
    inbox: Option<Arc<Inbox<C>>>,
    subs: Vec<SubState>,
    /// Indices of active subscribers, and the subsets that are lossless
    /// and that may be asleep.
    active: Vec<usize>,
    lossless: Vec<usize>,
    parkers: Vec<usize>,
    /// Free slots, reused in the order they were freed: the slot written
    /// next is the one released longest ago, whose lines have most likely
    /// left the subscribers' caches, so writing it does not have to
    /// invalidate them there (reusing the latest costs ~35 % on 1 MB frames).
    free: VecDeque<u32>,
    table_gen: u64,
    published: u64,
    bytes: u64,
    closed: bool,
    /// The writer role we hold: as publisher (with its loan budget), or as
    /// the owner recovering while no publisher is attached.
    writer: Writer,
    replaced: bool,
    cap_mask: u64,
    /// The odd `publisher_changes` our arrival made.
    arrival: u64,
    /// Frames kept for late joiners (the stream's `history`), and the
    /// history ring's index mask.
    history: u32,
    hist_mask: u64,
    /// The history window `[hist_first, hist_kept)` (positions in the
    /// history ring), as stored in `PublisherState`.
    hist_first: u64,
    hist_kept: u64,
    /// The interrupted frame `take_over` rolls forward once it has looked at
    /// the subscriber table (see `seed`).
    rolling: Option<Interrupted>,
    /// Set while `take_over` rolls an interrupted delivery forward: a close
    /// is acknowledged only after, or a subscriber could see the end and
    /// then a frame.
    hold_close: bool,
    /// Set while this writer changes shared memory (a loan, a send, a wait
    /// for room, taking over). Set outside one, a panic cut it short: the
    /// private state (free list, counts, subscriber list) may disagree
    /// with shared memory, and a slot some subscriber reads may look free
    /// (a push between entry and holder bit, a return applied but not
    /// counted). Such a publisher is poisoned: it loans, sends, frees and
    /// acknowledges nothing more, and lets go of the role with `dirty` set
    /// and its departure uncounted, so the owner repairs from shared
    /// memory (`repair`, `take_over`) before anyone sees it gone.
    busy: bool,
}

impl<S: StreamMem, C: ChannelMem> PubCore<S, C> {
    /// Attaches as the stream's only publisher: takes the writer role,
    /// recovers from a previous writer's crash if needed and rebuilds the
    /// private state from the holder masks.
    /// Attaches with one channel file per subscriber index, each serving
    /// every generation of its index (the owner resets it at admission).
    #[cfg(test)]
    pub(crate) fn attach(stream: S, channels: Vec<C>, pid: u32) -> Result<Self, AttachRefusal> {
        Self::attach_with(stream, channels.into_iter().map(|c| Some(Chan::any(c))).collect(), None, pid)
    }

    /// Attaches with the channels the owner has created so far (`None`
    /// where an index has none), and the inbox where it hands over those
    /// it creates later.
    pub(crate) fn attach_with(
        stream: S,
        channels: Vec<Option<Chan<C>>>,
        inbox: Option<Arc<Inbox<C>>>,
        pid: u32,
    ) -> Result<Self, AttachRefusal> {
        let g = stream.layout().geometry;
        assert_eq!(channels.len(), g.max_subscribers as usize, "a place per subscriber index");
        // What arrived before we attach counts from the start: the table is
        // read against it (a file taken later could replace an active
        // index's after the table was read).
        let mut channels = channels;
        for (index, chan) in inbox.iter().flat_map(|i| i.take()) {
            if let Some(place) = channels.get_mut(index as usize) {
                *place = Some(chan);
            }
        }
        let ctl = &stream.header().control;
        // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
        // Release CAS to CLOSED (`acknowledge_close`).
        if ctl.state.load(Acquire) != STREAM_OPEN {
            return Err(AttachRefusal::Closed);
        }
        let mut tries = 0u32;
        let writer = loop {
            // The previous writer let go (`Drop` here, `OwnerCore::reclaim_detached`).
            match Writer::acquire(ctl, WRITER_NONE, WRITER_PUBLISHER) {
                Ok(writer) => break writer,
                Err(WRITER_OWNER) if tries < 100_000 => {
                    // The owner reclaims for a moment while no publisher is attached.
                    tries += 1;
                    crate::primitive::yield_now();
                }
                Err(WRITER_OWNER) => return Err(AttachRefusal::Busy),
                Err(_) => return Err(AttachRefusal::PublisherExists { pid: ctl.publisher_pid.load(Relaxed) }),
            }
        };
        // Pairs with the SeqCst fence in `OwnerCore::close`, after its mark
        // of the state: either it sees our role taken (and leaves the
        // acknowledgement to us), or `take_over` sees the stream closing.
        crate::primitive::fence(crate::primitive::Ordering::SeqCst);
        ctl.publisher_pid.store(pid, Relaxed);
        let mut this = Self::take_over(stream, channels, writer);
        this.inbox = inbox;
        // Only a writer changes the count, and it is even (no publisher):
        // make it odd. Release pairs with the subscribers' Acquire load in
        // `SubCore::publisher_event`.
        // (Odd would mean a predecessor's departure went uncounted: count it.)
        let changes = &this.stream.header().control.publisher_changes;
        let now = changes.load(Relaxed);
        this.arrival = if now % 2 == 0 { now.wrapping_add(1) } else { now.wrapping_add(2) };
        changes.store(this.arrival, Release);
        wake_all(&this.channels);
        Ok(this)
    }

    /// Builds the writer's private state once the caller holds the writer
    /// `role`: finishes whatever a writer that died left half done (see
    /// [`repair`]), reads every return ring to its end, rebuilds the free
    /// list and each subscriber's `held` from the holder masks, and rolls
    /// an interrupted delivery forward.
    pub(crate) fn take_over(stream: S, channels: Vec<Option<Chan<C>>>, mut writer: Writer) -> Self {
        let g = stream.layout().geometry;
        assert_eq!(channels.len(), g.max_subscribers as usize, "a place per subscriber index");
        let ctl = &stream.header().control;
        let subs_n = g.max_subscribers as usize;
        // Should our own code panic before `this` exists, let go of the
        // role, `dirty` set (a `Writer` has no drop); from then on `busy`
        // does it (`let_go_poisoned`).
        let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let interrupted = if ctl.dirty.load(Relaxed) != 0 { repair(&writer, &stream, &channels) } else { None };
            // A predecessor may have died part-way through reading a return
            // ring: read them all to the end now, before any slot is delivered
            // again. A return it had applied finds its bit clear and changes
            // nothing; one it had not is applied now.
            for s in 0..channels.len() {
                if let Some(channel) = active_channel(&stream, &channels, s) {
                    replay_returns(&writer, &stream, channel, s);
                }
            }
            ctl.dirty.store(1, Relaxed);
            let window = history_window(&writer, &stream);

            let mut subs = vec![SubState::default(); subs_n];
            let mut free = VecDeque::with_capacity(g.slot_count as usize);
            for slot in (0..g.slot_count).rev() {
                let mut empty = true;
                for s in holders(stream.mask(slot)) {
                    empty = false;
                    if s < subs_n {
                        subs[s].held += 1;
                    }
                }
                if empty {
                    free.push_front(slot);
                }
            }
            (interrupted, subs, free, window)
        }));
        let (interrupted, subs, free, (hist_first, hist_kept)) = match prepared {
            Ok(prepared) => prepared,
            Err(panic) => {
                writer.let_go(ctl);
                std::panic::resume_unwind(panic)
            }
        };
        let ctl_loans = stream.header().ident.publisher_loans.load(Relaxed).clamp(1, g.slot_count - 1);
        writer.set_loan_budget(ctl_loans);
        let p = &stream.header().publisher;
        let mut this = Self {
            published: p.published.load(Relaxed),
            bytes: p.bytes.load(Relaxed),
            stream,
            channels,
            inbox: None,
            subs,
            active: Vec::with_capacity(subs_n),
            lossless: Vec::with_capacity(subs_n),
            parkers: Vec::with_capacity(subs_n),
            free,
            table_gen: u64::MAX,
            closed: false,
            writer,
            replaced: false,
            cap_mask: u64::from(g.queue_capacity) - 1,
            history: g.history,
            hist_mask: (g.history_capacity() as u64).wrapping_sub(1),
            hist_first,
            hist_kept,
            rolling: interrupted,
            arrival: 0,
            hold_close: true,
            // Until taken over: a panic in between poisons it.
            busy: true,
        };
        this.sync_table();
        if let Some(frame) = this.rolling.take() {
            this.roll_forward(frame);
        }
        this.trim_history();
        this.hold_close = false;
        // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
        // Release CAS to CLOSED (`acknowledge_close`).
        if !this.replaced && this.stream.header().control.state.load(Acquire) != STREAM_OPEN {
            this.closed = true;
            acknowledge_close(&this.stream, &this.channels);
        }
        this.busy = false;
        this
    }

    /// Finishes the delivery of `frame`, which some subscriber may have
    /// read already: every subscriber that has not got it gets it now, by
    /// the rules of its policy, as if the delivery had never stopped.
    ///
    /// A subscriber with no room gets it as its policy says: a lossless one
    /// whose credits the owner lowered since the send began drops it, like
    /// a drop-newest one (the send never returned, so no promise is broken).
    fn roll_forward(&mut self, frame: Interrupted) {
        let Interrupted { slot, seq, len, timestamp_ns } = frame;
        // Those that had the frame may have returned it since, so the
        // rebuild may have found the slot free: it is the frame's again.
        self.free.retain(|&x| x != slot);
        let stream = &self.stream;
        let has_it = |s: usize| holds_frame(stream, s, slot, seq);
        let had = (0..self.subs.len()).filter(|&s| has_it(s)).collect::<Vec<_>>();
        let info = self.deliver_each(slot, len, seq, timestamp_ns, |s| had.contains(&s));
        if self.history != 0 {
            if self.history_ends_with(slot, seq) {
                // `repair` found it kept: only the oldest may be left to go.
                self.trim_history();
            } else {
                self.keep(slot, len, seq, timestamp_ns);
            }
        }
        self.finish_delivery(slot, len, seq, info);
        tracing::debug!(slot, seq, delivered = info.delivered, "rolled an interrupted delivery forward");
    }

    /// Sequence number the next frame will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.published
    }

    /// Number of subscribers frames currently go to.
    pub(crate) fn subscriber_count(&self) -> usize {
        self.active.len()
    }

    /// Picks up changes the owner made to the subscriber table: one
    /// `Acquire` load per call while nothing changed.
    #[inline]
    fn sync_table(&mut self) {
        // Acquire pairs with the owner's Release increment of `table_gen`
        // (owner.rs `bump_table`): the records it changed are visible.
        let gen_now = self.stream.header().control.table_gen.load(Acquire);
        if gen_now != self.table_gen {
            self.sync_table_slow(gen_now);
        }
    }

    #[cold]
    fn sync_table_slow(&mut self, gen_now: u64) {
        self.table_gen = gen_now;
        let ctl = &self.stream.header().control;
        if self.writer.role() == WRITER_PUBLISHER && !self.writer.is_current(ctl) {
            // The owner declared us gone (`publisher_gone`) while we were
            // still alive: touch nothing more. (If it closed the stream
            // too, that is what the caller hears.)
            self.replaced = true;
            // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
            // Release CAS to CLOSED (`acknowledge_close`).
            self.closed = ctl.state.load(Acquire) != STREAM_OPEN;
            return;
        }
        self.take_inbox();
        self.active.clear();
        self.lossless.clear();
        self.parkers.clear();
        let cap = self.cap_mask as u32 + 1;
        for s in 0..self.subs.len() {
            let cfg = &self.stream.record(s).config;
            // Acquire pairs with the Release stores of the record's state (the owner's in
            // `add`/`remove`/`release`, the writer's SUB_FREE after reclaiming).
            let state = cfg.state.load(Acquire);
            let generation = cfg.generation.load(Relaxed);
            // The channel of a subscriber that has gone (not one created
            // for the next, whose generation is higher): unmapped once the
            // index is free.
            let theirs = self.channels[s].as_ref().is_some_and(|c| c.generation == Some(generation));
            match state {
                SUB_ACTIVE if !self.channels[s].as_ref().is_some_and(|c| c.serves(generation)) => {
                    // Admitted without its channel reaching us: the owner
                    // breaks its protocol. Deliver nothing rather than
                    // write into another subscriber's channel.
                    self.subs[s].active = false;
                }
                SUB_ACTIVE => {
                    let st = &mut self.subs[s];
                    let joined = !st.active || st.generation != generation;
                    if joined {
                        // A new subscriber: the owner reset its ring,
                        // counters and channel while the index was free.
                        let counters = &self.stream.record(s).counters;
                        // (Counters go on from the shared ones: a new writer
                        // takes over a subscriber mid-stream.)
                        *st = SubState {
                            active: true,
                            generation,
                            held: st.held,
                            pushed: counters.pushed.load(Relaxed),
                            collected: counters.collected.load(Relaxed),
                            dropped: counters.dropped.load(Relaxed),
                            evicted: counters.evicted.load(Relaxed),
                            faults: counters.faults.load(Relaxed),
                            ..SubState::default()
                        };
                    }
                    st.policy = OverflowPolicy::from_raw(cfg.policy.load(Relaxed)).unwrap_or_default();
                    st.credits = cfg.credits.load(Relaxed).min(cap);
                    st.parks = cfg.parks.load(Relaxed) != 0;
                    self.active.push(s);
                    if st.policy == OverflowPolicy::Lossless {
                        self.lossless.push(s);
                    }
                    if st.parks {
                        self.parkers.push(s);
                    }
                    if joined && self.history != 0 {
                        // Before any live frame: nothing is delivered
                        // until this look at the table is over.
                        self.seed(s);
                    }
                }
                SUB_DETACHING => {
                    let free = &mut self.free;
                    take_back_all(&self.writer, &self.stream, s, |slot| free.push_back(slot));
                    self.subs[s] = SubState::default();
                    if theirs {
                        self.channels[s] = None;
                    }
                    // Release pairs with the owner's Acquire load of the
                    // state before it reuses the index.
                    let _ = cfg.state.compare_exchange(SUB_DETACHING, SUB_FREE, Release, Relaxed);
                }
                _ => {
                    self.subs[s].active = false;
                    if theirs {
                        self.channels[s] = None;
                    }
                }
            }
        }
        // Release pairs with the owner's Acquire load in `committed`.
        self.stream.header().publisher.applied_gen.store(gen_now, Release);
        // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
        // Release CAS to CLOSED (`acknowledge_close`).
        if !self.hold_close && self.stream.header().control.state.load(Acquire) != STREAM_OPEN {
            // From here on nothing is delivered: tell the subscribers.
            self.closed = true;
            acknowledge_close(&self.stream, &self.channels);
        }
    }

    /// Maps the channels handed over since the last look, replacing what
    /// an index had (the owner creates a file per admission).
    #[cold]
    fn take_inbox(&mut self) {
        let Some(inbox) = &self.inbox else { return };
        for (index, chan) in inbox.take() {
            if let Some(place) = self.channels.get_mut(index as usize) {
                *place = Some(chan);
            }
        }
    }

    /// Subscriber `s`'s channel: `s` is active, so the channel is here.
    #[inline]
    fn channel(&self, s: usize) -> &C {
        channel_of(&self.channels, s)
    }

    /// Forgets the writer role without touching shared memory: this is a
    /// copy of the publisher in a forked child, and the role is the
    /// parent's.
    pub(crate) fn disown(&mut self) {
        self.writer = Writer::disowned();
    }

    /// Hands the writer role back to whoever gave it to
    /// [`take_over`](Self::take_over) (the owner, after recovering).
    pub(crate) fn into_writer(mut self) -> Writer {
        std::mem::replace(&mut self.writer, Writer::disowned())
    }

    /// Runs `step`, a change to shared memory, marked `busy`; `poisoned`
    /// instead if an earlier one never finished (see `busy`).
    #[inline(always)]
    fn step<R>(&mut self, poisoned: R, step: impl FnOnce(&mut Self) -> R) -> R {
        if self.busy {
            return poisoned;
        }
        self.busy = true;
        let done = step(self);
        self.busy = false;
        done
    }

    /// Looks at the subscriber table now, as a loan or send would first:
    /// hands the history to subscribers that joined, reclaims those that
    /// left. For a publisher that may not send for a while (see
    /// `Served`). A panic in it poisons the publisher and goes no further.
    #[cold]
    pub(crate) fn serve(&mut self) {
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.step((), Self::sync_table)));
    }

    /// Takes a free slot.
    #[inline(always)]
    pub(crate) fn loan(&mut self) -> Result<u32, LoanError> {
        self.step(
            Err(LoanError::Poisoned),
            #[inline(always)]
            |this| this.take_slot(),
        )
    }

    #[inline(always)]
    fn take_slot(&mut self) -> Result<u32, LoanError> {
        self.sync_table();
        if self.closed | self.replaced {
            return Err(if self.replaced { LoanError::Replaced } else { LoanError::Closed });
        }
        self.writer.take_loan().map_err(|budget| LoanError::TooManyLoans { budget })?;
        let slot = match self.free.pop_front() {
            Some(slot) => slot,
            None => self.loan_slow().inspect_err(|_| self.writer.end_loan())?,
        };
        // Take the slot loaned a few frames from now back from the
        // subscribers' caches while we work on this one.
        if let Some(&ahead) = self.free.get(PREFETCH_AHEAD) {
            self.stream.prefetch_slot(ahead);
        }
        Ok(slot)
    }

    #[cold]
    fn loan_slow(&mut self) -> Result<u32, LoanError> {
        for i in 0..self.active.len() {
            let s = self.active[i];
            self.collect(s);
        }
        self.free.pop_front().ok_or(LoanError::PoolExhausted)
    }

    /// The `Drop` of a poisoned publisher (see `busy`): lets go of the
    /// role, if still ours, and touches nothing else. `dirty` stays set
    /// and the departure uncounted: the owner repairs, rolls the
    /// interrupted frame forward, and only then counts the departure and
    /// acknowledges a close (`OwnerCore::reclaim_detached`), so that no
    /// subscriber sees the publisher gone, or the end, before a frame
    /// another one got. (It lets go of the owner's role too, should the
    /// owner's take-over panic.)
    #[cold]
    fn let_go_poisoned(&mut self) {
        std::mem::replace(&mut self.writer, Writer::disowned()).let_go(&self.stream.header().control);
    }

    /// Gives a loaned slot back unsent.
    pub(crate) fn abandon(&mut self, slot: u32) {
        self.writer.end_loan();
        if self.replaced || self.busy {
            // Replaced: not ours. Poisoned (`busy` outside a step): the
            // slot whose delivery a panic cut short may be in some
            // subscriber's queue without its holder bit yet (see `push`);
            // the next writer sorts it out.
            return;
        }
        // Unsent, so untouched by subscribers: reuse it first.
        if is_free(self.stream.mask(slot)) {
            self.free.push_front(slot);
        }
    }

    /// Sends the loaned `slot` holding `len` bytes to every subscriber.
    /// On refusal the slot stays loaned.
    #[inline(always)]
    pub(crate) fn commit(&mut self, slot: u32, len: u32, timestamp_ns: u64) -> Result<SendInfo, CommitRefusal> {
        self.step(
            Err(CommitRefusal::Poisoned),
            #[inline(always)]
            |this| this.send_slot(slot, len, timestamp_ns),
        )
    }

    // Inlined, as `deliver`: what it returns stays in registers.
    #[inline(always)]
    fn send_slot(&mut self, slot: u32, len: u32, timestamp_ns: u64) -> Result<SendInfo, CommitRefusal> {
        self.sync_table();
        if self.closed | self.replaced {
            return Err(if self.replaced { CommitRefusal::Replaced } else { CommitRefusal::Closed });
        }
        for i in 0..self.lossless.len() {
            let s = self.lossless[i];
            if !self.has_room(s) {
                return Err(CommitRefusal::WouldBlock { subscriber: s as u32 });
            }
        }
        let info = self.deliver(slot, len, timestamp_ns)?;
        // After the delivery, so counted once: should it panic, the
        // publisher is poisoned and its loans are never counted again (a
        // sample's drop ends the loan in `abandon`, freeing nothing).
        self.writer.end_loan();
        Ok(info)
    }

    /// Slots free (not loaned, held by nobody) once every return ring is read.
    #[cfg(test)]
    pub(crate) fn free_slots(&mut self) -> usize {
        for i in 0..self.active.len() {
            let s = self.active[i];
            self.collect(s);
        }
        self.free.len()
    }

    // Inlined into its one caller: the frame's figures stay in registers.
    // (Returned through memory, a wider load of two narrower stores cannot
    // be forwarded, so it waited for every store before it, the ring's
    // cross-core ones included: a quarter of the C publisher's rate.)
    #[inline(always)]
    fn deliver(&mut self, slot: u32, len: u32, timestamp_ns: u64) -> Result<SendInfo, CommitRefusal> {
        let seq = self.published;
        let header = self.stream.header();
        // One word names the frame in flight, so no kill leaves half a name.
        header.publisher.inflight.store(inflight(seq, slot), Relaxed);
        crash::point();
        // The owner may end a close we were slow to acknowledge while we
        // live (`OwnerCore::end_for_subscribers`): it marks the stream
        // ending, runs a system-wide barrier, then ends it only if no frame
        // is in flight. The light barrier pairs with that one: either it
        // sees our frame in flight and waits, or we see the mark here and
        // deliver nothing — so no subscriber sees the end before a frame
        // whose send returns Ok. (Same cache line as `table_gen`: free.)
        crate::primitive::light_barrier();
        if matches!(header.control.state.load(Relaxed), STREAM_ENDING | STREAM_CLOSED) {
            self.idle();
            self.closed = true;
            acknowledge_close(&self.stream, &self.channels);
            return Err(CommitRefusal::Closed);
        }
        let info = self.deliver_each(slot, len, seq, timestamp_ns, |_| false);
        if self.history != 0 {
            self.keep(slot, len, seq, timestamp_ns);
        }
        self.finish_delivery(slot, len, seq, info);
        Ok(info)
    }

    /// No frame in flight any more. Release pairs with the owner's Acquire
    /// load in `OwnerCore::end_for_subscribers`: whoever sees the stream
    /// end from it sees every frame delivered before.
    #[inline]
    fn idle(&self) {
        self.stream.header().publisher.inflight.store(INFLIGHT_IDLE, Release);
    }

    /// Offers frame `seq` in `slot` to every active subscriber but those
    /// `skip` names, in index order.
    #[inline]
    fn deliver_each(
        &mut self,
        slot: u32,
        len: u32,
        seq: u64,
        timestamp_ns: u64,
        skip: impl Fn(usize) -> bool,
    ) -> SendInfo {
        let (mut delivered, mut dropped) = (0u32, 0u32);
        let mut wake = false;
        for i in 0..self.active.len() {
            let s = self.active[i];
            if skip(s) {
                continue;
            }
            let room = self.has_room(s) || (self.subs[s].policy == OverflowPolicy::KeepLatest && self.evict_oldest(s));
            if room {
                self.push(s, slot, len, seq, timestamp_ns);
                delivered += 1;
                wake |= self.subs[s].parks;
            } else {
                let st = &mut self.subs[s];
                st.dropped = st.dropped.wrapping_add(1);
                self.stream.record(s).counters.dropped.store(st.dropped, Relaxed);
                crash::point();
                dropped += 1;
            }
        }
        if wake {
            // The SeqCst fence pairs with the one a waiter makes between
            // announcing itself and looking at its queue (`wait::wait_until`).
            wait::fence_before_wake();
            for &s in &self.parkers {
                let st = &self.subs[s];
                let ch = self.channel(s).header();
                // Only a subscriber this frame went to, asleep (or about
                // to be) and whose queue held nothing before it: one with
                // frames queued was woken for the first of them, or sees
                // them as it announces itself. So a subscriber that keeps
                // its word set costs a load per frame, not a system call.
                // (A stale head here means the waiter's fence came after
                // ours, and it sees this frame itself.)
                if st.last_push == seq.wrapping_add(1)
                    && wait::is_waiting(&ch.waiting)
                    && ch.queue_head.load(Relaxed) == st.pushed.wrapping_sub(1)
                {
                    wait::wake_announced(&ch.waiting);
                }
            }
        }
        SendInfo { seq, delivered, dropped }
    }

    /// Keeps frame `seq` in the history, after every subscriber was offered
    /// it, and lets the oldest frame go if the window is then too long.
    ///
    /// The entry, then the history's holder bit, then the window's end: a
    /// history bit never exists without its entry (see `repair`). The new
    /// frame goes in before the oldest leaves, so that a kill never leaves
    /// the history empty; the slot this holds for a moment is the one being
    /// sent, which the publisher's loans account for.
    #[inline]
    fn keep(&mut self, slot: u32, len: u32, seq: u64, timestamp_ns: u64) {
        let pos = self.hist_kept;
        // Only writers read the history ring (and the owner's statistics):
        // they hand over through the writer role's Release and Acquire.
        let e = &self.stream.history()[(pos & self.hist_mask) as usize];
        e.seq.store(seq, Relaxed);
        e.timestamp_ns.store(timestamp_ns, Relaxed);
        e.len.store(len, Relaxed);
        // The fields before the word: recovery trusts an entry by its word.
        crash::point();
        e.word.store(entry(pos, slot), Relaxed);
        crash::point();
        HolderBit::history(self.subs.len() as u32).set(&self.writer, self.stream.mask(slot));
        crash::point();
        self.hist_kept = pos.wrapping_add(1);
        self.stream.header().publisher.history_kept.store(self.hist_kept, Relaxed);
        crash::point();
        self.trim_history();
    }

    /// Lets the oldest frames of the history go while it holds more than
    /// `history`: once per send in the steady state. Each loses its bit
    /// before the window's start moves past it (`repair` finishes a kill in
    /// between), and its slot is free if no subscriber holds it.
    fn trim_history(&mut self) {
        let g = self.stream.layout().geometry;
        let bit = HolderBit::history(g.max_subscribers);
        while self.hist_kept.wrapping_sub(self.hist_first) > u64::from(self.history) {
            let e = &self.stream.history()[(self.hist_first & self.hist_mask) as usize];
            let (_, old) = split_entry(e.word.load(Relaxed));
            if old < g.slot_count && bit.clear(&self.writer, self.stream.mask(old)) == Some(true) {
                self.free.push_back(old);
            }
            crash::point();
            self.hist_first = self.hist_first.wrapping_add(1);
            self.stream.header().publisher.history_first.store(self.hist_first, Relaxed);
            crash::point();
        }
    }

    /// Whether the newest frame of the history is frame `seq` in `slot`.
    fn history_ends_with(&self, slot: u32, seq: u64) -> bool {
        if self.hist_kept == self.hist_first {
            return false;
        }
        let last = self.hist_kept.wrapping_sub(1);
        let e = &self.stream.history()[(last & self.hist_mask) as usize];
        e.word.load(Relaxed) == entry(last, slot) && e.seq.load(Relaxed) == seq
    }

    /// Hands the history to subscriber `s`, which this writer sees for the
    /// first time, unless a writer did already (`seeded_gen`): queues the
    /// newest frames of the history sent before `published` — as many as
    /// it wants and its credits allow — flagged [`ENTRY_HISTORY`], with
    /// their sequence numbers and timestamps, then marks it handed.
    ///
    /// No gap and no duplicate between these and the live frames: this runs
    /// on the writer's thread before any delivery to `s`, when the history
    /// ends with frame `published - 1` (or with the interrupted frame
    /// `published`, which `roll_forward` then delivers live). A slot handed
    /// over cannot be reused while `s` reads it: only this thread evicts
    /// from the history, and by then `s`'s own bit holds the slot.
    ///
    /// Resumable: until `seeded_gen` is set the subscriber's ring holds only
    /// history frames, so a writer taking over from one killed part-way
    /// (`repair` finishes its last push) goes on after the newest frame
    /// queued.
    #[cold]
    fn seed(&mut self, s: usize) {
        let generation = self.subs[s].generation;
        let rec = self.stream.record(s);
        if rec.counters.seeded_gen.load(Relaxed) == generation {
            return;
        }
        // A frame `take_over` is about to roll forward reaches the joiner
        // live: keep a credit for it, or a lossless joiner would lose it.
        let credits = self.subs[s].credits.saturating_sub(u32::from(self.rolling.is_some()));
        let wanted = u64::from(rec.config.history_wanted.load(Relaxed).min(credits).min(self.history));
        let mut end = self.hist_kept;
        if end != self.hist_first
            && self.stream.history()[(end.wrapping_sub(1) & self.hist_mask) as usize].seq.load(Relaxed)
                >= self.published
        {
            end = end.wrapping_sub(1); // the interrupted frame, delivered live
        }
        let start = if end.wrapping_sub(self.hist_first) > wanted { end.wrapping_sub(wanted) } else { self.hist_first };
        let pushed = self.subs[s].pushed;
        let after = (pushed != 0)
            .then(|| self.stream.ring(s)[(pushed.wrapping_sub(1) & self.cap_mask) as usize].seq.load(Relaxed));
        let slot_count = self.stream.layout().geometry.slot_count;
        let mut pos = start;
        while pos != end {
            let e = &self.stream.history()[(pos & self.hist_mask) as usize];
            let (stamp, slot) = split_entry(e.word.load(Relaxed));
            let (seq, len, timestamp_ns) = (e.seq.load(Relaxed), e.len.load(Relaxed), e.timestamp_ns.load(Relaxed));
            pos = pos.wrapping_add(1);
            if stamp != entry_stamp(pos.wrapping_sub(1)) || slot >= slot_count || after.is_some_and(|a| seq <= a) {
                continue;
            }
            self.push(s, slot, len | ENTRY_HISTORY, seq, timestamp_ns);
        }
        self.stream.record(s).counters.seeded_gen.store(generation, Relaxed);
        crash::point();
        // The SeqCst fence pairs with the one a waiter makes between
        // announcing itself and looking at its queue (`wait::wait_until`).
        wait::fence_before_wake();
        wait::wake_if_waiting(&self.channel(s).header().waiting);
    }

    /// Counts frame `seq` as sent once every subscriber has been offered it.
    #[inline]
    fn finish_delivery(&mut self, slot: u32, len: u32, seq: u64, info: SendInfo) {
        if info.delivered == 0 && is_free(self.stream.mask(slot)) {
            self.free.push_front(slot);
        }
        self.published = seq.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(u64::from(len));
        let p = &self.stream.header().publisher;
        p.published.store(self.published, Relaxed);
        crash::point();
        p.bytes.store(self.bytes, Relaxed);
        self.idle();
    }

    /// Queues `slot` for subscriber `s` (which has credit).
    #[inline]
    fn push(&mut self, s: usize, slot: u32, len: u32, seq: u64, timestamp_ns: u64) {
        let st = &mut self.subs[s];
        let pos = st.pushed;
        if pos & 1 == 0 {
            // A line of entries a few frames ahead, before the subscriber polls it.
            self.stream.prefetch_entry(s, (pos.wrapping_add(4) & self.cap_mask) as usize);
        }
        let e = &self.stream.ring(s)[(pos & self.cap_mask) as usize];
        e.seq.store(seq, Relaxed);
        e.timestamp_ns.store(timestamp_ns, Relaxed);
        e.len.store(len, Relaxed);
        // Release pairs with the subscriber's Acquire load of the word in
        // `SubCore::try_take`: the fields above are visible with it.
        e.word.store(entry(pos, slot), Release);
        crash::point();
        // The bit after the entry: a bit never exists without its entry (see
        // `repair`). The subscriber's return of this slot is read later, on
        // this thread, so it always finds the bit set.
        HolderBit::of(s).set(&self.writer, self.stream.mask(slot));
        crash::point();
        st.pushed = pos.wrapping_add(1);
        st.last_push = seq.wrapping_add(1);
        st.held += 1;
        self.stream.record(s).counters.pushed.store(pos.wrapping_add(1), Relaxed);
        crash::point();
    }

    /// Whether subscriber `s` may be given one more slot, reading its
    /// return ring first if it looks full.
    #[inline(always)]
    fn has_room(&mut self, s: usize) -> bool {
        let st = &self.subs[s];
        st.held < st.credits || self.has_room_after_collecting(s)
    }

    /// [`has_room`](Self::has_room) once the cheap look said no: reads
    /// the return ring (once per `credits` frames at most while streaming).
    #[inline(never)]
    fn has_room_after_collecting(&mut self, s: usize) -> bool {
        self.collect(s);
        let st = &self.subs[s];
        st.held < st.credits
    }

    /// Reads subscriber `s`'s return ring.
    fn collect(&mut self, s: usize) {
        collect_returns(
            &self.writer,
            &self.stream,
            channel_of(&self.channels, s),
            &mut self.subs[s],
            &mut self.free,
            s,
            self.cap_mask,
        );
    }

    /// `KeepLatest`: drops the oldest frames still queued for `s` until it
    /// has room (more than one if its credits were lowered); returns whether
    /// it has room.
    fn evict_oldest(&mut self, s: usize) -> bool {
        // One eviction makes room, more only if credits were lowered.
        let excess = self.subs[s].held.saturating_sub(self.subs[s].credits) + 1;
        for _ in 0..excess {
            if !self.evict_one(s) {
                // Nothing left to evict: the subscriber took it meanwhile,
                // and may have returned slots since we last looked.
                return self.has_room(s);
            }
            let st = &self.subs[s];
            if st.held < st.credits {
                return true;
            }
        }
        false
    }

    /// Drops the oldest frame queued for `s`; returns whether it did.
    fn evict_one(&mut self, s: usize) -> bool {
        let ch = channel_of(&self.channels, s).header();
        // Acquire pairs with the subscriber's AcqRel CAS on `queue_head` in
        // `SubCore::try_take`.
        let mut head = ch.queue_head.load(Acquire);
        // Each failed CAS must show the head moved forward, so the queue
        // shrinks at every try: a subscriber racing us wins at most once per
        // frame it had queued (it then holds them), and a hostile one that
        // moves its head costs at most its credits in failed CASes.
        loop {
            let st = &mut self.subs[s];
            let queued = st.pushed.wrapping_sub(head);
            if queued == 0 {
                return false; // everything it holds is borrowed
            }
            if queued > u64::from(st.held) {
                // More queued than it holds (or a claim it forged): the head
                // was scribbled over.
                fault(&self.stream, st, s);
                return false;
            }
            let (_, slot) = split_entry(self.stream.ring(s)[(head & self.cap_mask) as usize].word.load(Relaxed));
            // AcqRel: winning this CAS means the subscriber never took the
            // entry at `queue_head`; it pairs with the subscriber's own CAS. The
            // head stays claimed until the slot is taken back, so that a
            // writer killed in between leaves a mark recovery finishes
            // (`repair`) instead of a holder bit nobody clears.
            match ch.queue_head.compare_exchange(head, head | HEAD_CLAIMED, AcqRel, Acquire) {
                Ok(_) => {}
                Err(now) if now.wrapping_sub(head) as i64 > 0 => {
                    head = now; // it took the entry: try the next
                    continue;
                }
                Err(_) => return false, // moved back: not a subscriber keeping the protocol
            }
            crash::point();
            let free = &mut self.free;
            if !take_back(&self.writer, &self.stream, st, s, slot, |x| free.push_back(x)) {
                fault(&self.stream, st, s);
            }
            // Release pairs with the subscriber's Acquire loads of `queue_head`
            // (`SubCore::current_head`, its failed CAS).
            ch.queue_head.store(head.wrapping_add(1), Release);
            crash::point();
            // Counted once the claim is over, so that recovery, which finds
            // a claim, counts the eviction itself. (A kill right here loses
            // one count: statistics only.)
            st.evicted = st.evicted.wrapping_add(1);
            st.dropped = st.dropped.wrapping_add(1);
            let counters = &self.stream.record(s).counters;
            counters.evicted.store(st.evicted, Relaxed);
            counters.dropped.store(st.dropped, Relaxed);
            return true;
        }
    }

    /// Waits until lossless subscriber `s` has room, the subscriber table
    /// changes or `deadline` passes; returns false on timeout.
    /// (Poisoned: true at once, and the caller's retry hears why.)
    pub(crate) fn wait_for_room(&mut self, s: usize, backoff: Backoff, deadline: Option<Instant>) -> bool {
        self.step(true, |this| this.wait_for_room_unmarked(s, backoff, deadline))
    }

    fn wait_for_room_unmarked(&mut self, s: usize, backoff: Backoff, deadline: Option<Instant>) -> bool {
        if !self.subs[s].active || self.channels[s].is_none() || !self.lossless.contains(&s) {
            // It left since the refusal (a look at the table between the
            // two calls, e.g. by `serve`), and its place may have gone to
            // a subscriber that never blocks a send: let the caller retry.
            // (A lossless newcomer there is waited for on the retry.)
            return true;
        }
        let Self { writer, stream, channels, subs, free, table_gen, cap_mask, .. } = self;
        let (stream, channel, st) = (&*stream, channel_of(channels, s), &mut subs[s]);
        wait::wait_until(&channel.header().pub_waiting, backoff, deadline, || {
            if stream.header().control.table_gen.load(Acquire) != *table_gen {
                return true; // detached or credits changed: let the caller retry
            }
            if st.held < st.credits {
                return true;
            }
            collect_returns(writer, stream, channel, st, free, s, *cap_mask);
            st.held < st.credits
        })
    }
}

impl<S: StreamMem, C: ChannelMem> Drop for PubCore<S, C> {
    fn drop(&mut self) {
        #[cfg(all(test, not(loom)))]
        if crash::hook::dying() {
            return; // a simulated kill -9: nothing runs
        }
        if self.writer.role() == WRITER_NONE {
            return; // disowned: a copy in a forked child, or handed back
        }
        if self.busy {
            self.let_go_poisoned();
            return;
        }
        // Finish any detach the owner asked for: only a writer may. Should
        // that panic, let go as a poisoned publisher does.
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| self.sync_table())) {
            self.let_go_poisoned();
            std::panic::resume_unwind(panic);
        }
        if self.replaced || self.writer.role() != WRITER_PUBLISHER {
            return; // the role is somebody else's now, or the owner's to end
        }
        let ctl = &self.stream.header().control;
        // Count our departure. Release pairs with the subscribers' Acquire
        // load in `SubCore::publisher_event`: every frame we sent is visible
        // to a subscriber that sees us gone. Failing means the owner
        // declared us gone since our last look (and counted it): the role
        // may be somebody else's already, touch nothing.
        if ctl.publisher_changes.compare_exchange(self.arrival, self.arrival.wrapping_add(1), Release, Relaxed).is_err()
        {
            return;
        }
        ctl.publisher_pid.store(0, Relaxed);
        if !std::thread::panicking() {
            // A panic may have cut a delivery short: leave `dirty` set so
            // the next writer runs recovery.
            ctl.dirty.store(0, Relaxed);
        }
        // (Should the owner have taken the role back meanwhile, it is not
        // ours to release.)
        if !std::mem::replace(&mut self.writer, Writer::disowned()).release(ctl) {
            return;
        }
        // A close may have begun after our last look: the owner saw us still
        // attached and left the acknowledgement to us. The SeqCst fence pairs
        // with the one in `OwnerCore::close`: one of us sees the other.
        crate::primitive::fence(crate::primitive::Ordering::SeqCst);
        if ctl.state.load(Relaxed) != STREAM_OPEN {
            acknowledge_close(&self.stream, &self.channels);
        }
        wake_all(&self.channels);
    }
}

/// Wakes every subscriber asleep, so it sees a change of publisher made
/// just before. The SeqCst fence pairs with the one a subscriber makes
/// between announcing its sleep and re-checking (`wait::wait_until`).
pub(crate) fn wake_all<C: ChannelMem>(channels: &[Option<Chan<C>>]) {
    wait::fence_before_wake();
    for ch in mapped(channels) {
        wait::wake_if_waiting(&ch.header().waiting);
    }
}

/// Moves a closing stream to [`STREAM_CLOSED`] and wakes every sleeping
/// subscriber. Called by whoever ends delivery: the publisher on its first
/// look after the close, the owner if no publisher is attached.
pub(crate) fn acknowledge_close<S: StreamMem, C: ChannelMem>(stream: &S, channels: &[Option<Chan<C>>]) {
    // Release pairs with the subscribers' Acquire load of the state in
    // `SubCore::empty`: every frame delivered before is visible with it.
    let state = &stream.header().control.state;
    for from in [STREAM_CLOSING, STREAM_ENDING] {
        if state.compare_exchange(from, STREAM_CLOSED, Release, Relaxed).is_ok() {
            for ch in mapped(channels) {
                wait::wake(&ch.header().waiting);
            }
            return;
        }
    }
}

/// Active subscriber `s`'s channel, which a writer always has.
///
/// # Panics
/// If it has not: `sync_table_slow` makes only subscribers whose channel
/// it has active, and drops channels only of subscribers it made inactive.
#[inline]
fn channel_of<C>(channels: &[Option<Chan<C>>], s: usize) -> &C {
    match &channels[s] {
        Some(chan) => &chan.map,
        None => unreachable!("active subscriber #{s} without its channel"),
    }
}

/// Subscriber `s`'s channel if it is active and the channel is its own.
fn active_channel<'c, S: StreamMem, C>(stream: &S, channels: &'c [Option<Chan<C>>], s: usize) -> Option<&'c C> {
    let cfg = &stream.record(s).config;
    // Acquire pairs with the Release stores of the record's state (the owner's in
    // `add`/`remove`/`release`, the writer's SUB_FREE after reclaiming).
    if cfg.state.load(Acquire) != SUB_ACTIVE {
        return None;
    }
    let generation = cfg.generation.load(Relaxed);
    channels[s].as_ref().filter(|c| c.serves(generation)).map(|c| &c.map)
}

/// Reads subscriber `s`'s return ring into the free list.
fn collect_returns<S: StreamMem, C: ChannelMem>(
    writer: &Writer,
    stream: &S,
    channel: &C,
    st: &mut SubState,
    free: &mut VecDeque<u32>,
    s: usize,
    cap_mask: u64,
) {
    let ch = channel.header();
    // Acquire pairs with the subscriber's Release store of `returned` in
    // `SubCore::return_slot`: the slot numbers before it are visible.
    let tail = ch.returned.load(Acquire);
    let n = tail.wrapping_sub(st.collected);
    if n == 0 {
        return;
    }
    if n > u64::from(st.held) || n > cap_mask + 1 {
        // More returns than slots it holds: the tail was scribbled over.
        // Skip what it claims; only this subscriber's credit suffers.
        fault(stream, st, s);
    } else {
        let ring = channel.returns();
        // The subscriber has just written these lines: fetch them all at
        // once rather than one miss after another.
        // (16 returns to a 64-byte line.)
        for offset in (0..n).step_by(16) {
            let pos = st.collected.wrapping_add(offset);
            crate::platform::prefetch_for_read((&ring[(pos & cap_mask) as usize] as *const AtomicU32).cast());
        }
        let mut pos = st.collected;
        while pos != tail {
            let slot = ring[(pos & cap_mask) as usize].load(Relaxed);
            pos = pos.wrapping_add(1);
            if !take_back(writer, stream, st, s, slot, |x| free.push_back(x)) {
                fault(stream, st, s);
            }
        }
    }
    // Persisted after the batch: a successor re-reads from here (see
    // `replay_returns`, which `take_over` runs before any delivery).
    stream.record(s).counters.collected.store(tail, Relaxed);
    crash::point();
    st.collected = tail;
    // Release pairs with the subscriber's Acquire load of `collected` when
    // its return ring looks full.
    ch.collected.store(tail, Release);
}

/// Applies subscriber `s`'s returns from the persisted read position to the
/// tail, for a publisher taking over (bits only: the free list is rebuilt
/// from the masks afterwards).
fn replay_returns<S: StreamMem, C: ChannelMem>(writer: &Writer, stream: &S, channel: &C, s: usize) {
    let counters = &stream.record(s).counters;
    let cap = stream.layout().geometry.queue_capacity as usize;
    let ring = channel.returns();
    let mut pos = counters.collected.load(Relaxed);
    // Acquire pairs with the subscriber's Release store of `returned` in
    // `SubCore::return_slot`.
    let tail = channel.header().returned.load(Acquire);
    if tail.wrapping_sub(pos) <= cap as u64 {
        let bit = HolderBit::of(s);
        while pos != tail {
            let slot = ring[pos as usize % cap].load(Relaxed);
            if slot < stream.layout().geometry.slot_count {
                bit.clear(writer, stream.mask(slot));
                crash::point();
            }
            pos = pos.wrapping_add(1);
        }
    }
    crash::point();
    counters.collected.store(tail, Relaxed);
    // Release pairs with the subscriber's Acquire load of `collected` when
    // its return ring looks full (`SubCore::return_slot`).
    channel.header().collected.store(tail, Release);
}

/// Clears subscriber `s`'s bit on `slot`, calling `on_free` if no one else
/// holds the slot. Returns false (changing nothing) if `slot` is out of
/// range or `s` does not hold it.
#[inline]
fn take_back<S: StreamMem>(
    writer: &Writer,
    stream: &S,
    st: &mut SubState,
    s: usize,
    slot: u32,
    on_free: impl FnOnce(u32),
) -> bool {
    if slot >= stream.layout().geometry.slot_count {
        return false;
    }
    let Some(now_free) = HolderBit::of(s).clear(writer, stream.mask(slot)) else { return false };
    crash::point();
    st.held -= 1;
    if now_free {
        on_free(slot);
    }
    true
}

#[cold]
fn fault<S: StreamMem>(stream: &S, st: &mut SubState, s: usize) {
    st.faults = st.faults.wrapping_add(1);
    stream.record(s).counters.faults.store(st.faults, Relaxed);
}

/// Clears subscriber `s`'s bit from every slot, calling `on_free` for each
/// slot no one holds any more; returns the number of bits cleared. Only the
/// writer may call it.
pub(crate) fn take_back_all<S: StreamMem>(writer: &Writer, stream: &S, s: usize, mut on_free: impl FnMut(u32)) -> u32 {
    let bit = HolderBit::of(s);
    let mut cleared = 0;
    for slot in 0..stream.layout().geometry.slot_count {
        if let Some(now_free) = bit.clear(writer, stream.mask(slot)) {
            crash::point();
            cleared += 1;
            if now_free {
                on_free(slot);
            }
        }
    }
    cleared
}

/// A frame whose delivery a writer's death cut short after some
/// subscriber may have read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interrupted {
    slot: u32,
    seq: u64,
    len: u32,
    timestamp_ns: u64,
}

/// Whether subscriber `s`'s latest entry is frame `seq` in `slot`.
fn holds_frame<S: StreamMem>(stream: &S, s: usize, slot: u32, seq: u64) -> bool {
    if stream.record(s).config.state.load(Relaxed) != SUB_ACTIVE {
        return false;
    }
    let cap_mask = u64::from(stream.layout().geometry.queue_capacity) - 1;
    let pushed = stream.record(s).counters.pushed.load(Relaxed);
    if pushed == 0 {
        return false; // nothing was ever queued (its zeroed ring means nothing)
    }
    let last = pushed - 1;
    let e = &stream.ring(s)[(last & cap_mask) as usize];
    e.word.load(Relaxed) == entry(last, slot) && e.seq.load(Relaxed) == seq
}

/// The history window `[first, kept)` as stored, or — should it not be one
/// a writer leaves (longer than `history + 1`) — an empty one, the bits of
/// the history cleared from every slot.
fn history_window<S: StreamMem>(writer: &Writer, stream: &S) -> (u64, u64) {
    let g = stream.layout().geometry;
    if g.history == 0 {
        return (0, 0);
    }
    let p = &stream.header().publisher;
    let (first, kept) = (p.history_first.load(Relaxed), p.history_kept.load(Relaxed));
    if kept.wrapping_sub(first) <= u64::from(g.history) + 1 {
        return (first, kept);
    }
    tracing::warn!(first, kept, "the history window is corrupt: the history is dropped");
    let bit = HolderBit::history(g.max_subscribers);
    for slot in 0..g.slot_count {
        bit.clear(writer, stream.mask(slot));
        crash::point();
    }
    p.history_first.store(kept, Relaxed);
    crash::point();
    (kept, kept)
}

/// The history parts of [`repair`] that do not depend on a frame in
/// flight:
///
/// - A kill while the oldest frame left the history cleared its bit before
///   the window's start moved: the start moves past every oldest entry
///   whose slot lacks the bit (the rebuild of the free list finds the slot).
/// - A kill while the history was handed to a joiner (`PubCore::seed`) may
///   have left its last entry published, uncounted and without the
///   joiner's bit: each push publishes the entry, then sets the bit, then
///   counts it, so only the entry at `pushed` can be such. It is one if it
///   is stamped for that position, flagged [`ENTRY_HISTORY`] and its slot
///   is in the history (bit set): the bit is set and the entry counted. (A
///   joiner that took and returned it meanwhile has its return applied
///   after, by `replay_returns`.)
fn repair_history<S: StreamMem>(writer: &Writer, stream: &S) {
    let g = stream.layout().geometry;
    let p = &stream.header().publisher;
    let history = stream.history();
    let hist_mask = history.len() as u64 - 1;
    let bit = HolderBit::history(g.max_subscribers);
    let (mut first, kept) = (p.history_first.load(Relaxed), p.history_kept.load(Relaxed));
    while first != kept && kept.wrapping_sub(first) <= u64::from(g.history) + 1 {
        let (_, slot) = split_entry(history[(first & hist_mask) as usize].word.load(Relaxed));
        if slot < g.slot_count && bit.is_set(stream.mask(slot)) {
            break;
        }
        first = first.wrapping_add(1);
        p.history_first.store(first, Relaxed);
        crash::point();
    }
    let cap = u64::from(g.queue_capacity);
    for s in 0..g.max_subscribers as usize {
        let rec = stream.record(s);
        if rec.config.state.load(Relaxed) != SUB_ACTIVE
            || rec.counters.seeded_gen.load(Relaxed) == rec.config.generation.load(Relaxed)
        {
            continue;
        }
        let pushed = rec.counters.pushed.load(Relaxed);
        let e = &stream.ring(s)[(pushed & (cap - 1)) as usize];
        let (stamp, slot) = split_entry(e.word.load(Relaxed));
        if pushed < cap
            && stamp == entry_stamp(pushed)
            && e.len.load(Relaxed) & ENTRY_HISTORY != 0
            && slot < g.slot_count
            && bit.is_set(stream.mask(slot))
        {
            HolderBit::of(s).set(writer, stream.mask(slot));
            crash::point();
            rec.counters.pushed.store(pushed.wrapping_add(1), Relaxed);
            crash::point();
            tracing::debug!(subscriber = s, slot, "finished handing a history frame to a joiner");
        }
    }
}

/// The history part of a frame in flight's repair: completes a `keep` cut
/// short after its entry (bit and window end), and returns the frame if the
/// history has it.
fn keep_interrupted<S: StreamMem>(writer: &Writer, stream: &S, slot: u32, seq: u64) -> Option<Interrupted> {
    let g = stream.layout().geometry;
    let p = &stream.header().publisher;
    let history = stream.history();
    let hist_mask = history.len() as u64 - 1;
    let (first, mut kept) = (p.history_first.load(Relaxed), p.history_kept.load(Relaxed));
    if kept.wrapping_sub(first) > u64::from(g.history) {
        // Already one too many: the frame went in (the oldest leaves next).
    } else {
        let e = &history[(kept & hist_mask) as usize];
        if e.word.load(Relaxed) == entry(kept, slot) && e.seq.load(Relaxed) == seq {
            HolderBit::history(g.max_subscribers).set(writer, stream.mask(slot));
            crash::point();
            kept = kept.wrapping_add(1);
            p.history_kept.store(kept, Relaxed);
            crash::point();
        }
    }
    if kept == first {
        return None;
    }
    let last = kept.wrapping_sub(1);
    let e = &history[(last & hist_mask) as usize];
    (e.word.load(Relaxed) == entry(last, slot) && e.seq.load(Relaxed) == seq).then(|| Interrupted {
        slot,
        seq,
        len: e.len.load(Relaxed),
        timestamp_ns: e.timestamp_ns.load(Relaxed),
    })
}

/// Finishes, in shared memory, what a writer that died left half done.
/// Only the writer may call it, before relying on masks or rings; the
/// caller then reads the return rings and, if this returns a frame, rolls
/// its delivery forward ([`PubCore::take_over`]).
///
/// - An eviction cut short left its subscriber's head claimed
///   ([`HEAD_CLAIMED`]): the slot of the claimed entry loses that
///   subscriber's bit (if it still has it) and the head moves past the
///   entry. Only a claimed head is acted on, and only on the bit of the
///   subscriber whose channel holds it: a subscriber that forges a claim
///   can free nothing but its own slot.
/// - A delivery publishes each subscriber's entry, then sets its holder
///   bit, then counts the entry in `pushed`; `published` is counted after
///   every subscriber. So while the frame named by `inflight` is not
///   counted, a subscriber whose entry at `pushed` names it got the frame
///   and only its bit or count may be missing. If any subscriber got it,
///   the frame is returned to be delivered to the rest; if none did, its
///   number is reused and its slot is free.
pub(crate) fn repair<S: StreamMem, C: ChannelMem>(
    writer: &Writer,
    stream: &S,
    channels: &[Option<Chan<C>>],
) -> Option<Interrupted> {
    let g = stream.layout().geometry;
    let cap = u64::from(g.queue_capacity);
    for s in 0..channels.len() {
        let cfg = &stream.record(s).config;
        if cfg.policy.load(Relaxed) != OverflowPolicy::KeepLatest as u32 {
            continue;
        }
        let Some(channel) = active_channel(stream, channels, s) else { continue };
        let head = &channel.header().queue_head;
        // Acquire pairs with the subscriber's Release CAS on `queue_head`.
        let claimed = head.load(Acquire);
        if claimed & HEAD_CLAIMED == 0 {
            continue;
        }
        let pos = claimed & !HEAD_CLAIMED;
        let counters = &stream.record(s).counters;
        let queued = counters.pushed.load(Relaxed).wrapping_sub(pos);
        let (stamp, slot) = split_entry(stream.ring(s)[(pos & (cap - 1)) as usize].word.load(Relaxed));
        if (1..=cap).contains(&queued) && stamp == entry_stamp(pos) && slot < g.slot_count {
            HolderBit::of(s).clear(writer, stream.mask(slot));
            crash::point();
            // Release pairs with the subscriber's Acquire loads of `queue_head`.
            head.store(pos.wrapping_add(1), Release);
            crash::point();
            // The writer counts an eviction after it ends the claim.
            counters.evicted.store(counters.evicted.load(Relaxed).wrapping_add(1), Relaxed);
            counters.dropped.store(counters.dropped.load(Relaxed).wrapping_add(1), Relaxed);
            tracing::debug!(subscriber = s, pos, slot, "finished an interrupted eviction");
        } else {
            // Not a claim any writer made: only this subscriber's queue suffers.
            counters.faults.store(counters.faults.load(Relaxed).wrapping_add(1), Relaxed);
            head.store(pos, Release);
        }
        crash::point();
    }

    if g.history != 0 {
        repair_history(writer, stream);
    }

    let p = &stream.header().publisher;
    let (seq_low, slot) = split_inflight(p.inflight.load(Relaxed));
    let seq = p.published.load(Relaxed);
    if slot == NO_SLOT || slot >= g.slot_count || seq_low != seq as u32 {
        // Release pairs with the owner's Acquire load of `inflight` in
        // `OwnerCore::end_for_subscribers`.
        p.inflight.store(INFLIGHT_IDLE, Release);
        return None;
    }
    let mut got = None;
    for s in 0..g.max_subscribers as usize {
        if stream.record(s).config.state.load(Relaxed) != SUB_ACTIVE {
            continue;
        }
        let counters = &stream.record(s).counters;
        let pushed = counters.pushed.load(Relaxed);
        let e = &stream.ring(s)[(pushed & (cap - 1)) as usize];
        if e.word.load(Relaxed) == entry(pushed, slot) && e.seq.load(Relaxed) == seq {
            // Published but not yet held or counted: finish both.
            HolderBit::of(s).set(writer, stream.mask(slot));
            crash::point();
            counters.pushed.store(pushed.wrapping_add(1), Relaxed);
            crash::point();
        }
        if got.is_none() && holds_frame(stream, s, slot, seq) {
            let last = counters.pushed.load(Relaxed).wrapping_sub(1);
            let e = &stream.ring(s)[(last & (cap - 1)) as usize];
            got = Some(Interrupted { slot, seq, len: e.len.load(Relaxed), timestamp_ns: e.timestamp_ns.load(Relaxed) });
        }
    }
    if g.history != 0 {
        // The history is offered the frame after every subscriber: if it
        // has it, the frame was sent (and is rolled forward to whoever was
        // due it but has not got it).
        if let Some(kept) = keep_interrupted(writer, stream, slot, seq) {
            got = got.or(Some(kept));
        }
    }
    if got.is_none() {
        // Release pairs as above.
        p.inflight.store(INFLIGHT_IDLE, Release);
    }
    tracing::debug!(slot, seq, reached = got.is_some(), "repaired an interrupted delivery");
    got
}
