//! In-process tests of the data plane on real `memfd` segments, and a
//! proptest of the algorithms against a simple model.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::time::Duration;

use proptest::prelude::*;

use super::core::mem::heap::{HeapChannel, HeapStream};
use super::core::mem::{ChannelMem, StreamMem};
use super::core::owner::OwnerCore;
use super::core::publisher::{CommitRefusal, PubCore};
use super::core::subscriber::SubCore;
use super::core::wait::Backoff;
use super::layout::{Geometry, OverflowPolicy, WaitStrategy};
use super::*;
use crate::primitive::Ordering::Relaxed;

fn segment(slot_size: u32, slot_count: u32) -> StreamSegment {
    StreamSegment::create("test", &StreamConfig::new(slot_size, slot_count)).unwrap()
}

fn opts(credits: u32, policy: OverflowPolicy) -> SubscriberOptions {
    SubscriberOptions { credits, policy, wait: WaitStrategy::Park, ..SubscriberOptions::default() }
}

#[test]
fn frame_round_trip_carries_bytes_seq_and_timestamp() {
    let mut seg = segment(64, 8);
    let sub = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    let before = crate::platform::now_ns();
    let info = publisher.send(b"hello").unwrap();
    assert_eq!((info.seq, info.delivered, info.dropped), (0, 1, 0));
    let mut sample = publisher.loan().unwrap();
    sample.as_mut_slice()[..3].copy_from_slice(b"abc");
    sample.set_len(3);
    assert_eq!(&*sample, b"abc");
    sample.send().unwrap();

    let a = sub.try_recv().unwrap();
    assert_eq!((&*a, a.seq()), (&b"hello"[..], 0));
    assert!(a.timestamp_ns() >= before && a.timestamp_ns() <= crate::platform::now_ns());
    let b = sub.recv_timeout(Duration::from_secs(1)).unwrap();
    assert_eq!((&*b, b.seq()), (&b"abc"[..], 1));
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(sub.recv_timeout(Duration::from_millis(5)).unwrap_err(), RecvError::Timeout);
    assert!(matches!(publisher.send(&[0; 65]), Err(SendError::TooLarge { len: 65, slot_size: 64 })));
}

#[test]
fn long_stream_names_are_fine() {
    let name = "é".repeat(127); // 254 bytes
    let seg = StreamSegment::create(&name, &StreamConfig::new(8, 2)).unwrap();
    assert_eq!(seg.name(), name);
}

#[test]
fn unwanted_frames_and_abandoned_loans_free_their_slot_at_once() {
    let mut seg = segment(16, 2);
    let mut publisher = seg.open_publisher().unwrap();
    for _ in 0..10 {
        let info = publisher.send(b"x").unwrap();
        assert_eq!(info.delivered, 0);
        drop(publisher.loan().unwrap());
    }
    assert_eq!(seg.stats().free_slots, 2);
    assert_eq!(seg.stats().published, 10);
}

#[test]
fn fan_out_reaches_every_subscriber_and_reuses_a_slot_only_after_all_release() {
    let mut seg =
        StreamSegment::create("fan", &StreamConfig { max_subscribers: 40, ..StreamConfig::new(8, 42) }).unwrap();
    let subs: Vec<_> = (0..40).map(|_| seg.open_subscriber(&opts(1, OverflowPolicy::DropNewest)).unwrap()).collect();
    let mut publisher = seg.open_publisher().unwrap();
    assert_eq!(publisher.send(b"one").unwrap().delivered, 40);
    let mut samples: Vec<_> = subs.iter().map(|s| s.try_recv().unwrap()).collect();
    let slot = samples[0].info().slot;
    assert!(samples.iter().all(|s| s.info().slot == slot && &**s == b"one"));
    // Every subscriber but the last lets go: the slot stays held.
    let last = samples.pop().unwrap();
    drop(samples);
    assert_eq!(subs[39].try_recv().unwrap_err(), TryRecvError::CreditsExhausted { held: 1, credits: 1 });
    for i in 0..100u8 {
        // 39 subscribers get these; the 40th has no credit and drops them.
        let mut s = publisher.loan().unwrap();
        s.as_mut_slice()[0] = i;
        s.set_len(1);
        assert_eq!(s.send().unwrap().dropped, 1);
        for sub in &subs[..39] {
            let got = sub.try_recv().unwrap();
            assert_eq!(*got, [i]);
            assert_ne!(got.info().slot, slot, "slot reused while subscriber 39 holds it");
        }
    }
    assert_eq!(&*last, b"one");
    assert_eq!(seg.stats().subscribers[39].dropped, 100);
}

#[test]
fn drop_newest_counts_what_it_drops() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    for i in 0..5u8 {
        publisher.send(&[i]).unwrap();
    }
    assert_eq!(*sub.try_recv().unwrap(), [0]);
    assert_eq!(*sub.try_recv().unwrap(), [1]);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    let st = &seg.stats().subscribers[0];
    assert_eq!((st.delivered, st.dropped, st.evicted), (2, 3, 0));
}

#[test]
fn keep_latest_evicts_the_oldest_queued_frame() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(3, OverflowPolicy::KeepLatest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    for i in 0..10u8 {
        publisher.send(&[i]).unwrap();
    }
    let got: Vec<u8> = (0..3).map(|_| sub.try_recv().unwrap()[0]).collect();
    assert_eq!(got, [7, 8, 9]);
    let st = &seg.stats().subscribers[0];
    assert_eq!((st.delivered, st.dropped, st.evicted), (3, 7, 7));
}

#[test]
fn keep_latest_with_everything_borrowed_drops_the_new_frame() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::KeepLatest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(&[1]).unwrap();
    publisher.send(&[2]).unwrap();
    let a = sub.try_recv().unwrap();
    let b = sub.try_recv().unwrap();
    assert_eq!(publisher.send(&[3]).unwrap().dropped, 1);
    assert_eq!((a[0], b[0]), (1, 2));
    drop((a, b));
    publisher.send(&[4]).unwrap();
    assert_eq!(*sub.try_recv().unwrap(), [4]);
}

#[test]
fn lossless_blocks_the_publisher_instead_of_dropping() {
    let mut seg = segment(8, 8);
    let lossless = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    let lossy = seg.open_subscriber(&opts(1, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(&[0]).unwrap();
    publisher.send(&[1]).unwrap();
    assert_eq!(publisher.send(&[2]), Err(SendError::WouldBlock { subscriber: 0 }));
    assert_eq!(publisher.send_timeout(&[2], Duration::from_millis(10)), Err(SendError::Timeout));
    // Nothing was half-sent: the lossy subscriber saw only the first frame.
    assert_eq!(*lossy.try_recv().unwrap(), [0]);
    assert_eq!(lossy.try_recv().unwrap_err(), TryRecvError::Empty);

    let lossless = std::thread::scope(|scope| {
        let h = scope.spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(*lossless.try_recv().unwrap(), [0]);
            lossless
        });
        let info = publisher.send_timeout(&[2], Duration::from_secs(10)).unwrap();
        assert_eq!(info.seq, 2);
        h.join().unwrap()
    });
    assert_eq!(*lossless.try_recv().unwrap(), [1]);
    assert_eq!(*lossless.try_recv().unwrap(), [2]);
    assert_eq!(seg.stats().subscribers[0].dropped, 0);
}

#[test]
fn credits_are_checked_at_admission_at_receive_and_can_change_live() {
    let mut seg = segment(8, 10);
    let a = seg.open_subscriber(&opts(6, OverflowPolicy::DropNewest)).unwrap();
    let AdmitError::Refused(err) = seg.add_subscriber(&opts(4, OverflowPolicy::DropNewest), 1).unwrap_err() else {
        panic!("refused")
    };
    // Two slots are kept for the publisher's loans.
    assert_eq!(err, AddSubscriberError::CreditsRefused { requested: 4, available: 2, slot_count: 10, committed: 6 });
    assert!(err.to_string().contains("cannot grant 4 credits: 2 of 10 slots"));
    assert!(matches!(
        seg.add_subscriber(&opts(0, OverflowPolicy::DropNewest), 1),
        Err(AdmitError::Refused(AddSubscriberError::CreditsOutOfRange { credits: 0, max: 8 }))
    ));
    let mut publisher = seg.open_publisher().unwrap();
    for i in 0..8u8 {
        publisher.send(&[i]).unwrap();
    }
    let held: Vec<_> = (0..6).map(|_| a.try_recv().unwrap()).collect();
    assert_eq!(a.try_recv().unwrap_err(), TryRecvError::CreditsExhausted { held: 6, credits: 6 });
    assert_eq!(a.recv().unwrap_err(), RecvError::CreditsExhausted { held: 6, credits: 6 });

    // Lowering credits below what it holds: the extra stays reserved.
    seg.set_credits(0, 2).unwrap();
    assert!(matches!(
        seg.add_subscriber(&opts(4, OverflowPolicy::DropNewest), 1),
        Err(AdmitError::Refused(AddSubscriberError::CreditsRefused { committed: 6, .. }))
    ));
    drop(held);
    publisher.send(&[9]).unwrap(); // reads the returns
    seg.add_subscriber(&opts(4, OverflowPolicy::DropNewest), 1).unwrap();
    assert!(matches!(seg.set_credits(0, 6), Err(SubscriberOpError::Credits(_))));
    assert_eq!(seg.set_credits(7, 1), Err(SubscriberOpError::NotAttached(7)));
}

#[test]
fn detach_returns_queued_and_borrowed_slots() {
    let mut seg = segment(8, 9);
    let gone = seg.open_subscriber(&opts(5, OverflowPolicy::DropNewest)).unwrap();
    let stay = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    for i in 0..5u8 {
        publisher.send(&[i]).unwrap();
    }
    let borrowed = (gone.try_recv().unwrap(), gone.try_recv().unwrap());
    assert_eq!(seg.stats().free_slots, 4);
    seg.remove_subscriber(gone.index()).unwrap();
    assert_eq!(gone.try_recv().unwrap_err(), TryRecvError::Detached);
    drop(borrowed); // released after detach: ignored, no fault anywhere
    // The publisher reclaims on its next send; `stay` keeps its two frames.
    publisher.send(&[5]).unwrap();
    let stats = seg.stats();
    assert_eq!(stats.subscribers.len(), 1);
    assert_eq!(stats.free_slots, 9 - 2);
    assert_eq!(*stay.try_recv().unwrap(), [0]);
    assert_eq!(stats.subscribers[0].faults, 0);
    // Its index can be reused: a new subscriber starts with an empty queue.
    let again = seg.open_subscriber(&opts(5, OverflowPolicy::DropNewest)).unwrap();
    assert_eq!(again.try_recv().unwrap_err(), TryRecvError::Empty);
    publisher.send(&[6]).unwrap();
    assert_eq!(*again.try_recv().unwrap(), [6]);
}

