//! memsock streams across processes: the owner here, the publisher and
//! each subscriber in a child process.
//!
//! Each case runs two phases. Throughput: the publisher sends `count`
//! frames as fast as lossless subscribers take them (it spins or sleeps on
//! back-pressure, as the wait mode says); every frame is written whole by
//! the publisher and read whole by each subscriber. Latency: `lat_count`
//! frames sent at a fixed interval, each subscriber timing receive time
//! minus publish timestamp (carried in the payload when the stream does
//! not stamp its frames).
//!
//! A case may read only each frame's first 64 bytes (`"read":"header"`:
//! route by header, read the payload later or never), stream without
//! timestamps (`"timestamps":false`), or have a hostile lossy subscriber
//! present (`"hostile":true`) that never reads and keeps its wake word set,
//! to show what such a peer costs the publisher.

use std::hint::black_box;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::shm::{
    OverflowPolicy, Publisher, SendError, StreamConfig, StreamSegment, Subscriber, SubscriberOptions, SubscriberTicket,
    WaitStrategy,
};
use serde_json::{Value, json};

use crate::sys::{ChildProc, inherited_fds, pin, quantile, report, usage};

/// One stream measurement.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Frame size in bytes.
    pub size: usize,
    /// Number of subscriber processes.
    pub subscribers: u32,
    /// Spin (true) or spin-then-park.
    pub spin: bool,
    /// Frames in the throughput phase.
    pub count: u64,
    /// Frames in the latency phase.
    pub lat_count: u64,
    /// Ask for a huge-page pool.
    pub huge_pages: bool,
    /// Obtain the stream through the broker listening on this socket
    /// (instead of creating it here and passing descriptors).
    pub broker: Option<&'static str>,
    /// Frames carry their publish time (`StreamConfig::timestamps`).
    pub timestamps: bool,
    /// Subscribers read only the first 64 bytes of each frame.
    pub read_header: bool,
    /// A keep-latest subscriber that never reads and keeps its wake word
    /// set is attached too.
    pub hostile: bool,
    /// Frames the stream keeps for late joiners (`StreamConfig::history`).
    pub history: u32,
}

impl Case {
    /// A case of `size`-byte frames to `subscribers` subscribers, stamped,
    /// read whole, with no hostile peer.
    pub fn new(size: usize, subscribers: u32, spin: bool, count: u64, lat_count: u64, huge_pages: bool) -> Self {
        Self {
            size,
            subscribers,
            spin,
            count,
            lat_count,
            huge_pages,
            broker: None,
            timestamps: true,
            read_header: false,
            hostile: false,
            history: 0,
        }
    }

    /// The case's name.
    pub fn describe(&self) -> String {
        describe(&self.identity())
    }

    /// The fields that name the case in its JSON line.
    fn identity(&self) -> Value {
        json!({
            "case": "stream", "size": self.size, "subscribers": self.subscribers, "wait": wait_name(self.spin),
            "timestamps": self.timestamps, "read": if self.read_header { "header" } else { "whole" },
            "hostile": self.hostile, "history": self.history,
        })
    }

    /// The reference ring a target compares this case with, as
    /// `(size, stamped, header)`: one spinning subscriber only.
    pub fn reference_ring(&self) -> Option<(usize, bool, bool)> {
        let plain = self.subscribers == 1 && self.spin && !self.hostile && self.broker.is_none() && self.history == 0;
        plain.then_some((self.size, self.timestamps && self.size == 64, self.read_header))
    }

    fn wait(&self) -> WaitStrategy {
        if self.spin { WaitStrategy::Spin } else { WaitStrategy::default() }
    }

    /// Interval between latency-phase frames: long enough for the
    /// subscribers to be idle at each frame and, when blocking, asleep in
    /// the kernel — past their spin phase by as long as the futex reference
    /// sleeps, so both are measured in the same regime.
    fn interval(&self) -> Duration {
        let read = Duration::from_nanos((self.size as u64 / 4).max(1)); // reading at ≥ 4 B/ns
        let idle = match self.wait() {
            WaitStrategy::SpinThenPark { spin_us } => {
                Duration::from_micros(u64::from(spin_us)) + crate::reference::FUTEX_SLEEP
            }
            _ => Duration::from_micros(20),
        };
        idle.max(read * 2)
    }

