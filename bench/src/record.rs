//! `memsock-bench record`: the MCAP recorder and replayer against the disk
//! they write to, in one run.
//!
//! - `disk_baseline`: buffered sequential writes of 1 MiB blocks to a file
//!   in the same directory, as many bytes as the 1.1 MB recording.
//! - `record`: a publisher child at full speed, a lossless recorder child
//!   (the plugin host and recorder, as `memsock record` runs them) that
//!   subscribed by pattern before the stream existed; ingest (what the
//!   publisher got through), what reached the file, frames per second,
//!   drops, and the recorder's peak RSS against its bound (credits × slot
//!   size + 64 MiB).
//! - `ring_write`: the reference for `record`: a minimal ring in one
//!   process — a thread fills 66 frame buffers in turn as the publisher
//!   does, another writes each to a file with one `write` — what writing
//!   frames fresh from another core costs on this machine, with no
//!   broker, no MCAP and no CRC. The baseline writes one 1 MiB buffer that
//!   stays in its core's cache; a recorder's frames never are.
//! - `replay`: a recording replayed at full speed into a lossless
//!   subscriber, and a 100 Hz stream replayed at 1× with its pacing error.
//! - `plugin_idle`: a host following 100 idle streams — its CPU, and the
//!   latency from a frame's send to the plugin's hook after a quiet spell.
//!
//! The page cache makes a write look fast until the kernel's dirty limit:
//! every case that writes starts after a `sync` and writes over a
//! gigabyte, so it runs at the disk's sustained speed, as the baseline does.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::{Client, OverflowPolicy, StreamConfig, SubscribeOptions, WaitStrategy};
use memsock_plugins::record::{RecordCompression, RecordOptions, Recorder};
use memsock_plugins::replay::{ReplayOptions, ReplayStats, replay};
use memsock_plugins::{
    Delivery, FrameMeta, Host, HostOptions, Interest, OwnedSample, Plugin, PluginError, PublisherChange, StreamId,
    StreamOpened, async_trait,
};
use serde_json::{Value, json};

use crate::broker::BrokerProc;
use crate::sys::{ChildProc, quantile, report};

/// Credits of the recorder's subscribers, by frame size: small frames
/// need many in flight to keep the writer busy.
fn credits(size: u32) -> u32 {
    if size <= 4096 { 1024 } else { 64 }
}

/// Slots of a recorded stream's pool: the recorder's credits and two for
/// the publisher's loans (so the pool is what the credits cover; a
/// subscriber touches every slot of a pool over time, and those pages
/// count in its RSS).
fn slots(size: u32) -> u32 {
    credits(size) + 2
}