#[test]
fn detach_without_publisher_reclaims_at_once() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(5, OverflowPolicy::DropNewest)).unwrap();
    {
        let mut publisher = seg.open_publisher().unwrap();
        for i in 0..4u8 {
            publisher.send(&[i]).unwrap();
        }
    }
    let _s = sub.try_recv().unwrap();
    assert_eq!(seg.stats().free_slots, 4);
    seg.remove_subscriber(sub.index()).unwrap();
    assert_eq!(seg.stats().free_slots, 8);
}

#[test]
fn publisher_is_exclusive_and_can_be_taken_over_after_it_dies() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(4, OverflowPolicy::Lossless)).unwrap();
    let mut first = seg.open_publisher().unwrap();
    assert!(matches!(seg.open_publisher(), Err(OpenPublisherError::PublisherExists { .. })));
    first.send(&[1]).unwrap();
    first.send(&[2]).unwrap();
    // Die without cleaning up: the lease ends, the owner hands the role on.
    std::mem::forget(first);
    seg.publisher_gone();
    let mut second = seg.open_publisher().unwrap();
    assert_eq!(second.next_seq(), 2);
    second.send(&[3]).unwrap();
    let got: Vec<(u64, u8)> = (0..3).map(|_| sub.try_recv().map(|s| (s.seq(), s[0])).unwrap()).collect();
    assert_eq!(got, [(0, 1), (1, 2), (2, 3)]);
}

#[test]
fn subscribers_get_the_pool_read_only() {
    let seg = segment(8, 4);
    let ro = seg.read_only_data_fd().unwrap();
    assert!(!crate::platform::is_writable(ro.as_fd()).unwrap());
    // Mode 0400: an unprivileged holder of `ro` cannot re-open it writable
    // through /proc/self/fd.
    assert_eq!(rustix::fs::fstat(&ro).unwrap().st_mode & 0o777, 0o400);
    assert!(matches!(Publisher::open(ro.as_fd(), &seg.channel_fds()), Err(OpenPublisherError::ReadOnly)));
    let err = memmap2::MmapOptions::new().len(4096).map_raw(std::os::fd::AsRawFd::as_raw_fd(&ro));
    assert_eq!(err.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
}

#[test]
fn stale_tickets_and_wrong_files_are_refused() {
    let mut seg = segment(8, 4);
    let t = seg.add_subscriber(&opts(1, OverflowPolicy::DropNewest), 1).unwrap();
    let ro = seg.read_only_data_fd().unwrap();
    // Another subscriber's channel.
    let t2 = seg.add_subscriber(&opts(1, OverflowPolicy::DropNewest), 1).unwrap();
    let (ch, ch2) = (seg.channel_fd(t.index).unwrap(), seg.channel_fd(t2.index).unwrap());
    assert!(Subscriber::open(ro.as_fd(), ch2, t).is_err());
    // A channel file is not a data file.
    assert!(matches!(Subscriber::open(ch2, ch2, t2), Err(OpenSubscriberError::Map(_))));
    let ch = ch.try_clone_to_owned().unwrap();
    seg.remove_subscriber(t.index).unwrap();
    assert!(matches!(Subscriber::open(ro.as_fd(), ch.as_fd(), t), Err(OpenSubscriberError::NotAttached { .. })));
    // Its index is free again (no publisher to reclaim first): its channel is closed.
    assert!(seg.channel_fd(t.index).is_none());
    assert_eq!(seg.channel_count(), 1);
}

#[test]
fn publisher_changes_are_reported_after_the_frames() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(4, OverflowPolicy::Lossless)).unwrap();
    // The first publisher arrives silently.
    let mut first = seg.open_publisher().unwrap();
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    first.send(&[1]).unwrap();
    drop(first);
    assert_eq!(*sub.try_recv().unwrap(), [1], "frames come before the news");
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherGone);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty, "reported once");
    let mut second = seg.open_publisher().unwrap();
    second.send(&[2]).unwrap();
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherBack);
    assert_eq!(*sub.try_recv().unwrap(), [2]);
    // Declared gone after a crash: a subscriber asleep is woken to hear it.
    std::mem::forget(second);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            seg.publisher_gone();
        });
        assert_eq!(sub.recv_timeout(Duration::from_secs(10)).unwrap_err(), RecvError::PublisherGone);
    });
    // A publisher that comes and goes unseen is still back, then gone,
    // with its frame in between.
    let mut brief = seg.open_publisher().unwrap();
    brief.send(&[3]).unwrap();
    drop(brief);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherBack);
    assert_eq!(*sub.try_recv().unwrap(), [3]);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherGone);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    // A subscriber that joins while the publisher is gone hears it come back.
    let late = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let _third = seg.open_publisher().unwrap();
    assert_eq!(late.try_recv().unwrap_err(), TryRecvError::PublisherBack);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherBack);
}

/// What the README promises a subscriber that lags behind a change of
/// publisher: the news comes once it has caught up, after the frames of
/// both publishers, and `PublisherGone` never before a frame the departed
/// publisher sent.
#[test]
fn a_lagging_subscriber_hears_of_a_change_once_it_has_caught_up() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(4, OverflowPolicy::Lossless)).unwrap();
    let mut first = seg.open_publisher().unwrap();
    first.send(&[1]).unwrap();
    drop(first);
    let mut second = seg.open_publisher().unwrap();
    second.send(&[2]).unwrap();
    drop(second);
    let mut third = seg.open_publisher().unwrap();
    third.send(&[3]).unwrap();
    for (value, seq) in [(1u8, 0), (2, 1), (3, 2)] {
        let sample = sub.try_recv().unwrap();
        assert_eq!((&*sample, sample.seq()), (&[value][..], seq), "one sequence across publishers");
    }
    // Two changes while it lagged: one pair of news.
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherGone);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherBack);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    // Once caught up, the news comes in order again.
    third.send(&[4]).unwrap();
    drop(third);
    assert_eq!(*sub.try_recv().unwrap(), [4]);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherGone);
    let mut fourth = seg.open_publisher().unwrap();
    fourth.send(&[5]).unwrap();
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::PublisherBack);
    assert_eq!(*sub.try_recv().unwrap(), [5]);
}

#[test]
fn blocking_receive_is_woken_by_the_publisher() {
    for wait in [WaitStrategy::Park, WaitStrategy::SpinThenPark { spin_us: 10 }, WaitStrategy::Spin] {
        let mut seg = segment(8, 8);
        let sub = seg
            .open_subscriber(&SubscriberOptions {
                credits: 4,
                policy: OverflowPolicy::Lossless,
                wait,
                ..SubscriberOptions::default()
            })
            .unwrap();
        let mut publisher = seg.open_publisher().unwrap();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                for i in 0..50u8 {
                    std::thread::sleep(Duration::from_micros(200));
                    publisher.send_timeout(&[i], Duration::from_secs(60)).unwrap();
                }
            });
            for i in 0..50u8 {
                assert_eq!(*sub.recv().unwrap(), [i], "{wait:?}");
            }
        });
    }
}

#[test]
fn close_wakes_and_ends_everyone() {
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(&[1]).unwrap();
    std::thread::scope(|scope| {
        let h = scope.spawn(move || {
            let first = sub.recv().map(|s| s[0]);
            (first, sub.recv().map(|s| s[0]))
        });
        std::thread::sleep(Duration::from_millis(20));
        seg.close();
        // The publisher's next send acknowledges the close, which ends the
        // subscriber's wait: no frame can still be on its way.
        assert_eq!(publisher.send(&[2]), Err(SendError::Closed));
        assert_eq!(h.join().unwrap(), (Ok(1), Err(RecvError::Closed)));
    });
    assert!(matches!(publisher.loan(), Err(LoanError::Closed)));
    // With no publisher attached, a close takes effect at once.
    let mut seg = segment(8, 8);
    let sub = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    seg.close();
    assert_eq!(sub.recv().unwrap_err(), RecvError::Closed);
    assert!(matches!(seg.open_publisher(), Err(OpenPublisherError::Closed)));
}

#[test]
fn hostile_returns_are_counted_and_change_nothing() {
    let mut seg = segment(8, 8);
    let honest = seg.open_subscriber(&opts(3, OverflowPolicy::DropNewest)).unwrap();
    let bad = seg.open_subscriber(&opts(3, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(&[7]).unwrap();
    let keep = honest.try_recv().unwrap();
    let slot = keep.info().slot;
    let ch =
        ChannelMap::open(seg.channel_fd(bad.index()).unwrap(), bad.index(), seg.geometry().queue_capacity, 0).unwrap();
    let h = ch.header();
    // Return: an out-of-range slot, a slot it never held, the honest
    // subscriber's slot twice.
    for (i, s) in [u32::MAX, 5, slot, slot].into_iter().enumerate() {
        ch.returns()[i].store(s, Relaxed);
    }
    h.returned.store(4, Relaxed);
    publisher.send(&[8]).unwrap();
    publisher.send(&[9]).unwrap();
    // More returns than the one slot it holds: the batch is refused.
    publisher.send(&[10]).unwrap(); // `bad` is full now: its returns are read
    let stats = seg.stats();
    assert!(stats.subscribers[1].faults >= 1, "{stats:?}");
    // Returns of slots it does not hold, one at a time, are refused singly.
    let tail = h.returned.load(Relaxed);
    for (i, s) in [u32::MAX, 6].into_iter().enumerate() {
        ch.returns()[(tail as usize + i) % 8].store(s, Relaxed);
    }
    h.returned.store(tail + 2, Relaxed);
    publisher.send(&[11]).unwrap();
    assert!(seg.stats().subscribers[1].faults >= 3, "{:?}", seg.stats());
    assert_eq!(stats.subscribers[0].faults, 0);
    // The honest subscriber's slot was not recycled under it.
    assert_eq!(&*keep, [7]);
    assert_eq!(*honest.try_recv().unwrap(), [8]);
    // A tail far ahead is a fault too, and nothing breaks.
    h.returned.store(1 << 40, Relaxed);
    for i in 0..20u8 {
        publisher.send(&[i]).unwrap();
    }
    assert!(seg.stats().subscribers[1].faults >= 4);
    assert_eq!(&*keep, [7]);
    assert_eq!(seg.stats().subscribers[0].faults, 0);
}

// ---------------------------------------------------------------------------
// Model-based test of the algorithms (single-threaded, heap memory).

#[derive(Debug, Clone)]
enum Op {
    Send,
    Take(usize),
    Release(usize, usize),
    /// Credits, policy, history wanted.
    Attach(u32, OverflowPolicy, u32),
    Detach(usize),
    SetCredits(usize, u32),
    /// The publisher leaves; `Attach`es meanwhile get their history from
    /// the owner; then a new publisher attaches.
    Republish(Vec<(u32, OverflowPolicy, u32)>),
}

fn policy() -> impl Strategy<Value = OverflowPolicy> {
    prop_oneof![Just(OverflowPolicy::DropNewest), Just(OverflowPolicy::KeepLatest), Just(OverflowPolicy::Lossless)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Send),
        5 => (0..4usize).prop_map(Op::Take),
        4 => (0..4usize, 0..8usize).prop_map(|(s, k)| Op::Release(s, k)),
        1 => (1..6u32, policy(), wanted()).prop_map(|(c, p, h)| Op::Attach(c, p, h)),
        1 => (0..4usize).prop_map(Op::Detach),
        1 => (0..4usize, 1..6u32).prop_map(|(s, c)| Op::SetCredits(s, c)),
        1 => proptest::collection::vec((1..6u32, policy(), wanted()), 0..3).prop_map(Op::Republish),
    ]
}

/// History a joiner asks for: none, one frame, two, or all there is.
fn wanted() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(1), Just(2), Just(u32::MAX)]
}