    /// CPUs for the publisher and the subscriber: with one subscriber, one
    /// core each (as a latency-minded deployment would pin them); with more
    /// processes than cores, wherever the scheduler puts them.
    fn cpus(&self) -> (Value, Value) {
        if self.subscribers == 1 { (0.into(), 1.into()) } else { (Value::Null, Value::Null) }
    }
}

/// Folds a frame's bytes into a checksum: how benchmarks "read it whole".
///
/// Never inlined, so that the stream subscriber and the reference ring's
/// consumer run the same machine code: inlined into each loop, it was
/// compiled differently, and the stream's copy read 1.1 MB frames ~1.6×
/// slower (26 vs 16 µs a frame, timed around the fold alone), which the
/// 1.1 MB whole-read target then charged to memsock.
#[inline(never)]
pub fn fold(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()));
        }
    }
    let tail = chunks.remainder().iter().fold(0u64, |a, &b| a.wrapping_add(u64::from(b)));
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// Writes frame `seq` into `buf` whole: a fill plus the sequence number.
#[inline]
pub fn write_frame(buf: &mut [u8], seq: u64) {
    if buf.len() > 64 {
        buf.fill(seq as u8);
    } else {
        let mut msg = [0x5au8; 64];
        msg[..8].copy_from_slice(&seq.to_le_bytes());
        buf.copy_from_slice(&msg[..buf.len()]);
    }
    buf[..8].copy_from_slice(&seq.to_le_bytes());
}

/// How a stream line is named in the table and in `--only`, e.g.
/// "stream 64 B × 1 spin nostamp" or "stream 1153434 B × 1 spin header".
pub fn describe(v: &Value) -> String {
    let mut name = format!("stream {} B × {} {}", v["size"], v["subscribers"], v["wait"].as_str().unwrap_or("?"));
    for word in variant(v) {
        name.push(' ');
        name.push_str(word);
    }
    name
}

/// How a line differs from the plain case: "nostamp", "header", "+hostile",
/// "history1".
pub fn variant(v: &Value) -> Vec<&'static str> {
    let mut words = Vec::new();
    if v["timestamps"] == false {
        words.push("nostamp");
    }
    if v["read"] == "header" {
        words.push("header");
    }
    if v["hostile"] == true {
        words.push("+hostile");
    }
    match v["history"].as_u64() {
        None | Some(0) => {}
        Some(1) => words.push("history1"),
        Some(_) => words.push("history"),
    }
    words
}

/// Bytes of a frame a subscriber reads in "header" mode.
pub const HEADER_LEN: usize = 64;

fn wait_name(spin: bool) -> &'static str {
    if spin { "spin" } else { "block" }
}

fn credits(case: &Case) -> u32 {
    if case.size > 4096 { 4 } else { 256 }
}

fn config(case: &Case) -> StreamConfig {
    let slots = credits(case) * case.subscribers + u32::from(case.hostile) + case.history + 1 + 2;
    let mut config = StreamConfig::new(case.size as u32, slots);
    config.history = case.history;
    config.max_subscribers = (case.subscribers + 1).max(4);
    config.huge_pages = case.huge_pages;
    config.timestamps = case.timestamps;
    config
}

fn spec(case: &Case, role: &str) -> Value {
    json!({
        "role": role, "size": case.size, "count": case.count, "lat_count": case.lat_count,
        "spin": case.spin, "interval_ns": case.interval().as_nanos() as u64,
        "socket": case.broker, "subscribers": case.subscribers,
        "credits": credits(case), "config": serde_json::to_value(config(case)).ok(),
        "read_header": case.read_header,
    })
}

