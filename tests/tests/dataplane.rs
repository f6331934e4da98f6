//! The data plane across real processes: this test process owns each
//! stream (as the broker will) and starts publishers and subscribers as
//! separate processes that inherit the stream's descriptors.

use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::Result;
use memsock::shm::{OverflowPolicy, StreamConfig, StreamSegment, SubscriberOptions, SubscriberTicket, WaitStrategy};
use memsock_tests::{Peer, eventually};
use serde_json::{Value, json};

const PEER: &str = env!("CARGO_BIN_EXE_memsock-test-peer");

fn stream(name: &str, slot_size: u32, slot_count: u32) -> StreamSegment {
    StreamSegment::create_with_all_channels(name, &StreamConfig::new(slot_size, slot_count)).unwrap()
}

fn start_publisher(seg: &StreamSegment, extra: Value) -> Result<Peer> {
    let mut fds = vec![seg.data_fd()];
    fds.extend(seg.channel_fds().into_iter().map(|(_, _, fd)| fd));
    let mut spec = json!({"role": "publisher"});
    merge(&mut spec, extra);
    let mut p = Peer::spawn(PEER, &spec, &fds)?;
    p.read_until("ready")?;
    Ok(p)
}

fn start_subscriber(
    seg: &mut StreamSegment,
    role: &str,
    credits: u32,
    policy: OverflowPolicy,
    extra: Value,
) -> Result<(Peer, SubscriberTicket)> {
    let ticket = seg.add_subscriber(
        &SubscriberOptions { credits, policy, wait: WaitStrategy::default(), ..SubscriberOptions::default() },
        0,
    )?;
    let ro = seg.read_only_data_fd()?;
    let g = seg.geometry();
    let mut spec = json!({
        "role": role, "index": ticket.index, "generation": ticket.generation,
        "queue_capacity": g.queue_capacity, "slot_count": g.slot_count,
    });
    merge(&mut spec, extra);
    let mut p = Peer::spawn(PEER, &spec, &[ro.as_fd(), seg.channel_fd(ticket.index).expect("its channel")])?;
    p.read_until("ready")?;
    Ok((p, ticket))
}

fn merge(spec: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(b)) = (spec.as_object_mut(), extra) {
        a.extend(b);
    }
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Frames a subscriber never saw: gaps between what it received, before
/// its first and after its last frame.
fn lost(report: &Value, attach_seq: u64, published: u64) -> u64 {
    if n(report, "received") == 0 {
        return published - attach_seq;
    }
    n(report, "missing") + (n(report, "first") - attach_seq) + (published - 1 - n(report, "last"))
}

#[test]
fn ten_million_frames_reach_three_policies_intact_or_accounted() -> Result<()> {
    const FRAMES: u64 = 10_000_000;
    let mut seg = stream("ten-million", 256, 64);
    let (lossless, _) = start_subscriber(&mut seg, "subscriber", 16, OverflowPolicy::Lossless, json!({}))?;
    // The lossy two pause now and then, so that they do lose frames.
    let slow = json!({"slow_us": 200, "slow_every": 50_000});
    let (dropper, td) = start_subscriber(&mut seg, "subscriber", 16, OverflowPolicy::DropNewest, slow.clone())?;
    let (keeper, tk) = start_subscriber(&mut seg, "subscriber", 16, OverflowPolicy::KeepLatest, slow)?;
    // Progress every half million frames: the peers' deadline then catches
    // a hang, not a slow run (a lossless reader and its publisher that
    // both fell asleep hand over 16 frames per two wake-ups, ten times
    // slower than spinning side by side, and slower still on a busy host).
    let publisher = start_publisher(&seg, json!({"count": FRAMES, "report_every": 500_000}))?;

    assert_eq!(n(&publisher.finish()?, "sent"), FRAMES);
    seg.close();
    let (l, d, k) = (lossless.finish()?, dropper.finish()?, keeper.finish()?);
    let stats = seg.stats();
    assert_eq!(stats.published, FRAMES);

    assert_eq!((n(&l, "received"), n(&l, "missing"), n(&l, "bad")), (FRAMES, 0, 0), "{l}");
    assert_eq!((n(&l, "first"), n(&l, "last")), (0, FRAMES - 1));
    assert_eq!((stats.subscribers[0].delivered, stats.subscribers[0].dropped), (FRAMES, 0));

    for (report, ticket) in [(&d, td), (&k, tk)] {
        let st = stats.subscribers.iter().find(|s| s.index == ticket.index).unwrap();
        assert_eq!(n(report, "bad"), 0, "{report}");
        assert_eq!(n(report, "received"), st.delivered, "{report} {st:?}");
        assert_eq!(lost(report, st.attach_seq, FRAMES), st.dropped, "{report} {st:?}");
        assert_eq!(st.delivered + st.dropped, FRAMES, "{st:?}");
        assert!(st.dropped > 0, "the slow subscriber was expected to lose frames: {st:?}");
        assert_eq!(st.faults, 0);
    }
    let keeper_stats = stats.subscribers.iter().find(|s| s.index == tk.index).unwrap();
    assert_eq!(keeper_stats.evicted, keeper_stats.dropped, "KeepLatest drops by eviction only");
    Ok(())
}