/// What a subscriber should see, by the rules of its policy.
#[derive(Debug)]
struct ModelSub {
    policy: OverflowPolicy,
    credits: u32,
    /// Sequence numbers queued, and whether each comes from the history.
    queue: VecDeque<(u64, bool)>,
    borrowed: Vec<(u64, u32)>,
    delivered: u64,
    dropped: u64,
}

type Core<T> = std::sync::Arc<T>;
type HeapSub = SubCore<Core<HeapStream>, Core<HeapChannel>>;

struct Harness {
    owner: OwnerCore<Core<HeapStream>, Core<HeapChannel>>,
    /// `None` only inside `Op::Republish`.
    publisher: Option<PubCore<Core<HeapStream>, Core<HeapChannel>>>,
    stream: Core<HeapStream>,
    channels: Vec<Core<HeapChannel>>,
    subs: HashMap<usize, (HeapSub, ModelSub)>,
    /// Which seq each slot carries while anybody holds it.
    slot_of_seq: HashMap<u64, u32>,
    next_seq: u64,
    /// The stream's history: the last `history` sequence numbers sent.
    history: VecDeque<u64>,
    history_len: usize,
}

impl Harness {
    fn new(geometry: Geometry) -> Self {
        let stream = Core::new(HeapStream::new(geometry));
        let channels: Vec<_> =
            (0..geometry.max_subscribers).map(|i| Core::new(HeapChannel::new(i, geometry.queue_capacity))).collect();
        let owner = OwnerCore::new(stream.clone(), channels.clone());
        let publisher = Some(PubCore::attach(stream.clone(), channels.clone(), 1).unwrap());
        Self {
            owner,
            publisher,
            stream,
            channels,
            subs: HashMap::new(),
            slot_of_seq: HashMap::new(),
            next_seq: 0,
            history: VecDeque::new(),
            history_len: geometry.history as usize,
        }
    }

    fn publisher(&mut self) -> &mut PubCore<Core<HeapStream>, Core<HeapChannel>> {
        self.publisher.as_mut().expect("a publisher is attached")
    }

    /// Admits a subscriber, expecting the newest frames of the history it
    /// asked for (within its credits) first.
    fn attach(&mut self, credits: u32, policy: OverflowPolicy, wanted: u32) {
        let o = SubscriberOptions { credits, policy, wait: WaitStrategy::Park, history: wanted };
        let Ok(t) = self.owner.add(&o, 1) else { return };
        let s = t.index as usize;
        let core = SubCore::attach(
            self.stream.clone(),
            self.channels[s].clone(),
            s,
            t.generation,
            Backoff { spin: Duration::ZERO, park: true },
        )
        .unwrap();
        let n = self.history.len().min(wanted as usize).min(credits as usize);
        let queue = self.history.iter().skip(self.history.len() - n).map(|&seq| (seq, true)).collect();
        let model = ModelSub { policy, credits, queue, borrowed: vec![], delivered: 0, dropped: 0 };
        self.subs.insert(s, (core, model));
    }

    fn held_slots(&self) -> HashMap<u32, ()> {
        let mut held = HashMap::new();
        for seq in &self.history {
            held.insert(self.slot_of_seq[seq], ());
        }
        for (_, m) in self.subs.values() {
            for (seq, _) in &m.queue {
                held.insert(self.slot_of_seq[seq], ());
            }
            for (_, slot) in &m.borrowed {
                held.insert(*slot, ());
            }
        }
        held
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Send => {
                let slot = self.publisher().loan().expect("a loan never fails while credits are kept");
                assert!(!self.held_slots().contains_key(&slot), "loaned slot {slot} is still held");
                let full_lossless = self.subs.iter().find(|(_, (_, m))| {
                    m.policy == OverflowPolicy::Lossless && m.queue.len() + m.borrowed.len() >= m.credits as usize
                });
                let expect_block = full_lossless.map(|(&s, _)| s);
                match self.publisher().commit(slot, 1, 0) {
                    Err(CommitRefusal::WouldBlock { subscriber }) => {
                        assert_eq!(Some(subscriber as usize), expect_block.map(|_| subscriber as usize));
                        assert!(expect_block.is_some(), "unexpected WouldBlock");
                        self.publisher().abandon(slot);
                    }
                    Err(
                        refusal @ (CommitRefusal::Closed
                        | CommitRefusal::Replaced
                        | CommitRefusal::Forked
                        | CommitRefusal::Poisoned),
                    ) => {
                        panic!("{refusal:?}")
                    }
                    Ok(info) => {
                        assert!(expect_block.is_none(), "send should have blocked on {expect_block:?}");
                        assert_eq!(info.seq, self.next_seq);
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        self.slot_of_seq.insert(seq, slot);
                        let mut delivered = 0;
                        for (_, m) in self.subs.values_mut() {
                            if m.policy == OverflowPolicy::KeepLatest {
                                while m.queue.len() + m.borrowed.len() >= m.credits as usize && !m.queue.is_empty() {
                                    m.queue.pop_front();
                                    m.dropped += 1;
                                }
                            }
                            if m.queue.len() + m.borrowed.len() < m.credits as usize {
                                m.queue.push_back((seq, false));
                                delivered += 1;
                            } else {
                                m.dropped += 1;
                            }
                        }
                        assert_eq!(info.delivered, delivered);
                        if self.history_len > 0 {
                            self.history.push_back(seq);
                            if self.history.len() > self.history_len {
                                self.history.pop_front();
                            }
                        }
                    }
                }
            }
            Op::Take(k) => {
                let Some(s) = self.nth_sub(k) else { return };
                let (core, m) = self.subs.get_mut(&s).unwrap();
                // News of a publisher leaving and coming (`Republish`) is
                // not a frame: past it.
                let got = loop {
                    match core.try_take() {
                        Err(e) if e.is_publisher_event() => {}
                        other => break other,
                    }
                };
                if m.borrowed.len() >= m.credits as usize {
                    assert!(matches!(got, Err(TryRecvError::CreditsExhausted { .. })), "{got:?}");
                } else if let Some((seq, history)) = m.queue.pop_front() {
                    let info = got.unwrap();
                    assert_eq!((info.seq, info.slot, info.history), (seq, self.slot_of_seq[&seq], history));
                    m.borrowed.push((seq, info.slot));
                    m.delivered += 1;
                } else {
                    assert_eq!(got, Err(TryRecvError::Empty));
                }
            }
            Op::Release(k, i) => {
                let Some(s) = self.nth_sub(k) else { return };
                let (core, m) = self.subs.get_mut(&s).unwrap();
                if !m.borrowed.is_empty() {
                    let (_, slot) = m.borrowed.remove(i % m.borrowed.len());
                    core.return_slot(slot);
                }
            }
            Op::Attach(credits, policy, wanted) => {
                self.attach(credits, policy, wanted);
                // The publisher hands the history over at its next look at
                // the subscriber table (a loan, here).
                let slot = self.publisher().loan().unwrap();
                self.publisher().abandon(slot);
            }
            Op::Republish(joiners) => {
                self.publisher = None;
                for (credits, policy, wanted) in joiners {
                    self.attach(credits, policy, wanted);
                }
                self.publisher = Some(PubCore::attach(self.stream.clone(), self.channels.clone(), 2).unwrap());
            }
            Op::Detach(k) => {
                let Some(s) = self.nth_sub(k) else { return };
                self.owner.remove(s as u32).unwrap();
                let (core, _) = self.subs.remove(&s).unwrap();
                assert_eq!(core.try_take(), Err(TryRecvError::Detached));
            }
            Op::SetCredits(k, credits) => {
                let Some(s) = self.nth_sub(k) else { return };
                if self.owner.set_credits(s as u32, credits).is_ok() {
                    self.subs.get_mut(&s).unwrap().1.credits = credits;
                }
            }
        }
    }

    fn nth_sub(&self, k: usize) -> Option<usize> {
        let mut keys: Vec<_> = self.subs.keys().copied().collect();
        keys.sort_unstable();
        (!keys.is_empty()).then(|| keys[k % keys.len()])
    }

    fn check_counters(&self) {
        let stats = self.owner.stats(0);
        assert_eq!(stats.published, self.next_seq);
        for st in stats.subscribers.iter().filter(|st| !st.detaching) {
            let (_, m) = &self.subs[&(st.index as usize)];
            assert_eq!((st.delivered, st.dropped, st.queued), (m.delivered, m.dropped, m.queue.len() as u64));
        }
        // Every slot is free, loaned, or held by someone the model knows of.
        let held = self.held_slots().len() as u32;
        assert_eq!(stats.history_held as usize, self.history.len());
        let g = self.stream.layout().geometry;
        let used = (0..g.slot_count).filter(|&x| self.stream.mask(x).iter().any(|w| w.load(Relaxed) != 0)).count();
        assert!(used as u32 >= held);
        let _ = &self.channels[0].header();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn algorithms_match_the_model(history in prop_oneof![Just(0u32), Just(1), Just(3)], ops in proptest::collection::vec(op(), 1..300)) {
        let mut h = Harness::new(Geometry { slot_size: 8, slot_count: 12, max_subscribers: 4, queue_capacity: 8, history });
        for op in ops {
            h.apply(op);
            h.check_counters();
        }
        // Everyone lets go and leaves: the whole pool comes back.
        let keys: Vec<_> = h.subs.keys().copied().collect();
        for s in keys {
            h.owner.remove(s as u32).unwrap();
            h.subs.remove(&s);
        }
        let slot = h.publisher().loan().unwrap();
        h.publisher().abandon(slot);
        // But for the history's.
        prop_assert_eq!(h.owner.stats(0).free_slots as usize, 12 - h.history.len());
    }
}