/// Runs one case.
pub fn run(case: Case) -> Result<Value> {
    if case.broker.is_some() {
        return run_via_broker(case);
    }
    let credits = credits(&case);
    let mut seg = StreamSegment::create_with_all_channels("bench", &config(&case))?;
    let spec = |role: &str| spec(&case, role);
    let mut subs = Vec::new();
    for _ in 0..case.subscribers {
        let opts = SubscriberOptions {
            credits,
            policy: OverflowPolicy::Lossless,
            wait: case.wait(),
            ..SubscriberOptions::default()
        };
        let t = seg.add_subscriber(&opts, 0)?;
        let mut s = spec("stream_subscriber");
        s["index"] = t.index.into();
        s["generation"] = t.generation.into();
        s["cpu"] = case.cpus().1;
        let ro = seg.read_only_data_fd()?;
        let (child, _) = ChildProc::spawn(&s, &[ro.as_fd(), seg.channel_fd(t.index).context("its channel")?])?;
        subs.push(child);
    }
    for s in &mut subs {
        s.read().context("subscriber ready")?;
    }
    let hostile = if case.hostile { Some(spawn_hostile(&mut seg)?) } else { None };
    let mut fds = vec![seg.data_fd()];
    fds.extend(seg.channel_fds().into_iter().map(|(_, _, fd)| fd));
    let mut p = spec("stream_publisher");
    p["cpu"] = case.cpus().0;
    let (publisher, _) = ChildProc::spawn(&p, &fds)?;
    let pub_result = publisher.finish()?;
    let mut results = Vec::new();
    for s in subs {
        results.push(s.finish()?);
    }
    if let Some(mut hostile) = hostile {
        hostile.kill();
    }
    let stats = seg.stats();
    let lossless = stats.subscribers.iter().filter(|s| s.policy == OverflowPolicy::Lossless);
    if lossless.clone().any(|s| s.dropped != 0 || s.faults != 0) {
        bail!("lossless subscribers lost frames or saw faults: {stats:?}");
    }
    Ok(summarize(&case, &pub_result, &results))
}

/// Attaches a keep-latest, one-credit, sleeping subscriber and starts a
/// process that maps its channel and, instead of receiving, keeps setting
/// its wake word: the publisher keeps evicting its frame and finds it
/// "asleep" at every frame.
fn spawn_hostile(seg: &mut StreamSegment) -> Result<ChildProc> {
    let opts = SubscriberOptions {
        credits: 1,
        policy: OverflowPolicy::KeepLatest,
        wait: WaitStrategy::Park,
        ..SubscriberOptions::default()
    };
    let t = seg.add_subscriber(&opts, 0)?;
    let spec = json!({"role": "hostile_subscriber", "queue_capacity": seg.geometry().queue_capacity});
    let (mut child, _) = ChildProc::spawn(&spec, &[seg.channel_fd(t.index).context("its channel")?])?;
    child.read().context("hostile subscriber ready")?;
    Ok(child)
}

/// Child: the hostile subscriber of [`spawn_hostile`]. Runs until killed.
pub fn hostile_child(spec: &Value) -> Result<()> {
    let capacity = spec["queue_capacity"].as_u64().unwrap_or(1) as u32;
    let fd = inherited_fds(spec).pop().expect("channel fd");
    let region = crate::sys::Region::map(fd, memsock_proto::shm::layout::channel_len(capacity))?;
    // SAFETY: a channel file starts with its header: atomics only.
    let header = unsafe { region.get::<memsock_proto::shm::layout::ChannelHeader>() };
    report(&json!({"ready": true}));
    let parent = std::os::unix::process::parent_id();
    for i in 0u64.. {
        // Announced as a sleeper would, again as soon as a wake clears it.
        if header.waiting.load(std::sync::atomic::Ordering::Relaxed) & 1 == 0 {
            header.waiting.fetch_or(1, std::sync::atomic::Ordering::Relaxed);
        }
        std::hint::spin_loop();
        // Should the runner die without killing us, do not spin on.
        if i % (1 << 16) == 0 && std::os::unix::process::parent_id() != parent {
            break;
        }
    }
    Ok(())
}

/// Runs one case with the stream from the broker: subscribers ask for it
/// before it exists, the publisher creates it.
fn run_via_broker(case: Case) -> Result<Value> {
    let socket = case.broker.expect("via broker");
    let client = memsock::Client::connect_to(socket)?;
    let mut subs = Vec::new();
    for _ in 0..case.subscribers {
        let mut s = spec(&case, "stream_subscriber");
        s["cpu"] = case.cpus().1;
        subs.push(ChildProc::spawn(&s, &[])?.0);
    }
    let waiting = |n| client.stats(None).is_ok_and(|s| s.waiting_subscribers == n);
    while !waiting(case.subscribers) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut p = spec(&case, "stream_publisher");
    p["cpu"] = case.cpus().0;
    let (publisher, _) = ChildProc::spawn(&p, &[])?;
    for s in &mut subs {
        s.read().context("subscriber ready")?;
    }
    let pub_result = publisher.finish()?;
    let mut results = Vec::new();
    for s in subs {
        results.push(s.finish()?);
    }
    let mut line = summarize(&case, &pub_result, &results);
    line["via"] = "broker".into();
    Ok(line)
}

