//! The shared-memory layout of a stream: every `#[repr(C)]` structure, the
//! constants stored in it and the one function that places them at offsets.
//!
//! A stream is a set of files (see [`crate::shm`] for who maps what):
//!
//! ```text
//! data file (publisher and owner read-write, subscribers read-only)
//!   0                StreamHeader        ident | control | publisher lines
//!   table_offset     SubscriberRecord × max_subscribers
//!   rings_offset     Entry × queue_capacity, one ring per subscriber
//!   history_offset   Entry × history_capacity, the frames kept for late joiners
//!   masks_offset     u64 × mask_words, one holder mask per slot
//!   pool_offset      slot × slot_count, each slot_stride bytes (page aligned)
//!
//! channel file, one per subscriber index (that subscriber and the publisher
//! read-write)
//!   0                ChannelHeader       ident | head | waiting | tail | ...
//!   size_of header   u32 × queue_capacity   the return ring
//! ```
//!
//! All positions are offsets computed by [`Layout::new`] from five numbers
//! (slot size, slot count, subscriber capacity, queue capacity, history); nothing in
//! shared memory is a pointer. Fields that more than one process writes are
//! atomics on their own 128-byte line, so the writers never share a line.
//!
//! The creator fills a header, then stores `version` last with `Release`;
//! an opener that loads it with `Acquire` tells "not ready" (0) from "wrong
//! version" from ready, then copies the geometry out once, validates it and
//! never trusts the header's numbers again.

use std::mem::{align_of, size_of};

use crate::primitive::{AtomicU32, AtomicU64};

/// `b"memsockS"`: the first eight bytes of a stream's data file.
pub const STREAM_MAGIC: u64 = u64::from_le_bytes(*b"memsockS");
/// `b"memsockC"`: the first eight bytes of a channel file.
pub const CHANNEL_MAGIC: u64 = u64::from_le_bytes(*b"memsockC");
/// Version of this layout. Bumped on any change to a structure or constant
/// in this module; 0 is never used (it means "not initialised yet").
pub const LAYOUT_VERSION: u32 = 5;

/// The alignment and spacing of every independently written field.
///
/// Fixed at 128 bytes rather than taken from the architecture, so that two
/// processes built for different targets agree on the layout, and because
/// x86's adjacent-line prefetcher pairs 64-byte lines.
pub const LINE: usize = 128;
/// Page granularity of an ordinary segment.
pub const PAGE: usize = 4096;

/// Largest slot a stream may have (1 GiB).
pub const MAX_SLOT_SIZE: u32 = 1 << 30;
/// Most slots a stream may have.
pub const MAX_SLOT_COUNT: u32 = 1 << 20;
/// Most subscribers a stream may be created for.
pub const MAX_SUBSCRIBERS: u32 = 128;
/// Largest per-subscriber queue.
pub const MAX_QUEUE_CAPACITY: u32 = 1 << 16;
/// Largest data file (64 GiB).
pub const MAX_SEGMENT_LEN: u64 = 64 << 30;
/// Fewest slots a publisher may hold on loan ([`StreamIdent::publisher_loans`]),
/// outside every subscriber's credits: every stream keeps at least these.
pub const PUBLISHER_LOANS: u32 = 1;
/// Slots a publisher may hold on loan unless its stream says otherwise:
/// one sample being written plus one detached loan (or a second sample).
pub const DEFAULT_PUBLISHER_LOANS: u32 = 2;
/// Most slots a publisher may be allowed to hold on loan.
pub const MAX_PUBLISHER_LOANS: u32 = 64;

/// [`Entry::len`]: the entry is a frame handed to a late joiner from the
/// stream's history, not a live one. (Lengths stay below [`MAX_SLOT_SIZE`],
/// so the bit is free; the live path writes the length anyway.)
pub const ENTRY_HISTORY: u32 = 1 << 31;

/// [`ChannelHeader::queue_head`]: set by a writer evicting the entry at the head
/// (the position in the low bits) until the eviction is complete.
pub const HEAD_CLAIMED: u64 = 1 << 63;

/// "No slot" in fields holding a slot index.
pub const NO_SLOT: u32 = u32::MAX;