#[test]
fn a_ticket_opens_one_subscriber_only() {
    let mut seg = segment(8, 4);
    let t = seg.add_subscriber(&opts(1, OverflowPolicy::DropNewest), 1).unwrap();
    let ro = seg.read_only_data_fd().unwrap();
    let _first = Subscriber::open(ro.as_fd(), seg.channel_fd(t.index).unwrap(), t).unwrap();
    assert!(matches!(
        Subscriber::open(ro.as_fd(), seg.channel_fd(t.index).unwrap(), t),
        Err(OpenSubscriberError::AlreadyOpen(0))
    ));
}

#[test]
fn a_scribbled_channel_does_not_stop_the_next_publisher() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let len = crate::platform::file_len(seg.channel_fd(0).unwrap()).unwrap() as usize;
    let raw = memmap2::MmapOptions::new()
        .len(len)
        .map_raw(std::os::fd::AsRawFd::as_raw_fd(&seg.channel_fd(0).unwrap()))
        .unwrap();
    // SAFETY: test-only scribbling over a mapping we own, with no Rust
    // references into it held across the write.
    unsafe { std::ptr::write_bytes(raw.as_mut_ptr(), 0xee, 128) };
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(&[1]).unwrap();
    assert_eq!(*sub.try_recv().unwrap(), [1]);
    // The owner rewrites a reused channel completely.
    drop(sub);
    seg.remove_subscriber(0).unwrap();
    publisher.send(&[0]).unwrap(); // the publisher reclaims index 0
    let again = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    publisher.send(&[2]).unwrap();
    assert_eq!(*again.try_recv().unwrap(), [2]);
}

#[test]
fn a_publisher_declared_gone_cannot_publish_any_more() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let mut old = seg.open_publisher().unwrap();
    old.send(&[1]).unwrap();
    seg.publisher_gone();
    let mut new = seg.open_publisher().unwrap();
    assert_eq!(old.send(&[9]), Err(SendError::Replaced));
    assert!(matches!(old.loan(), Err(LoanError::Replaced)));
    drop(old); // must not release the role its successor holds
    new.send(&[2]).unwrap();
    assert!(matches!(seg.open_publisher(), Err(OpenPublisherError::PublisherExists { .. })));
    let got: Vec<u8> = (0..2).map(|_| sub.try_recv().unwrap()[0]).collect();
    assert_eq!(got, [1, 2]);
}

#[test]
fn endless_timeouts_are_accepted() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(1, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send_timeout(&[1], Duration::MAX).unwrap();
    assert_eq!(*sub.recv_timeout(Duration::MAX).unwrap(), [1]);
}

#[test]
fn a_keep_latest_head_scribbled_to_the_limit_harms_nobody_else() {
    let mut seg = segment(8, 8);
    let honest = seg.open_subscriber(&opts(3, OverflowPolicy::Lossless)).unwrap();
    let bad = seg.open_subscriber(&opts(2, OverflowPolicy::KeepLatest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    let ch =
        ChannelMap::open_for_publisher(seg.channel_fd(bad.index()).unwrap(), seg.geometry().queue_capacity, 0).unwrap();
    for (i, head) in [u64::MAX, u64::MAX - 1, 1 << 63, 3].into_iter().enumerate() {
        ch.header().queue_head.store(head, Relaxed);
        for j in 0..3u8 {
            publisher.send(&[i as u8 * 10 + j]).unwrap();
        }
        for j in 0..3u8 {
            assert_eq!(*honest.try_recv().unwrap(), [i as u8 * 10 + j]);
        }
    }
    assert!(seg.stats().subscribers[1].faults > 0);
    assert_eq!(seg.stats().subscribers[0].faults, 0);
}

#[test]
fn lowered_credits_count_until_the_publisher_applies_them() {
    let mut seg = segment(8, 10);
    let a = seg.open_subscriber(&opts(6, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    seg.set_credits(a.index(), 2).unwrap();
    // The publisher has not seen the change: it may still fill 6 for `a`.
    assert!(matches!(
        seg.add_subscriber(&opts(4, OverflowPolicy::DropNewest), 1),
        Err(AdmitError::Refused(AddSubscriberError::CreditsRefused { committed: 6, .. }))
    ));
    publisher.send(&[1]).unwrap(); // applies the new credits
    seg.add_subscriber(&opts(4, OverflowPolicy::DropNewest), 1).unwrap();
    assert_eq!(*a.try_recv().unwrap(), [1]);
}

#[test]
fn an_idle_blocked_subscriber_uses_no_cpu() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(1, OverflowPolicy::DropNewest)).unwrap();
    let cpu = std::thread::spawn(move || {
        let thread_cpu = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        };
        let before = thread_cpu();
        assert_eq!(sub.recv_timeout(Duration::from_millis(300)).unwrap_err(), RecvError::Timeout);
        thread_cpu() - before
    })
    .join()
    .unwrap();
    // Parked in the kernel for 300 ms: a few wake-ups' worth of CPU at most.
    assert!(cpu < Duration::from_millis(30), "a parked subscriber burnt {cpu:?} of CPU");
}

#[test]
fn locked_and_huge_page_streams_work_or_fall_back() {
    // mlock: honoured, or refused with an error that says so.
    let locked = StreamConfig { mlock: true, ..StreamConfig::new(4096, 8) };
    match StreamSegment::create("locked", &locked) {
        Ok(mut seg) => {
            let sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
            seg.open_publisher().unwrap().send(&[1; 4096]).unwrap();
            assert_eq!(sub.try_recv().unwrap().len(), 4096);
        }
        Err(e) => assert!(e.to_string().contains("lock"), "{e}"),
    }
    // Huge pages: used if reserved, otherwise ordinary pages, same behaviour.
    let huge = StreamConfig { huge_pages: true, ..StreamConfig::new(1 << 20, 4) };
    let mut seg = StreamSegment::create("huge", &huge).unwrap();
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    let mut sample = publisher.loan().unwrap();
    sample.as_mut_slice().fill(7);
    sample.set_len(1 << 20);
    sample.send().unwrap();
    let got = sub.try_recv().unwrap();
    assert!(got.len() == 1 << 20 && got.iter().all(|&b| b == 7));
    let free_huge_pages = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("HugePages_Free:").map(|v| v.trim().parse::<u64>().ok())))
        .flatten()
        .unwrap_or(0);
    // The stream needs 3 huge pages (4 MiB of slots plus the tables);
    // checked after creation, so 3 of them may be ours.
    match free_huge_pages {
        0 if !seg.huge_pages() => {}
        n if n >= 8 => assert!(seg.huge_pages(), "{n} huge pages were free"),
        _ => {}
    }
}

#[test]
fn detached_samples_go_back_from_any_thread() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(1, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(b"one").unwrap();
    let owned = sub.try_recv().unwrap().detach();
    assert_eq!((&*owned, owned.seq()), (&b"one"[..], 0));
    // Detached, it still counts against the credits.
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::CreditsExhausted { held: 1, credits: 1 });
    std::thread::spawn(move || assert_eq!(&*owned, b"one")).join().unwrap();
    // The next receive hands the slot back first.
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(sub.borrowed(), 0);
    let info = publisher.send(b"two").unwrap();
    assert_eq!((info.delivered, info.dropped), (1, 0));
    assert_eq!(&*sub.try_recv().unwrap().detach(), b"two");
    // Sent, received, detached and dropped on another thread in turn,
    // 1000 frames never run the 4-slot pool dry. (The slot goes back at
    // the subscriber's next receive: a frame sent before that would find
    // its one credit still used.)
    for i in 0..1000u32 {
        assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
        assert_eq!(publisher.send(&i.to_le_bytes()).unwrap().delivered, 1);
        let owned = sub.try_recv().unwrap().detach();
        std::thread::spawn(move || assert_eq!(*owned, i.to_le_bytes())).join().unwrap();
    }
    assert_eq!(seg.stats().subscribers[0].dropped, 0);
}

#[derive(Debug)]
struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Flag {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

#[test]
fn detached_samples_outlive_their_subscriber_and_keep_its_lease() {
    let mut seg = segment(8, 4);
    let mut sub = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    sub.set_keep_alive(std::sync::Arc::new(Flag(ended.clone())));
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(b"a").unwrap();
    publisher.send(b"b").unwrap();
    let a = sub.try_recv().unwrap().detach();
    let b = sub.try_recv().unwrap().detach();
    drop(sub);
    assert!(!ended.load(Relaxed), "the lease ended while samples were out");
    drop(a);
    assert!(!ended.load(Relaxed));
    assert_eq!(&*b, b"b");
    drop(b);
    assert!(ended.load(Relaxed), "the lease outlived the last sample");
}

#[test]
fn a_watcher_wakes_for_frames_releases_and_interrupts_only() {
    use std::sync::atomic::AtomicBool;
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    let watcher = sub.watcher();
    let never = || false;
    let soon = || Some(std::time::Instant::now() + Duration::from_millis(20));
    let long = || Some(std::time::Instant::now() + Duration::from_secs(30));

    // Nothing happens (once the subscriber has seen the publisher come):
    // the deadline passes.
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    assert!(!watcher.wait(sub.position(), soon(), never));
    // A frame arrives while it sleeps.
    let from = sub.position();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            publisher.send(b"x").unwrap();
        });
        assert!(watcher.wait(from, long(), never));
    });
    // It does not take: the frame is still there.
    let owned = sub.try_recv().unwrap().detach();
    // A detached sample is released on another thread while it sleeps.
    let from = sub.position();
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(owned);
        });
        assert!(watcher.wait(from, long(), never));
    });
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(sub.borrowed(), 0);
    // Interrupted.
    let stop = AtomicBool::new(false);
    let from = sub.position();
    let interrupter = watcher.interrupter();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            stop.store(true, Relaxed);
            interrupter.interrupt();
        });
        assert!(watcher.wait(from, long(), || stop.load(Relaxed)));
    });
}

#[test]
fn a_detached_loan_is_resumed_by_its_publisher_only() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    let mut sample = publisher.loan().unwrap();
    sample.as_mut_slice()[..2].copy_from_slice(b"hi");
    sample.set_len(2);
    let loan = sample.detach();
    assert_eq!(loan.len(), 2);
    // Another stream's publisher cannot use it.
    let mut other_seg = segment(8, 4);
    let mut other = other_seg.open_publisher().unwrap();
    let loan = other.resume(loan).unwrap_err();
    // Its own publisher sends it; a resumed and dropped loan is discarded.
    let sample = publisher.resume(loan).unwrap();
    assert_eq!(&*sample, b"hi");
    assert_eq!(sample.send().unwrap().seq, 0);
    let loan = publisher.loan().unwrap().detach();
    drop(publisher.resume(loan).unwrap());
    assert_eq!(&*sub.try_recv().unwrap(), b"hi");
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    publisher.send(b"x").unwrap();
    assert_eq!(seg.stats().published, 2);
}