fn summarize(case: &Case, pub_result: &Value, results: &[Value]) -> Value {
    let elapsed = results.iter().map(|r| r["elapsed_ns"].as_f64().unwrap_or(f64::NAN)).fold(0.0, f64::max);
    let msgs_per_s = case.count as f64 / (elapsed / 1e9);
    let p50 = results.iter().map(|r| r["lat_p50_ns"].as_u64().unwrap_or(0)).max().unwrap_or(0);
    let p99 = results.iter().map(|r| r["lat_p99_ns"].as_u64().unwrap_or(0)).max().unwrap_or(0);
    let total = (case.count + case.lat_count) as f64;
    let minflt: u64 = pub_result["minflt"].as_u64().unwrap_or(0)
        + results.iter().map(|r| r["minflt"].as_u64().unwrap_or(0)).sum::<u64>();
    let mut line = case.identity();
    line.as_object_mut().expect("an object").extend(serde_json::Map::from_iter([
        ("msgs_per_s".to_string(), json!(msgs_per_s)),
        ("gbytes_per_s".to_string(), json!(msgs_per_s * case.size as f64 / 1e9)),
        ("lat_p50_ns".to_string(), json!(p50)),
        ("lat_p99_ns".to_string(), json!(p99)),
        (
            "pub_cpu_ns_per_msg".to_string(),
            json!(pub_result["cpu_ns"].as_f64().unwrap_or(f64::NAN) / case.count as f64),
        ),
        ("minflt_per_msg".to_string(), json!(minflt as f64 / (total - 1.0))),
    ]));
    line
}

/// Child: the publisher.
pub fn publisher_child(spec: &Value) -> Result<()> {
    let size = spec["size"].as_u64().unwrap_or(64) as usize;
    let count = spec["count"].as_u64().unwrap_or(0);
    let lat_count = spec["lat_count"].as_u64().unwrap_or(0);
    let spin = spec["spin"].as_bool().unwrap_or(true);
    let interval = Duration::from_nanos(spec["interval_ns"].as_u64().unwrap_or(10_000));
    if let Some(cpu) = spec["cpu"].as_u64() {
        pin(cpu as usize);
    }
    if let Some(socket) = spec["socket"].as_str() {
        let client = memsock::Client::connect_to(socket)?;
        let config: StreamConfig = serde_json::from_value(spec["config"].clone())?;
        let mut publisher = client.publisher("bench", &config)?;
        // Frames count from the moment every subscriber is attached.
        let subscribers = spec["subscribers"].as_u64().unwrap_or(1) as usize;
        while publisher.subscriber_count() < subscribers {
            // A loan refreshes the publisher's view of the subscriber table.
            drop(publisher.loan()?);
            std::thread::sleep(Duration::from_millis(1));
        }
        return publish_frames(&mut publisher, size, count, lat_count, spin, interval);
    }
    let fds = inherited_fds(spec);
    let channels: Vec<_> = fds[1..].iter().enumerate().map(|(i, fd)| (i as u32, 0, fd.as_fd())).collect();
    let mut publisher = Publisher::open(fds[0].as_fd(), &channels)?;
    publish_frames(&mut publisher, size, count, lat_count, spin, interval)
}

fn publish_frames(
    publisher: &mut Publisher,
    size: usize,
    count: u64,
    lat_count: u64,
    spin: bool,
    interval: Duration,
) -> Result<()> {
    // Faults are counted from after the first frame: the steady state.
    send_one(publisher, size, 0, spin)?;
    let (cpu0, flt0) = usage();
    for seq in 1..count {
        send_one(publisher, size, seq, spin)?;
    }
    let (cpu1, _) = usage();
    // Without timestamps on the stream, latency frames carry their send
    // time in bytes 8..16 of the payload.
    let stamp_payload = !publisher.timestamps() && size >= 16;
    for seq in count..count + lat_count {
        let next = Instant::now() + interval;
        while Instant::now() < next {
            std::hint::spin_loop();
        }
        if stamp_payload {
            send_stamped(publisher, size, seq)?;
        } else {
            send_one(publisher, size, seq, spin)?;
        }
    }
    let (_, flt1) = usage();
    report(&json!({
        "cpu_ns": (cpu1 - cpu0) as f64 * count as f64 / (count - 1).max(1) as f64,
        "minflt": flt1 - flt0,
    }));
    Ok(())
}

