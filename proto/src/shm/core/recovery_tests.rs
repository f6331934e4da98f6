//! Recovery after a writer's death, against what subscribers may do before
//! it runs: the cases an independent review of the step-k design found
//! (each failed before its fix; see the closing notes of issue 9).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::crash::hook;
use super::mem::heap::{HeapChannel, HeapStream};
use super::mem::{ChannelMem, StreamMem};
use super::owner::SubscriberOptions;
use super::owner::{EndProgress, OwnerCore};
use super::publisher::LoanError;
use super::publisher::{CommitRefusal, PubCore};
use super::subscriber::SubCore;
use super::subscriber::{RecvError, TryRecvError};
use super::wait::Backoff;
use crate::primitive::Ordering::Relaxed;
use crate::shm::layout::{Geometry, HEAD_CLAIMED, OverflowPolicy, WRITER_NONE, WRITER_PUBLISHER, WaitStrategy};

type Stream = Arc<HeapStream>;
type Channel = Arc<HeapChannel>;

const SLOTS: u32 = 8;

/// A stream, its channels, its owner and one subscriber per index.
type World = (Stream, Vec<Channel>, OwnerCore<Stream, Channel>, Vec<SubCore<Stream, Channel>>);
const PARK: Backoff = Backoff { spin: Duration::ZERO, park: true };

fn world(subs: &[(u32, OverflowPolicy)]) -> World {
    let n = subs.len() as u32;
    let g = Geometry { slot_size: 8, slot_count: SLOTS, max_subscribers: n, queue_capacity: 4, history: 0 };
    let stream = Arc::new(HeapStream::new(g));
    let channels: Vec<_> = (0..n).map(|i| Arc::new(HeapChannel::new(i, 4))).collect();
    let mut owner = OwnerCore::new(stream.clone(), channels.clone());
    let mut cores = Vec::new();
    for &(credits, policy) in subs {
        let t = owner
            .add(&SubscriberOptions { credits, policy, wait: WaitStrategy::Park, ..SubscriberOptions::default() }, 1)
            .unwrap();
        let s = t.index as usize;
        cores.push(SubCore::attach(stream.clone(), channels[s].clone(), s, t.generation, PARK).unwrap());
    }
    (stream, channels, owner, cores)
}