/// [`StreamIdent::flags`]: the segment is to be locked in memory by every mapper.
pub const FLAG_MLOCK: u32 = 1 << 0;
/// [`StreamIdent::flags`]: the data file is backed by 2 MiB huge pages.
pub const FLAG_HUGE_PAGES: u32 = 1 << 1;
/// [`StreamIdent::flags`]: mappers pre-fault the whole segment.
pub const FLAG_PREFAULT: u32 = 1 << 2;
/// [`StreamIdent::flags`]: the publisher stamps every frame with its send
/// time; without it [`Entry::timestamp_ns`] is 0.
pub const FLAG_TIMESTAMPS: u32 = 1 << 3;

/// [`StreamControl::state`]: publishing and subscribing are allowed.
pub const STREAM_OPEN: u32 = 0;
/// [`StreamControl::state`]: closed, and the publisher (if any) has
/// acknowledged: no frame will be delivered any more.
pub const STREAM_CLOSED: u32 = 1;
/// [`StreamControl::state`]: the owner is closing the stream; the attached
/// publisher acknowledges (moving it to [`STREAM_CLOSED`]) on its next loan,
/// send or detach, after the last frame it delivered.
pub const STREAM_CLOSING: u32 = 2;
/// [`StreamControl::state`]: the owner ends a close the publisher has not
/// acknowledged, without taking its role (its process still lives). A
/// publisher that sees it before a delivery does not deliver, and moves it
/// to [`STREAM_CLOSED`] itself; the owner does so once `inflight` shows no
/// delivery under way (see `OwnerCore::end_for_subscribers`). Subscribers
/// treat it as closing.
pub const STREAM_ENDING: u32 = 3;

/// [`StreamControl::writer`]: nobody owns the publisher-side bookkeeping.
pub const WRITER_NONE: u32 = 0;
/// [`StreamControl::writer`]: a publisher owns it.
pub const WRITER_PUBLISHER: u32 = 1;
/// [`StreamControl::writer`]: the owner is reclaiming while no publisher is attached.
pub const WRITER_OWNER: u32 = 2;

/// [`SubscriberConfig::state`]: the index is unused.
pub const SUB_FREE: u32 = 0;
/// [`SubscriberConfig::state`]: frames are delivered to this index.
pub const SUB_ACTIVE: u32 = 1;
/// [`SubscriberConfig::state`]: the owner removed the subscriber; its slots
/// are being reclaimed by the writer (publisher or owner), who then sets `SUB_FREE`.
pub const SUB_DETACHING: u32 = 2;

/// A value padded and aligned to its own [`LINE`].
#[derive(Debug, Default)]
#[repr(C, align(128))]
pub struct Line<T>(pub T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// What a frame does for a subscriber whose credits are used up. Named
/// `drop_newest`, `keep_latest` and `lossless` wherever it is spelled out
/// (stats JSON, Python).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum OverflowPolicy {
    /// The new frame is not queued for this subscriber and counted as dropped.
    #[default]
    DropNewest = 0,
    /// The oldest frame still queued for this subscriber is dropped to make room.
    KeepLatest = 1,
    /// The publisher's `send` fails with `WouldBlock` (and `send_timeout`
    /// waits) until this subscriber releases a slot.
    Lossless = 2,
}

impl OverflowPolicy {
    /// Decodes the stored value; `None` for anything else.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::DropNewest),
            1 => Some(Self::KeepLatest),
            2 => Some(Self::Lossless),
            _ => None,
        }
    }
}

/// How a blocking receive waits for the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WaitStrategy {
    /// Busy-poll only: lowest latency, one core at 100 %. The publisher
    /// never pays for waking this subscriber.
    Spin,
    /// Busy-poll for the given number of microseconds, then sleep in the
    /// kernel until the publisher wakes it.
    SpinThenPark {
        /// How long to poll before sleeping, in microseconds.
        spin_us: u32,
    },
    /// Sleep in the kernel at once.
    Park,
}

impl Default for WaitStrategy {
    fn default() -> Self {
        Self::SpinThenPark { spin_us: 50 }
    }
}

impl WaitStrategy {
    /// Whether a subscriber with this strategy may sleep, so the publisher
    /// must check its wake-up flag after every frame.
    pub fn parks(self) -> bool {
        !matches!(self, Self::Spin)
    }
}