#[inline]
fn send_one(publisher: &mut Publisher, size: usize, seq: u64, spin: bool) -> Result<()> {
    let mut sample = publisher.loan()?;
    write_frame(&mut sample.as_mut_slice()[..size], seq);
    sample.set_len(size);
    if !spin {
        sample.send_timeout(Duration::from_secs(30))?;
        return Ok(());
    }
    loop {
        match sample.try_send() {
            Ok(_) => return Ok(()),
            Err(unsent) if matches!(unsent.error, SendError::WouldBlock { .. }) => {
                sample = unsent.sample;
                std::hint::spin_loop();
            }
            Err(unsent) => return Err(unsent.error.into()),
        }
    }
}

/// Sends frame `seq` with the current time in bytes 8..16.
fn send_stamped(publisher: &mut Publisher, size: usize, seq: u64) -> Result<()> {
    let mut sample = publisher.loan()?;
    let buf = &mut sample.as_mut_slice()[..size];
    write_frame(buf, seq);
    buf[8..16].copy_from_slice(&memsock::now_ns().to_le_bytes());
    sample.set_len(size);
    sample.send_timeout(Duration::from_secs(30))?;
    Ok(())
}

/// Child: one subscriber.
pub fn subscriber_child(spec: &Value) -> Result<()> {
    let size = spec["size"].as_u64().unwrap_or(64) as usize;
    let count = spec["count"].as_u64().unwrap_or(0);
    let lat_count = spec["lat_count"].as_u64().unwrap_or(0);
    let spin = spec["spin"].as_bool().unwrap_or(true);
    if let Some(cpu) = spec["cpu"].as_u64() {
        pin(cpu as usize);
    }
    let wait = if spin { WaitStrategy::Spin } else { WaitStrategy::default() };
    if let Some(socket) = spec["socket"].as_str() {
        let client = memsock::Client::connect_to(socket)?;
        let options = memsock::SubscribeOptions {
            credits: spec["credits"].as_u64().unwrap_or(4) as u32,
            policy: OverflowPolicy::Lossless,
            wait,
            wait_for_stream: true,
            credits_up_to: false,
            history: u32::MAX,
        };
        let sub = client.subscriber("bench", &options)?;
        return receive_frames(&sub, size, count, lat_count, spec["read_header"] == true);
    }
    let fds = inherited_fds(spec);
    let ticket = SubscriberTicket {
        index: spec["index"].as_u64().unwrap_or(0) as u32,
        generation: spec["generation"].as_u64().unwrap_or(0),
        wait,
    };
    let sub = Subscriber::open(fds[0].as_fd(), fds[1].as_fd(), ticket)?;
    receive_frames(&sub, size, count, lat_count, spec["read_header"] == true)
}

fn receive_frames(sub: &Subscriber, size: usize, count: u64, lat_count: u64, header_only: bool) -> Result<()> {
    let read = if header_only { size.min(HEADER_LEN) } else { size };
    let mut lat = Vec::with_capacity(lat_count as usize);
    report(&json!({"ready": true}));

    let mut flt0 = 0;
    let mut check = 0u64;
    let mut start: Option<Instant> = None;
    let mut elapsed = Duration::ZERO;
    for expect in 0..count + lat_count {
        let sample = sub.recv()?;
        // Latency-phase frames only: the clock costs ~25 ns a read.
        let now = if expect >= count { memsock::now_ns() } else { 0 };
        if expect == 0 {
            start = Some(Instant::now());
        }
        if sample.seq() != expect || sample.len() != size {
            bail!("expected frame {expect} of {size} bytes, got {} of {}", sample.seq(), sample.len());
        }
        check = check.wrapping_add(fold(&sample[..read]));
        if u64::from_le_bytes(sample[..8].try_into().unwrap()) != expect {
            bail!("frame {expect} carries the wrong payload");
        }
        if expect >= count {
            let sent = match sample.timestamp_ns() {
                0 if size >= 16 => u64::from_le_bytes(sample[8..16].try_into().unwrap()),
                t => t,
            };
            lat.push(now.saturating_sub(sent));
        }
        drop(sample);
        if expect == 0 {
            flt0 = usage().1; // faults are counted from after the first frame
        }
        if expect + 1 == count {
            elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
        }
    }
    black_box(check);
    let (_, flt1) = usage();
    report(&json!({
        "elapsed_ns": elapsed.as_nanos() as u64,
        "lat_p50_ns": quantile(&mut lat, 0.5),
        "lat_p99_ns": quantile(&mut lat, 0.99),
        "minflt": flt1 - flt0,
    }));
    Ok(())
}