#[test]
fn a_removed_subscribers_credits_are_free_at_once_even_with_an_idle_publisher() {
    let mut seg = segment(8, 9);
    let dead = seg.open_subscriber(&opts(7, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    for i in 0..7u8 {
        publisher.send(&[i]).unwrap();
    }
    let held: Vec<_> = (0..3).map(|_| dead.try_recv().unwrap()).collect();
    // It dies holding 3 and with 4 queued; the publisher stays idle.
    std::mem::forget(held);
    let index = dead.index();
    std::mem::forget(dead);
    seg.remove_subscriber(index).unwrap();
    // Its 7 credits go to a newcomer at once...
    let new = seg.open_subscriber(&opts(7, OverflowPolicy::Lossless)).unwrap();
    // ...and the publisher, reclaiming on its next send, has the slots for
    // all of them.
    for i in 0..7u8 {
        publisher.send(&[i]).unwrap();
    }
    for i in 0..7u8 {
        assert_eq!(*new.try_recv().unwrap(), [i]);
    }
}

/// The owner ends the close of an idle publisher at its grace by declaring
/// it gone, which counts a departure before it marks the stream closed. A
/// subscriber that looks in between must not report that departure: the
/// close supersedes it, and the subscriber sees the end.
#[test]
fn a_close_supersedes_the_departure_counted_at_its_grace() {
    let g = Geometry { slot_size: 8, slot_count: 4, max_subscribers: 1, queue_capacity: 2, history: 0 };
    let stream = Core::new(HeapStream::new(g));
    let channels = vec![Core::new(HeapChannel::new(0, g.queue_capacity))];
    let mut owner = OwnerCore::new(stream.clone(), channels.clone());
    let t = owner.add(&opts(2, OverflowPolicy::Lossless), 1).unwrap();
    let park = Backoff { spin: Duration::ZERO, park: true };
    let sub: HeapSub =
        SubCore::attach(stream.clone(), channels[0].clone(), t.index as usize, t.generation, park).unwrap();
    let idle = PubCore::attach(stream.clone(), channels.clone(), 1).unwrap();
    owner.close();
    assert_eq!(sub.try_take().unwrap_err(), TryRecvError::Empty, "an idle publisher has not acknowledged");
    // The first step of `publisher_gone`: the departure is counted...
    let changes = &stream.header().control.publisher_changes;
    changes.store(changes.load(Relaxed) + 1, Relaxed);
    // ...and the subscriber looks before the close is acknowledged.
    assert_eq!(sub.try_take().unwrap_err(), TryRecvError::Empty, "no stray departure");
    changes.store(changes.load(Relaxed) - 1, Relaxed);
    owner.publisher_gone();
    assert_eq!(sub.try_take().unwrap_err(), TryRecvError::Closed);
    assert_eq!(sub.take(None).unwrap_err(), RecvError::Closed);
    drop(idle);
    assert_eq!(sub.try_take().unwrap_err(), TryRecvError::Closed);
}

#[test]
fn a_stream_without_timestamps_sends_frames_stamped_zero() {
    let mut seg =
        StreamSegment::create("plain", &StreamConfig { timestamps: false, ..StreamConfig::new(8, 4) }).unwrap();
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    assert!(!publisher.timestamps());
    publisher.send(b"a").unwrap();
    let sample = sub.try_recv().unwrap();
    assert_eq!((&*sample, sample.timestamp_ns()), (&b"a"[..], 0));
    // Stamped streams stay stamped.
    let stamped = segment(8, 4).open_publisher().unwrap();
    assert!(stamped.timestamps());
}

#[test]
fn the_publishers_loan_budget_bounds_its_loans_and_is_kept_out_of_credits() {
    // A 1,024-slot stream keeps the default two loans for its publisher
    // and promises the rest.
    let mut seg = segment(8, 1024);
    seg.add_subscriber(&opts(1000, OverflowPolicy::DropNewest), 1).unwrap();
    seg.add_subscriber(&opts(22, OverflowPolicy::DropNewest), 1).unwrap();
    assert!(matches!(
        seg.add_subscriber(&opts(1, OverflowPolicy::DropNewest), 1),
        Err(AdmitError::Refused(AddSubscriberError::CreditsRefused { available: 0, .. }))
    ));
    let mut publisher = seg.open_publisher().unwrap();
    let first = publisher.loan().unwrap().detach();
    let second = publisher.loan().unwrap().detach();
    let err = publisher.loan().unwrap_err();
    assert_eq!(err, LoanError::TooManyLoans { budget: 2 });
    assert!(err.to_string().contains("already holds its 2 loan(s)"));
    assert!(matches!(publisher.send(b"x"), Err(SendError::Loan(LoanError::TooManyLoans { budget: 2 }))));
    // A loan sent or dropped gives its place back.
    publisher.resume(first).unwrap().send().unwrap();
    drop(publisher.resume(second).unwrap());
    publisher.send(b"y").unwrap();
    assert_eq!(publisher.next_seq(), 2);
}

/// A subscriber that keeps its wake word set without reading (or a waiter
/// that left it set) costs the publisher a system call only for a frame
/// that finds its queue empty: the publisher clears the word when, and
/// only when, it wakes.
#[test]
fn a_subscriber_keeping_its_wake_word_set_is_woken_only_for_a_frame_into_an_empty_queue() {
    let g = Geometry { slot_size: 8, slot_count: 8, max_subscribers: 1, queue_capacity: 4, history: 0 };
    let stream = Core::new(HeapStream::new(g));
    let channels = vec![Core::new(HeapChannel::new(0, 4))];
    let mut owner = OwnerCore::new(stream.clone(), channels.clone());
    for policy in [OverflowPolicy::DropNewest, OverflowPolicy::KeepLatest] {
        let t = owner.add(&opts(3, policy), 1).unwrap();
        let mut publisher = PubCore::attach(stream.clone(), channels.clone(), 1).unwrap();
        let sub = SubCore::attach(
            stream.clone(),
            channels[0].clone(),
            0,
            t.generation,
            Backoff { spin: Duration::ZERO, park: true },
        )
        .unwrap();
        let waiting = &channels[0].header().waiting;
        let send = |publisher: &mut PubCore<_, _>| {
            let slot = publisher.loan().unwrap();
            publisher.commit(slot, 1, 0).unwrap();
        };
        let flag = || waiting.load(Relaxed) & 1;
        waiting.fetch_or(1, Relaxed);
        send(&mut publisher);
        assert_eq!(flag(), 0, "{policy:?}: the first frame wakes");
        // Set again without reading: every further frame (queued, dropped
        // or evicting under KeepLatest) leaves it alone.
        for _ in 0..10 {
            waiting.fetch_or(1, Relaxed);
            send(&mut publisher);
            assert_eq!(flag(), 1, "{policy:?}: no wake into a queue with frames");
        }
        // Once it has read everything, the next frame wakes it again.
        while let Ok(info) = sub.try_take() {
            sub.return_slot(info.slot);
        }
        send(&mut publisher);
        assert_eq!(flag(), 0, "{policy:?}: a frame into an empty queue wakes");
        drop(publisher);
        owner.remove(t.index).unwrap();
    }
}

/// Issue 10, part 1: a stream holds a channel file per subscriber, created
/// at admission and closed once its index is free again, and a publisher
/// attached before the subscriber came delivers to it (the channel reaches
/// it through its inbox).
#[test]
fn channels_come_with_subscribers_and_go_when_their_index_is_free() {
    let mut seg = segment(8, 8);
    assert_eq!(seg.channel_count(), 0, "no subscriber, no channel");
    let mut publisher = seg.open_publisher().unwrap();
    let a = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    let b = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    assert_eq!(seg.channel_count(), 2);
    let info = publisher.send(b"x").unwrap();
    assert_eq!(info.delivered, 2, "both came after the publisher attached");
    assert_eq!(&*a.try_recv().unwrap(), b"x");
    assert_eq!(&*b.try_recv().unwrap(), b"x");
    let index = a.index();
    drop(a);
    seg.release_subscriber(index).unwrap();
    // The publisher reclaims at its next send; the file goes at the next look.
    assert_eq!(publisher.send(b"y").unwrap().delivered, 1);
    assert_eq!(seg.sweep_channels(), 1);
    assert_eq!(seg.channel_count(), 1);
    assert!(seg.channel_fd(index).is_none());
    // A new subscriber of the same index gets a new file, and the frames.
    let c = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    assert_eq!(publisher.send(b"z").unwrap().delivered, 2);
    assert_eq!(&*c.try_recv().unwrap(), b"z");
}

/// Review finding: subscribers that are given up before they are activated
/// (their client left) hand the publisher a channel each; the inbox keeps
/// only the newest per index, so however many come and go before the
/// publisher looks, it maps at most one file per index.
#[test]
fn the_inbox_keeps_one_channel_per_index() {
    use super::core::publisher::{Chan, Inbox};
    let inbox: Inbox<u32> = Inbox::default();
    for generation in 1..=2000u64 {
        inbox.push((generation % 3) as u32, Chan { generation: Some(generation), map: generation as u32 });
    }
    let mut taken: Vec<_> = inbox.take().into_iter().map(|(i, c)| (i, c.generation)).collect();
    taken.sort_unstable();
    assert_eq!(taken, [(0, Some(1998)), (1, Some(1999)), (2, Some(2000))]);
}

/// An owner that activates a subscriber whose channel the publisher never
/// got breaks the protocol: the publisher delivers nothing to it (rather
/// than to a file that is not its own) and goes on serving the rest; once
/// the channel arrives, it delivers. Every reservation has a generation of
/// its own, even one given up, so a file of a given-up reservation never
/// passes for a later one's.
#[test]
fn a_publisher_delivers_only_with_the_subscriber_s_own_channel() {
    use super::core::publisher::{Chan, Inbox};
    let g = Geometry { slot_size: 8, slot_count: 8, max_subscribers: 1, queue_capacity: 4, history: 0 };
    let stream = Core::new(HeapStream::new(g));
    let mut owner: OwnerCore<Core<HeapStream>, Core<HeapChannel>> = OwnerCore::sparse(stream.clone());
    let inbox: Core<Inbox<Core<HeapChannel>>> = Core::default();
    let mut publisher = PubCore::attach_with(stream.clone(), vec![None], Some(inbox.clone()), 1).unwrap();

    let given_up = owner.reserve(&opts(2, OverflowPolicy::Lossless), 1).unwrap();
    let stale = Core::new(HeapChannel::new(given_up.index, 4));
    owner.install(given_up.index, stale.clone());
    inbox.push(given_up.index, Chan { generation: Some(given_up.generation), map: stale });
    owner.give_up(given_up.index);

    let r = owner.reserve(&opts(2, OverflowPolicy::Lossless), 1).unwrap();
    assert_eq!(r.index, given_up.index, "the one index comes round again");
    assert_ne!(r.generation, given_up.generation, "a generation of its own");
    let channel = Core::new(HeapChannel::new(r.index, 4));
    owner.install(r.index, channel.clone());
    // Activated without handing the publisher the channel.
    let t = owner.activate(r.index).unwrap();
    let send = |p: &mut PubCore<_, _>| {
        let slot = p.loan().unwrap();
        p.commit(slot, 1, 0).unwrap()
    };
    assert_eq!(send(&mut publisher).delivered, 0, "the given-up file is not its channel");
    inbox.push(r.index, Chan { generation: Some(r.generation), map: channel.clone() });
    owner.set_credits(t.index, 3).unwrap(); // any change of the table
    assert_eq!(send(&mut publisher).delivered, 1);
    let sub: HeapSub =
        SubCore::attach(stream, channel, t.index as usize, t.generation, Backoff { spin: Duration::ZERO, park: true })
            .unwrap();
    assert_eq!(sub.try_take().unwrap().seq, 1);
}

/// For the C library: a sample forgotten keeps its slot until its slot is
/// given back by number; a number out of range, or one more than was
/// taken, changes nothing.
#[test]
fn a_forgotten_sample_s_slot_is_given_back_by_number() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(b"one").unwrap();
    publisher.send(b"two").unwrap();
    assert!(matches!(publisher.send(b"three"), Err(SendError::WouldBlock { .. })), "two credits");
    let (ptr, info) = sub.try_recv().unwrap().forget();
    // SAFETY: the slot is still this subscriber's: its bytes stay put.
    assert_eq!(unsafe { std::slice::from_raw_parts(ptr, info.len as usize) }, b"one");
    assert_eq!(sub.borrowed(), 1);
    assert!(!sub.release_slot(99), "out of range");
    // A live sample's slot, or one made up, is not given back by number.
    let live = sub.try_recv().unwrap();
    assert!(!sub.release_slot(live.info().slot), "a live sample's");
    assert!(!sub.release_slot((info.slot + 2) % 4), "made up");
    drop(live);
    assert!(sub.release_slot(info.slot));
    assert!(!sub.release_slot(info.slot), "twice");
    assert_eq!(sub.borrowed(), 0);
    publisher.send(b"three").unwrap();
    assert_eq!(&*sub.try_recv().unwrap(), b"three");
}

#[test]
fn a_parked_loan_is_taken_back_whole_and_one_at_a_time() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(2, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    assert!(!publisher.has_parked() && publisher.unpark().is_none());
    let mut sample = publisher.loan().unwrap();
    sample.as_mut_slice()[..2].copy_from_slice(b"hi");
    sample.set_len(2);
    let slot = sample.as_mut_ptr();
    sample.park().unwrap();
    assert!(publisher.has_parked());
    // A second loan cannot be parked beside it: it comes back, and goes
    // back to the pool when dropped.
    let second = publisher.loan().unwrap();
    let second = second.park().unwrap_err();
    drop(second);
    // The same slot, with what was written and its length.
    let mut sample = publisher.unpark().unwrap();
    assert_eq!((sample.as_mut_ptr(), &*sample), (slot, &b"hi"[..]));
    sample.send().unwrap();
    assert_eq!(&*sub.try_recv().unwrap(), b"hi");
    // A parked loan counts against the loan budget (two here) like any.
    publisher.loan().unwrap().park().unwrap();
    let other = publisher.loan().unwrap().detach();
    assert_eq!(publisher.loan().unwrap_err(), LoanError::TooManyLoans { budget: 2 });
    drop(publisher.resume(other).unwrap());
    // Dropped with a loan parked (given back as a dropped sample's is),
    // the publisher leaves the stream to the next.
    drop(publisher);
    let mut publisher = seg.open_publisher().unwrap();
    assert!(!publisher.has_parked());
    publisher.send(b"next").unwrap();
    assert_eq!(&*sub.try_recv().unwrap(), b"next");
}

#[test]
fn a_send_with_a_timeout_that_need_not_wait_sends_and_one_that_must_times_out() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(1, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    let mut sample = publisher.loan().unwrap();
    sample.set_len(1);
    assert_eq!(sample.try_send_timeout(Duration::ZERO).unwrap().seq, 0);
    let mut sample = publisher.loan().unwrap();
    sample.as_mut_slice()[0] = 7;
    sample.set_len(1);
    let unsent = sample.try_send_timeout(Duration::from_millis(10)).unwrap_err();
    assert_eq!(unsent.error, SendError::Timeout);
    drop(sub.try_recv().unwrap());
    assert_eq!(unsent.sample.try_send_timeout(Duration::from_secs(60)).unwrap().seq, 1);
    assert_eq!(*sub.try_recv().unwrap(), [7]);
}

#[test]
fn a_parked_loan_is_sent_in_place_kept_when_it_must_wait_and_given_back_when_refused() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(1, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    assert!(publisher.try_send_parked(1).is_none(), "nothing parked");
    let mut sample = publisher.loan().unwrap();
    sample.as_mut_slice()[..3].copy_from_slice(b"abc");
    sample.park().unwrap();
    assert_eq!(publisher.try_send_parked(9), Some(Err(SendError::TooLarge { len: 9, slot_size: 8 })));
    assert_eq!(publisher.try_send_parked(3).unwrap().unwrap().seq, 0);
    assert!(!publisher.has_parked());
    // The subscriber's one credit is taken: the next must wait, parked.
    publisher.loan().unwrap().park().unwrap();
    assert!(matches!(publisher.try_send_parked(1), Some(Err(SendError::WouldBlock { .. }))));
    assert!(publisher.has_parked());
    assert_eq!(&*sub.try_recv().unwrap(), b"abc");
    assert_eq!(publisher.try_send_parked(1).unwrap().unwrap().seq, 1);
    drop(sub.try_recv().unwrap());
    // Closed: the loan's slot is given back, nothing stays parked.
    publisher.loan().unwrap().park().unwrap();
    seg.close();
    assert_eq!(publisher.try_send_parked(1), Some(Err(SendError::Closed)));
    assert!(!publisher.has_parked());
}

/// A panic in the middle of a parked loan's delivery (simulated at every
/// point of a send) leaves nothing parked: the slot, which subscribers
/// may hold, is not handed out again as the current loan.
#[test]
fn a_parked_loan_whose_send_panics_is_not_parked_any_more() {
    for k in 0..8 {
        let mut seg = segment(8, 4);
        let _sub = seg.open_subscriber(&opts(2, OverflowPolicy::DropNewest)).unwrap();
        let mut publisher = seg.open_publisher().unwrap();
        publisher.loan().unwrap().park().unwrap();
        let (result, ran) = panic_at(k, || publisher.try_send_parked(1));
        if !ran {
            assert!(matches!(result, Ok(Some(Ok(_)))));
            return; // past the last point of a send
        }
        assert!(result.is_err(), "the panic went through");
        assert!(!publisher.has_parked() && publisher.unpark().is_none(), "point {k}: still parked");
    }
    panic!("a send has more points than the test tries");
}

/// The C library's loan (`loan_parked`) and send (`try_send_parked`): the
/// parked slot comes back until it is sent, a send refused as too large
/// or as would-block leaves it parked, and after many rounds of each no
/// slot and no loan is lost (the whole budget is still there). A
/// publisher poisoned meanwhile refuses its parked loan.
#[test]
fn the_c_library_s_parked_loan_loses_no_slot_and_no_loan() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(1, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    for round in 0..100u8 {
        let (ptr, cap) = publisher.loan_parked().unwrap();
        assert_eq!(publisher.loan_parked().unwrap(), (ptr, cap), "round {round}: the same loan while parked");
        // SAFETY: the parked loan's slot, `cap` bytes, is ours to write.
        unsafe { ptr.write(round) };
        assert!(matches!(publisher.try_send_parked(cap + 1), Some(Err(SendError::TooLarge { .. }))));
        let sent = match publisher.try_send_parked(1).unwrap() {
            // The one-credit subscriber still holds last round's frame.
            Err(SendError::WouldBlock { .. }) => {
                assert_eq!(publisher.loan_parked().unwrap().0, ptr, "round {round}: parked after would-block");
                drop(sub.try_recv().unwrap());
                publisher.try_send_parked(1).unwrap()
            }
            other => other,
        };
        assert_eq!(sent.unwrap().seq, u64::from(round));
        assert!(!publisher.has_parked());
    }
    assert_eq!(sub.try_recv().unwrap()[0], 99);
    let loans = [publisher.loan().unwrap().detach(), publisher.loan().unwrap().detach()];
    assert_eq!(publisher.loan().unwrap_err(), LoanError::TooManyLoans { budget: 2 });
    drop(loans);
    publisher.loan_parked().unwrap();
    let (result, ran) = panic_at(0, || publisher.try_send_parked(1));
    assert!(ran && result.is_err());
    assert_eq!(publisher.loan_parked().unwrap_err(), LoanError::Poisoned);
    assert!(publisher.try_send_parked(1).is_none());
}

/// Runs `body`, panicking (as a bug would) at its `k`-th crash point;
/// the panic caught. Returns `body`'s result, or the panic, and whether
/// the panic happened (false: `body` has fewer points).
fn panic_at<R>(k: u32, body: impl FnOnce() -> R) -> (std::thread::Result<R>, bool) {
    super::core::crash::hook::act_at(k, &mut || panic!("simulated panic"), || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
    })
}