#[test]
fn subscribers_join_and_leave_a_live_stream() -> Result<()> {
    let mut seg = stream("join-leave", 128, 64);
    let (base, tb) = start_subscriber(&mut seg, "subscriber", 8, OverflowPolicy::Lossless, json!({}))?;
    let publisher = start_publisher(&seg, json!({"count": 0}))?;
    let policies = [OverflowPolicy::DropNewest, OverflowPolicy::KeepLatest, OverflowPolicy::Lossless];
    for round in 0..12u64 {
        // Two or three at a time, each leaving after its own number of frames.
        let mut joined = Vec::new();
        for j in 0..2 + round % 2 {
            let policy = policies[((round + j) % 3) as usize];
            let frames = 500 + 700 * ((round * 3 + j) % 5);
            let (p, t) = start_subscriber(&mut seg, "subscriber", 4, policy, json!({"max_frames": frames}))?;
            joined.push((p, t, policy, frames));
        }
        // Remove each as soon as it exits (a lossless one that left would
        // otherwise hold the publisher back), as the broker does at lease end.
        while !joined.is_empty() {
            let Some(i) = joined.iter_mut().position(|(p, ..)| p.exited()) else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            let (p, t, policy, frames) = joined.swap_remove(i);
            seg.remove_subscriber(t.index)?;
            let r = p.finish()?;
            assert_eq!((n(&r, "received"), n(&r, "bad")), (frames, 0), "{policy:?}: {r}");
            if policy == OverflowPolicy::Lossless {
                assert_eq!(n(&r, "missing"), 0, "{r}");
            }
        }
    }
    seg.close();
    let sent = n(&publisher.finish()?, "sent");
    let b = base.finish()?;
    assert_eq!((n(&b, "received"), n(&b, "missing"), n(&b, "bad")), (sent, 0, 0), "{b}");
    // Everybody gone: the whole pool is free again.
    seg.remove_subscriber(tb.index)?;
    let stats = seg.stats();
    assert!(stats.subscribers.is_empty(), "{stats:?}");
    assert_eq!(stats.free_slots, 64);
    Ok(())
}

#[test]
fn slots_of_a_killed_subscriber_come_back_after_reclamation() -> Result<()> {
    let mut seg = stream("sigkill", 64, 16);
    let (base, tb) = start_subscriber(&mut seg, "subscriber", 4, OverflowPolicy::Lossless, json!({}))?;
    // The victim is lossless: while it hangs, the publisher is held back.
    let (mut victim, tv) = start_subscriber(&mut seg, "subscriber", 6, OverflowPolicy::Lossless, json!({"hold": 3}))?;
    let publisher = start_publisher(&seg, json!({"count": 0}))?;
    victim.read_until("holding")?;
    let victim_holds =
        |seg: &StreamSegment| seg.stats().subscribers.iter().find(|s| s.index == tv.index).map(|s| (s.held, s.queued));
    // Held back once the sixth frame is counted as sent: the victim's
    // counters move a few instructions before `published` does.
    let held_back = |seg: &StreamSegment| victim_holds(seg) == Some((6, 3)) && seg.stats().published == 6;
    assert!(eventually(Duration::from_secs(10), || held_back(&seg)), "{:?}", seg.stats());
    let stalled = seg.stats().published;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(seg.stats().published, stalled, "a full lossless subscriber holds the publisher back");

    victim.kill()?;
    seg.remove_subscriber(tv.index)?;
    // The publisher reclaims the six slots and carries on.
    assert!(eventually(Duration::from_secs(10), || {
        let s = seg.stats();
        victim_holds(&seg).is_none() && s.published > stalled + 1000
    }));
    seg.close();
    let sent = n(&publisher.finish()?, "sent");
    let b = base.finish()?;
    assert_eq!((n(&b, "received"), n(&b, "missing"), n(&b, "bad")), (sent, 0, 0), "{b}");
    seg.remove_subscriber(tb.index)?;
    assert_eq!(seg.stats().free_slots, 16);
    Ok(())
}