/// Immutable description of a stream, written once by the creator.
#[derive(Debug, Default)]
#[repr(C)]
pub struct StreamIdent {
    /// [`STREAM_MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`], stored last with `Release` when the segment is ready.
    pub version: AtomicU32,
    /// `FLAG_*` bits.
    pub flags: AtomicU32,
    /// Usable bytes per slot.
    pub slot_size: AtomicU32,
    /// Number of slots in the pool.
    pub slot_count: AtomicU32,
    /// Number of subscriber indices (records, rings and channel files).
    pub max_subscribers: AtomicU32,
    /// Entries per subscriber queue and return ring (a power of two); also
    /// the most credits one subscriber may have.
    pub queue_capacity: AtomicU32,
    /// Total length of the data file in bytes.
    pub total_len: AtomicU64,
    /// Slots the publisher may hold on loan at once (1 ..= [`MAX_PUBLISHER_LOANS`]),
    /// kept outside every subscriber's credits.
    pub publisher_loans: AtomicU32,
    /// Frames the stream keeps for late joiners (0: none).
    pub history: AtomicU32,
}

/// Stream-wide control fields: written rarely, by the owner and on attach.
#[derive(Debug, Default)]
#[repr(C)]
pub struct StreamControl {
    /// Bumped (`Release`) by the owner after every change to the subscriber
    /// table; the publisher polls it (`Acquire`) once per frame.
    pub table_gen: AtomicU64,
    /// [`STREAM_OPEN`], [`STREAM_CLOSING`], [`STREAM_ENDING`] or [`STREAM_CLOSED`].
    pub state: AtomicU32,
    /// `WRITER_*`: who may change the holder masks and delivery rings.
    pub writer: AtomicU32,
    /// Pid of the attached publisher, 0 if none.
    pub publisher_pid: AtomicU32,
    /// 1 while a writer is attached; still 1 after it died, which tells the
    /// next writer to run recovery.
    pub dirty: AtomicU32,
    /// Bumped each time a publisher attaches.
    pub publisher_epoch: AtomicU64,
    /// Publisher arrivals and departures, counted: odd while a publisher is
    /// attached, even while none is. A publisher makes it odd when it has
    /// attached and even when it detaches; the owner makes it even when it
    /// declares a crashed publisher gone (each with a `Release`
    /// compare-and-swap, so one departure counts once). Subscribers watch
    /// it to report a publisher gone or back.
    pub publisher_changes: AtomicU64,
}

/// Publisher-written counters and recovery state.
#[derive(Debug, Default)]
#[repr(C)]
pub struct PublisherState {
    /// Frames sent so far; also the sequence number of the next frame.
    pub published: AtomicU64,
    /// Payload bytes sent so far.
    pub bytes: AtomicU64,
    /// The frame being delivered: [`inflight`]`(seq, slot)`, or
    /// [`INFLIGHT_IDLE`]. One word, so that no kill can leave half of it:
    /// while its sequence number is `published`, that frame's delivery is
    /// under way (or was cut short by the writer's death, and recovery
    /// finishes it).
    pub inflight: AtomicU64,
    /// The last `table_gen` the publisher has applied: until it catches up
    /// with a lowering of credits, the owner keeps counting the old ones.
    pub applied_gen: AtomicU64,
    /// The history window `[history_first, history_kept)`: positions in the
    /// history ring of the frames kept for late joiners. Writer-written;
    /// `history_kept` moves first (a new frame goes in before the oldest
    /// leaves), so the window holds `history + 1` entries only inside a send.
    pub history_first: AtomicU64,
    /// See [`history_first`](Self::history_first).
    pub history_kept: AtomicU64,
}

/// The first bytes of a data file.
#[derive(Debug, Default)]
#[repr(C)]
pub struct StreamHeader {
    /// Written once at creation.
    pub ident: Line<StreamIdent>,
    /// Owner-side control.
    pub control: Line<StreamControl>,
    /// Publisher-side counters.
    pub publisher: Line<PublisherState>,
}

/// Per-subscriber settings, written by the owner.
#[derive(Debug, Default)]
#[repr(C)]
pub struct SubscriberConfig {
    /// `SUB_*`.
    pub state: AtomicU32,
    /// An [`OverflowPolicy`] value.
    pub policy: AtomicU32,
    /// How many slots the subscriber may hold, queued plus borrowed.
    pub credits: AtomicU32,
    /// 1 if the subscriber may sleep ([`WaitStrategy::parks`]).
    pub parks: AtomicU32,
    /// Pid of the subscriber process, for statistics.
    pub pid: AtomicU32,
    /// Frames of the stream's history it wants when it joins (0 declines).
    pub history_wanted: AtomicU32,
    /// Stream sequence number when the subscriber attached.
    pub attach_seq: AtomicU64,
    /// Bumped on every attach to this index: a stale handle compares it.
    pub generation: AtomicU64,
}