/// Takes what `sub` has until it finds nothing, its credits run out or
/// it ends: frames (kept in `held`) as `f<seq>`, news by name.
fn take_all<'s>(sub: &'s Subscriber, held: &mut Vec<Sample<'s>>, log: &mut Vec<String>) {
    loop {
        match sub.try_recv() {
            Ok(sample) => {
                log.push(format!("f{}", sample.seq()));
                held.push(sample);
            }
            Err(TryRecvError::Empty | TryRecvError::CreditsExhausted { .. }) => return,
            Err(e @ (TryRecvError::PublisherGone | TryRecvError::PublisherBack)) => log.push(format!("{e:?}")),
            Err(e) => return log.push(format!("{e:?}")), // the end
        }
    }
}

/// Sends frames that carry their own number until one is refused;
/// returns how many went.
fn send_numbered(publisher: &mut Publisher, most: usize) -> usize {
    (0..most).take_while(|_| publisher.send(&[publisher.next_seq() as u8; 8]).is_ok()).count()
}

/// Review findings: a panic part-way through a send (simulated at every
/// point) left the publisher going on with a private state that
/// disagreed with shared memory — a slot queued to a subscriber without
/// its holder bit went back on the free list and was written while read;
/// a later loan acknowledged a close before the frame reached everyone;
/// the publisher's drop counted its departure before it. Now the panic
/// poisons the publisher: it refuses everything, and its drop leaves the
/// repair to the owner. Every subscriber gets frame 1 or none does, before
/// the publisher is gone and before the end; no held sample changes; no
/// number is used twice.
#[test]
fn a_send_that_panics_poisons_its_publisher_and_the_owner_finishes_the_frame() {
    for close in [false, true] {
        for k in 0.. {
            let mut seg = segment(8, 24);
            let subs: Vec<_> = [OverflowPolicy::DropNewest, OverflowPolicy::KeepLatest, OverflowPolicy::Lossless]
                .into_iter()
                .map(|policy| seg.open_subscriber(&opts(6, policy)).unwrap())
                .collect();
            let mut publisher = seg.open_publisher().unwrap();
            publisher.send(&[0; 8]).unwrap();
            let (result, ran) = panic_at(k, || publisher.send(&[1; 8]));
            if !ran {
                assert!(matches!(result, Ok(Ok(_))) && k > 0);
                break; // past the last point of a send
            }
            let at = format!("point {k}, close {close}");
            assert!(result.is_err(), "{at}: the panic went through");
            if close {
                seg.close();
            }
            assert!(matches!(publisher.loan(), Err(LoanError::Poisoned)), "{at}");
            assert_eq!(publisher.send(&[9; 8]), Err(SendError::Poisoned), "{at}");
            let mut held: Vec<Vec<Sample<'_>>> = subs.iter().map(|_| Vec::new()).collect();
            let mut logs: Vec<Vec<String>> = subs.iter().map(|_| Vec::new()).collect();
            // No news while it lives, nor once it has let go, until the
            // owner has finished its frame.
            let mut publisher = Some(publisher);
            for round in 0..2 {
                if round == 1 {
                    drop(publisher.take());
                }
                for (i, sub) in subs.iter().enumerate() {
                    take_all(sub, &mut held[i], &mut logs[i]);
                    assert!(logs[i].iter().all(|e| e.starts_with('f')), "{at}: news too early: {:?}", logs[i]);
                }
            }
            seg.publisher_released();
            for (i, sub) in subs.iter().enumerate() {
                take_all(sub, &mut held[i], &mut logs[i]);
                // The frames, then the news (gone, or the end).
                let news = logs[i].iter().position(|e| !e.starts_with('f')).unwrap_or(logs[i].len());
                assert!(logs[i][news..].iter().all(|e| !e.starts_with('f')), "{at}: subscriber {i}: {:?}", logs[i]);
            }
            if !close {
                let mut next = seg.open_publisher().unwrap();
                send_numbered(&mut next, 3);
            }
            for (i, sub) in subs.iter().enumerate() {
                take_all(sub, &mut held[i], &mut logs[i]);
            }
            let mut got_1 = 0;
            for (i, log) in logs.iter().enumerate() {
                let seqs: Vec<u64> = held[i].iter().map(|s| s.seq()).collect();
                assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{at}: subscriber {i}: {log:?}");
                for sample in &held[i] {
                    assert_eq!(&**sample, &[sample.seq() as u8; 8][..], "{at}: subscriber {i}'s frame was overwritten");
                }
                got_1 += usize::from(log.iter().any(|e| e == "f1"));
                let gone = log.iter().position(|e| e == "PublisherGone");
                if close {
                    // Its frames, then the news: gone (or not: the end
                    // supersedes it), and the end.
                    let frames = log.iter().filter(|e| e.starts_with('f')).count();
                    assert!(gone.is_none_or(|g| g >= frames), "{at}: subscriber {i}: {log:?}");
                    assert_eq!(log.last().map(String::as_str), Some("Closed"), "{at}: subscriber {i}: {log:?}");
                } else {
                    assert!(gone.is_some(), "{at}: subscriber {i} never heard the publisher go: {log:?}");
                }
            }
            assert!(got_1 == 0 || got_1 == subs.len(), "{at}: frame 1 reached {got_1} of {}: {logs:?}", subs.len());
        }
    }
}

