//! Step-k crash tests: a writer is stopped after each point `k` of a send
//! that evicts, delivers, drops and reads returns (see [`super::crash`]),
//! as a `kill -9` would stop it; recovery and a new writer follow, and
//! every subscriber must then get each frame at most once, keep all its
//! credits, and no slot may be lost — with and without a history, whose
//! frames must stay the latest ones sent; and a writer stopped while it
//! hands the history to a joiner must leave nothing to hand twice.

use std::sync::Arc;
use std::time::Duration;

use super::crash::hook;
use super::mem::heap::{HeapChannel, HeapStream};
use super::mem::{ChannelMem, StreamMem};
use super::owner::OwnerCore;
use super::owner::SubscriberOptions;
use super::publisher::PubCore;
use super::subscriber::SubCore;
use super::subscriber::TryRecvError;
use super::wait::Backoff;
use super::writer::HolderBit;
use crate::primitive::Ordering::Relaxed;
use crate::shm::layout::{Geometry, HEAD_CLAIMED, OverflowPolicy, WRITER_NONE, WaitStrategy, split_entry};

type Stream = Arc<HeapStream>;
type Channel = Arc<HeapChannel>;
type Writer = PubCore<Stream, Channel>;

const SLOTS: u32 = 16;

/// How the stopped writer's work is repaired.
#[derive(Debug, Clone, Copy)]
enum Recovery {
    /// The next publisher recovers as it attaches.
    NextPublisher,
    /// The owner declares the publisher gone and recovers; a publisher
    /// attaches later.
    Owner,
    /// Subscribers read (and release) what they can before the next
    /// publisher recovers.
    NextPublisherAfterReads,
}

struct Sub {
    core: SubCore<Stream, Channel>,
    policy: OverflowPolicy,
    /// Sequence numbers received, in order.
    got: Vec<u64>,
    /// Those of them flagged as history.
    history: Vec<u64>,
}

struct World {
    stream: Stream,
    channels: Vec<Channel>,
    owner: OwnerCore<Stream, Channel>,
    subs: Vec<Sub>,
}

impl World {
    /// Four subscribers, one per way a send treats a subscriber:
    /// 0 keep-latest with 1 credit (evicted), 1 lossless with 1 credit
    /// (its return is read first), 2 drop-newest with 1 credit (dropped),
    /// 3 lossless with 2 credits (plainly delivered).
    fn new(history: u32) -> Self {
        let g = Geometry { slot_size: 8, slot_count: SLOTS, max_subscribers: 4, queue_capacity: 4, history };
        let stream = Arc::new(HeapStream::new(g));
        let channels: Vec<_> = (0..4).map(|i| Arc::new(HeapChannel::new(i, 4))).collect();
        let mut owner = OwnerCore::new(stream.clone(), channels.clone());
        let mut subs = Vec::new();
        for (credits, policy) in [
            (1, OverflowPolicy::KeepLatest),
            (1, OverflowPolicy::Lossless),
            (1, OverflowPolicy::DropNewest),
            (2, OverflowPolicy::Lossless),
        ] {
            let t = owner
                .add(
                    &SubscriberOptions { credits, policy, wait: WaitStrategy::Park, ..SubscriberOptions::default() },
                    1,
                )
                .unwrap();
            let s = t.index as usize;
            let backoff = Backoff { spin: Duration::ZERO, park: true };
            let core = SubCore::attach(stream.clone(), channels[s].clone(), s, t.generation, backoff).unwrap();
            subs.push(Sub { core, policy, got: Vec::new(), history: Vec::new() });
        }
        Self { stream, channels, owner, subs }
    }

    fn publisher(&self, pid: u32) -> Writer {
        PubCore::attach(self.stream.clone(), self.channels.clone(), pid).expect("a publisher attaches")
    }

    /// Subscriber `s` takes one frame, if it can, and releases it at once.
    fn take(&mut self, s: usize) -> Option<u64> {
        let sub = &mut self.subs[s];
        loop {
            match sub.core.try_take() {
                Ok(info) => {
                    if info.history {
                        sub.history.push(info.seq);
                    }
                    sub.got.push(info.seq);
                    sub.core.return_slot(info.slot);
                    return Some(info.seq);
                }
                Err(TryRecvError::PublisherGone | TryRecvError::PublisherBack) => {}
                Err(TryRecvError::Empty) => return None,
                Err(e) => panic!("subscriber {s}: {e:?}"),
            }
        }
    }

