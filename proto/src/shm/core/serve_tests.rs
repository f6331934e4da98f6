//! The idle publisher's service (`PubCore::serve`) run between two of the
//! owner's core calls. (Found by the second review: it failed before
//! `wait_for_room` retried for a subscriber no longer lossless.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mem::heap::{HeapChannel, HeapStream};
use super::owner::{OwnerCore, SubscriberOptions};
use super::publisher::{CommitRefusal, PubCore};
use super::wait::Backoff;
use crate::shm::layout::{Geometry, OverflowPolicy, WaitStrategy};

type Stream = Arc<HeapStream>;
type Channel = Arc<HeapChannel>;

/// `SampleMut::wait_and_send` (and `send_parked_timeout`) refuse at
/// `commit` (WouldBlock { s }), then call `wait_for_room(s)` in a second
/// core call. Serves may run between the two (at the end of the refused
/// commit, by the connection thread, at the start of the wait). Two of
/// them can reclaim the lossless subscriber at `s` *and* attach a new
/// subscriber at the same index; the guard added for finding 1 (`!active
/// || no channel`) does not see it, and the publisher then waits for room
/// in a newcomer that never blocks a send (here: DropNewest, its credits
/// filled by the history hand-over) — until the deadline, i.e. a spurious
/// `SendError::Timeout` or a stall as long as the caller's timeout.
#[test]
fn a_wait_for_room_after_the_index_was_reused_does_not_wait_on_the_newcomer() {
    let g = Geometry { slot_size: 8, slot_count: 12, max_subscribers: 1, queue_capacity: 4, history: 2 };
    let stream = Arc::new(HeapStream::new(g));
    let channels: Vec<_> = (0..1).map(|i| Arc::new(HeapChannel::new(i, 4))).collect();
    let mut owner = OwnerCore::new(stream.clone(), channels.clone());
    let lossless =
        SubscriberOptions { credits: 2, policy: OverflowPolicy::Lossless, wait: WaitStrategy::Park, history: 0 };
    let a = owner.add(&lossless, 0).unwrap();
    assert_eq!(a.index, 0);
    let mut p: PubCore<Stream, Channel> = PubCore::attach(stream.clone(), channels.clone(), 2).unwrap();
    for _ in 0..2 {
        let slot = p.loan().unwrap();
        p.commit(slot, 1, 7).unwrap();
    }
    // A holds its two credits and reads nothing: the next send is refused.
    let slot = p.loan().unwrap();
    assert!(matches!(p.commit(slot, 1, 7), Err(CommitRefusal::WouldBlock { subscriber: 0 })));

    // Between the refusal and the wait: A leaves, a serve reclaims index 0,
    // a drop-newest joiner takes it, a serve (the broker's Event::Serve)
    // hands it the history (two frames: its two credits).
    owner.remove(0).unwrap();
    p.serve();
    let joiner = SubscriberOptions {
        credits: 2,
        policy: OverflowPolicy::DropNewest,
        wait: WaitStrategy::Park,
        history: u32::MAX,
    };
    let b = owner.add(&joiner, 0).unwrap();
    assert_eq!(b.index, 0, "the index is reused");
    p.serve();

    // The send's wait for room in "subscriber 0".
    let t0 = Instant::now();
    let roomy = p.wait_for_room(0, Backoff { spin: Duration::ZERO, park: true }, Some(t0 + Duration::from_millis(500)));
    let waited = t0.elapsed();
    // Nothing blocks a send now:
    let sent = p.commit(slot, 1, 7);
    assert!(sent.is_ok(), "{sent:?}");
    assert!(
        roomy && waited < Duration::from_millis(100),
        "wait_for_room(0) waited {waited:?} and returned {roomy} (false: the send reports Timeout) for a \
         DropNewest newcomer at the reused index, though the commit right after succeeds"
    );
}