/// Per-subscriber counters, written by the publisher.
#[derive(Debug, Default)]
#[repr(C)]
pub struct SubscriberCounters {
    /// Frames queued for the subscriber so far: the next queue position.
    pub pushed: AtomicU64,
    /// Frames this subscriber lost: not queued (no credit) plus evicted.
    pub dropped: AtomicU64,
    /// Of `dropped`, those evicted from the queue by `KeepLatest`.
    pub evicted: AtomicU64,
    /// Protocol violations seen from this subscriber (bad returns, a
    /// corrupted head or return ring).
    pub faults: AtomicU64,
    /// Next return-ring position the writer will read. Kept here, where
    /// only the writer writes, and stored after each batch of returns is
    /// applied: a writer that dies mid-batch leaves it behind, and the next
    /// one applies the batch again, which is harmless (a return whose bit is
    /// already clear changes nothing; see `replay_returns`).
    pub collected: AtomicU64,
    /// The subscriber generation handed its history: set once a writer has
    /// queued the history frames for it (zero or more), so that no later
    /// writer queues them again. Until it is set, the subscriber's ring
    /// holds history frames only.
    pub seeded_gen: AtomicU64,
}

/// One subscriber index of the table in the data file.
#[derive(Debug, Default)]
#[repr(C)]
pub struct SubscriberRecord {
    /// Owner-written.
    pub config: Line<SubscriberConfig>,
    /// Publisher-written.
    pub counters: Line<SubscriberCounters>,
}

/// One queued frame in a subscriber's delivery ring (publisher-written,
/// read-only to the subscriber). Two share a cache line.
#[derive(Debug, Default)]
#[repr(C, align(32))]
pub struct Entry {
    /// [`entry`]`(position, slot)`: the low 32 bits of `position + 1` (the
    /// stamp: the entry is complete when it matches) above the slot number.
    /// Stored last, with `Release`.
    pub word: AtomicU64,
    /// Stream sequence number of the frame.
    pub seq: AtomicU64,
    /// Publish time, nanoseconds on the monotonic clock.
    pub timestamp_ns: AtomicU64,
    /// Payload length in bytes, with [`ENTRY_HISTORY`] set on a frame a
    /// late joiner gets from the history.
    pub len: AtomicU32,
}

/// [`PublisherState::inflight`] while no delivery is under way.
pub const INFLIGHT_IDLE: u64 = NO_SLOT as u64;

/// The [`PublisherState::inflight`] word of frame `seq` in `slot`: the low
/// 32 bits of `seq` above the slot.
#[inline]
pub const fn inflight(seq: u64, slot: u32) -> u64 {
    ((seq & 0xffff_ffff) << 32) | slot as u64
}