    fn take_all(&mut self) {
        for s in 0..self.subs.len() {
            while self.take(s).is_some() {}
        }
    }

    /// Slots some subscriber (or the history) holds, by the masks.
    fn used_slots(&self) -> usize {
        (0..SLOTS).filter(|&x| self.stream.mask(x).iter().any(|w| w.load(Relaxed) != 0)).count()
    }

    /// The sequence numbers in the history window, oldest first, each
    /// checked to hold its slot by the history's bit.
    fn history(&self) -> Vec<u64> {
        let p = &self.stream.header().publisher;
        let (first, kept) = (p.history_first.load(Relaxed), p.history_kept.load(Relaxed));
        let ring = self.stream.history();
        let max_subscribers = self.stream.layout().geometry.max_subscribers;
        (first..kept)
            .map(|pos| {
                let e = &ring[pos as usize % ring.len()];
                let (_, slot) = split_entry(e.word.load(Relaxed));
                assert!(
                    HolderBit::history(max_subscribers).is_set(self.stream.mask(slot)),
                    "history slot {slot} unheld"
                );
                e.seq.load(Relaxed)
            })
            .collect()
    }
}

fn send(writer: &mut Writer) -> u64 {
    let slot = writer.loan().expect("loan");
    writer.commit(slot, 1, 7).expect("commit").seq
}

/// One run: a send stopped at point `k`, then recovery — itself stopped at
/// point `j` of the next publisher's take-over, if given, and finished by a
/// third. Returns whether the send, and the take-over, finished without
/// reaching their point.
fn run(k: u32, recovery: Recovery, j: Option<u32>, history: u32) -> (bool, bool) {
    let mut w = World::new(history);
    let mut first = w.publisher(100);
    // Frame 0 reaches everyone. Subscriber 1 takes and returns it (so the
    // next send must read its return ring to find room) and so does 3;
    // 0 and 2 leave it queued (0 is then evicted, 2 drops the next frame).
    assert_eq!(send(&mut first), 0);
    assert_eq!(w.take(1), Some(0));
    assert_eq!(w.take(3), Some(0));

    hook::arm(k);
    let finished = hook::run(|| send(&mut first)).is_some();
    let pending = hook::disarm();
    assert_eq!(finished, pending, "point {k}");
    if finished {
        drop(first);
    } else {
        // Killed at point k: nothing of the writer runs any more.
        std::mem::forget(first);
        match recovery {
            Recovery::Owner => w.owner.publisher_gone(),
            // The role of a dead holder is free to take; the next
            // publisher then finds the stream dirty.
            Recovery::NextPublisher => w.stream.header().control.writer.store(WRITER_NONE, Relaxed),
            Recovery::NextPublisherAfterReads => {
                w.take_all();
                w.stream.header().control.writer.store(WRITER_NONE, Relaxed);
            }
        }
    }
    let mut took_over = true;
    let mut second = match j {
        None => w.publisher(200),
        Some(j) => {
            hook::arm(j);
            let second = hook::run(|| w.publisher(200));
            took_over = hook::disarm();
            second.unwrap_or_else(|| {
                w.stream.header().control.writer.store(WRITER_NONE, Relaxed);
                w.publisher(300)
            })
        }
    };
    let after = second.next_seq();
    w.take_all();

    let at = if finished { "nowhere".to_string() } else { hook::last() };
    let label = format!(
        "history {history}, stopped at point {k} ({at}), recovered by {recovery:?}, take-over stopped at {j:?}"
    );
    // The history holds the latest frames sent, as many as it keeps.
    let h = u64::from(history).min(after);
    assert_eq!(w.history(), (after - h..after).collect::<Vec<_>>(), "{label}: history");
    // Frame 1 either reached nobody (and its number is reused) or, once
    // anybody may have read it, every subscriber that was due it.
    let reached = w.subs.iter().any(|s| s.got.contains(&1));
    assert_eq!(after, if reached { 2 } else { 1 }, "{label}: next sequence number");
    for (s, sub) in w.subs.iter().enumerate() {
        if sub.policy != OverflowPolicy::DropNewest {
            assert_eq!(sub.got.contains(&1), reached, "{label}: subscriber {s} got {:?}", sub.got);
        }
    }
    // Every subscriber keeps every credit: each gets every new frame.
    for _ in 0..3 * SLOTS {
        let seq = send(&mut second);
        for s in 0..w.subs.len() {
            assert_eq!(w.take(s), Some(seq), "{label}: subscriber {s} after recovery");
        }
    }
    // Nothing twice, nothing out of order.
    for (s, sub) in w.subs.iter().enumerate() {
        assert!(sub.got.windows(2).all(|p| p[0] < p[1]), "{label}: subscriber {s} got {:?}", sub.got);
    }
    // No slot lost: with everything released and read back (a loan reads
    // every return ring when the free list runs dry), the whole pool is free.
    assert!(second.loan().is_ok_and(|slot| {
        second.abandon(slot);
        true
    }));
    let free = second.free_slots();
    let kept = history.min(SLOTS) as usize;
    assert_eq!((w.used_slots(), free), (kept, SLOTS as usize - kept), "{label}: slots lost");
    let next = second.next_seq();
    assert_eq!(w.history(), (next - u64::from(history)..next).collect::<Vec<_>>(), "{label}: history at the end");
    (finished, took_over)
}

fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    text.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_writer_stopped_at_any_point_of_a_send_loses_and_duplicates_nothing() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for (recovery, history) in [
        (Recovery::NextPublisher, 0),
        (Recovery::Owner, 0),
        (Recovery::NextPublisherAfterReads, 0),
        (Recovery::NextPublisher, 2),
        (Recovery::Owner, 2),
        (Recovery::NextPublisherAfterReads, 1),
    ] {
        let mut k = 0;
        loop {
            runs += 1;
            match std::panic::catch_unwind(|| run(k, recovery, None, history)) {
                Ok((true, _)) => break,
                Ok((false, _)) => {}
                Err(payload) => failures.push(message(payload)),
            }
            k += 1;
            assert!(k < 200, "the send never finished");
        }
        assert!(k > 10, "a send has many points ({k})");
    }
    assert!(runs > 20);
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_recovery_stopped_at_any_point_is_finished_by_the_next_writer() {
    for history in [0, 2] {
        recoveries_stopped_at_any_point(history);
    }
}

fn recoveries_stopped_at_any_point(history: u32) {
    let mut failures = Vec::new();
    let mut k = 0;
    loop {
        let mut j = 0;
        let first_finished = loop {
            match std::panic::catch_unwind(|| run(k, Recovery::NextPublisher, Some(j), history)) {
                Ok((first, true)) => break first,
                Ok((_, false)) => {}
                Err(payload) => failures.push(message(payload)),
            }
            j += 1;
            assert!(j < 200, "the take-over never finished");
        };
        if first_finished {
            break;
        }
        k += 1;
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// A keep-latest subscriber that claims its own head, as if a writer were
/// evicting its oldest frame, and whose publisher then dies: recovery acts
/// on the claim, but frees nothing another subscriber holds.
#[test]
fn a_forged_claim_frees_no_slot_but_the_forgers_own() {
    let mut w = World::new(0);
    let mut first = w.publisher(100);
    assert_eq!(send(&mut first), 0);
    // Subscriber 3 takes frame 0 and keeps it borrowed.
    let held = w.subs[3].core.try_take().unwrap();
    // Subscriber 0 forges a claim on its queued frame 0.
    let head = &w.channels[0].header().queue_head;
    head.store(head.load(Relaxed) | HEAD_CLAIMED, Relaxed);
    std::mem::forget(first);
    w.owner.publisher_gone();
    let mut second = w.publisher(200);
    // Frame 0's slot is still subscriber 3's (and 1's and 2's, queued):
    // no loan may hand it out.
    for _ in 0..3 * SLOTS {
        let slot = second.loan().unwrap();
        assert_ne!(slot, held.slot, "a slot others hold was freed");
        second.abandon(slot);
        for s in 0..4 {
            while w.take(s).is_some() {}
        }
        let _ = send(&mut second);
    }
    assert_eq!(w.subs[0].got.first(), Some(&1), "the forger lost only its own frame");
    w.subs[3].core.return_slot(held.slot);
}

/// A writer stopped while reclaiming a detached subscriber's slots: the
/// next one finishes, and no slot is lost.
#[test]
fn a_writer_stopped_while_reclaiming_a_detached_subscriber_loses_no_slot() {
    let mut k = 0;
    loop {
        let mut w = World::new(0);
        let mut first = w.publisher(100);
        for _ in 0..2 {
            send(&mut first);
            w.take(1);
        }
        w.owner.remove(3).unwrap();
        hook::arm(k);
        let finished = hook::run(|| first.loan().map(|slot| first.abandon(slot))).is_some();
        hook::disarm();
        if finished {
            drop(first);
        } else {
            std::mem::forget(first);
            w.stream.header().control.writer.store(WRITER_NONE, Relaxed);
        }
        let mut second = w.publisher(200);
        w.subs.truncate(3);
        w.take_all();
        let slot = second.loan().unwrap_or_else(|e| panic!("stopped at point {k}: {e:?}"));
        second.abandon(slot);
        let free = second.free_slots();
        assert_eq!((w.used_slots(), free), (0, SLOTS as usize), "stopped at point {k}: slots lost");
        if finished {
            break;
        }
        k += 1;
    }
    assert!(k >= 2, "reclaiming has points ({k})");
}

/// A stream with no subscriber sends only to its history: a writer stopped
/// at any point of such a send leaves the frame kept once or not at all
/// (its number then reused), never a slot held outside the history.
#[test]
fn a_writer_stopped_while_only_the_history_takes_a_frame_keeps_it_once() {
    for recovery in [Recovery::NextPublisher, Recovery::Owner] {
        let mut k = 0;
        loop {
            let mut w = World::new(2);
            for s in 0..4 {
                w.owner.remove(s).unwrap();
            }
            w.subs.clear();
            let mut first = w.publisher(100);
            send(&mut first);
            send(&mut first);
            hook::arm(k);
            let finished = hook::run(|| send(&mut first)).is_some();
            hook::disarm();
            if finished {
                drop(first);
            } else {
                std::mem::forget(first);
                match recovery {
                    Recovery::Owner => w.owner.publisher_gone(),
                    _ => w.stream.header().control.writer.store(WRITER_NONE, Relaxed),
                }
            }
            let label = format!("stopped at point {k} ({}), {recovery:?}", hook::last());
            let mut second = w.publisher(200);
            let n = second.next_seq();
            assert!(n == 2 || n == 3, "{label}: next seq {n}");
            assert_eq!(w.history(), vec![n - 2, n - 1], "{label}");
            for _ in 0..2 * SLOTS {
                send(&mut second);
            }
            let n = second.next_seq();
            assert_eq!(w.history(), vec![n - 2, n - 1], "{label}");
            assert_eq!((w.used_slots(), second.free_slots()), (2, SLOTS as usize - 2), "{label}: slots lost");
            if finished {
                break;
            }
            k += 1;
        }
        assert!(k > 4, "a history-only send has points ({k})");
    }
}

/// One subscriber joins a stream with a history of 2 after frames 0..3:
/// the writer that hands it the history (publisher or owner) is stopped
/// at any point of it. Whoever recovers — the next publisher, the owner,
/// or the next publisher after the joiner took what it could — finishes
/// the hand-over: the joiner gets frames 1 and 2 as history, then the live
/// ones, nothing twice, and no slot is lost.
#[test]
fn a_writer_stopped_at_any_point_of_a_hand_over_duplicates_nothing() {
    #[derive(Debug, Clone, Copy)]
    enum By {
        Publisher,
        Owner,
    }
    let mut failures = Vec::new();
    for (by, recovery) in [
        (By::Publisher, Recovery::NextPublisher),
        (By::Publisher, Recovery::Owner),
        (By::Publisher, Recovery::NextPublisherAfterReads),
        (By::Owner, Recovery::NextPublisher),
        (By::Owner, Recovery::NextPublisherAfterReads),
    ] {
        for policy in [OverflowPolicy::Lossless, OverflowPolicy::KeepLatest, OverflowPolicy::DropNewest] {
            let mut k = 0;
            loop {
                let result = std::panic::catch_unwind(|| hand_over(by_publisher(by), k, recovery, policy));
                match result {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(payload) => failures.push(message(payload)),
                }
                k += 1;
                assert!(k < 200, "the hand-over never finished");
            }
            assert!(k >= 6, "a hand-over of two frames has points ({k}, {by:?})");
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));

    fn by_publisher(by: By) -> bool {
        matches!(by, By::Publisher)
    }
}

/// One run of the test above; returns whether the hand-over finished
/// without reaching point `k`.
fn hand_over(by_publisher: bool, k: u32, recovery: Recovery, policy: OverflowPolicy) -> bool {
    let mut w = World::new(2);
    // Index 3 leaves: the joiner takes it.
    w.owner.remove(3).unwrap();
    w.subs.truncate(3);
    let mut first = w.publisher(100);
    for _ in 0..3 {
        send(&mut first);
        w.take_all();
    }
    let opts = SubscriberOptions { credits: 3, policy, wait: WaitStrategy::Park, ..SubscriberOptions::default() };
    let backoff = Backoff { spin: Duration::ZERO, park: true };
    let (finished, ticket) = if by_publisher {
        let ticket = w.owner.add(&opts, 1).unwrap();
        hook::arm(k);
        let finished = hook::run(|| first.loan().map(|slot| first.abandon(slot))).is_some();
        hook::disarm();
        (finished, ticket)
    } else {
        drop(first);
        hook::arm(k);
        let added = hook::run(|| w.owner.add(&opts, 1).unwrap());
        let pending = hook::disarm();
        if added.is_none() {
            // The owner "died" holding the role, with `dirty` set: its
            // successor (here a publisher) repairs.
            w.stream.header().control.writer.store(WRITER_NONE, Relaxed);
        }
        first = PubCore::attach(w.stream.clone(), w.channels.clone(), 1).unwrap();
        match added {
            Some(ticket) => (pending, ticket),
            None => {
                // The ticket the owner would have replied with.
                let s = 3;
                let generation = w.stream.record(s).config.generation.load(Relaxed);
                (false, super::owner::SubscriberTicket { index: 3, generation, wait: WaitStrategy::Park })
            }
        }
    };
    let s = ticket.index as usize;
    let core = SubCore::attach(w.stream.clone(), w.channels[s].clone(), s, ticket.generation, backoff).unwrap();
    w.subs.push(Sub { core, policy, got: Vec::new(), history: Vec::new() });
    let label = format!("{policy:?}, stopped at point {k} ({}), recovered by {recovery:?}", hook::last());
    let mut second = if by_publisher && !finished {
        std::mem::forget(first);
        match recovery {
            Recovery::Owner => w.owner.publisher_gone(),
            Recovery::NextPublisher => w.stream.header().control.writer.store(WRITER_NONE, Relaxed),
            Recovery::NextPublisherAfterReads => {
                w.take_all();
                w.stream.header().control.writer.store(WRITER_NONE, Relaxed);
            }
        }
        w.publisher(200)
    } else {
        if matches!(recovery, Recovery::NextPublisherAfterReads) {
            w.take_all();
        }
        first
    };
    for _ in 0..SLOTS {
        send(&mut second);
        w.take_all();
    }
    let joiner = &w.subs[3];
    let n = second.next_seq();
    assert_eq!(joiner.history, vec![1, 2], "{label}: history got {:?}", joiner.got);
    assert_eq!(joiner.got, (1..n).collect::<Vec<_>>(), "{label}");
    assert!(second.loan().is_ok_and(|slot| {
        second.abandon(slot);
        true
    }));
    let free = second.free_slots();
    assert_eq!((w.used_slots(), free), (2, SLOTS as usize - 2), "{label}: slots lost");
    finished
}
