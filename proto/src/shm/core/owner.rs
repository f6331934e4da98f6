//! The owner side of a stream: creating its files, admitting subscribers
//! against the credit budget, changing credits, detaching and reclaiming,
//! closing, and reading statistics — everything the broker does with a
//! stream, none of it on the per-frame path.
//!
//! The owner writes subscriber records and bumps `table_gen`; the publisher
//! notices on its next loan or send. Reclaiming a detached subscriber's
//! slots changes holder masks, which only the writer may do: the attached
//! publisher does it, or the owner itself (taking the writer role) when no
//! publisher is attached.

use super::mem::{ChannelMem, StreamMem};
use super::publisher::{Chan, PubCore, acknowledge_close, mapped, take_back_all};
use super::wait;
use super::writer::{Writer, holders, is_free};
use crate::primitive::Ordering::{Acquire, Relaxed, Release, SeqCst};
use crate::primitive::{BarrierPassed, barrier_mark};
use crate::shm::layout::{
    CHANNEL_MAGIC, ChannelLatency, DEFAULT_PUBLISHER_LOANS, FLAG_TIMESTAMPS, Geometry, HEAD_CLAIMED, INFLIGHT_IDLE,
    LATENCY_BUCKETS, LAYOUT_VERSION, LayoutError, MAX_PUBLISHER_LOANS, NO_SLOT, OverflowPolicy, PUBLISHER_LOANS,
    STREAM_CLOSED, STREAM_CLOSING, STREAM_ENDING, STREAM_OPEN, SUB_ACTIVE, SUB_DETACHING, SUB_FREE, WRITER_NONE,
    WRITER_OWNER, WRITER_PUBLISHER, WaitStrategy,
};

/// What a subscriber asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubscriberOptions {
    /// Most slots it may hold at once, queued plus borrowed (its queue depth).
    pub credits: u32,
    /// What happens to frames when its credits are used up.
    pub policy: OverflowPolicy,
    /// How its blocking receives wait.
    pub wait: WaitStrategy,
    /// Most frames of the stream's history it receives first, when it joins
    /// a stream that keeps one (within its credits): `u32::MAX` (the
    /// default) takes all, 0 declines.
    pub history: u32,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        Self { credits: 4, policy: OverflowPolicy::default(), wait: WaitStrategy::default(), history: u32::MAX }
    }
}

/// What a subscriber process needs, besides the files, to open its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberTicket {
    /// Its index in the stream (which channel file is its own).
    pub index: u32,
    /// Attach generation of that index, so a stale ticket is refused.
    pub generation: u64,
    /// The wait strategy it was admitted with.
    pub wait: WaitStrategy,
}

/// Why a subscriber was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddSubscriberError {
    /// Credits must be at least 1 and at most the queue capacity.
    #[error("credits must be between 1 and {max}, got {credits}")]
    CreditsOutOfRange {
        /// Requested.
        credits: u32,
        /// The stream's queue capacity.
        max: u32,
    },
    /// The pool cannot honour the credits on top of those already granted.
    #[error(
        "cannot grant {requested} credits: {available} of {slot_count} slots are free to promise \
         ({committed} promised to other subscribers, the rest kept for the publisher's loans and the stream's history)"
    )]
    CreditsRefused {
        /// Requested.
        requested: u32,
        /// Still grantable.
        available: u32,
        /// Pool size.
        slot_count: u32,
        /// Already granted.
        committed: u32,
    },
    /// Every subscriber index is taken.
    #[error("stream is full: all {max} subscriber places are taken")]
    Full {
        /// The stream's subscriber capacity.
        max: u32,
    },
    /// The stream is closed.
    #[error("the stream is closed")]
    Closed,
}

/// A subscriber index held for a subscriber being admitted: its channel
/// is created and handed to the publisher before it is activated
/// ([`OwnerCore::activate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The index held.
    pub index: u32,
    /// The generation the subscriber will have: its channel's.
    pub generation: u64,
}

/// A held index's terms, until it is activated or given up.
#[derive(Debug, Clone, Copy)]
struct Held {
    generation: u64,
    opts: SubscriberOptions,
    pid: u32,
}

/// Why an operation on an existing subscriber failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriberOpError {
    /// No attached subscriber has this index.
    #[error("no subscriber #{0} is attached")]
    NotAttached(u32),
    /// The new credits are refused (see [`AddSubscriberError`]).
    #[error(transparent)]
    Credits(#[from] AddSubscriberError),
}

/// A subscriber as the owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Index in the stream.
    pub index: u32,
    /// Which subscriber of that index (as the owner counts them, not as
    /// shared memory says).
    pub generation: u64,
    /// Process id given at attach.
    pub pid: u32,
    /// Overflow policy.
    pub policy: OverflowPolicy,
    /// Current credits.
    pub credits: u32,
    /// Still being reclaimed after a detach.
    pub detaching: bool,
    /// Stream sequence number at attach.
    pub attach_seq: u64,
    /// Frames it has taken from its queue.
    pub delivered: u64,
    /// Frames it lost (not queued for lack of credit, or evicted).
    pub dropped: u64,
    /// Of `dropped`, frames evicted under `KeepLatest`.
    pub evicted: u64,
    /// Frames waiting in its queue.
    pub queued: u64,
    /// Slots it holds: queued, borrowed, or returned and not yet read back.
    pub held: u32,
    /// Age of the oldest queued frame, in nanoseconds (0 if none).
    pub lag_ns: u64,
    /// Protocol violations seen from it.
    pub faults: u64,
    /// Its latency histogram since it attached (`None` for a stream
    /// without timestamps): what it wrote, unchecked — only its own
    /// report depends on it.
    pub latency: Option<Box<LatencyCounts>>,
}