/// The directory the recordings go to (the target directory's filesystem:
/// where a user of this checkout would record).
fn workdir() -> Result<PathBuf> {
    let dir = std::env::var_os("MEMSOCK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_default().join("target").join("bench-record"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Runs every case once; prints JSON lines or a table.
pub fn run(json_out: bool, scale: f64, only: Option<&str>) -> Result<()> {
    let dir = workdir()?;
    let broker = BrokerProc::start()?;
    let n = |count: f64| ((count * scale) as u64).max(10);
    let mut lines = Vec::new();
    let big_bytes = n(1500.0) * 1_153_434;
    let wanted = |case: &str| only.is_none_or(|o| case.contains(o));
    // The disk's speed drifts on a shared machine: measured right before
    // and right after the 1.1 MB recording, the better of the two kept.
    // (The first large write of a run is slow here, whatever writes it —
    // `dd` too: blocks freed by the last deletion are quick to reuse, new
    // ones are not. One as large as the others warms up, not counted.)
    disk_baseline(&dir, big_bytes)?;
    let mut baselines = vec![disk_baseline(&dir, big_bytes)?];
    for (size, count, compression) in [
        (64u32, n(3e6), "none"),
        (65_536, n(20_000.0), "none"),
        (1_153_434, n(1500.0), "none"),
        (65_536, n(20_000.0), "lz4"),
        (65_536, n(20_000.0), "zstd"),
    ] {
        if wanted(&format!("record_{size}_{compression}")) {
            lines.push(record_case(&broker, &dir, size, count, compression)?);
            if size == 1_153_434 {
                baselines.push(disk_baseline(&dir, big_bytes)?);
                lines.push(ring_write(&dir, size, count)?);
            }
        }
    }
    let best = baselines.iter().copied().fold(0.0, f64::max);
    lines.insert(0, json!({"case": "disk_baseline", "bytes": big_bytes, "gbytes_per_s": best, "runs": baselines}));
    if wanted("replay") {
        lines.extend(replay_cases(&broker, &dir, scale)?);
    }
    if wanted("plugin_idle") {
        lines.push(plugin_idle(&broker)?);
    }
    let baseline = lines[0]["gbytes_per_s"].as_f64().unwrap_or(0.0);
    let big = lines.iter().find(|l| l["case"] == "record" && l["size"] == 1_153_434).cloned().unwrap_or_default();
    let ring = lines.iter().find(|l| l["case"] == "ring_write").cloned().unwrap_or_default();
    let small = lines.iter().find(|l| l["case"] == "record" && l["size"] == 64).cloned().unwrap_or_default();
    let paced = lines.iter().find(|l| l["case"] == "replay" && l["rate"] == 1.0).cloned().unwrap_or_default();
    let rss_ok = lines
        .iter()
        .filter(|l| l["case"] == "record")
        .all(|l| l["rss_mb"].as_f64().unwrap_or(f64::MAX) <= l["rss_bound_mb"].as_f64().unwrap_or(0.0));
    let targets = json!({
        "targets": {
            "record_1153434_vs_disk (>= 0.8)": big["written_gbytes_per_s"].as_f64().unwrap_or(0.0) / baseline.max(1e-9),
            "record_1153434_drops (= 0)": big["drops"],
            "reference: ring_write_vs_disk": ring["gbytes_per_s"].as_f64().unwrap_or(0.0) / baseline.max(1e-9),
            "reference: record_1153434_vs_ring_write": big["written_gbytes_per_s"].as_f64().unwrap_or(0.0)
                / ring["gbytes_per_s"].as_f64().unwrap_or(0.0).max(1e-9),
            "record_64_frames_per_s (>= 1e6)": small["frames_per_s"],
            "rss_within_bound": rss_ok,
            "replay_100hz_pacing_error_p99_us (<= 1000)": paced["pacing_error_p99_us"],
        }
    });
    for line in lines.iter().chain(std::iter::once(&targets)) {
        if json_out {
            println!("{line}");
        } else {
            println!("{}", serde_json::to_string_pretty(line)?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Buffered sequential 1 MiB writes of `bytes` to a new file: GB/s.
fn disk_baseline(dir: &Path, bytes: u64) -> Result<f64> {
    let path = dir.join("baseline.bin");
    sync();
    let block = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    drop(f);
    let secs = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(bytes as f64 / secs / 1e9)
}

/// The minimal ring writing `count` frames of `size` bytes to a new file
/// (see the module's notes): GB/s.
fn ring_write(dir: &Path, size: u32, count: u64) -> Result<Value> {
    let path = dir.join("ring.bin");
    let size = size as usize;
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Box<[u8]>>(RING_FRAMES);
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Box<[u8]>>(RING_FRAMES);
    for _ in 0..RING_FRAMES {
        free_tx.send(vec![0u8; size].into_boxed_slice())?;
    }
    sync();
    let mut file = std::fs::File::create(&path)?;
    let filler = std::thread::spawn(move || {
        for i in 0..count {
            let Ok(mut frame) = free_rx.recv() else { return };
            // The publisher child's pattern.
            frame[..8].copy_from_slice(&i.to_le_bytes());
            frame[8..].fill(i as u8);
            if full_tx.send(frame).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    for frame in full_rx.iter() {
        file.write_all(&frame)?;
        let _ = free_tx.send(frame);
    }
    drop(file);
    let secs = start.elapsed().as_secs_f64();
    filler.join().map_err(|_| anyhow::anyhow!("the ring's filler panicked"))?;
    std::fs::remove_file(&path)?;
    Ok(json!({"case": "ring_write", "size": size, "gbytes_per_s": (count * size as u64) as f64 / secs / 1e9}))
}

/// Frame buffers of [`ring_write`]'s ring: as many as the recorded pool.
const RING_FRAMES: usize = 66;

/// A lossless recording of `count` frames of `size` bytes.
fn record_case(broker: &BrokerProc, dir: &Path, size: u32, count: u64, compression: &str) -> Result<Value> {
    let stream = format!("rec/{size}-{compression}");
    let output = dir.join(format!("rec-{size}-{compression}.mcap"));
    let _ = std::fs::remove_file(&output);
    sync();
    let spec = json!({"role": "record_recorder", "socket": broker.socket, "pattern": stream,
        "output": output.to_str(), "count": count, "compression": compression, "credits": credits(size)});
    let (mut recorder, _) = ChildProc::spawn(&spec, &[])?;
    recorder.read()?; // ready: subscribed by pattern
    let slots = slots(size);
    let spec = json!({"role": "record_publisher", "socket": broker.socket, "stream": stream,
        "size": size, "slots": slots, "count": count});
    let (publisher, _) = ChildProc::spawn(&spec, &[])?;
    let sent = publisher.finish()?;
    let recorded = recorder.finish()?;
    let _ = std::fs::remove_file(&output);
    let secs = sent["seconds"].as_f64().context("seconds")?;
    let bytes = count as f64 * f64::from(size);
    let rss_bound_mb = (f64::from(credits(size)) * f64::from(size)) / 1048576.0 + 64.0;
    Ok(json!({
        "case": "record", "size": size, "compression": compression,
        "ingest_gbytes_per_s": bytes / secs / 1e9,
        "written_gbytes_per_s": recorded["file_bytes"].as_f64().unwrap_or(0.0) / recorded["seconds"].as_f64().unwrap_or(1.0) / 1e9,
        "frames_per_s": count as f64 / secs,
        "drops": recorded["upstream_gaps"].as_u64().unwrap_or(0) + recorded["recorder_drops"].as_u64().unwrap_or(0),
        "frames": recorded["frames"],
        "rss_mb": recorded["rss_mb"],
        "rss_shared_mb": recorded["rss_shared_mb"],
        "recorder_thread_busy": recorded["thread_busy"],
        "rss_bound_mb": rss_bound_mb,
    }))
}

/// Child: a recorder (host + MCAP recorder) until `count` frames are
/// written; reports what it wrote, how long it took from its first frame
/// to the finished file, and its peak RSS.
pub fn recorder_child(spec: &Value) -> Result<()> {
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let mut options = RecordOptions::new(
        vec![spec["pattern"].as_str().context("pattern")?.to_owned()],
        spec["output"].as_str().context("output")?,
    );
    options.credits = spec["credits"].as_u64().unwrap_or(64) as u32;
    options.compression = match spec["compression"].as_str() {
        Some("lz4") => RecordCompression::Lz4,
        Some("zstd") => RecordCompression::Zstd,
        _ => RecordCompression::None,
    };
    let count = spec["count"].as_u64().context("count")?;
    let recorder = Recorder::new(options)?;
    let stats = recorder.stats();
    let host = Host::new(client, recorder, HostOptions::default()).on_ready(|| report(&json!({"ready": true})));
    let stop = host.stop_handle();
    let thread = std::thread::spawn(move || host.run_blocking());
    let mut first = None;
    while stats.frames.load(Relaxed) < count {
        if first.is_none() && stats.frames.load(Relaxed) > 0 {
            first = Some(Instant::now());
        }
        if thread.is_finished() {
            bail!("the recorder stopped early");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let busy = threads_cpu_ns();
    stop.stop();
    thread.join().map_err(|_| anyhow::anyhow!("the host panicked"))??;
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let busy: serde_json::Map<String, Value> =
        busy.into_iter().map(|(name, ns)| (name, json!(ns as f64 / 1e9 / seconds.max(1e-9)))).collect();
    report(&json!({
        "frames": stats.frames.load(Relaxed),
        "file_bytes": stats.file_bytes.load(Relaxed),
        "upstream_gaps": stats.upstream_gaps.load(Relaxed),
        "recorder_drops": stats.recorder_drops.load(Relaxed),
        "seconds": seconds,
        "rss_mb": status_kb("VmHWM")? as f64 / 1024.0,
        "rss_shared_mb": status_kb("RssShmem")? as f64 / 1024.0,
        "thread_busy": busy,
    }));
    Ok(())
}

/// CPU time of each of this process's threads so far, by name.
fn threads_cpu_ns() -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .filter_map(|t| {
            let path = t.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?.trim().to_owned();
            let ns = std::fs::read_to_string(path.join("schedstat")).ok()?.split_whitespace().next()?.parse().ok()?;
            Some((name, ns))
        })
        .collect()
}

/// A field of this process's /proc status (VmHWM: peak resident set;
/// RssShmem: shared memory resident now), KiB.
fn status_kb(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.split(':').next() == Some(field)).context("no such status field")?;
    Ok(line.split_whitespace().nth(1).context("a value")?.parse()?)
}

/// Child: publishes `count` frames of `size` bytes as fast as lossless
/// subscribers take them (optionally at `rate_hz`); reports the time.
pub fn publisher_child(spec: &Value) -> Result<()> {
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let size = spec["size"].as_u64().context("size")? as usize;
    let mut config = StreamConfig::new(size as u32, spec["slots"].as_u64().context("slots")? as u32);
    config.max_subscribers = 4;
    let mut publisher = client.publisher(spec["stream"].as_str().context("stream")?, &config)?;
    let count = spec["count"].as_u64().context("count")?;
    let period = spec["rate_hz"].as_f64().map(|hz| Duration::from_secs_f64(1.0 / hz));
    let start = Instant::now();
    for i in 0..count {
        if let Some(p) = period {
            let due = start + p * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut loan = publisher.loan()?;
        let bytes = loan.as_mut_slice();
        // A pattern of the frame's number: the bytes differ frame to frame.
        bytes[..size.min(8)].copy_from_slice(&i.to_le_bytes()[..size.min(8)]);
        if size > 8 {
            bytes[8..size].fill(i as u8);
        }
        loan.set_len(size);
        loan.send_timeout(Duration::from_secs(60))?;
    }
    report(&json!({"sent": count, "seconds": start.elapsed().as_secs_f64()}));
    Ok(())
}

/// Child: a lossless subscriber taking `count` frames (bytes untouched).
pub fn drain_child(spec: &Value) -> Result<()> {
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let options = SubscribeOptions {
        credits: 16,
        policy: OverflowPolicy::Lossless,
        wait: WaitStrategy::default(),
        wait_for_stream: true,
        credits_up_to: true,
        history: u32::MAX,
    };
    // Waits for the stream to be created (the parent watches for that).
    let sub = client.subscriber(spec["stream"].as_str().context("stream")?, &options)?;
    let count = spec["count"].as_u64().context("count")?;
    let mut got = 0;
    while got < count {
        match sub.recv_timeout(Duration::from_secs(60)) {
            Ok(_) => got += 1,
            Err(e) if e.is_publisher_event() => {}
            Err(e) => return Err(e.into()),
        }
    }
    report(&json!({"received": got}));
    Ok(())
}

/// Records a stream, then replays it: at full speed (1.1 MB frames) and
/// at 1× (a 100 Hz stream), each into a lossless subscriber child.
fn replay_cases(broker: &BrokerProc, dir: &Path, scale: f64) -> Result<Vec<Value>> {
    let mut lines = Vec::new();
    for (size, count, rate_hz) in [(1_153_434u32, ((600.0 * scale) as u64).max(10), None), (65_536, 300, Some(100.0))] {
        let name = format!("replay-src-{size}");
        let output = dir.join(format!("{name}.mcap"));
        let _ = std::fs::remove_file(&output);
        let spec = json!({"role": "record_recorder", "socket": broker.socket, "pattern": name,
            "output": output.to_str(), "count": count, "compression": "none"});
        let (mut recorder, _) = ChildProc::spawn(&spec, &[])?;
        recorder.read()?;
        let mut spec = json!({"role": "record_publisher", "socket": broker.socket, "stream": name,
            "size": size, "slots": 32, "count": count});
        if let Some(hz) = rate_hz {
            spec["rate_hz"] = json!(hz);
        }
        ChildProc::spawn(&spec, &[])?.0.finish()?;
        recorder.finish()?;

        let target = format!("replayed-{size}");
        let spec = json!({"role": "record_drain", "socket": broker.socket, "stream": target, "count": count});
        let (drain, _) = ChildProc::spawn(&spec, &[])?;
        // Wait until the drain is waiting for the stream.
        let client = Client::connect_to(broker.socket)?;
        let start = Instant::now();
        while client.stats(None)?.waiting_subscribers == 0 {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the drain did not subscribe");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The recording's writeback out of the way of the pacing.
        sync();
        let options = ReplayOptions {
            files: vec![output.clone()],
            patterns: vec![memsock::pattern::Pattern::parse("**")?],
            rate: rate_hz.map(|_| 1.0),
            start: None,
            end: None,
            looped: false,
            renames: [(name.clone(), target.clone())].into_iter().collect(),
        };
        let stats = ReplayStats::default();
        let begin = Instant::now();
        let pacing = replay(&client, &options, &stats, &AtomicBool::new(false))?;
        drain.finish()?;
        let secs = begin.elapsed().as_secs_f64();
        let bytes = stats.bytes.load(Relaxed) as f64;
        let _ = std::fs::remove_file(&output);
        let mut line = json!({"case": "replay", "size": size, "frames": stats.frames.load(Relaxed)});
        match rate_hz {
            None => {
                line["rate"] = json!("max");
                line["max_speed_gbytes_per_s"] = json!(bytes / secs / 1e9);
            }
            Some(hz) => {
                line["rate"] = json!(1.0);
                line["stream_hz"] = json!(hz);
                line["pacing_error_p50_us"] = json!(pacing.quantile_us(0.5));
                line["pacing_error_p99_us"] = json!(pacing.quantile_us(0.99));
            }
        }
        lines.push(line);
    }
    Ok(lines)
}

/// A plugin that notes each frame's latency from its send.
#[derive(Debug)]
struct Latency {
    latencies: Arc<Mutex<Vec<u64>>>,
}

#[async_trait]
impl Plugin for Latency {
    fn interests(&self) -> Vec<Interest> {
        let options = SubscribeOptions { credits: 2, credits_up_to: true, ..SubscribeOptions::default() };
        vec![Interest { pattern: "idle/*".into(), options }]
    }
    async fn stream_opened(&mut self, _: &StreamOpened) -> Result<(), PluginError> {
        Ok(())
    }
    fn frame(&mut self, meta: FrameMeta, _frame: OwnedSample) -> Delivery {
        let now = memsock::now_ns();
        self.latencies.lock().expect("not poisoned").push(now.saturating_sub(meta.publish_ns));
        Delivery::Taken
    }
    async fn publisher_changed(&mut self, _: StreamId, _: PublisherChange) -> Result<(), PluginError> {
        Ok(())
    }
    async fn stream_closed(&mut self, _: StreamId) -> Result<(), PluginError> {
        Ok(())
    }
    async fn shutdown(&mut self) -> Result<(), PluginError> {
        Ok(())
    }
}

/// CPU time of thread `tid` of this process, ns.
fn thread_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A host following 100 idle streams: its thread's CPU over 3 s of
/// silence, then 200 frames one at a time, 10 ms apart on random streams,
/// each after silence: from send to hook.
fn plugin_idle(broker: &BrokerProc) -> Result<Value> {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let client = Client::connect_to(broker.socket)?;
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let host = Host::new(client, Latency { latencies: latencies.clone() }, HostOptions::default())
        .on_ready(move || tid_tx.send(rustix::thread::gettid().as_raw_nonzero().get()).expect("waiting"));
    let stop = host.stop_handle();
    let thread = std::thread::spawn(move || host.run_blocking());
    let tid = tid_rx.recv_timeout(Duration::from_secs(10))?;
    let publishing = Client::connect_to(broker.socket)?;
    let mut publishers = (0..100)
        .map(|i| publishing.publisher(&format!("idle/{i}"), &StreamConfig::new(64, 4)))
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, t0) = (thread_cpu_ns(tid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let idle_cpu = (thread_cpu_ns(tid) - cpu0) as f64 / t0.elapsed().as_nanos() as f64 * 100.0;
    let mut x = 0x9e37_79b9_u64;
    for _ in 0..200 {
        x = memsock_tests::mix(x);
        publishers[(x % 100) as usize].send(&[1])?;
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.stop();
    thread.join().map_err(|_| anyhow::anyhow!("the host panicked"))??;
    let mut l = latencies.lock().expect("not poisoned").clone();
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(json!({
        "case": "plugin_idle", "streams": 100, "threads": 1,
        "idle_cpu_percent": idle_cpu,
        "frames": l.len(),
        "wake_latency_p50_us": us(quantile(&mut l, 0.5)),
        "wake_latency_p99_us": us(quantile(&mut l, 0.99)),
        "wake_latency_max_us": us(quantile(&mut l, 1.0)),
    }))
}