/// The next frame's seq, past publisher events.
fn take_seq(sub: &SubCore<Stream, Channel>) -> Result<u64, TryRecvError> {
    loop {
        match sub.try_take() {
            Ok(info) => {
                sub.return_slot(info.slot);
                return Ok(info.seq);
            }
            Err(TryRecvError::PublisherGone | TryRecvError::PublisherBack) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A publisher that sent frame 0, which subscribers `taking` took and
/// returned (the others keep it queued).
fn sent_frame_0(
    stream: &Stream,
    channels: &[Channel],
    subs: &[SubCore<Stream, Channel>],
    taking: &[usize],
) -> PubCore<Stream, Channel> {
    let mut p1 = PubCore::attach(stream.clone(), channels.to_vec(), 100).unwrap();
    let s = p1.loan().unwrap();
    p1.commit(s, 1, 0).unwrap();
    for &i in taking {
        let info = subs[i].try_take().unwrap();
        subs[i].return_slot(info.slot);
    }
    p1
}

/// Pauses the owner inside `publisher_gone`, at its first point of the
/// roll-forward (after subscriber 1's drop, before subscriber 2's push):
/// `watcher` must hear of nothing yet — no departure, no close. Then
/// resumes the owner's work, as a second reclaim would.
fn pause_and_resume_recovery(
    stream: &Stream,
    owner: &mut OwnerCore<Stream, Channel>,
    watcher: &SubCore<Stream, Channel>,
) {
    hook::arm(0);
    assert!(hook::run(|| owner.publisher_gone()).is_none());
    hook::disarm();
    assert_eq!(watcher.try_take().unwrap_err(), TryRecvError::Empty, "news before the rolled-forward frame");
    stream.header().control.writer.store(WRITER_NONE, Relaxed);
    assert!(owner.reclaim_detached());
}

/// Sends one frame, "killed" (kill -9) at crash point `k`; returns the
/// slot it was sending if it died.
fn send_killed_at(p: PubCore<Stream, Channel>, k: u32) -> u32 {
    let mut p = p;
    let slot = p.loan().unwrap();
    hook::arm(k);
    let died = hook::run(|| p.commit(slot, 1, 0)).is_none();
    hook::disarm();
    assert!(died, "the send must die at point {k}");
    std::mem::forget(p);
    slot
}

/// The only subscriber that got the interrupted frame reads and returns it
/// before recovery: the rebuilt free list has the slot, and the
/// roll-forward must not add it a second time (it did, once).
#[test]
fn a_rolled_forward_slot_returned_before_recovery_is_free_once() {
    let (stream, channels, _owner, subs) = world(&[(2, OverflowPolicy::DropNewest)]);
    let p1 = PubCore::attach(stream.clone(), channels.clone(), 100).unwrap();
    // Points of the send: inflight (0), entry (1), bit (2), pushed (3):
    // die once subscriber 0's push is complete, before `published`.
    let x = send_killed_at(p1, 3);
    let info = subs[0].try_take().unwrap();
    assert_eq!((info.seq, info.slot), (0, x));
    subs[0].return_slot(info.slot);
    // The role of the dead holder is free (as in crash_tests' NextPublisher).
    stream.header().control.writer.store(WRITER_NONE, Relaxed);
    let mut p2 = PubCore::attach(stream.clone(), channels.clone(), 200).unwrap();
    assert_eq!(p2.free_slots(), SLOTS as usize, "free list holds more slots than the pool");
}

/// The same with a second subscriber the kill came before: the slot is
/// rolled forward to it, so it must leave the free list the rebuild put it
/// in (it stayed there once, and the next loan handed out the slot that
/// subscriber was about to read).
#[test]
fn a_rolled_forward_slot_is_not_loaned_while_queued() {
    let (stream, channels, _owner, subs) = world(&[(2, OverflowPolicy::DropNewest), (2, OverflowPolicy::DropNewest)]);
    // A first frame to both (taken and released), so that frame 1 is not
    // the degenerate seq-0/slot-0 case.
    let p1 = sent_frame_0(&stream, &channels, &subs, &[0, 1]);
    let x = send_killed_at(p1, 3); // subscriber 0 has frame 1, subscriber 1 not yet
    let info = subs[0].try_take().unwrap();
    assert_eq!(info.seq, 1);
    subs[0].return_slot(info.slot);
    stream.header().control.writer.store(WRITER_NONE, Relaxed);
    let mut p2 = PubCore::attach(stream.clone(), channels.clone(), 200).unwrap();
    // Subscriber 1 got frame 1 in slot x by the roll-forward...
    assert!(stream.mask(x)[0].load(Relaxed) & 0b10 != 0, "subscriber 1 holds x");
    // ...but x is also in the free list: the next loans hand it out while
    // subscriber 1 has it queued.
    assert_eq!(p2.free_slots(), SLOTS as usize - 1, "slot {x} is both queued and free");
}

/// A subscriber that never got a frame (its zeroed ring reads like frame 0
/// in slot 0 at position -1) is not taken for one that got an interrupted
/// frame 0: the roll-forward reaches it (it once skipped it).
#[test]
fn a_subscriber_that_never_got_a_frame_gets_an_interrupted_frame_0() {
    let (stream, channels, _owner, subs) = world(&[(2, OverflowPolicy::Lossless), (2, OverflowPolicy::Lossless)]);
    let p1 = PubCore::attach(stream.clone(), channels.clone(), 100).unwrap();
    let x = send_killed_at(p1, 3); // frame 0, slot 0: reached subscriber 0 only
    assert_eq!(x, 0);
    stream.header().control.writer.store(WRITER_NONE, Relaxed);
    let p2 = PubCore::attach(stream.clone(), channels.clone(), 200).unwrap();
    assert_eq!(p2.next_seq(), 1, "frame 0 was rolled forward");
    assert_eq!(take_seq(&subs[0]), Ok(0));
    assert_eq!(take_seq(&subs[1]), Ok(0), "lossless subscriber 1 lost frame 0");
}

/// The owner rolls a dead publisher's interrupted frame forward before it
/// counts the departure, so no subscriber hears of it before the frame (it
/// once counted first). The owner is "paused" at a point inside the
/// roll-forward with the crash hook and resumed by a second reclaim: the
/// state in between is what a subscriber running meanwhile sees.
#[test]
fn the_departure_of_a_dead_publisher_comes_after_its_rolled_forward_frame() {
    // 0 gets frame 1 before the kill; 1 is full and drops it (a point);
    // 2 is the one that sees the departure first.
    let (stream, channels, mut owner, subs) =
        world(&[(2, OverflowPolicy::DropNewest), (1, OverflowPolicy::DropNewest), (2, OverflowPolicy::DropNewest)]);
    let p1 = sent_frame_0(&stream, &channels, &subs, &[0, 2]);
    send_killed_at(p1, 3); // frame 1 reached subscriber 0 only
    pause_and_resume_recovery(&stream, &mut owner, &subs[2]);
    assert_eq!(take_seq(&subs[2]), Ok(1), "the rolled-forward frame");
    // And a whole publisher_gone: frame first, then the news.
    let (stream, channels, mut owner, subs) =
        world(&[(2, OverflowPolicy::DropNewest), (2, OverflowPolicy::DropNewest)]);
    let p1 = sent_frame_0(&stream, &channels, &subs, &[0, 1]);
    send_killed_at(p1, 3); // frame 1 reached subscriber 0 only
    owner.publisher_gone();
    assert_eq!(subs[1].try_take().map(|i| i.seq), Ok(1));
    assert_eq!(subs[1].try_take().unwrap_err(), TryRecvError::PublisherGone);
}

/// A head left claimed by a writer killed mid-eviction does not keep a
/// keep-latest subscriber's timed receive past its deadline (it once spun
/// until the head was repaired).
#[test]
fn a_claimed_head_does_not_keep_a_receive_past_its_deadline() {
    let (stream, channels, _owner, mut subs) = world(&[(1, OverflowPolicy::KeepLatest)]);
    let p1 = sent_frame_0(&stream, &channels, &subs, &[]); // queued: the next send evicts it
    // Points: inflight (0), claim CAS (1).
    send_killed_at(p1, 1);
    let head = &channels[0].header().queue_head;
    assert!(head.load(Relaxed) & HEAD_CLAIMED != 0);
    let sub = subs.pop().unwrap();
    // The head stays claimed until the receive has returned: one that
    // ignored its deadline would only return after the repair below (with
    // its frame), and a hung one is repaired after a minute.
    let (returned, told) = std::sync::mpsc::channel::<()>();
    let repairer = {
        let channels = channels.clone();
        std::thread::spawn(move || {
            let hung = told.recv_timeout(Duration::from_secs(60)).is_err();
            // What recovery would do: move the head past the entry.
            let head = &channels[0].header().queue_head;
            head.store((head.load(Relaxed) & !HEAD_CLAIMED) + 1, Relaxed);
            hung
        })
    };
    let r = sub.take(Some(Instant::now() + Duration::from_millis(50)));
    returned.send(()).unwrap();
    assert!(!repairer.join().unwrap(), "the receive kept on past its deadline");
    assert_eq!(r.map(|i| i.seq), Err(RecvError::Timeout));
}

/// A close pending when the publisher died is acknowledged after the
/// interrupted frame is rolled forward, so no subscriber sees the end and
/// then a frame (the take-over once acknowledged it first).
#[test]
fn a_pending_close_comes_after_the_rolled_forward_frame() {
    let (stream, channels, mut owner, subs) =
        world(&[(2, OverflowPolicy::DropNewest), (1, OverflowPolicy::DropNewest), (2, OverflowPolicy::DropNewest)]);
    let p1 = sent_frame_0(&stream, &channels, &subs, &[0, 2]);
    send_killed_at(p1, 3);
    owner.close(); // the publisher is dead: nobody acknowledges yet
    pause_and_resume_recovery(&stream, &mut owner, &subs[2]);
    assert_eq!(subs[2].try_take().map(|i| i.seq), Ok(1), "the rolled-forward frame, then the end");
    assert_eq!(subs[2].try_take().unwrap_err(), TryRecvError::Closed);
}

/// A `Loan` dropped without `resume` gives its slot and its place in the
/// loan budget back (it once kept them for the publisher's lifetime: two
/// dropped loans and the publisher could never loan again).
#[test]
fn dropped_loans_give_their_budget_back() {
    use crate::shm::{LoanError, StreamConfig, StreamSegment};
    let mut seg = StreamSegment::create("review", &StreamConfig::new(8, 16)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    drop(publisher.loan().unwrap().detach());
    drop(publisher.loan().unwrap().detach());
    assert!(
        !matches!(publisher.loan().map(drop), Err(LoanError::TooManyLoans { .. })),
        "publisher is dead for good after two dropped Loans"
    );
}

/// The very first send of a stream killed before it pushed anything is
/// forgotten: its number is reused and slot 0 is free once (the zeroed
/// rings once read as frame 0 in slot 0, so slot 0 went on the free list
/// twice).
#[test]
fn a_first_send_killed_before_any_push_is_forgotten() {
    let (stream, channels, _owner, _subs) = world(&[(2, OverflowPolicy::DropNewest)]);
    let p1 = PubCore::attach(stream.clone(), channels.clone(), 100).unwrap();
    assert_eq!(send_killed_at(p1, 0), 0);
    stream.header().control.writer.store(WRITER_NONE, Relaxed);
    let mut p2 = PubCore::attach(stream.clone(), channels.clone(), 200).unwrap();
    assert_eq!((p2.next_seq(), p2.free_slots()), (0, SLOTS as usize));
}

/// Ends a close the way the broker does — a system-wide barrier between
/// the mark and the look — as far as it can go now.
fn end_for_subscribers(owner: &mut OwnerCore<Stream, Channel>) -> EndProgress {
    let mut barrier = None;
    loop {
        match owner.end_for_subscribers(barrier) {
            EndProgress::NeedsBarrier => barrier = Some(crate::primitive::system_barrier()),
            other => return other,
        }
    }
}

/// Every frame a subscriber gets until the end.
fn until_closed(sub: &SubCore<Stream, Channel>) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        match take_seq(sub) {
            Ok(seq) => seen.push(seq),
            Err(TryRecvError::Closed) => return seen,
            Err(e) => panic!("{e:?} after {seen:?}: the stream must have ended"),
        }
    }
}

/// 2b: the close grace is over and the publisher's process lives, so the
/// owner ends the close for the subscribers without taking the role —
/// while the publisher is at each point of a send in turn (as if preempted
/// there). A send that returns Ok reaches every subscriber before the end;
/// one that fails delivered nothing; the role stays the publisher's.
#[test]
fn ending_a_close_at_every_point_of_a_send_loses_no_sent_frame() {
    let (mut ok, mut refused) = (0, 0);
    for k in 0.. {
        let (stream, channels, mut owner, subs) =
            world(&[(2, OverflowPolicy::Lossless), (1, OverflowPolicy::DropNewest), (1, OverflowPolicy::KeepLatest)]);
        // Subscriber 2 keeps frame 0: frame 1 evicts it.
        let mut p = sent_frame_0(&stream, &channels, &subs, &[0, 1]);
        let slot = p.loan().unwrap();
        let mut during = None;
        let (result, ran) = hook::act_at(
            k,
            &mut || {
                owner.close();
                during = Some(end_for_subscribers(&mut owner));
            },
            || p.commit(slot, 1, 0),
        );
        if !ran {
            assert!(result.is_ok());
            break; // past the last point of a send
        }
        let during = during.expect("ran");
        assert_eq!(end_for_subscribers(&mut owner), EndProgress::Ended, "point {k}");
        let got: Vec<Vec<u64>> = subs.iter().map(until_closed).collect();
        match result {
            Ok(info) => {
                assert_eq!(during, EndProgress::Delivering, "point {k}: ended under a delivery");
                assert_eq!((info.seq, info.delivered), (1, 3), "point {k}");
                assert_eq!(got, [vec![1], vec![1], vec![1]], "point {k}: a sent frame was lost");
                ok += 1;
            }
            Err(CommitRefusal::Closed) => {
                p.abandon(slot);
                assert_eq!(got, [vec![], vec![], vec![0]], "point {k}: a refused frame was delivered");
                refused += 1;
            }
            Err(e) => panic!("point {k}: {e:?}"),
        }
        assert!(matches!(p.loan(), Err(LoanError::Closed)), "point {k}");
        assert_eq!(stream.header().control.writer.load(Relaxed), WRITER_PUBLISHER, "point {k}: role taken");
        drop(p);
        assert_eq!(stream.header().control.writer.load(Relaxed), WRITER_NONE);
    }
    assert!(ok > 0 && refused > 0, "ok at {ok} points, refused at {refused}");
}

/// 2b: a publisher stopped mid-delivery (its process alive, say under
/// SIGSTOP) holds the end back however often the owner tries; once it
/// goes on, the end comes after its frame.
#[test]
fn a_publisher_stopped_mid_delivery_holds_the_end_back() {
    let (stream, channels, mut owner, subs) = world(&[(2, OverflowPolicy::Lossless)]);
    let mut p = sent_frame_0(&stream, &channels, &subs, &[0]);
    let slot = p.loan().unwrap();
    let (mut tries, mut early) = (Vec::new(), None);
    // Point 1: after the first push of frame 1.
    let (result, ran) = hook::act_at(
        1,
        &mut || {
            owner.close();
            tries = (0..3).map(|_| end_for_subscribers(&mut owner)).collect();
            early = take_seq(&subs[0]).ok();
            assert_ne!(take_seq(&subs[0]), Err(TryRecvError::Closed), "ended under a delivery");
        },
        || p.commit(slot, 1, 0),
    );
    assert!(ran);
    assert_eq!(tries, [EndProgress::Delivering; 3]);
    assert_eq!(result.unwrap().seq, 1);
    assert_eq!(end_for_subscribers(&mut owner), EndProgress::Ended);
    let got: Vec<u64> = early.into_iter().chain(until_closed(&subs[0])).collect();
    assert_eq!(got, [1]);
}

/// 2b: a publisher asleep in a send, waiting for a lossless subscriber's
/// credit, when the owner revokes it (where its connection was its lease
/// and has ended): it wakes at once and finds itself replaced, rather
/// than sleeping out its deadline.
#[test]
fn a_revoked_publisher_asleep_in_a_send_wakes() {
    let (stream, channels, mut owner, subs) = world(&[(1, OverflowPolicy::Lossless)]);
    // Subscriber 0 keeps frame 0: no credit left for frame 1.
    let mut p = sent_frame_0(&stream, &channels, &subs, &[]);
    let (tx, rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        let slot = p.loan().unwrap();
        let Err(CommitRefusal::WouldBlock { subscriber }) = p.commit(slot, 1, 0) else { panic!("room for frame 1") };
        // No deadline of its own: only the wake-up ends this wait.
        let woken = p.wait_for_room(subscriber as usize, PARK, None);
        tx.send((woken, p.commit(slot, 1, 0).err())).unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !super::wait::is_waiting(&channels[0].header().pub_waiting) {
        assert!(Instant::now() < deadline, "the publisher never went to sleep");
        std::thread::yield_now();
    }
    owner.publisher_gone();
    let (woken, refusal) = rx.recv_timeout(Duration::from_secs(120)).expect("the revoked publisher slept on");
    assert!(woken);
    assert_eq!(refusal, Some(CommitRefusal::Replaced));
    sender.join().unwrap();
}

/// Review finding: a publisher that panicked mid-delivery let go of the
/// role with `dirty` set (its `Drop` under a panic). A close that finds no
/// writer must roll that frame forward before the end: subscriber 1 got
/// `Closed` and then frame 0 (`Ok(0)` after `Closed`).
#[test]
fn a_close_after_a_panicked_delivery_ends_after_its_frame() {
    let (stream, channels, mut owner, subs) =
        world(&[(2, OverflowPolicy::DropNewest), (2, OverflowPolicy::DropNewest)]);
    let p1 = PubCore::attach(stream.clone(), channels.clone(), 100).unwrap();
    // Stopped after subscriber 0's push, before subscriber 1's.
    send_killed_at(p1, 3);
    // What `PubCore::drop` does under a panic: count the departure, keep
    // `dirty`, let go of the role.
    stream.header().control.publisher_changes.fetch_add(1, Relaxed);
    stream.header().control.writer.store(WRITER_NONE, Relaxed);
    assert_eq!(take_seq(&subs[0]), Ok(0));
    owner.close();
    assert_eq!(until_closed(&subs[1]), [0], "the end before a frame another subscriber got");
    owner.publisher_gone();
    assert_eq!(take_seq(&subs[1]), Err(TryRecvError::Closed));
}

/// Review: the owner ends a close under a live publisher at send point
/// `k`; the publisher then dies at every later point `j` and is declared
/// gone. Every frame reaches all subscribers or none, the stream ends,
/// and the role is free.
#[test]
fn a_publisher_killed_after_its_close_was_ended_leaves_a_whole_frame() {
    for k in 0.. {
        let mut killed = false;
        for j in k.. {
            let (stream, channels, mut owner, subs) = world(&[
                (2, OverflowPolicy::Lossless),
                (1, OverflowPolicy::DropNewest),
                (1, OverflowPolicy::KeepLatest),
            ]);
            let mut p = sent_frame_0(&stream, &channels, &subs, &[0, 1]);
            let slot = p.loan().unwrap();
            let mut during = None;
            hook::arm(j);
            let r = hook::run(|| {
                hook::act_at(
                    k,
                    &mut || {
                        owner.close();
                        during = Some(end_for_subscribers(&mut owner));
                    },
                    || p.commit(slot, 1, 0),
                )
            });
            hook::disarm();
            match r {
                Some((_, false)) if j == k => return, // past the last point of a send
                Some(_) => break,                     // survived: no later point
                None => std::mem::forget(p),          // killed at j
            }
            killed = true;
            owner.publisher_gone();
            assert_eq!(end_for_subscribers(&mut owner), EndProgress::Ended, "k {k} j {j} ({during:?})");
            let got: Vec<Vec<u64>> = subs.iter().map(until_closed).collect();
            let with_1 = got.iter().filter(|g| g.contains(&1)).count();
            assert!(with_1 == 0 || with_1 == got.len(), "k {k} j {j}: {got:?} ({during:?})");
            assert_eq!(stream.header().control.writer.load(Relaxed), WRITER_NONE);
        }
        assert!(killed || k == 0);
    }
}

/// Final review: a hostile publisher writes, at a keep-latest subscriber's
/// head, an entry stamped one position ahead and never moves the head.
/// The bounded retry in `try_take` said `Empty`, `ready()` kept saying a
/// frame was there, and the receive spun without ever checking its
/// deadline ("the receive kept on past its deadline: 2.001908722s").
#[test]
fn an_entry_ahead_of_an_unmoved_head_is_a_corrupt_queue_not_an_endless_receive() {
    use crate::shm::layout::entry;
    let (stream, channels, _owner, mut subs) = world(&[(1, OverflowPolicy::KeepLatest)]);
    // Position 0's entry stamped as position 1's (what an eviction would
    // leave behind had it moved the head; here nobody does).
    stream.ring(0)[0].word.store(entry(1, 0), Relaxed);
    let sub = subs.pop().unwrap();
    // Should the receive hang, this unsticks it once a generous deadline
    // passes without the receive returning, so the test fails, not hangs.
    let (returned, wait_for_it) = std::sync::mpsc::channel::<()>();
    let fixer = {
        let channels = channels.clone();
        std::thread::spawn(move || {
            let hung = wait_for_it.recv_timeout(Duration::from_secs(60)).is_err();
            if hung {
                channels[0].header().queue_head.store(1, Relaxed);
            }
            hung
        })
    };
    let r = sub.take(Some(Instant::now() + Duration::from_millis(50)));
    let _ = returned.send(());
    assert!(!fixer.join().unwrap(), "the receive kept on past its deadline");
    assert!(matches!(r, Err(RecvError::Corrupt(_))), "{r:?}");
}

/// Final review: a hostile publisher queues one slot twice; both samples
/// are detached and dropped. The second post tripped a debug assertion (a
/// panic in a sample's drop); in release the subscriber's `borrowed`
/// stayed one too high for good.
#[test]
fn a_slot_queued_twice_goes_back_once_and_leaves_nothing_borrowed() {
    use crate::shm::layout::entry;
    let (stream, _channels, _owner, mut subs) = world(&[(2, OverflowPolicy::DropNewest)]);
    for pos in 0..2u64 {
        let e = &stream.ring(0)[pos as usize];
        e.seq.store(pos, Relaxed);
        e.len.store(1, Relaxed);
        e.word.store(entry(pos, 3), Relaxed);
    }
    let sub = subs.pop().unwrap();
    let (a, b) = (sub.try_take().unwrap(), sub.try_take().unwrap());
    assert_eq!((a.slot, b.slot), (3, 3));
    let board = sub.board().clone();
    let posted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        board.post(a.slot);
        board.post(b.slot);
    }));
    assert!(posted.is_ok(), "the second post panicked");
    sub.hand_back();
    assert_eq!(sub.borrowed(), 0);
}