/// A look at a subscriber's latency histogram ([`ChannelLatency`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyCounts {
    /// Samples per bucket (see
    /// [`latency_bucket_range`](crate::shm::layout::latency_bucket_range)).
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Their sum, nanoseconds (wrapping).
    pub sum_ns: u64,
}

impl LatencyCounts {
    /// Reads `histogram`.
    pub fn read(histogram: &ChannelLatency) -> Self {
        Self {
            buckets: std::array::from_fn(|i| histogram.buckets[i].load(Relaxed)),
            sum_ns: histogram.sum_ns.load(Relaxed),
        }
    }
}

/// A stream as the owner sees it: read from shared memory, no messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// Slot size in bytes.
    pub slot_size: u32,
    /// Slots in the pool.
    pub slot_count: u32,
    /// Slots held by no subscriber (the publisher's loan, if any, included).
    pub free_slots: u32,
    /// Frames sent.
    pub published: u64,
    /// Payload bytes sent.
    pub bytes: u64,
    /// Pid of the attached publisher, 0 if none.
    pub publisher_pid: u32,
    /// The stream was closed.
    pub closed: bool,
    /// Frames the stream keeps for late joiners.
    pub history: u32,
    /// Frames its history holds now.
    pub history_held: u32,
    /// Attached (and detaching) subscribers.
    pub subscribers: Vec<SubscriberStats>,
}

/// The owner algorithm over any memory implementing the layout.
#[derive(Debug)]
pub(crate) struct OwnerCore<S: StreamMem, C: ChannelMem> {
    stream: S,
    /// Per subscriber index, its channel file while it has one: from its
    /// reservation until the index is free again.
    channels: Vec<Option<Chan<C>>>,
    /// Indices held for subscribers being admitted.
    held: Vec<Option<Held>>,
    /// The last generation each index was reserved for (so that every
    /// reservation, even one given up, names its own channel).
    reserved_gen: Vec<u64>,
    /// Where the search for a free index starts: indices are reused as
    /// late as possible, which keeps stale handles from meeting new peers.
    cursor: usize,
    /// Per index: credits in force before they were lowered, and the
    /// `table_gen` that lowered them. Until the publisher has applied that
    /// generation it may still deliver by the old credits.
    lowered: Vec<Option<(u32, u64)>>,
    /// Set once we marked the stream ending (see `end_for_subscribers`).
    ending: Option<Ending>,
}

/// A close being ended under a live publisher.
#[derive(Debug, Clone, Copy)]
struct Ending {
    /// [`barrier_mark`] taken after the mark: the barrier that makes the
    /// mark seen must begin after it.
    mark: u64,
    /// Such a barrier has run.
    seen: bool,
}

/// How far [`StreamSegment::end_for_subscribers`](crate::shm::StreamSegment::end_for_subscribers) got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndProgress {
    /// Subscribers see the end once they have received every frame sent.
    Ended,
    /// The stream is marked ending: run [`system_barrier`](crate::shm::system_barrier)
    /// (outside any lock: it takes milliseconds) and call again with its proof.
    NeedsBarrier,
    /// The publisher is delivering a frame right now: call again later. It
    /// ends the close itself if it gets to its next send first.
    Delivering,
    /// The stream is not closing: nothing to end.
    Open,
}

impl<S: StreamMem, C: ChannelMem> OwnerCore<S, C> {
    /// An owner with one channel file per subscriber index, each serving
    /// every generation of its index (reset at each admission).
    #[cfg(test)]
    pub(crate) fn new(stream: S, channels: Vec<C>) -> Self {
        assert_eq!(channels.len(), stream.layout().geometry.max_subscribers as usize);
        Self::with_channels(stream, channels.into_iter().map(|c| Some(Chan::any(c))).collect())
    }

    /// An owner of a stream whose subscribers get a channel file each at
    /// admission ([`reserve`](Self::reserve), [`install`](Self::install)).
    pub(crate) fn sparse(stream: S) -> Self {
        let n = stream.layout().geometry.max_subscribers as usize;
        Self::with_channels(stream, (0..n).map(|_| None).collect())
    }

    fn with_channels(stream: S, channels: Vec<Option<Chan<C>>>) -> Self {
        let n = channels.len();
        Self {
            stream,
            channels,
            held: vec![None; n],
            reserved_gen: vec![0; n],
            cursor: 0,
            lowered: vec![None; n],
            ending: None,
        }
    }

    pub(crate) fn stream(&self) -> &S {
        &self.stream
    }

    /// Every channel file there is, by index.
    pub(crate) fn channels(&self) -> &[Option<Chan<C>>] {
        &self.channels
    }