/// Splits an `inflight` word into (low 32 bits of the sequence number, slot).
#[inline]
pub const fn split_inflight(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// The word of the ring entry for queue position `position` holding `slot`.
#[inline]
pub const fn entry(position: u64, slot: u32) -> u64 {
    ((position.wrapping_add(1) & 0xffff_ffff) << 32) | slot as u64
}

/// The stamp a ready entry for `position` carries.
#[inline]
pub const fn entry_stamp(position: u64) -> u32 {
    position.wrapping_add(1) as u32
}

/// Splits an entry into (stamp, slot).
#[inline]
pub const fn split_entry(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// Immutable description of a channel, written by the owner at attach.
#[derive(Debug, Default)]
#[repr(C)]
pub struct ChannelIdent {
    /// [`CHANNEL_MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`], stored last.
    pub version: AtomicU32,
    /// The subscriber index this channel belongs to.
    pub index: AtomicU32,
    /// Entries in the return ring (the stream's queue capacity).
    pub capacity: AtomicU32,
    /// Set by the first `Subscriber::open` of this generation, so a ticket
    /// opens one handle only.
    pub claimed: AtomicU32,
    /// The subscriber generation the channel was last reset for.
    pub generation: AtomicU64,
}

/// The first bytes of a channel file: everything a subscriber writes.
#[derive(Debug, Default)]
#[repr(C)]
pub struct ChannelHeader {
    /// Written by the owner.
    pub ident: Line<ChannelIdent>,
    /// Delivery ring: next queue position the subscriber will take.
    /// Subscriber-written;
    /// under `KeepLatest` the writer evicts the entry at the head by a
    /// compare-and-swap to `head |` [`HEAD_CLAIMED`], takes the slot back,
    /// then stores `head + 1`. A claimed head is never the subscriber's to
    /// move; recovery finishes an eviction it finds claimed.
    pub queue_head: Line<AtomicU64>,
    /// Futex word of the subscriber's waiters (its receive, its watcher):
    /// a wake count above a "may sleep" flag in bit 0, which a waiter sets
    /// and a waker clears as it counts a wake (see `wait`). The publisher
    /// wakes on a frame only a subscriber whose queue was empty before it:
    /// one that has frames queued was woken for the first of them.
    pub waiting: Line<AtomicU32>,
    /// Return ring: slots returned so far (the next position the
    /// subscriber writes). Subscriber-written.
    pub returned: Line<AtomicU64>,
    /// Return ring: returns collected so far (the next position the writer
    /// reads). Writer-written, for the subscriber's flow control only (the
    /// writer's own, persisted copy is `SubscriberCounters::collected`).
    pub collected: Line<AtomicU64>,
    /// Futex word of the publisher waiting for room in a full lossless
    /// subscriber, as `waiting`; the subscriber wakes it.
    pub pub_waiting: Line<AtomicU32>,
    /// Publish-to-receive latency of a sample of the frames received.
    /// Subscriber-written; the owner reads it for stats (it is only ever
    /// the subscriber's own report: nothing else depends on it).
    pub latency: Line<ChannelLatency>,
}

/// Buckets of [`ChannelLatency`]: under 128 ns, then four per doubling
/// from 128 ns to 2^38 ns (about 275 s), then one for the rest.
pub const LATENCY_BUCKETS: usize = 2 + 4 * (LATENCY_TOP_SHIFT - LATENCY_MIN_SHIFT) as usize;
/// The doubling where the buckets start: 2^7 ns.
const LATENCY_MIN_SHIFT: u32 = 7;
/// The doubling where they end: 2^38 ns.
const LATENCY_TOP_SHIFT: u32 = 38;

/// A latency histogram: counts per bucket (see [`latency_bucket`]) and the
/// sum of the latencies, in nanoseconds; both only grow (from 0 at attach),
/// so readers take differences between two looks.
#[derive(Debug)]
#[repr(C)]
pub struct ChannelLatency {
    /// Latencies recorded, nanoseconds (wrapping).
    pub sum_ns: AtomicU64,
    /// Samples per bucket.
    pub buckets: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for ChannelLatency {
    fn default() -> Self {
        Self { sum_ns: AtomicU64::new(0), buckets: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

/// The bucket of a latency of `ns` nanoseconds.
#[inline]
pub const fn latency_bucket(ns: u64) -> usize {
    if ns < 1 << LATENCY_MIN_SHIFT {
        return 0;
    }
    let doubling = 63 - ns.leading_zeros();
    if doubling >= LATENCY_TOP_SHIFT {
        return LATENCY_BUCKETS - 1;
    }
    let quarter = (ns >> (doubling - 2)) & 3;
    1 + 4 * (doubling - LATENCY_MIN_SHIFT) as usize + quarter as usize
}

/// The latencies of bucket `i`: from the first nanosecond value in it to the
/// first past it (`u64::MAX` for the last).
pub const fn latency_bucket_range(i: usize) -> (u64, u64) {
    if i == 0 {
        return (0, 1 << LATENCY_MIN_SHIFT);
    }
    if i >= LATENCY_BUCKETS - 1 {
        return (1 << LATENCY_TOP_SHIFT, u64::MAX);
    }
    let doubling = LATENCY_MIN_SHIFT + ((i - 1) / 4) as u32;
    let quarter = ((i - 1) % 4) as u64;
    let start = (1u64 << doubling) + quarter * (1 << (doubling - 2));
    (start, start + (1 << (doubling - 2)))
}

#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<Line<u8>>() == LINE && align_of::<Line<u8>>() == LINE);
    assert!(size_of::<StreamIdent>() == 48);
    assert!(size_of::<StreamHeader>() == 3 * LINE);
    assert!(size_of::<SubscriberConfig>() == 40);
    assert!(size_of::<SubscriberRecord>() == 2 * LINE);
    assert!(size_of::<Entry>() == 32 && std::mem::align_of::<Entry>() == 32);
    assert!(size_of::<ChannelLatency>() == 8 * LINE - 8);
    assert!(size_of::<ChannelHeader>() == 14 * LINE);
    assert!(size_of::<AtomicU64>() == 8 && size_of::<AtomicU32>() == 4);
};

/// The five numbers a stream's layout is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Usable bytes per slot.
    pub slot_size: u32,
    /// Slots in the pool.
    pub slot_count: u32,
    /// Subscriber indices.
    pub max_subscribers: u32,
    /// Entries per subscriber queue (a power of two), the most credits one
    /// subscriber can hold.
    pub queue_capacity: u32,
    /// Frames kept for late joiners (0: none).
    pub history: u32,
}

/// Why a geometry or a segment's header is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A field is out of its range.
    #[error("{field} = {value} is out of range ({min} ..= {max})")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The offending value.
        value: u64,
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// The queue capacity is not a power of two.
    #[error("queue capacity {0} is not a power of two")]
    NotPowerOfTwo(u32),
    /// The whole segment would exceed [`MAX_SEGMENT_LEN`].
    #[error("segment would be {0} bytes, more than the {MAX_SEGMENT_LEN}-byte limit")]
    TooLarge(u64),
    /// The first bytes are not a memsock segment of the expected kind.
    #[error("not a memsock {0} segment (bad magic)")]
    BadMagic(&'static str),
    /// The creator has not finished initialising the segment.
    #[error("segment is not initialised yet")]
    NotReady,
    /// The segment was written by an incompatible memsock.
    #[error("segment layout version {found}, this build understands {LAYOUT_VERSION}")]
    VersionMismatch {
        /// The version found in the header.
        found: u32,
    },
    /// The header disagrees with the file it is in.
    #[error("segment header is inconsistent: {0}")]
    Inconsistent(&'static str),
}

impl Geometry {
    /// Number of `u64` words in one slot's holder mask: a bit per
    /// subscriber index, and one more (index `max_subscribers`) for the
    /// history if the stream keeps one.
    #[inline]
    pub fn mask_words(&self) -> usize {
        (self.max_subscribers as usize + usize::from(self.history > 0)).div_ceil(64)
    }

    /// Entries in the history ring: a power of two above `history` (the
    /// window holds one frame more while a send replaces the oldest), 0
    /// without history.
    #[inline]
    pub fn history_capacity(&self) -> usize {
        if self.history == 0 { 0 } else { (self.history as usize + 1).next_power_of_two() }
    }

    /// Checks every field against its range.
    ///
    /// # Errors
    /// [`LayoutError::OutOfRange`] or [`LayoutError::NotPowerOfTwo`].
    pub fn validate(&self) -> Result<(), LayoutError> {
        fn range(field: &'static str, value: u32, min: u32, max: u32) -> Result<(), LayoutError> {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(LayoutError::OutOfRange { field, value: value.into(), min: min.into(), max: max.into() })
            }
        }
        range("slot_size", self.slot_size, 1, MAX_SLOT_SIZE)?;
        range("slot_count", self.slot_count, PUBLISHER_LOANS + 1, MAX_SLOT_COUNT)?;
        range("max_subscribers", self.max_subscribers, 1, MAX_SUBSCRIBERS)?;
        range("queue_capacity", self.queue_capacity, 1, MAX_QUEUE_CAPACITY)?;
        // At least one slot beyond the history and a loan, for a credit.
        range("history", self.history, 0, self.slot_count - PUBLISHER_LOANS - 1)?;
        if !self.queue_capacity.is_power_of_two() {
            return Err(LayoutError::NotPowerOfTwo(self.queue_capacity));
        }
        Ok(())
    }
}

/// Where everything is in a data file, derived from a [`Geometry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The numbers this layout was computed from.
    pub geometry: Geometry,
    /// Granularity the file is sized and the pool aligned to.
    pub page: usize,
    /// Offset of the subscriber table.
    pub table_offset: usize,
    /// Offset of the delivery rings.
    pub rings_offset: usize,
    /// Offset of the history ring.
    pub history_offset: usize,
    /// Offset of the holder masks.
    pub masks_offset: usize,
    /// Offset of slot 0.
    pub pool_offset: usize,
    /// Distance between consecutive slots.
    pub slot_stride: usize,
    /// Length of the data file.
    pub total_len: usize,
}

impl Layout {
    /// Computes the layout of a data file; `page` is [`PAGE`] or the huge
    /// page size.
    ///
    /// # Errors
    /// Any [`Geometry::validate`] error, or [`LayoutError::TooLarge`].
    pub fn new(geometry: Geometry, page: usize) -> Result<Self, LayoutError> {
        geometry.validate()?;
        let g = geometry;
        let subs = g.max_subscribers as usize;
        let table_offset = size_of::<StreamHeader>();
        let rings_offset = table_offset + subs * size_of::<SubscriberRecord>();
        let ring_bytes = g.queue_capacity as usize * size_of::<Entry>();
        let history_offset = round_up(rings_offset + subs * round_up(ring_bytes, LINE), LINE);
        let history_bytes = g.history_capacity() * size_of::<Entry>();
        let masks_offset = round_up(history_offset + history_bytes, LINE);
        let masks_bytes = g.slot_count as usize * g.mask_words() * size_of::<u64>();
        let pool_offset = round_up(masks_offset + masks_bytes, page);
        // Slots start on a 128-byte boundary, so that writing one never
        // touches a line pair a subscriber is reading from the previous one;
        // large ones on a page, so that copies run aligned.
        let align = if g.slot_size as usize >= 16 * PAGE { PAGE } else { LINE };
        let slot_stride = round_up(g.slot_size as usize, align);
        let pool_bytes = (slot_stride as u64) * u64::from(g.slot_count);
        let total = (pool_offset as u64)
            .checked_add(pool_bytes)
            .map(|t| t.div_ceil(page as u64) * page as u64)
            .filter(|&t| t <= MAX_SEGMENT_LEN)
            .ok_or(LayoutError::TooLarge(pool_offset as u64 + pool_bytes))?;
        Ok(Self {
            geometry,
            page,
            table_offset,
            rings_offset,
            history_offset,
            masks_offset,
            pool_offset,
            slot_stride,
            total_len: total as usize,
        })
    }

    /// Offset of subscriber `index`'s delivery ring.
    #[inline]
    pub fn ring_offset(&self, index: usize) -> usize {
        let ring_bytes = self.geometry.queue_capacity as usize * size_of::<Entry>();
        self.rings_offset + index * round_up(ring_bytes, LINE)
    }

    /// Offset of slot `slot`'s holder mask.
    #[inline]
    pub fn mask_offset(&self, slot: u32) -> usize {
        self.masks_offset + slot as usize * self.geometry.mask_words() * size_of::<u64>()
    }

    /// Offset of slot `slot`'s payload.
    #[inline]
    pub fn slot_offset(&self, slot: u32) -> usize {
        self.pool_offset + slot as usize * self.slot_stride
    }

    /// Reads and validates the header of a mapped data file of `file_len`
    /// bytes, returning the layout it describes and its flags.
    ///
    /// # Errors
    /// [`LayoutError::BadMagic`], [`LayoutError::NotReady`],
    /// [`LayoutError::VersionMismatch`], [`LayoutError::Inconsistent`] or a
    /// geometry error.
    pub fn from_header(ident: &StreamIdent, file_len: u64) -> Result<(Self, u32), LayoutError> {
        use crate::primitive::Ordering::{Acquire, Relaxed};
        // A Relaxed load and a fence, not an Acquire load: subscribers map
        // the file read-only (see `subscriber`). The fence pairs with the
        // creator's Release store of `version` in `write_header`: the fields
        // below are complete once it is seen.
        let version = ident.version.load(Relaxed);
        crate::primitive::fence(Acquire);
        match version {
            0 => return Err(LayoutError::NotReady),
            LAYOUT_VERSION => {}
            found => return Err(LayoutError::VersionMismatch { found }),
        }
        if ident.magic.load(Relaxed) != STREAM_MAGIC {
            return Err(LayoutError::BadMagic("stream"));
        }
        let flags = ident.flags.load(Relaxed);
        let geometry = Geometry {
            slot_size: ident.slot_size.load(Relaxed),
            slot_count: ident.slot_count.load(Relaxed),
            max_subscribers: ident.max_subscribers.load(Relaxed),
            queue_capacity: ident.queue_capacity.load(Relaxed),
            history: ident.history.load(Relaxed),
        };
        let page = if flags & FLAG_HUGE_PAGES != 0 { crate::platform::HUGE_PAGE_SIZE } else { PAGE };
        let layout = Self::new(geometry, page)?;
        if ident.total_len.load(Relaxed) != layout.total_len as u64 {
            return Err(LayoutError::Inconsistent("total length does not match the geometry"));
        }
        if file_len < layout.total_len as u64 {
            return Err(LayoutError::Inconsistent("file is shorter than the header says"));
        }
        let loans = ident.publisher_loans.load(Relaxed);
        if loans == 0 || loans > MAX_PUBLISHER_LOANS || loans >= geometry.slot_count {
            return Err(LayoutError::Inconsistent("publisher loan budget out of range"));
        }
        if u64::from(loans) + u64::from(geometry.history) >= u64::from(geometry.slot_count) {
            return Err(LayoutError::Inconsistent("history and loans leave no slot for a subscriber"));
        }
        Ok((layout, flags))
    }

    /// Fills a fresh (zeroed) header and publishes it by storing `version`
    /// last. `publisher_loans` must be in range (see [`StreamIdent::publisher_loans`]).
    pub fn write_header(&self, header: &StreamHeader, flags: u32, publisher_loans: u32) {
        use crate::primitive::Ordering::{Relaxed, Release};
        let id = &header.ident;
        let g = &self.geometry;
        id.magic.store(STREAM_MAGIC, Relaxed);
        id.flags.store(flags, Relaxed);
        id.slot_size.store(g.slot_size, Relaxed);
        id.slot_count.store(g.slot_count, Relaxed);
        id.max_subscribers.store(g.max_subscribers, Relaxed);
        id.queue_capacity.store(g.queue_capacity, Relaxed);
        id.history.store(g.history, Relaxed);
        id.total_len.store(self.total_len as u64, Relaxed);
        id.publisher_loans.store(publisher_loans, Relaxed);
        header.publisher.inflight.store(INFLIGHT_IDLE, Relaxed);
        // Release pairs with the Acquire load in `from_header`.
        id.version.store(LAYOUT_VERSION, Release);
    }
}

/// Length of a channel file for a given queue capacity.
pub fn channel_len(queue_capacity: u32) -> usize {
    round_up(size_of::<ChannelHeader>() + queue_capacity as usize * size_of::<u32>(), PAGE)
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub(crate) const fn round_up(value: usize, align: usize) -> usize {
    (value + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry { slot_size: 100, slot_count: 10, max_subscribers: 65, queue_capacity: 8, history: 0 }
    }

    #[test]
    fn layout_places_regions_in_order_and_aligned() {
        let l = Layout::new(geo(), PAGE).unwrap();
        assert_eq!(l.table_offset, 3 * LINE);
        assert!(l.rings_offset >= l.table_offset + 65 * 256);
        assert!(l.masks_offset >= l.ring_offset(64) + 8 * 32);
        assert_eq!(geo().mask_words(), 2);
        assert!(l.pool_offset >= l.mask_offset(9) + 16);
        assert_eq!(l.pool_offset % PAGE, 0);
        assert_eq!(l.slot_stride, 128);
        assert_eq!(l.total_len % PAGE, 0);
        assert!(l.total_len >= l.slot_offset(9) + 100);
    }

    #[test]
    fn big_slots_are_page_aligned() {
        let g = Geometry { slot_size: 1_153_434, slot_count: 6, max_subscribers: 4, queue_capacity: 8, history: 0 };
        let l = Layout::new(g, PAGE).unwrap();
        assert_eq!(l.slot_stride % PAGE, 0);
        assert_eq!(l.slot_offset(1) % PAGE, 0);
    }

    #[test]
    fn bad_geometry_is_refused() {
        let mut g = geo();
        g.queue_capacity = 6;
        assert_eq!(Layout::new(g, PAGE), Err(LayoutError::NotPowerOfTwo(6)));
        g = geo();
        g.slot_count = 1;
        assert!(matches!(Layout::new(g, PAGE), Err(LayoutError::OutOfRange { field: "slot_count", .. })));
        g = geo();
        g.slot_size = MAX_SLOT_SIZE;
        g.slot_count = 100;
        assert!(matches!(Layout::new(g, PAGE), Err(LayoutError::TooLarge(_))));
    }

    #[test]
    fn latency_buckets_tile_every_value_in_order() {
        assert_eq!(LATENCY_BUCKETS, 126);
        let mut next = 0;
        for i in 0..LATENCY_BUCKETS {
            let (start, end) = latency_bucket_range(i);
            assert_eq!(start, next, "bucket {i} starts where {} ends", i.wrapping_sub(1));
            assert!(end > start);
            assert_eq!(latency_bucket(start), i);
            assert_eq!(latency_bucket(end - 1), i);
            next = end;
        }
        assert_eq!(next, u64::MAX);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        // A quarter of a doubling wide: 1 ms falls in [917.5 µs, 1.049 ms).
        assert_eq!(latency_bucket_range(latency_bucket(1_000_000)), (917_504, 1_048_576));
    }

    proptest::proptest! {
        #[test]
        fn a_latency_lies_in_its_bucket(ns: u64) {
            let (start, end) = latency_bucket_range(latency_bucket(ns));
            proptest::prop_assert!(start <= ns && (ns < end || end == u64::MAX));
        }
    }
}
