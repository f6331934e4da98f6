//! Exhaustive model checks of the publisher, subscriber and owner
//! algorithms under loom (`RUSTFLAGS="--cfg loom" cargo test -p
//! memsock-proto --release --lib loom`).
//!
//! Each model runs the production code on heap memory with loom's atomics.
//! Slot payloads live in loom `UnsafeCell`s: if the algorithm ever let the
//! publisher write a slot that a subscriber may still read (or the reverse)
//! without a happens-before edge, loom reports the race. A lost wake-up
//! shows as a deadlock, because the futex model ignores timeouts.

use std::sync::Arc;

use loom::cell::UnsafeCell;

use super::mem::StreamMem;
use super::mem::heap::{HeapChannel, HeapStream};
use super::owner::{EndProgress, OwnerCore, SubscriberOptions};
use super::publisher::{CommitRefusal, PubCore};
use super::subscriber::{RecvError, SubCore};
use super::wait::Backoff;
use crate::primitive::Ordering::Relaxed;
use crate::shm::layout::{Geometry, OverflowPolicy, WaitStrategy};

/// One payload word per slot.
struct Payload(Vec<UnsafeCell<u64>>);

// SAFETY: access is what is being checked: loom tracks every `with`/
// `with_mut` and fails the model on an unsynchronised pair.
unsafe impl Sync for Payload {}

const PARK: Backoff = Backoff { spin: std::time::Duration::ZERO, park: true };

type Owner = OwnerCore<Arc<HeapStream>, Arc<HeapChannel>>;

fn setup(
    slot_count: u32,
    queue_capacity: u32,
    subs: &[(u32, OverflowPolicy)],
) -> (Owner, Vec<(usize, u64)>, Arc<Payload>) {
    let g = Geometry { slot_size: 8, slot_count, max_subscribers: subs.len() as u32, queue_capacity, history: 0 };
    let stream = Arc::new(HeapStream::new(g));
    let channels: Vec<_> = (0..g.max_subscribers).map(|i| Arc::new(HeapChannel::new(i, queue_capacity))).collect();
    let mut owner = OwnerCore::new(stream, channels);
    let tickets = subs
        .iter()
        .map(|&(credits, policy)| {
            let t = owner
                .add(
                    &SubscriberOptions { credits, policy, wait: WaitStrategy::Park, ..SubscriberOptions::default() },
                    1,
                )
                .unwrap();
            (t.index as usize, t.generation)
        })
        .collect();
    let payload = Arc::new(Payload((0..slot_count).map(|_| UnsafeCell::new(0)).collect()));
    (owner, tickets, payload)
}

/// Channel file `index` of a model's owner (each index has one from the start).
fn channel_of(owner: &Owner, index: usize) -> Arc<HeapChannel> {
    owner.channels()[index].as_ref().expect("created up front").map.clone()
}

fn publisher(owner: &Owner) -> PubCore<Arc<HeapStream>, Arc<HeapChannel>> {
    PubCore::attach(owner.stream().clone(), (0..owner.channels().len()).map(|i| channel_of(owner, i)).collect(), 1)
        .unwrap()
}

/// Sends `frames` frames (waiting for lossless room), detaches, then closes.
/// (The publisher attaches before the threads start: attaching while a
/// subscriber looks is the subject of its own model.)
fn publish_then_close(mut owner: Owner, p: Pub, payload: Arc<Payload>, frames: u64) {
    publish(p, &payload, frames);
    owner.close();
}

type Pub = PubCore<Arc<HeapStream>, Arc<HeapChannel>>;

/// Sends `frames` frames (waiting for lossless room) and detaches.
fn publish(mut p: Pub, payload: &Payload, frames: u64) {
    for seq in 0..frames {
        let slot = p.loan().expect("pool never runs dry");
        payload.0[slot as usize].with_mut(|v| unsafe_write(v, seq));
        loop {
            match p.commit(slot, 1, 0) {
                Ok(info) => {
                    assert_eq!(info.seq, seq);
                    break;
                }
                Err(CommitRefusal::WouldBlock { subscriber }) => {
                    assert!(p.wait_for_room(subscriber as usize, PARK, None));
                }
                Err(refusal) => panic!("{refusal:?}"),
            }
        }
    }
}