    /// Unmaps the channels of indices that are free again (their
    /// subscriber gone and reclaimed, nobody holding them). Returns how
    /// many it dropped.
    pub(crate) fn sweep(&mut self) -> usize {
        let mut dropped = 0;
        for s in 0..self.channels.len() {
            let Some(chan) = &self.channels[s] else { continue };
            // Acquire pairs with the Release store of SUB_FREE by whoever
            // reclaimed the index.
            if chan.generation.is_some()
                && self.held[s].is_none()
                && self.stream.record(s).config.state.load(Acquire) == SUB_FREE
            {
                self.channels[s] = None;
                dropped += 1;
            }
        }
        dropped
    }

    /// Announces a change of the subscriber table; returns the new generation.
    fn bump_table(&self) -> u64 {
        // Release pairs with the publisher's Acquire load in `sync_table`.
        self.stream.header().control.table_gen.fetch_add(1, Release).wrapping_add(1)
    }

    /// Slots each subscriber index holds (bits set in the masks).
    fn held_per_subscriber(&self) -> Vec<u32> {
        let g = self.stream.layout().geometry;
        let mut held = vec![0u32; g.max_subscribers as usize];
        for slot in 0..g.slot_count {
            for s in holders(self.stream.mask(slot)) {
                if let Some(h) = held.get_mut(s) {
                    *h += 1;
                }
            }
        }
        held
    }

    /// Credits promised to attached subscribers other than `except`: for
    /// each, the larger of its credits and what it holds now (after lowered
    /// credits it may hold more until it releases).
    fn committed(&self, except: Option<usize>) -> u64 {
        let header = self.stream.header();
        // Acquire pairs with the publisher's Release store in `sync_table_slow`.
        let applied = header.publisher.applied_gen.load(Acquire);
        // Acquire pairs with `Writer::release`'s Release CAS (through the
        // release sequence a later `Writer::acquire` CAS continues).
        let publisher_attached = header.control.writer.load(Acquire) == WRITER_PUBLISHER;
        let held = self.held_per_subscriber();
        (0..held.len())
            .filter(|&s| Some(s) != except)
            .map(|s| {
                if let Some(h) = &self.held[s] {
                    // Being admitted: its credits are promised already.
                    return u64::from(h.opts.credits);
                }
                let cfg = &self.stream.record(s).config;
                // A detaching subscriber promises nothing any more: the
                // publisher reclaims what it holds before its next loan or
                // delivery, so its slots are back before anyone needs them
                // (an idle publisher must not keep a dead subscriber's
                // credits from a new one).
                if matches!(cfg.state.load(Acquire), SUB_FREE | SUB_DETACHING) {
                    return 0;
                }
                let pending = match self.lowered[s] {
                    Some((old, lowered_at)) if publisher_attached && applied < lowered_at => old,
                    _ => 0,
                };
                u64::from(cfg.credits.load(Relaxed).max(held[s]).max(pending))
            })
            .sum()
    }

    fn check_credits(&self, credits: u32, except: Option<usize>) -> Result<(), AddSubscriberError> {
        let g = self.stream.layout().geometry;
        if credits == 0 || credits > g.queue_capacity {
            return Err(AddSubscriberError::CreditsOutOfRange { credits, max: g.queue_capacity });
        }
        let committed = self.committed(except);
        let loans = self.stream.header().ident.publisher_loans.load(Relaxed);
        // The history's slots are counted apart from the subscribers' even
        // though they mostly hold the same frames: a slow subscriber's old
        // frames and the history's new ones can be different slots.
        let budget = u64::from(g.slot_count.saturating_sub(loans).saturating_sub(g.history));
        if committed + u64::from(credits) > budget {
            return Err(AddSubscriberError::CreditsRefused {
                requested: credits,
                available: budget.saturating_sub(committed) as u32,
                slot_count: g.slot_count,
                committed: committed as u32,
            });
        }
        Ok(())
    }

    /// Admits a subscriber at once, in one step, on an index that has its
    /// channel already (an owner made with [`new`](Self::new)).
    #[cfg(test)]
    pub(crate) fn add(&mut self, opts: &SubscriberOptions, pid: u32) -> Result<SubscriberTicket, AddSubscriberError> {
        let r = self.reserve(opts, pid)?;
        self.activate(r.index)
    }