#[test]
fn hostile_subscribers_do_not_disturb_the_publisher_or_others() -> Result<()> {
    let mut seg = stream("hostile", 256, 64);
    let (good, tg) = start_subscriber(&mut seg, "subscriber", 8, OverflowPolicy::Lossless, json!({}))?;
    let mut hostiles = Vec::new();
    for (i, policy) in
        [OverflowPolicy::DropNewest, OverflowPolicy::KeepLatest, OverflowPolicy::DropNewest].into_iter().enumerate()
    {
        hostiles.push(start_subscriber(&mut seg, "hostile", 8, policy, json!({"duration_ms": 3000, "seed": 7 + i}))?);
    }
    let publisher = start_publisher(&seg, json!({"count": 0}))?;
    let mut faults = 0;
    for (h, t) in hostiles {
        let r = h.finish()?;
        assert!(n(&r, "actions") > 1000, "{r}");
        faults += seg.stats().subscribers.iter().find(|s| s.index == t.index).map_or(0, |s| s.faults);
        seg.remove_subscriber(t.index)?;
    }
    assert!(faults > 0, "the hostile subscribers' abuse should have been noticed");
    // The stream keeps flowing after they are gone.
    let before = seg.stats().published;
    assert!(eventually(Duration::from_secs(10), || seg.stats().published > before + 10_000));
    seg.close();
    let p = publisher.finish()?;
    let g = good.finish()?;
    assert_eq!((n(&g, "received"), n(&g, "missing"), n(&g, "bad")), (n(&p, "sent"), 0, 0), "{g}");
    assert_eq!(n(&g, "faults"), 0);
    let stats = seg.stats();
    assert_eq!(stats.subscribers.iter().find(|s| s.index == tg.index).unwrap().faults, 0);
    seg.remove_subscriber(tg.index)?;
    assert_eq!(seg.stats().free_slots, 64, "no slot leaked");
    Ok(())
}

/// A keep-latest subscriber with one credit, whose every frame the
/// publisher evicts for the next, through 200 `kill -9`s of a full-speed
/// publisher and take-overs: it keeps receiving, in order, and no slot is
/// lost. (Before recovery finished an eviction cut short, one kill at the
/// wrong instruction left it a credit short — with one credit, it never
/// received again.)
#[test]
fn a_one_credit_keep_latest_subscriber_survives_hundreds_of_publisher_kills() -> Result<()> {
    let mut seg = stream("kills", 64, 16);
    let opts = SubscriberOptions {
        credits: 1,
        policy: OverflowPolicy::KeepLatest,
        wait: WaitStrategy::Spin,
        ..SubscriberOptions::default()
    };
    let latest = seg.open_subscriber(&opts)?;
    let mut last_seq = None;
    let mut take = |latest: &memsock::shm::Subscriber| match latest.try_recv() {
        Ok(sample) => {
            assert!(last_seq.is_none_or(|last| sample.seq() > last), "{} after {last_seq:?}", sample.seq());
            last_seq = Some(sample.seq());
            true
        }
        Err(_) => false,
    };
    for round in 0..200u64 {
        let publisher = start_publisher(&seg, json!({"count": 0}))?;
        // Kill it a varying number of frames in: somewhere in its loop.
        let from = seg.stats().published;
        assert!(eventually(Duration::from_secs(10), || seg.stats().published > from + round % 13 * 40));
        publisher.kill()?;
        seg.publisher_gone();
        if round % 3 == 0 {
            take(&latest);
        }
    }
    let publisher = start_publisher(&seg, json!({"count": 0}))?;
    let got = eventually(Duration::from_secs(10), || take(&latest));
    assert!(got, "the subscriber receives again: {:?}", seg.stats().subscribers);
    seg.close();
    publisher.finish()?;
    seg.remove_subscriber(latest.index())?;
    drop(latest);
    assert_eq!(seg.stats().free_slots, 16, "no slot lost");
    Ok(())
}