/// Review finding: a panic while the publisher read a lossless
/// subscriber's returns (simulated at every point of the send that reads
/// them) left returns applied but not counted: applied twice later, a slot
/// the subscriber still read was loaned again, or a credit was lost for
/// good. The owner's repair after the poisoned publisher goes counts each
/// return once: the next publisher sends exactly what the credits allow.
#[test]
fn a_panic_while_reading_returns_loses_no_credit_and_frees_no_held_slot() {
    for k in 0.. {
        let mut seg = segment(8, 8);
        let sub = seg.open_subscriber(&opts(6, OverflowPolicy::Lossless)).unwrap();
        let mut publisher = seg.open_publisher().unwrap();
        assert_eq!(send_numbered(&mut publisher, 6), 6);
        let mut kept: Vec<_> = std::iter::from_fn(|| sub.try_recv().ok()).collect();
        kept.drain(..4); // frames 0 to 3 go back; 4 and 5 stay held
        let (result, ran) = panic_at(k, || publisher.send(&[6; 8]));
        if !ran {
            assert!(matches!(result, Ok(Ok(_))) && k > 0);
            return; // past the last point of a send
        }
        assert!(result.is_err(), "point {k}: the panic went through");
        assert!(matches!(publisher.loan(), Err(LoanError::Poisoned)), "point {k}");
        drop(publisher);
        seg.publisher_released();
        let mut next = seg.open_publisher().unwrap();
        let sent = send_numbered(&mut next, 8);
        // Credits 6: the 2 held, frame 6 if it was delivered, and the rest.
        let mut seqs: Vec<u64> = kept.iter().map(|s| s.seq()).collect();
        for sample in std::iter::from_fn(|| sub.try_recv().ok()) {
            seqs.push(sample.seq());
            assert_eq!(&*sample, &[sample.seq() as u8; 8][..], "point {k}");
            kept.push(sample);
        }
        for sample in &kept {
            assert_eq!(&**sample, &[sample.seq() as u8; 8][..], "point {k}: a held frame was overwritten");
        }
        assert_eq!(seqs, (4..4 + seqs.len() as u64).collect::<Vec<_>>(), "point {k}: a gap");
        assert_eq!(seqs.len(), 6, "point {k}: sent {sent} after the panic; credits lost or gained");
    }
}

/// Review finding: a panic while the publisher took back a removed
/// subscriber's slots (on its next send; simulated at every point) left
/// its list of subscribers short until the table next changed: a lossless
/// subscriber silently missed frames. Now the publisher is poisoned, and
/// the next one, rebuilt from shared memory, reaches it.
#[test]
fn a_panic_while_taking_back_a_removed_subscriber_s_slots_loses_nobody_s_frames() {
    for k in 0.. {
        let mut seg = segment(8, 12);
        let gone = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
        let stay = seg.open_subscriber(&opts(4, OverflowPolicy::Lossless)).unwrap();
        let mut publisher = seg.open_publisher().unwrap();
        assert_eq!(send_numbered(&mut publisher, 2), 2);
        seg.remove_subscriber(gone.index()).unwrap();
        let (result, ran) = panic_at(k, || send_numbered(&mut publisher, 1));
        if !ran {
            assert_eq!(result.ok(), Some(1));
            assert!(k > 0);
            return; // past the last point of a send
        }
        assert!(matches!(publisher.loan(), Err(LoanError::Poisoned)), "point {k}");
        drop(publisher);
        seg.publisher_released();
        let mut next = seg.open_publisher().unwrap();
        send_numbered(&mut next, 1);
        let seqs: Vec<u64> = std::iter::from_fn(|| stay.try_recv().ok()).map(|s| s.seq()).collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "point {k}");
        assert!(seqs.len() >= 3, "point {k}: the lossless subscriber got {seqs:?}");
    }
}

/// Second review: a panic in the writer's own code while a publisher
/// took over after a poisoned one (attach), while the owner did (its
/// reclaim), or in a publisher's drop (taking back a removed subscriber's
/// slots), simulated at every point, left the writer role held by nobody
/// alive: every later publisher was refused. Now the role is let go with
/// `dirty` set: the next publisher repairs, and the lossless subscriber's
/// frames come whole, in order, without a gap.
#[test]
fn a_panic_while_taking_over_or_letting_go_leaves_the_role_free() {
    for stage in ["attach", "owner", "drop"] {
        for k in 0.. {
            let mut seg = segment(8, 12);
            let gone = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
            let sub = seg.open_subscriber(&opts(4, OverflowPolicy::Lossless)).unwrap();
            let mut publisher = seg.open_publisher().unwrap();
            assert_eq!(send_numbered(&mut publisher, 2), 2);
            let mut held: Vec<_> = std::iter::from_fn(|| sub.try_recv().ok()).collect();
            if stage == "drop" {
                seg.remove_subscriber(gone.index()).unwrap();
            } else {
                // Poisoned between a subscriber's entry and its bit.
                let (result, _) = panic_at(1, || publisher.send(&[2; 8]));
                assert!(result.is_err());
            }
            let (result, ran) = match stage {
                "attach" => {
                    drop(publisher);
                    panic_at(k, || drop(seg.open_publisher()))
                }
                "owner" => {
                    drop(publisher);
                    panic_at(k, || seg.publisher_released())
                }
                _ => panic_at(k, || drop(publisher)),
            };
            if !ran {
                assert!(result.is_ok() && k > 0, "{stage} {k}");
                break; // past its last point
            }
            assert!(result.is_err(), "{stage} {k}: the panic went through");
            let mut next = seg.open_publisher().unwrap_or_else(|e| panic!("{stage} {k}: {e}"));
            assert!(send_numbered(&mut next, 2) > 0, "{stage} {k}");
            held.extend(std::iter::from_fn(|| sub.try_recv().ok()));
            let seqs: Vec<u64> = held.iter().map(|s| s.seq()).collect();
            assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{stage} {k}");
            for sample in &held {
                assert_eq!(&**sample, &[sample.seq() as u8; 8][..], "{stage} {k}: a frame was overwritten");
            }
        }
    }
}