    /// Holds a free index for a subscriber of process `pid` whose credits
    /// the pool can honour. Give the index its channel
    /// ([`install`](Self::install)), hand the channel to the attached
    /// publisher, then [`activate`](Self::activate) it — or
    /// [`give_up`](Self::give_up).
    pub(crate) fn reserve(&mut self, opts: &SubscriberOptions, pid: u32) -> Result<Reservation, AddSubscriberError> {
        let header = self.stream.header();
        // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
        // Release CAS to CLOSED (`acknowledge_close`).
        if header.control.state.load(Acquire) != STREAM_OPEN {
            return Err(AddSubscriberError::Closed);
        }
        self.reclaim_detached();
        self.sweep();
        let n = self.channels.len();
        let me = crate::platform::current_pid();
        let requester = if pid == 0 { u32::MAX } else { pid };
        let index = (0..n)
            .map(|i| (self.cursor + i) % n)
            .find(|&s| {
                let cfg = &self.stream.record(s).config;
                // Acquire pairs with the Release store of SUB_FREE by whoever
                // reclaimed the index: its mask changes are visible.
                self.held[s].is_none() && cfg.state.load(Acquire) == SUB_FREE && {
                    // A process that was removed but still lives keeps its
                    // mapping of this channel: do not hand a channel every
                    // generation shares to somebody else while it could
                    // still write there (the same process may have it
                    // back). A new subscriber of a sparse index gets a new
                    // file: the old one is nobody's concern.
                    let pid = cfg.pid.load(Relaxed);
                    !self.has_any(s as u32)
                        || pid == 0
                        || pid == me
                        || pid == requester
                        || !crate::platform::process_alive(pid)
                }
            })
            .ok_or(AddSubscriberError::Full { max: n as u32 })?;
        self.check_credits(opts.credits, None)?;
        // From the owner's own count, never from shared memory (which the
        // publisher writes too). Generations start at 1: 0 names a file
        // serving every generation.
        let generation = self.reserved_gen[index].wrapping_add(1).max(1);
        self.reserved_gen[index] = generation;
        self.held[index] = Some(Held { generation, opts: *opts, pid });
        self.cursor = index + 1;
        Ok(Reservation { index: index as u32, generation })
    }

    /// Gives held index `index` its own channel file, created for the
    /// reservation's generation.
    ///
    /// # Panics
    /// If the index is not held.
    pub(crate) fn install(&mut self, index: u32, map: C) {
        let held = self.held[index as usize].expect("install on a held index");
        self.channels[index as usize] = Some(Chan { generation: Some(held.generation), map });
    }

    /// Gives index `index` a channel file serving every generation of it
    /// (reset at each admission), for good.
    pub(crate) fn install_any(&mut self, index: u32, map: C) {
        self.channels[index as usize] = Some(Chan::any(map));
    }

    /// Whether index `index` has a channel file serving every generation.
    pub(crate) fn has_any(&self, index: u32) -> bool {
        self.channels[index as usize].as_ref().is_some_and(|c| c.generation.is_none())
    }

    /// Gives up held index `index` and the channel created for it.
    pub(crate) fn give_up(&mut self, index: u32) {
        let s = index as usize;
        if self.held.get(s).is_some_and(Option::is_some) {
            self.held[s] = None;
            if self.channels[s].as_ref().is_some_and(|c| c.generation.is_some()) {
                self.channels[s] = None;
            }
        }
    }

    /// Activates held index `index`: the subscriber is attached and the
    /// publisher delivers to it from its next send. Every publisher that
    /// may be attached must have its channel by now.
    ///
    /// # Errors
    /// [`AddSubscriberError::Closed`] if the stream closed meanwhile (the
    /// index is given up).
    ///
    /// # Panics
    /// If the index is not held or has no channel.
    pub(crate) fn activate(&mut self, index: u32) -> Result<SubscriberTicket, AddSubscriberError> {
        let s = index as usize;
        let Held { generation, opts, pid } = self.held[s].expect("activate a held index");
        let header = self.stream.header();
        // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
        // Release CAS to CLOSED (`acknowledge_close`).
        if header.control.state.load(Acquire) != STREAM_OPEN {
            self.give_up(index);
            return Err(AddSubscriberError::Closed);
        }
        let chan = self.channels[s].as_ref().expect("a held index has its channel before it is activated");
        assert!(chan.serves(generation), "the channel is the reservation's");
        self.held[s] = None;

        // The index is free: neither the publisher nor any subscriber uses
        // its ring, counters or channel, so they can be reset.
        for e in self.stream.ring(s) {
            e.word.store(0, Relaxed);
        }
        let counters = &self.stream.record(s).counters;
        for c in [
            &counters.pushed,
            &counters.dropped,
            &counters.evicted,
            &counters.faults,
            &counters.collected,
            &counters.seeded_gen,
        ] {
            c.store(0, Relaxed);
        }
        let cfg = &self.stream.record(s).config;
        // The previous subscriber could write anything in the channel (if
        // it is a file every generation shares): rewrite all of it.
        let ch = chan.map.header();
        let id = &ch.ident;
        id.magic.store(CHANNEL_MAGIC, Relaxed);
        id.index.store(index, Relaxed);
        id.capacity.store(self.stream.layout().geometry.queue_capacity, Relaxed);
        id.claimed.store(0, Relaxed);
        id.generation.store(generation, Relaxed);
        for c in [&ch.queue_head, &ch.returned, &ch.collected] {
            c.store(0, Relaxed);
        }
        ch.waiting.store(0, Relaxed);
        ch.pub_waiting.store(0, Relaxed);
        // A file every generation of the index shares (a file made for one
        // generation starts zeroed): the last subscriber's latency goes.
        // Statistics only, which no algorithm reads: left out of the loom
        // models, where each of these stores would be a branch point.
        #[cfg(not(loom))]
        if chan.generation.is_none() {
            ch.latency.sum_ns.store(0, Relaxed);
            for b in &ch.latency.buckets {
                b.store(0, Relaxed);
            }
        }
        for r in chan.map.returns() {
            r.store(NO_SLOT, Relaxed);
        }
        // Release pairs with the subscriber's Acquire load in `ChannelMap::open`.
        id.version.store(LAYOUT_VERSION, Release);
        self.lowered[s] = None;

        cfg.policy.store(opts.policy as u32, Relaxed);
        cfg.credits.store(opts.credits, Relaxed);
        cfg.parks.store(u32::from(opts.wait.parks()), Relaxed);
        cfg.pid.store(pid, Relaxed);
        cfg.history_wanted.store(opts.history, Relaxed);
        cfg.attach_seq.store(header.publisher.published.load(Relaxed), Relaxed);
        cfg.generation.store(generation, Relaxed);
        // Release pairs with the Acquire loads of the state by the
        // publisher (`sync_table_slow`) and the subscriber (`attach`).
        cfg.state.store(SUB_ACTIVE, Release);
        self.bump_table();
        if self.stream.layout().geometry.history != 0 {
            // The joiner's history: handed now if no publisher holds the
            // writer role (we take it for a moment), else by the publisher
            // before its next delivery — which may be asleep waiting for a
            // lossless subscriber's room: wake it to look at the table.
            if !self.reclaim_detached() {
                for ch in mapped(&self.channels) {
                    wait::wake(&ch.header().pub_waiting);
                }
            }
        }
        Ok(SubscriberTicket { index, generation, wait: opts.wait })
    }

