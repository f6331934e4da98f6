//! The reference figures every memsock number is compared with, measured
//! in the same run: memcpy, a minimal two-process SPSC ring, a cache-line
//! ping-pong and a futex ping-pong.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use memsock_proto::platform::{futex_wait, futex_wake};
use serde_json::{Value, json};

use crate::sys::{ChildProc, Region, inherited_fds, pin, report};

/// One value on its own 128-byte line.
#[repr(C, align(128))]
struct Line<T>(T);

/// Single-threaded copy between two buffers.
pub fn memcpy(size: usize, bytes_total: usize) -> Value {
    let src = vec![0x5au8; size];
    let mut dst = vec![0u8; size];
    let rounds = (bytes_total / size).max(1);
    dst.copy_from_slice(&src); // fault both in
    let start = Instant::now();
    for _ in 0..rounds {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    let secs = start.elapsed().as_secs_f64();
    json!({"case": "memcpy", "size": size, "gbytes_per_s": (size * rounds) as f64 / secs / 1e9})
}

/// A minimal SPSC ring: no pool, no fan-out, no policies, spin. Frames of
/// `size` bytes are written whole by the producer and read whole by the
/// consumer, exactly as in the stream cases, so that the two compare.
#[repr(C)]
struct RingHeader {
    /// Next frame the consumer reads.
    head: Line<AtomicU64>,
    /// Next frame the producer writes.
    tail: Line<AtomicU64>,
}

/// Ring geometry for a frame size: slot count and slot stride.
fn ring_geometry(size: usize) -> (usize, usize) {
    if size <= 64 { (1024, 64) } else { (8, size.div_ceil(4096) * 4096) }
}

fn ring_len(size: usize) -> usize {
    let (slots, stride) = ring_geometry(size);
    4096 + slots * stride
}

/// The ring's producer runs here, its consumer in a child process; the
/// two are pinned to CPUs 0 and 1 like the one-subscriber stream cases.
///
/// `stamped`: the producer also reads the monotonic clock once per frame
/// and writes it into the frame, as memsock stamps every frame with its
/// publish time — the floor for any design whose samples carry one.
/// `header`: the consumer reads only each frame's first
/// [`HEADER_LEN`](crate::stream::HEADER_LEN) bytes, as a stream case that
/// routes by header does.
pub fn reference_ring(size: usize, count: u64, stamped: bool, header: bool) -> Result<Value> {
    let region = Region::create(ring_len(size))?;
    let spec = json!({"role": "ring_consumer", "count": count, "size": size, "header": header});
    let (mut child, _) = ChildProc::spawn(&spec, &[region.fd()])?;
    child.read()?; // ready
    pin(0);
    let (slots, stride) = ring_geometry(size);
    // SAFETY: the header is atomics only, at the start of the region.
    let ring = unsafe { region.get::<RingHeader>() };
    let (mut tail, mut head_seen) = (0u64, 0u64);
    for seq in 0..count {
        while tail - head_seen == slots as u64 {
            // Acquire pairs with the consumer's Release store of `head`.
            head_seen = ring.head.0.load(Ordering::Acquire);
            std::hint::spin_loop();
        }
        // SAFETY: slot `tail % slots` is free (tail - head < slots), lies
        // within the region, and only the producer writes slots.
        let frame = unsafe { region.bytes_mut(4096 + (tail as usize % slots) * stride, size) };
        crate::stream::write_frame(frame, seq);
        if stamped {
            frame[8..16].copy_from_slice(&memsock::now_ns().to_le_bytes());
        }
        tail += 1;
        // Release pairs with the consumer's Acquire load of `tail`.
        ring.tail.0.store(tail, Ordering::Release);
    }
    let r = child.finish()?;
    let secs = r["elapsed_ns"].as_f64().unwrap_or(f64::NAN) / 1e9;
    let msgs_per_s = count as f64 / secs;
    let case = if stamped { "reference_ring_stamped" } else { "reference_ring" };
    Ok(json!({"case": case, "size": size, "read": if header { "header" } else { "whole" },
              "msgs_per_s": msgs_per_s, "gbytes_per_s": msgs_per_s * size as f64 / 1e9}))
}

/// What one read of the monotonic clock costs this thread, back to back:
/// memsock reads it once per frame for the publish timestamp.
pub fn clock(reads: u64) -> Value {
    let start = Instant::now();
    let mut acc = 0u64;
    for _ in 0..reads {
        acc = acc.wrapping_add(memsock::now_ns());
    }
    black_box(acc);
    let ns = start.elapsed().as_nanos() as f64;
    json!({"case": "clock", "ns_per_read": ns / reads as f64})
}

/// Child side of [`reference_ring`].
pub fn ring_consumer(spec: &Value) -> Result<()> {
    let count = spec["count"].as_u64().unwrap_or(0);
    let size = spec["size"].as_u64().unwrap_or(64) as usize;
    let read = if spec["header"] == true { size.min(crate::stream::HEADER_LEN) } else { size };
    let fd = inherited_fds(spec).pop().expect("ring fd");
    let region = Region::map(fd, ring_len(size))?;
    let (slots, stride) = ring_geometry(size);
    // SAFETY: as in the producer.
    let ring = unsafe { region.get::<RingHeader>() };
    pin(1);
    report(&json!({"ready": true}));
    let (mut head, mut tail_seen) = (0u64, 0u64);
    let mut start = None;
    let mut check = 0u64;
    while head < count {
        while head == tail_seen {
            // Acquire pairs with the producer's Release store of `tail`.
            tail_seen = ring.tail.0.load(Ordering::Acquire);
            std::hint::spin_loop();
        }
        start.get_or_insert_with(Instant::now);
        // SAFETY: frame `head` was published (head < tail) and is not
        // rewritten before `head` moves past it.
        let frame = unsafe { region.bytes(4096 + (head as usize % slots) * stride, read) };
        let seq = u64::from_le_bytes(frame[..8].try_into().unwrap());
        assert_eq!(seq, head, "reference ring lost a frame");
        check = check.wrapping_add(crate::stream::fold(frame));
        head += 1;
        // Release pairs with the producer's Acquire load of `head`.
        ring.head.0.store(head, Ordering::Release);
    }
    black_box(check);
    let ns = start.map_or(0, |s| s.elapsed().as_nanos() as u64);
    report(&json!({"elapsed_ns": ns}));
    Ok(())
}

#[repr(C)]
struct PingPong {
    ping: Line<AtomicU64>,
    pong: Line<AtomicU64>,
    ping32: Line<AtomicU32>,
    pong32: Line<AtomicU32>,
}

/// Half the round trip of a cache line bounced between two processes.
pub fn cacheline(rounds: u64) -> Result<Value> {
    let region = Region::create(std::mem::size_of::<PingPong>())?;
    let (mut child, _) = ChildProc::spawn(&json!({"role": "pong", "rounds": rounds, "futex": false}), &[region.fd()])?;
    child.read()?;
    pin(0);
    // SAFETY: atomics only, smaller than the region.
    let pp = unsafe { region.get::<PingPong>() };
    let start = Instant::now();
    for i in 1..=rounds {
        pp.ping.0.store(i, Ordering::Release);
        while pp.pong.0.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
    }
    let ns = start.elapsed().as_nanos() as f64;
    child.finish()?;
    Ok(json!({"case": "cacheline", "one_way_ns": ns / (2 * rounds) as f64}))
}

/// How long the futex sleeper sleeps before each wake: as long as a
/// blocked subscriber sleeps between frames in the stream latency phase
/// (the frame interval minus its spin phase). On a VM the cost of waking a
/// CPU depends on how long it slept (guest halt polling adapts to it), so
/// the two must sleep alike to compare.
pub const FUTEX_SLEEP: Duration = Duration::from_micros(30);

/// The cost of a raw cross-process futex wake, measured the way the stream
/// latency is: one process (CPU 0) busy, the other (CPU 1) asleep in
/// `futex_wait` for [`FUTEX_SLEEP`], woken with `futex_wake`; the median of
/// wake-up time minus the waker's timestamp, across processes. (Half a
/// back-to-back round trip, the textbook figure, keeps both CPUs in a
/// different idle regime on this VM and does not compare.)
pub fn futex(rounds: u32) -> Result<Value> {
    let region = Region::create(std::mem::size_of::<PingPong>())?;
    let (mut child, _) = ChildProc::spawn(&json!({"role": "pong", "rounds": rounds, "futex": true}), &[region.fd()])?;
    child.read()?;
    pin(0);
    // SAFETY: atomics only, smaller than the region.
    let pp = unsafe { region.get::<PingPong>() };
    for i in 1..=rounds {
        busy_wait(FUTEX_SLEEP);
        pp.ping.0.store(memsock::now_ns(), Ordering::Relaxed);
        pp.ping32.0.store(i, Ordering::Release);
        futex_wake(&pp.ping32.0);
        // The sleeper acknowledges without waking us: spin.
        while pp.pong32.0.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
    }
    let r = child.finish()?;
    Ok(json!({"case": "futex", "one_way_ns": r["p50_ns"]}))
}

fn busy_wait(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

fn wait_for(word: &AtomicU32, value: u32) {
    loop {
        let now = word.load(Ordering::Acquire);
        if now == value {
            return;
        }
        futex_wait(word, now, None);
    }
}

/// Child side of [`cacheline`] and [`futex`].
pub fn pong(spec: &Value) -> Result<()> {
    let rounds = spec["rounds"].as_u64().unwrap_or(0);
    let fd = inherited_fds(spec).pop().expect("region fd");
    let region = Region::map(fd, std::mem::size_of::<PingPong>())?;
    // SAFETY: as in the parent.
    let pp = unsafe { region.get::<PingPong>() };
    pin(1);
    if spec["futex"].as_bool() == Some(true) {
        report(&json!({"ready": true}));
        let mut lat = Vec::with_capacity(rounds as usize);
        for i in 1..=rounds as u32 {
            wait_for(&pp.ping32.0, i);
            lat.push(memsock::now_ns().saturating_sub(pp.ping.0.load(Ordering::Relaxed)));
            pp.pong32.0.store(i, Ordering::Release);
        }
        report(&json!({"p50_ns": crate::sys::quantile(&mut lat, 0.5)}));
        return Ok(());
    } else {
        report(&json!({"ready": true}));
        for i in 1..=rounds {
            while pp.ping.0.load(Ordering::Acquire) != i {
                std::hint::spin_loop();
            }
            pp.pong.0.store(i, Ordering::Release);
        }
    }
    report(&json!({"done": true}));
    Ok(())
}