#[test]
fn a_parked_loan_that_must_wait_keeps_the_length_it_was_sent_with() {
    let mut seg = segment(8, 4);
    let sub = seg.open_subscriber(&opts(1, OverflowPolicy::Lossless)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    publisher.send(b"a").unwrap();
    publisher.loan().unwrap().park().unwrap();
    assert!(matches!(publisher.try_send_parked(3), Some(Err(SendError::WouldBlock { .. }))));
    assert_eq!(publisher.unpark().unwrap().len(), 3);
    drop(sub);
}

/// A subscriber measures the latency of the frames it receives into its
/// channel: the first frame, then the first published a millisecond after
/// the last one measured, else one in 64 — so a burst of frames costs a
/// few clock reads, and a slow stream is measured frame by frame. A
/// subscriber that scribbles on its histogram changes its own report
/// only; a stream without timestamps has none; a new subscriber at a
/// reused index starts from zero.
#[test]
fn subscribers_measure_a_sample_of_their_frames_latency_and_only_their_own() {
    use super::layout::{LATENCY_BUCKETS, latency_bucket};
    let mut seg = segment(8, 512);
    let honest = seg.open_subscriber(&opts(200, OverflowPolicy::DropNewest)).unwrap();
    let bad = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    // A burst: 130 frames within well under a millisecond of each other
    // (a slow machine may spread them: then more are measured).
    for i in 0..130u8 {
        publisher.send(&[i]).unwrap();
    }
    for _ in 0..130 {
        drop(honest.try_recv().unwrap());
    }
    let samples = |s: &SubscriberStats| s.latency.as_ref().unwrap().buckets.iter().sum::<u64>();
    let burst = samples(&seg.stats().subscribers[0]);
    assert!((3..=130).contains(&burst), "frames 0, 64 and 128 at least: {burst}");
    // A slow stream: every frame a millisecond after the last.
    for i in 0..5u8 {
        std::thread::sleep(Duration::from_micros(1100));
        publisher.send(&[i]).unwrap();
        drop(honest.try_recv().unwrap());
    }
    let stats = seg.stats();
    let counts = stats.subscribers[0].latency.as_ref().unwrap();
    assert_eq!(samples(&stats.subscribers[0]), burst + 5);
    // Received at once: each under a second, the sum of what was counted.
    assert!(counts.buckets[latency_bucket(1_000_000_000)..].iter().all(|&c| c == 0), "{counts:?}");
    assert!(counts.sum_ns > 0);

    // The other subscriber writes garbage over its histogram.
    let ch =
        ChannelMap::open(seg.channel_fd(bad.index()).unwrap(), bad.index(), seg.geometry().queue_capacity, 0).unwrap();
    for b in &ch.header().latency.buckets {
        b.store(u64::MAX, Relaxed);
    }
    ch.header().latency.sum_ns.store(u64::MAX, Relaxed);
    let after = seg.stats();
    assert_eq!(after.subscribers[0].latency, stats.subscribers[0].latency, "the honest report is untouched");
    assert_eq!(after.subscribers[1].latency.as_ref().unwrap().buckets, [u64::MAX; LATENCY_BUCKETS]);

    // An index reused, in a channel file every generation shares: the new
    // subscriber's histogram starts from zero, and the owner tells it from
    // the last one by its generation (nothing in shared memory), even
    // with no frame published in between.
    let mut config = StreamConfig::new(8, 8);
    config.max_subscribers = 1;
    let mut one = StreamSegment::create_with_all_channels("one", &config).unwrap();
    let first = one.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    let scribbled = ChannelMap::open(one.channel_fd(0).unwrap(), 0, one.geometry().queue_capacity, 0).unwrap();
    scribbled.header().latency.buckets[3].store(u64::MAX, Relaxed);
    let before = one.stats().subscribers[0].clone();
    assert_eq!(before.latency.as_ref().unwrap().buckets[3], u64::MAX);
    drop(first);
    one.remove_subscriber(0).unwrap();
    let second = one.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    assert_eq!(second.index(), 0);
    let after = one.stats().subscribers[0].clone();
    assert_eq!(samples(&after), 0);
    assert_ne!(after.generation, before.generation);
    assert_eq!(after.attach_seq, before.attach_seq, "nothing published in between");
    let mut p = one.open_publisher().unwrap();
    p.send(&[1]).unwrap();
    drop(second.try_recv().unwrap());
    assert_eq!(samples(&one.stats().subscribers[0]), 1);

    // No timestamps: no latency at all.
    let mut config = StreamConfig::new(8, 8);
    config.timestamps = false;
    let mut plain = StreamSegment::create("plain", &config).unwrap();
    let sub = plain.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    plain.open_publisher().unwrap().send(&[1]).unwrap();
    drop(sub.try_recv().unwrap());
    assert_eq!(plain.stats().subscribers[0].latency, None);
}

/// A stream with history whose publisher is attached but idle: a
/// subscriber that joins is handed the history at once by another thread
/// serving the publisher (as the client's connection thread does on the
/// owner's word), not at the publisher's next send; and a publisher that
/// is in the middle of its own calls is never touched meanwhile.
#[test]
fn an_idle_publisher_is_served_from_another_thread_and_a_busy_one_serves_itself() {
    let config = StreamConfig { history: 2, ..StreamConfig::new(8, 16) };
    let mut seg = StreamSegment::create("served", &config).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    for i in 0..3u8 {
        publisher.send(&[i]).unwrap();
    }
    let sub = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty, "the publisher holds the role: not handed yet");
    let inbox = publisher.channel_inbox().clone();
    std::thread::spawn(move || inbox.serve()).join().unwrap();
    let got: Vec<_> = (0..2).map(|_| sub.try_recv().map(|s| (s[0], s.is_history())).unwrap()).collect();
    assert_eq!(got, [(1, true), (2, true)]);
    publisher.send(&[3]).unwrap();
    assert_eq!(sub.try_recv().map(|s| (s[0], s.is_history())).unwrap(), (3, false));

    // Served over and over while the publisher sends: every joiner gets
    // the history once, then every frame, in order.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let inbox = publisher.channel_inbox().clone();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Relaxed) {
                inbox.serve();
            }
        });
        for round in 0..20u8 {
            let joiner = seg.open_subscriber(&opts(4, OverflowPolicy::DropNewest)).unwrap();
            publisher.send(&[100 + round]).unwrap();
            let mut seen = Vec::new();
            while let Ok(s) = joiner.try_recv() {
                seen.push((s.seq(), s.is_history()));
            }
            let last = publisher.next_seq() - 1;
            assert_eq!(seen, [(last - 2, true), (last - 1, true), (last, false)], "round {round}");
            drop(joiner);
            seg.remove_subscriber(seg.stats().subscribers.last().unwrap().index).ok();
        }
        stop.store(true, Relaxed);
    });
}

/// (Found by the review of the idle publisher's service.) `Publisher::drop` must let go of the writer role before it
/// returns (the client tells the broker `Unpublish` right after). With a
/// serving thread holding the core's `Arc` for a moment, the core may be
/// dropped later, on that thread: a publisher reopened at once is refused.
#[test]
fn a_dropped_publisher_lets_go_of_the_role_before_drop_returns() {
    let config = StreamConfig { history: 1, ..StreamConfig::new(8, 16) };
    let mut seg = StreamSegment::create("served-drop", &config).unwrap();
    let current: std::sync::Mutex<Option<ChannelInbox>> = std::sync::Mutex::new(None);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut refused = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Relaxed) {
                let inbox = current.lock().unwrap().clone();
                if let Some(inbox) = inbox {
                    inbox.serve();
                }
            }
        });
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Relaxed);
            }
        }
        let _stop = Stop(&stop);
        for round in 0..3000u32 {
            let mut publisher = match seg.open_publisher() {
                Ok(p) => p,
                Err(e) => {
                    refused.push((round, e.to_string()));
                    // Let the serving thread drop the last reference.
                    *current.lock().unwrap() = None;
                    let t0 = std::time::Instant::now();
                    loop {
                        match seg.open_publisher() {
                            Ok(p) => {
                                refused.push((round, format!("reopened after {:?}", t0.elapsed())));
                                break p;
                            }
                            Err(e) if t0.elapsed() > Duration::from_secs(2) => {
                                panic!("round {round}: refused for 2 s: {e}; refused so far: {refused:?}")
                            }
                            Err(_) => std::thread::sleep(Duration::from_micros(100)),
                        }
                    }
                }
            };
            if let Err(e) = publisher.send(&[1]) {
                panic!("round {round}: send {e}; refused so far: {refused:?}");
            }
            *current.lock().unwrap() = Some(publisher.channel_inbox().clone());
            for _ in 0..(round % 50) {
                std::hint::spin_loop();
            }
            drop(publisher);
            if let Some(pid) = seg.publisher_attached() {
                refused.push((round, format!("still attached (pid {pid}) after drop returned")));
            }
        }
        stop.store(true, Relaxed);
    });
    assert!(refused.is_empty(), "{} refused: {:?}", refused.len(), refused);
}

/// (Found by the review of the idle publisher's service.) A send that met a full lossless subscriber waits for room in
/// it (`wait_for_room(s)`, a separate core call). Between the refusal and
/// that call the core may be served (by the other thread, or by the owner
/// at the end of the refused commit): a serve that reclaims the departed
/// subscriber drops its channel, and `wait_for_room(s)` then finds none.
#[test]
fn a_serve_between_a_refusal_and_the_wait_for_room_retries() {
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let config = StreamConfig { history: 1, ..StreamConfig::new(8, 16) };
    let seg = std::sync::Mutex::new(StreamSegment::create("served-wait", &config).unwrap());
    let mut publisher = seg.lock().unwrap().open_publisher().unwrap();
    let inbox = publisher.channel_inbox().clone();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut panicked = None;
    let mut outcomes: HashMap<String, u32> = HashMap::new();
    std::thread::scope(|scope| {
        let _stop = Stop(&stop);
        scope.spawn(|| {
            while !stop.load(Relaxed) {
                inbox.serve();
            }
        });
        let (to_d, d_rx) = std::sync::mpsc::channel::<u32>();
        let (d_tx, from_d) = std::sync::mpsc::channel::<()>();
        let seg2 = &seg;
        scope.spawn(move || {
            while let Ok(i) = d_rx.recv() {
                let r = seg2.lock().unwrap().remove_subscriber(i);
                let _ = r;
                let _ = d_tx.send(());
            }
        });
        for round in 0..5000u32 {
            let sub = seg
                .lock()
                .unwrap()
                .open_subscriber(&SubscriberOptions { history: 0, ..opts(1, OverflowPolicy::Lossless) });
            let Ok(sub) = sub else {
                panicked = Some((round, Some(format!("open_subscriber: {:?}", sub.err()))));
                break;
            };
            let i = seg.lock().unwrap().stats().subscribers.last().unwrap().index;
            if let Err(e) = publisher.send(&[0]) {
                panicked = Some((round, Some(format!("first send: {e}"))));
                break;
            }
            to_d.send(i).unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                publisher.loan().map(|s| s.send_timeout(Duration::from_millis(20)))
            }));
            from_d.recv().unwrap();
            drop(sub);
            match r {
                Ok(r) => *outcomes.entry(format!("{r:?}")).or_default() += 1,
                Err(p) => {
                    panicked = Some((
                        round,
                        p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())),
                    ));
                    break;
                }
            }
        }
    });
    assert!(panicked.is_none(), "panicked: {panicked:?}; before: {outcomes:?}");
}