    fn active_index(&self, index: u32) -> Result<usize, SubscriberOpError> {
        let s = index as usize;
        // Acquire pairs with the Release stores of the record's state (the owner's in
        // `add`/`remove`/`release`, the writer's SUB_FREE after reclaiming).
        if s < self.channels.len() && self.stream.record(s).config.state.load(Acquire) == SUB_ACTIVE {
            Ok(s)
        } else {
            Err(SubscriberOpError::NotAttached(index))
        }
    }

    pub(crate) fn set_credits(&mut self, index: u32, credits: u32) -> Result<(), SubscriberOpError> {
        let s = self.active_index(index)?;
        self.check_credits(credits, Some(s))?;
        let cfg = &self.stream.record(s).config;
        let old = cfg.credits.swap(credits, Relaxed);
        let gen_now = self.bump_table();
        if credits < old {
            let before = self.lowered[s].map_or(old, |(o, _)| o.max(old));
            self.lowered[s] = Some((before, gen_now));
        }
        // A publisher blocked on this lossless subscriber re-reads credits.
        if let Some(chan) = &self.channels[s] {
            wait::wake(&chan.map.header().pub_waiting);
        }
        Ok(())
    }

    /// Detaches subscriber `index`: its queued and borrowed slots return to
    /// the pool. Use it for a subscriber that left and for one that died.
    pub(crate) fn remove(&mut self, index: u32) -> Result<(), SubscriberOpError> {
        let s = self.active_index(index)?;
        // Release pairs with the publisher's Acquire load in `sync_table_slow`.
        self.stream.record(s).config.state.store(SUB_DETACHING, Release);
        self.bump_table();
        if let Some(chan) = &self.channels[s] {
            wait::wake(&chan.map.header().waiting);
            wait::wake(&chan.map.header().pub_waiting);
        }
        self.reclaim_detached();
        Ok(())
    }

    /// Detaches subscriber `index`, which has let go of its channel (its
    /// own process said so): like [`remove`](Self::remove), but the index
    /// may serve any process once reclaimed, rather than waiting for this
    /// one to end.
    pub(crate) fn release(&mut self, index: u32) -> Result<(), SubscriberOpError> {
        self.remove(index)?;
        // Read back by `add` (and `stats`, which then shows pid 0 while the
        // index is reclaimed), both on this, the owner's, thread.
        self.stream.record(index as usize).config.pid.store(0, Relaxed);
        Ok(())
    }

    /// Reclaims detaching subscribers' slots if no publisher is attached
    /// (an attached one does it on its next loan or send). Returns whether
    /// it ran.
    pub(crate) fn reclaim_detached(&self) -> bool {
        let ctl = &self.stream.header().control;
        // The last writer let go (publisher `Drop`, or here).
        let Ok(writer) = Writer::acquire(ctl, WRITER_NONE, WRITER_OWNER) else { return false };
        let writer = self.reclaim_as_writer(writer);
        // A poisoned publisher lets go without counting its departure
        // (`PubCore::let_go_poisoned`): counted now, after its frame.
        if count_departure(ctl) {
            super::publisher::wake_all(&self.channels);
        }
        writer.release(ctl);
        true
    }

    /// Holding the writer role as owner: finishes a dead writer's work
    /// (rolling an interrupted delivery forward) and reclaims detaching
    /// subscribers' slots. Gives the role back.
    fn reclaim_as_writer(&self, mut writer: Writer) -> Writer {
        let ctl = &self.stream.header().control;
        // A writer's take-over also hands the history to joiners nobody
        // handed it to yet.
        if ctl.dirty.load(Relaxed) != 0 || self.unseeded() {
            let channels = self.channels.iter().map(|c| c.as_ref().map(Chan::by_ref)).collect();
            writer = PubCore::take_over(&self.stream, channels, writer).into_writer();
            ctl.dirty.store(0, Relaxed);
        }
        for s in 0..self.channels.len() {
            let state = &self.stream.record(s).config.state;
            // Acquire pairs with the Release stores of the record's state (the owner's in
            // `add`/`remove`/`release`, the writer's SUB_FREE after reclaiming).
            if state.load(Acquire) == SUB_DETACHING {
                take_back_all(&writer, &self.stream, s, |_| {});
                state.store(SUB_FREE, Release);
            }
        }
        writer
    }

