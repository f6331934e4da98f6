//! Step-k crash tests: a writer is stopped after each point `k` of a send
//! that evicts, delivers, drops and reads returns (see [`super::crash`]),
//! as a `kill -9` would stop it; recovery and a new writer follow, and
//! every subscriber must then get each frame at most once, keep all its
//! credits, and no slot may be lost.

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
use crate::primitive::Ordering::Relaxed;
use crate::shm::layout::{Geometry, HEAD_CLAIMED, OverflowPolicy, WRITER_NONE, WaitStrategy};

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
    fn new() -> Self {
        let g = Geometry { slot_size: 8, slot_count: SLOTS, max_subscribers: 4, queue_capacity: 4 };
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
            let t = owner.add(&SubscriberOptions { credits, policy, wait: WaitStrategy::Park }, 1).unwrap();
            let s = t.index as usize;
            let backoff = Backoff { spin: Duration::ZERO, park: true };
            let core = SubCore::attach(stream.clone(), channels[s].clone(), s, t.generation, backoff).unwrap();
            subs.push(Sub { core, policy, got: Vec::new() });
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

    /// Slots some subscriber holds, by the masks.
    fn used_slots(&self) -> usize {
        (0..SLOTS).filter(|&x| self.stream.mask(x).iter().any(|w| w.load(Relaxed) != 0)).count()
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
fn run(k: u32, recovery: Recovery, j: Option<u32>) -> (bool, bool) {
    let mut w = World::new();
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
    let label = format!("stopped at point {k} ({at}), recovered by {recovery:?}, take-over stopped at {j:?}");
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
    assert_eq!((w.used_slots(), free), (0, SLOTS as usize), "{label}: slots lost");
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
    for recovery in [Recovery::NextPublisher, Recovery::Owner, Recovery::NextPublisherAfterReads] {
        let mut k = 0;
        loop {
            runs += 1;
            match std::panic::catch_unwind(|| run(k, recovery, None)) {
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
    let mut failures = Vec::new();
    let mut k = 0;
    loop {
        let mut j = 0;
        let first_finished = loop {
            match std::panic::catch_unwind(|| run(k, Recovery::NextPublisher, Some(j))) {
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
    let mut w = World::new();
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
        let mut w = World::new();
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