/// Tries `frames` sends (waiting for lossless room) until one is refused
/// as closed; returns how many succeeded.
fn send_until_closed(p: &mut Pub, payload: &Payload, frames: u64) -> usize {
    let mut sent = 0;
    for _ in 0..frames {
        let Ok(slot) = p.loan() else { break };
        payload.0[slot as usize].with_mut(|v| unsafe_write(v, p.next_seq()));
        match p.commit(slot, 1, 0) {
            Ok(_) => sent += 1,
            Err(CommitRefusal::WouldBlock { subscriber }) => {
                p.abandon(slot);
                if !p.wait_for_room(subscriber as usize, PARK, None) {
                    break;
                }
            }
            Err(_) => {
                p.abandon(slot);
                break;
            }
        }
    }
    sent
}

fn unsafe_write(v: *mut u64, value: u64) {
    // SAFETY: loom checks that this write is ordered after every read of
    // the slot's previous frame; the pointer comes from `with_mut`.
    unsafe { *v = value }
}

/// Receives until the stream closes; returns the sequence numbers seen.
fn receive_all(
    owner_stream: Arc<HeapStream>,
    channel: Arc<HeapChannel>,
    (index, generation): (usize, u64),
    payload: Arc<Payload>,
) -> Vec<u64> {
    let sub = SubCore::attach(owner_stream, channel, index, generation, PARK).unwrap();
    let mut seen = Vec::new();
    loop {
        match sub.take(None) {
            Ok(info) => {
                // SAFETY: loom checks this read against the publisher's writes.
                let value = payload.0[info.slot as usize].with(|v| unsafe { *v });
                assert_eq!(value, info.seq, "payload of slot {} was overwritten", info.slot);
                seen.push(info.seq);
                sub.return_slot(info.slot);
            }
            Err(RecvError::Closed) => return seen,
            // The publisher leaves before the owner closes.
            Err(RecvError::PublisherGone) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

#[test]
fn loom_lossless_delivers_everything_and_parks_both_ways() {
    model(|| {
        let (owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let (stream, channel) = (owner.stream().clone(), channel_of(&owner, 0));
        let p = payload.clone();
        let publ = publisher(&owner);
        let t = loom::thread::spawn(move || publish_then_close(owner, publ, p, 3));
        let seen = receive_all(stream, channel, tickets[0], payload);
        t.join().unwrap();
        assert_eq!(seen, [0, 1, 2]);
    });
}

#[test]
fn loom_drop_newest_never_reuses_a_held_slot() {
    model(|| {
        let (owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::DropNewest)]);
        let (stream, channel) = (owner.stream().clone(), channel_of(&owner, 0));
        let p = payload.clone();
        let publ = publisher(&owner);
        let t = loom::thread::spawn(move || publish_then_close(owner, publ, p, 3));
        let seen = receive_all(stream, channel, tickets[0], payload);
        t.join().unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    });
}

#[test]
fn loom_keep_latest_eviction_races_the_subscriber() {
    model(|| {
        let (owner, tickets, payload) = setup(3, 2, &[(2, OverflowPolicy::KeepLatest)]);
        let (stream, channel) = (owner.stream().clone(), channel_of(&owner, 0));
        let s2 = stream.clone();
        let p = payload.clone();
        let publ = publisher(&owner);
        let t = loom::thread::spawn(move || publish_then_close(owner, publ, p, 3));
        let seen = receive_all(stream, channel, tickets[0], payload);
        t.join().unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        // The newest frame is never the one evicted.
        assert_eq!(seen.last(), Some(&2));
        let c = &s2.record(0).counters;
        assert_eq!(seen.len() as u64 + c.dropped.load(Relaxed), 3);
    });
}

#[test]
fn loom_detach_during_sends_reclaims_every_slot() {
    model(|| {
        let (mut owner, tickets, _payload) = setup(3, 2, &[(2, OverflowPolicy::DropNewest)]);
        let mut p = publisher(&owner);
        let t = loom::thread::spawn(move || {
            for _ in 0..2 {
                let slot = p.loan().unwrap();
                p.commit(slot, 1, 0).unwrap();
            }
            // Dropping the publisher finishes any detach it was asked for.
        });
        owner.remove(tickets[0].0 as u32).unwrap();
        t.join().unwrap();
        owner.reclaim_detached();
        let s = owner.stream();
        for slot in 0..3 {
            assert_eq!(s.mask(slot)[0].load(Relaxed), 0, "slot {slot} leaked");
        }
        assert_eq!(owner.stats(0).free_slots, 3);
    });
}

#[test]
fn loom_removing_a_full_lossless_subscriber_wakes_the_publisher() {
    model(|| {
        let (mut owner, tickets, _payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let mut p = publisher(&owner);
        let t = loom::thread::spawn(move || {
            for _ in 0..2 {
                let slot = p.loan().unwrap();
                // The second frame blocks until the subscriber is removed;
                // a lost wake-up would leave this thread asleep for ever.
                while let Err(CommitRefusal::WouldBlock { subscriber }) = p.commit(slot, 1, 0) {
                    assert!(p.wait_for_room(subscriber as usize, PARK, None));
                }
            }
        });
        owner.remove(tickets[0].0 as u32).unwrap();
        t.join().unwrap();
        owner.reclaim_detached();
        assert_eq!(owner.stats(0).free_slots, 2);
    });
}

#[test]
fn loom_close_racing_sends_loses_no_sent_frame() {
    model(|| {
        let (mut owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let (stream, channel) = (owner.stream().clone(), channel_of(&owner, 0));
        let mut p = publisher(&owner);
        let written = payload.clone();
        let sender = loom::thread::spawn(move || send_until_closed(&mut p, &written, 2));
        let receiver = loom::thread::spawn(move || receive_all(stream, channel, tickets[0], payload).len());
        owner.close();
        let sent = sender.join().unwrap();
        // Every frame whose send succeeded arrives before `Closed`.
        assert_eq!(receiver.join().unwrap(), sent);
    });
}

/// The close grace is over with the publisher alive: the owner ends the
/// close for the subscribers (a system-wide barrier between its mark and
/// its look) while the publisher sends. Every frame whose send succeeded
/// arrives before `Closed`, and the role is never taken from the publisher.
#[test]
fn loom_ending_a_close_under_a_live_publisher_loses_no_sent_frame() {
    model(|| {
        let (mut owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let (stream, channel) = (owner.stream().clone(), channel_of(&owner, 0));
        let mut p = publisher(&owner);
        let written = payload.clone();
        let sender = loom::thread::spawn(move || {
            let sent = send_until_closed(&mut p, &written, 2);
            // Still attached: the owner must not have taken the role.
            (sent, p)
        });
        let receiver = loom::thread::spawn(move || receive_all(stream, channel, tickets[0], payload).len());
        owner.close();
        let mut barrier = None;
        loop {
            match owner.end_for_subscribers(barrier) {
                EndProgress::Ended => break,
                EndProgress::NeedsBarrier => barrier = Some(crate::primitive::system_barrier()),
                EndProgress::Delivering => loom::thread::yield_now(),
                EndProgress::Open => unreachable!("closed above"),
            }
        }
        let (sent, p) = sender.join().unwrap();
        assert_eq!(receiver.join().unwrap(), sent);
        assert_eq!(owner.stream().header().control.writer.load(Relaxed), crate::shm::layout::WRITER_PUBLISHER);
        drop(p);
    });
}

#[test]
fn loom_publisher_gone_comes_after_its_frames_and_wakes_the_subscriber() {
    model(|| {
        let (owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let (index, generation) = tickets[0];
        let sub = SubCore::attach(owner.stream().clone(), channel_of(&owner, 0), index, generation, PARK).unwrap();
        let p = payload.clone();
        // The publisher may come and go before the subscriber first looks:
        // the departure is still reported, after both frames. A lost
        // wake-up shows as a deadlock.
        let t = loom::thread::spawn(move || publish(publisher(&owner), &p, 2));
        let mut seen = Vec::new();
        loop {
            match sub.take(None) {
                Ok(info) => {
                    // SAFETY: loom checks this read against the publisher's writes.
                    let value = payload.0[info.slot as usize].with(|v| unsafe { *v });
                    assert_eq!(value, info.seq);
                    seen.push(info.seq);
                    sub.return_slot(info.slot);
                }
                Err(RecvError::PublisherGone) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        t.join().unwrap();
        assert_eq!(seen, [0, 1]);
    });
}

#[test]
fn loom_a_sample_released_on_another_thread_goes_back_and_wakes_the_watcher() {
    model(|| {
        let (owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let (index, generation) = tickets[0];
        // Attached after the publisher, the subscriber has no change of
        // publisher to learn of while its credits are used up.
        let publ = publisher(&owner);
        let sub = SubCore::attach(owner.stream().clone(), channel_of(&owner, 0), index, generation, PARK).unwrap();
        let watcher = sub.watcher();
        let p = payload.clone();
        let t = loom::thread::spawn(move || {
            publish(publ, &p, 2);
            drop(owner);
        });
        let first = sub.take(None).unwrap();
        // Detached: another thread reads the frame and lets it go. Its
        // reads must happen before the publisher reuses the slot, and
        // the subscriber, asleep meanwhile, must learn of the release: the
        // lossless publisher cannot send frame 1 until the slot is back.
        let board = sub.board().clone();
        let p = payload.clone();
        let releaser = loom::thread::spawn(move || {
            // SAFETY: loom checks this read against the publisher's writes.
            let value = p.0[first.slot as usize].with(|v| unsafe { *v });
            assert_eq!(value, 0);
            board.post(first.slot);
        });
        let mut from = sub.position();
        let second = loop {
            match sub.try_take() {
                Ok(info) => break info,
                Err(
                    super::subscriber::TryRecvError::Empty | super::subscriber::TryRecvError::CreditsExhausted { .. },
                ) => {}
                Err(e) => panic!("{e:?}"),
            }
            assert!(watcher.watch(from, None, || false));
            from = sub.position();
        };
        // SAFETY: loom checks this read against the publisher's writes.
        let value = payload.0[second.slot as usize].with(|v| unsafe { *v });
        assert_eq!((second.seq, value), (1, 1));
        sub.return_slot(second.slot);
        releaser.join().unwrap();
        t.join().unwrap();
    });
}

/// However the close, its grace (the owner declaring the idle publisher
/// gone) and the subscriber's receive interleave, a subscriber of a closed
/// stream sees its frames and then the end, never a departure.
#[test]
fn loom_a_close_of_an_idle_publisher_ends_the_stream_without_a_departure() {
    model(|| {
        let (mut owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let (index, generation) = tickets[0];
        let mut idle = publisher(&owner);
        let slot = idle.loan().unwrap();
        payload.0[slot as usize].with_mut(|v| unsafe_write(v, 0));
        idle.commit(slot, 1, 0).unwrap();
        let sub = SubCore::attach(owner.stream().clone(), channel_of(&owner, 0), index, generation, PARK).unwrap();
        let closer = loom::thread::spawn(move || {
            owner.close();
            owner.publisher_gone();
            drop(idle);
        });
        let mut seen = Vec::new();
        loop {
            match sub.take(None) {
                Ok(info) => {
                    seen.push(info.seq);
                    sub.return_slot(info.slot);
                }
                Err(RecvError::Closed) => break,
                Err(e) => panic!("{e:?} before the end"),
            }
        }
        closer.join().unwrap();
        assert_eq!(seen, [0]);
    });
}

/// A watcher and a blocking receive wait on one subscriber's wake word at
/// once; the watcher leaves first (its `stop` holds). The frame sent after
/// must still wake the receive: a waiter that leaves never clears the word
/// another may be asleep on.
#[test]
fn loom_two_waiters_on_one_subscriber_lose_no_wake_up() {
    model(|| {
        let (owner, tickets, payload) = setup(2, 1, &[(1, OverflowPolicy::Lossless)]);
        let (index, generation) = tickets[0];
        let publ = publisher(&owner);
        let sub = SubCore::attach(owner.stream().clone(), channel_of(&owner, 0), index, generation, PARK).unwrap();
        let watcher = sub.watcher();
        let from = sub.position();
        let w = loom::thread::spawn(move || {
            // Not done on its first look, done on its second: it announces
            // itself, then leaves without sleeping.
            let looks = std::cell::Cell::new(0);
            watcher.watch(from, None, || {
                looks.set(looks.get() + 1);
                looks.get() > 1
            });
        });
        let p = payload.clone();
        let t = loom::thread::spawn(move || publish(publ, &p, 1));
        let info = sub.take(None).unwrap();
        assert_eq!(info.seq, 0);
        sub.return_slot(info.slot);
        w.join().unwrap();
        t.join().unwrap();
        drop(owner);
    });
}

/// A subscriber admitted while the publisher streams, with a channel file
/// of its own created at admission: the owner hands the channel to the
/// publisher's inbox, then activates the subscriber, which attaches and
/// receives. The publisher picks the channel up only when it sees the
/// table change, and delivers to the subscriber only with it: every frame
/// the subscriber gets is intact, in order, and it sees the end.
#[test]
fn loom_a_subscriber_admitted_mid_stream_gets_its_channel_through_the_inbox() {
    use super::publisher::{Chan, Inbox};
    model(|| {
        let g = Geometry { slot_size: 8, slot_count: 4, max_subscribers: 1, queue_capacity: 2, history: 0 };
        let stream = Arc::new(HeapStream::new(g));
        let mut owner: Owner = OwnerCore::sparse(stream.clone());
        let inbox: Arc<Inbox<Arc<HeapChannel>>> = Arc::default();
        let p = PubCore::attach_with(stream.clone(), vec![None], Some(inbox.clone()), 1).unwrap();
        let payload = Arc::new(Payload((0..4).map(|_| UnsafeCell::new(0)).collect()));
        let publisher = {
            let payload = payload.clone();
            loom::thread::spawn(move || {
                let mut p = p;
                let sent = send_until_closed(&mut p, &payload, 2);
                drop(p);
                sent
            })
        };
        let opts = SubscriberOptions {
            credits: 2,
            policy: OverflowPolicy::Lossless,
            wait: WaitStrategy::Park,
            ..SubscriberOptions::default()
        };
        let r = owner.reserve(&opts, 1).unwrap();
        let channel = Arc::new(HeapChannel::new(r.index, 2));
        owner.install(r.index, channel.clone());
        inbox.push(r.index, Chan { generation: Some(r.generation), map: channel.clone() });
        let t = owner.activate(r.index).unwrap();
        let subscriber =
            loom::thread::spawn(move || receive_all(stream, channel, (t.index as usize, t.generation), payload));
        let sent = publisher.join().unwrap();
        owner.close();
        let seen = subscriber.join().unwrap();
        assert!(seen.len() <= sent, "{seen:?} of {sent}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
    });
}

/// A joiner admitted while the publisher sends, to a stream with a history
/// of 1 that already holds frame 0: whichever writer hands it the history
/// (the publisher at its next send or as it leaves, or the owner once it
/// has left), the joiner gets one history frame, then the live ones, with
/// no gap and no duplicate — and loom checks that no history slot it reads
/// is rewritten under it.
#[test]
fn loom_history_hand_over_has_no_gap_and_no_duplicate() {
    use super::publisher::{Chan, Inbox};
    model(|| {
        let g = Geometry { slot_size: 8, slot_count: 4, max_subscribers: 1, queue_capacity: 2, history: 1 };
        let stream = Arc::new(HeapStream::new(g));
        let mut owner: Owner = OwnerCore::sparse(stream.clone());
        let inbox: Arc<Inbox<Arc<HeapChannel>>> = Arc::default();
        let mut p = PubCore::attach_with(stream.clone(), vec![None], Some(inbox.clone()), 1).unwrap();
        let payload = Arc::new(Payload((0..4).map(|_| UnsafeCell::new(0)).collect()));
        assert_eq!(send_until_closed(&mut p, &payload, 1), 1);
        let publisher = {
            let payload = payload.clone();
            loom::thread::spawn(move || {
                let mut p = p;
                let sent = send_until_closed(&mut p, &payload, 1);
                drop(p);
                sent
            })
        };
        let opts = SubscriberOptions {
            credits: 2,
            policy: OverflowPolicy::DropNewest,
            wait: WaitStrategy::Park,
            ..SubscriberOptions::default()
        };
        let r = owner.reserve(&opts, 1).unwrap();
        let channel = Arc::new(HeapChannel::new(r.index, 2));
        owner.install(r.index, channel.clone());
        inbox.push(r.index, Chan { generation: Some(r.generation), map: channel.clone() });
        let t = owner.activate(r.index).unwrap();
        let subscriber = loom::thread::spawn(move || {
            let sub = SubCore::attach(stream, channel, t.index as usize, t.generation, PARK).unwrap();
            let mut seen = Vec::new();
            loop {
                match sub.take(None) {
                    Ok(info) => {
                        // SAFETY: loom checks this read against the publisher's writes.
                        let value = payload.0[info.slot as usize].with(|v| unsafe { *v });
                        assert_eq!(value, info.seq, "payload of slot {} was overwritten", info.slot);
                        seen.push((info.seq, info.history));
                        sub.return_slot(info.slot);
                    }
                    Err(RecvError::Closed) => return seen,
                    Err(RecvError::PublisherGone | RecvError::PublisherBack) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
        });
        let sent = publisher.join().unwrap() as u64 + 1;
        owner.close();
        let seen = subscriber.join().unwrap();
        assert!(!seen.is_empty() && seen[0].1, "history first: {seen:?}");
        assert!(seen[1..].iter().all(|&(_, h)| !h), "then live frames: {seen:?}");
        let seqs: Vec<u64> = seen.iter().map(|&(seq, _)| seq).collect();
        assert_eq!(seqs, (seqs[0]..sent).collect::<Vec<_>>(), "no gap, no duplicate");
    });
}

/// The idle publisher's service (`Served`): a requester on another thread
/// asks for work on the value while its owner uses it. Loom checks that
/// the two never touch the value at once (its `UnsafeCell`), and that the
/// request is served exactly once — by the requester, or by the owner as
/// its use begins or ends — without a further use by the owner.
#[test]
fn loom_a_request_to_serve_is_done_once_and_never_beside_the_owner() {
    use super::served::Served;
    model(|| {
        let served = Arc::new(Served::new((0u32, 0u32)));
        let requester = {
            let served = served.clone();
            loom::thread::spawn(move || {
                served.request(|v| v.1 += 1);
            })
        };
        // SAFETY: this thread is the owner.
        unsafe { served.enter(|v| v.1 += 1, |v| v.0 += 1) };
        requester.join().unwrap();
        // SAFETY: the requester is done: no other thread touches it.
        let (uses, serves) = unsafe { served.enter(|_| unreachable!("served already"), |v| *v) };
        assert_eq!((uses, serves), (1, 1));
    });
}

/// (Found by the review.) What prompted a request must be visible to
/// whoever serves it. The requester learns of a change (`prompt`), then
/// asks, `requests` times; once both sides are done and the owner is idle,
/// the last serve must have seen the newest prompt. (With two, the second
/// may find the first's WANTED still pending and return at once.)
fn a_serve_sees_what_prompted_it(requests: u32) {
    use super::served::Served;
    use crate::primitive::AtomicU32;
    use crate::primitive::Ordering::{Acquire, Release};
    model(move || {
        let served = Arc::new(Served::new(0u32));
        let prompt = Arc::new(AtomicU32::new(0));
        let requester = {
            let (served, prompt) = (served.clone(), prompt.clone());
            loom::thread::spawn(move || {
                for k in 1..=requests {
                    prompt.store(k, Release);
                    served.request(|v| *v = (*v).max(prompt.load(Acquire)));
                }
            })
        };
        let p = prompt.clone();
        // SAFETY: this thread is the owner.
        unsafe { served.enter(move |v| *v = (*v).max(p.load(Acquire)), |_| ()) };
        requester.join().unwrap();
        // SAFETY: the requester is done.
        let seen = unsafe { served.enter(|_| panic!("a request still pending while the owner is idle"), |v| *v) };
        assert_eq!(seen, requests, "the last serve missed the change that prompted the last request");
    });
}

#[test]
fn loom_one_request_sees_its_prompt() {
    a_serve_sees_what_prompted_it(1);
}

#[test]
fn loom_a_second_request_finding_wanted_is_not_lost() {
    a_serve_sees_what_prompted_it(2);
}

/// (Found by the second review: it failed before requesters took a
/// mutex.) `Served::request` may be called from any thread, from safe code
/// (`ChannelInbox` is `pub` and `Clone`, `serve(&self)`). With two
/// requesters: R1 sets WANTED, passes its barrier and reads `in_call == 0`;
/// the owner enters, takes R1's WANTED (-> IDLE) and works on the value;
/// R2 sets WANTED again (and leaves it to the owner: `in_call` is 1); R1's
/// CAS WANTED -> RUNNING now succeeds on R2's WANTED, and R1 serves while
/// the owner is inside its use. A plain interleaving (two preemptions), no
/// weak memory needed. To keep the model small the owner's use waits for
/// both requesters (as a long use would); the value must not change under
/// the owner's `&mut`.
#[test]
fn loom_two_requesters_never_serve_beside_the_owner() {
    use super::served::Served;
    model(|| {
        let served = Arc::new(Served::new(0u32));
        let r1 = {
            let served = served.clone();
            loom::thread::spawn(move || {
                served.request(|v| *v += 1);
            })
        };
        let s2 = served.clone();
        // SAFETY: this thread is the owner.
        unsafe {
            served.enter(
                |v| *v += 1,
                move |v| {
                    let before = *v;
                    let r2 = loom::thread::spawn(move || {
                        s2.request(|v| *v += 1);
                    });
                    r2.join().unwrap();
                    r1.join().unwrap();
                    assert_eq!(*v, before, "a requester served while the owner was inside its use");
                },
            )
        };
    });
}