    /// Whether an active subscriber has not been handed the stream's history.
    fn unseeded(&self) -> bool {
        self.stream.layout().geometry.history != 0
            && (0..self.channels.len()).any(|s| {
                let rec = self.stream.record(s);
                // Acquire pairs with the Release stores of the record's state.
                rec.config.state.load(Acquire) == SUB_ACTIVE
                    && rec.counters.seeded_gen.load(Relaxed) != rec.config.generation.load(Relaxed)
            })
    }

    /// The attached publisher's lease ended (it exited or died): release
    /// the writer role so another publisher can take over, and reclaim.
    pub(crate) fn publisher_gone(&mut self) {
        let ctl = &self.stream.header().control;
        if let Ok(writer) = Writer::acquire(ctl, WRITER_PUBLISHER, WRITER_OWNER) {
            ctl.publisher_pid.store(0, Relaxed);
            // Finish what it left half done first — a frame some subscriber
            // got reaches the others — so that its departure comes after
            // every frame it sent.
            let writer = self.reclaim_as_writer(writer);
            // Count the departure, unless the publisher did as it left.
            count_departure(ctl);
            writer.release(ctl);
        }
        self.publisher_released();
    }

    /// The attached publisher let go of the writer role itself (its
    /// `Drop` counted its departure): wake whoever waits on it, reclaim,
    /// and end a close it left open. Takes no role from anybody — use it
    /// whenever the publisher's process may still live.
    pub(crate) fn publisher_released(&mut self) {
        // A revoked publisher still alive notices on its next loan or send
        // that it no longer holds the role, and stops.
        self.bump_table();
        self.lowered.fill(None);
        // Subscribers asleep see the publisher gone; a revoked publisher
        // asleep in a send (waiting for a lossless subscriber's credit)
        // wakes, re-reads the table bumped above and finds itself replaced.
        super::publisher::wake_all(&self.channels);
        for ch in mapped(&self.channels) {
            wait::wake(&ch.header().pub_waiting);
        }
        // A close it never acknowledged ends here (unless a successor
        // holds the role already: it acknowledges).
        if self.stream.header().control.state.load(Acquire) == STREAM_OPEN {
            self.reclaim_detached();
        } else {
            self.end_without_publisher();
        }
    }

    /// Ends a close while no publisher holds the writer role. One that
    /// panicked mid-delivery let go with `dirty` set: the reclaim rolls its
    /// frame forward first (and acknowledges after it, in `take_over`), so
    /// the end never comes before a frame some subscriber got. If a
    /// publisher holds the role again, it acknowledges itself.
    fn end_without_publisher(&self) {
        if self.reclaim_detached() {
            acknowledge_close(&self.stream, &self.channels);
        }
    }

    /// Closes the stream: the publisher's next loan or send fails, and
    /// subscribers get `Closed` once they have received every frame it
    /// sent. An attached publisher acknowledges the close on its next loan,
    /// send or detach (a frame it was sending meanwhile is still delivered);
    /// until then its subscribers simply see no new frames.
    pub(crate) fn close(&mut self) {
        let ctl = &self.stream.header().control;
        if ctl.state.compare_exchange(STREAM_OPEN, STREAM_CLOSING, Release, Relaxed).is_err() {
            return; // already closing or closed
        }
        self.bump_table();
        // A publisher blocked on a lossless subscriber re-reads the table.
        for ch in mapped(&self.channels) {
            wait::wake(&ch.header().pub_waiting);
        }
        // The SeqCst fence pairs with the one in `PubCore::drop`: either we
        // see its writer role released, or it sees the stream closing.
        crate::primitive::fence(crate::primitive::Ordering::SeqCst);
        // Acquire pairs with `Writer::release`'s Release CAS (through the
        // release sequence a later `Writer::acquire` CAS continues).
        if ctl.writer.load(Acquire) != WRITER_PUBLISHER {
            self.end_without_publisher();
        }
    }

    /// Ends a close for the subscribers while the publisher, whose process
    /// still lives, has not acknowledged it — without taking its writer
    /// role or reclaiming anything, since it may still be writing.
    ///
    /// A publisher that sees the stream ending before a delivery does not
    /// deliver (its send fails with `Closed`); one already delivering
    /// finishes, and the stream ends after its frame. The check on either
    /// side is an asymmetric fence: the publisher's is free, ours is
    /// [`system_barrier`](crate::shm::system_barrier), which the caller
    /// runs between our first call (which marks the stream and returns
    /// [`EndProgress::NeedsBarrier`]) and the next.
    pub(crate) fn end_for_subscribers(&mut self, barrier: Option<BarrierPassed>) -> EndProgress {
        let ctl = &self.stream.header().control;
        loop {
            // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
            // Release CAS to CLOSED (`acknowledge_close`).
            let state = ctl.state.load(Acquire);
            if state == STREAM_OPEN {
                return EndProgress::Open;
            }
            if state == STREAM_CLOSED {
                return EndProgress::Ended;
            }
            // Acquire pairs with `Writer::release`'s Release CAS (through the
            // release sequence a later `Writer::acquire` CAS continues).
            if ctl.writer.load(Acquire) != WRITER_PUBLISHER {
                // It let go meanwhile (its `Drop` acknowledges too).
                self.end_without_publisher();
                return EndProgress::Ended;
            }
            // SeqCst: the mark precedes `barrier_mark` in the single total
            // order, so a barrier numbered after the mark began after it.
            // (Failing means the publisher acknowledged just now: look again.)
            if state == STREAM_ENDING
                || ctl.state.compare_exchange(STREAM_CLOSING, STREAM_ENDING, SeqCst, Relaxed).is_ok()
            {
                break;
            }
        }
        let ending = self.ending.get_or_insert_with(|| Ending { mark: barrier_mark(), seen: false });
        // One barrier after the mark is enough for every later look.
        ending.seen |= barrier.is_some_and(|b| b.follows(ending.mark));
        if !ending.seen {
            return EndProgress::NeedsBarrier;
        }
        // Acquire pairs with the writer's Release store of INFLIGHT_IDLE
        // (`PubCore::idle`, or `repair`'s): every frame it delivered is visible to whoever
        // sees the end from our Release in `acknowledge_close`.
        if self.stream.header().publisher.inflight.load(Acquire) != INFLIGHT_IDLE {
            return EndProgress::Delivering;
        }
        // It delivers nothing more: past the barrier, its next look before
        // a delivery sees the mark.
        acknowledge_close(&self.stream, &self.channels);
        EndProgress::Ended
    }

    /// The pid a publisher holding the writer role gave (it may be alive
    /// or dead: the caller knows which); `None` if none holds it.
    pub(crate) fn publisher_attached(&self) -> Option<u32> {
        let ctl = &self.stream.header().control;
        // Acquire pairs with `Writer::release`'s Release CAS (through the
        // release sequence a later `Writer::acquire` CAS continues).
        (ctl.writer.load(Acquire) == WRITER_PUBLISHER).then(|| ctl.publisher_pid.load(Relaxed))
    }

    pub(crate) fn stats(&self, now_ns: u64) -> StreamStats {
        let g = self.stream.layout().geometry;
        let header = self.stream.header();
        let held = self.held_per_subscriber();
        let cap_mask = u64::from(g.queue_capacity) - 1;
        let used = (0..g.slot_count).filter(|&slot| !is_free(self.stream.mask(slot))).count() as u32;
        let timestamps = header.ident.flags.load(Relaxed) & FLAG_TIMESTAMPS != 0;
        let subscribers = (0..self.channels.len())
            .filter_map(|s| {
                let cfg = &self.stream.record(s).config;
                // Acquire pairs with the Release stores of the record's state (the owner's in
                // `add`/`remove`/`release`, the writer's SUB_FREE after reclaiming).
                let state = cfg.state.load(Acquire);
                if state == SUB_FREE {
                    return None;
                }
                let c = &self.stream.record(s).counters;
                let pushed = c.pushed.load(Relaxed);
                let evicted = c.evicted.load(Relaxed);
                // The subscriber writes its head: clamp what it claims.
                let head = self.channels[s]
                    .as_ref()
                    .map_or(pushed, |c| c.map.header().queue_head.load(Acquire) & !HEAD_CLAIMED)
                    .min(pushed);
                let queued = pushed - head;
                let lag_ns = if queued > 0 {
                    let e = &self.stream.ring(s)[(head & cap_mask) as usize];
                    now_ns.saturating_sub(e.timestamp_ns.load(Relaxed))
                } else {
                    0
                };
                let latency = match &self.channels[s] {
                    Some(c) if timestamps => Some(Box::new(LatencyCounts::read(&c.map.header().latency))),
                    _ => None,
                };
                Some(SubscriberStats {
                    index: s as u32,
                    generation: self.reserved_gen[s],
                    pid: cfg.pid.load(Relaxed),
                    policy: OverflowPolicy::from_raw(cfg.policy.load(Relaxed)).unwrap_or_default(),
                    credits: cfg.credits.load(Relaxed),
                    detaching: state == SUB_DETACHING,
                    attach_seq: cfg.attach_seq.load(Relaxed),
                    delivered: head.saturating_sub(evicted),
                    dropped: c.dropped.load(Relaxed),
                    evicted,
                    queued,
                    held: held[s],
                    lag_ns,
                    faults: c.faults.load(Relaxed),
                    latency,
                })
            })
            .collect();
        StreamStats {
            slot_size: g.slot_size,
            slot_count: g.slot_count,
            free_slots: g.slot_count.saturating_sub(used),
            published: header.publisher.published.load(Relaxed),
            bytes: header.publisher.bytes.load(Relaxed),
            publisher_pid: header.control.publisher_pid.load(Relaxed),
            // Acquire pairs with the owner's Release CAS to CLOSING (`OwnerCore::close`) and the
            // Release CAS to CLOSED (`acknowledge_close`).
            closed: header.control.state.load(Acquire) != STREAM_OPEN,
            history: g.history,
            // Written by the writer only: a look, clamped to the history.
            history_held: header
                .publisher
                .history_kept
                .load(Relaxed)
                .wrapping_sub(header.publisher.history_first.load(Relaxed))
                .min(u64::from(g.history)) as u32,
            subscribers,
        }
    }
}

/// How to create a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamConfig {
    /// Bytes per slot: the largest frame.
    pub slot_size: u32,
    /// Slots in the pool; the credits of all subscribers together can be
    /// at most `slot_count - 1` (one slot is kept for the publisher's loan).
    pub slot_count: u32,
    /// Most subscribers attached at once.
    pub max_subscribers: u32,
    /// Most credits one subscriber may have (rounded up to a power of
    /// two); 0 picks `slot_count - 1`, rounded up, at most 65536.
    pub queue_capacity: u32,
    /// Lock the segment in memory (`mlock`) in every process that maps it.
    pub mlock: bool,
    /// Back the pool with 2 MiB huge pages if the system has them reserved,
    /// else fall back to ordinary pages.
    pub huge_pages: bool,
    /// Fault every page in when mapping, so no frame pays a page fault.
    pub prefault: bool,
    /// Stamp every frame with its send time. Off saves a clock read per
    /// frame (tens of nanoseconds, which bounds small frames); samples then
    /// report a `timestamp_ns` of 0.
    pub timestamps: bool,
    /// Slots the publisher may hold on loan at once — samples being written
    /// plus detached loans — kept out of every subscriber's credits; 0 picks
    /// [`DEFAULT_PUBLISHER_LOANS`] (fewer if the pool is tiny).
    pub publisher_loans: u32,
    /// Frames kept for late joiners: a subscriber that attaches first gets
    /// (up to) this many of the latest frames, flagged as history, then the
    /// live ones. 0 (the default) keeps none; 1 keeps the last value. The
    /// history's slots come out of the pool like credits: the subscribers'
    /// credits together can be at most `slot_count - publisher_loans - history`.
    pub history: u32,
    /// How long a stream with history stays once it has neither publisher
    /// nor subscriber, in milliseconds; 0 (the default): until it is
    /// closed. (The broker's rule: streams without history go when unused.)
    pub history_idle_ms: u64,
}

impl StreamConfig {
    /// A stream of `slot_count` slots of `slot_size` bytes, for up to 32
    /// subscribers, pre-faulted, not locked, on ordinary pages.
    pub fn new(slot_size: u32, slot_count: u32) -> Self {
        Self {
            slot_size,
            slot_count,
            max_subscribers: 32,
            queue_capacity: 0,
            mlock: false,
            huge_pages: false,
            prefault: true,
            timestamps: true,
            publisher_loans: 0,
            history: 0,
            history_idle_ms: 0,
        }
    }

    /// The publisher's loan budget this configuration asks for.
    pub fn loans(&self) -> u32 {
        match self.publisher_loans {
            0 => DEFAULT_PUBLISHER_LOANS
                .min(self.slot_count.saturating_sub(1).saturating_sub(self.history))
                .max(PUBLISHER_LOANS),
            n => n,
        }
    }

    /// The geometry this configuration asks for.
    ///
    /// # Errors
    /// [`LayoutError`] if a number is out of range.
    pub fn geometry(&self) -> Result<Geometry, LayoutError> {
        let cap = match self.queue_capacity {
            0 => self.slot_count.saturating_sub(self.loans()).saturating_sub(self.history).max(1),
            n => n,
        };
        let g = Geometry {
            slot_size: self.slot_size,
            slot_count: self.slot_count,
            max_subscribers: self.max_subscribers,
            queue_capacity: cap
                .checked_next_power_of_two()
                .unwrap_or(u32::MAX)
                .min(crate::shm::layout::MAX_QUEUE_CAPACITY),
            history: self.history,
        };
        g.validate()?;
        let loans = self.loans();
        let max_loans = MAX_PUBLISHER_LOANS.min(self.slot_count - 1);
        if !(PUBLISHER_LOANS..=max_loans).contains(&loans) {
            return Err(LayoutError::OutOfRange {
                field: "publisher_loans",
                value: loans.into(),
                min: PUBLISHER_LOANS.into(),
                max: max_loans.into(),
            });
        }
        if u64::from(loans) + u64::from(self.history) >= u64::from(self.slot_count) {
            // No slot would be left for a subscriber's credit.
            return Err(LayoutError::OutOfRange {
                field: "history",
                value: self.history.into(),
                min: 0,
                max: (self.slot_count - loans - 1).into(),
            });
        }
        Ok(g)
    }
}

/// Counts a publisher's departure if it is not counted yet (the count is
/// odd while a publisher is attached); returns whether it counted. Only
/// the owner holding the writer role calls it, after finishing the
/// publisher's frames. Release pairs with the subscribers' Acquire fence
/// after their load in `SubCore::publisher_event`.
fn count_departure(ctl: &crate::shm::layout::StreamControl) -> bool {
    let now = ctl.publisher_changes.load(Relaxed);
    now % 2 == 1 && ctl.publisher_changes.compare_exchange(now, now.wrapping_add(1), Release, Relaxed).is_ok()
}
