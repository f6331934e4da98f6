//! `memsock demo`: a broker on a temporary socket, a publisher and two
//! subscribers with different policies, each its own process, with live
//! figures for a few seconds and a summary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::{Client, OverflowPolicy, RecvError, StreamConfig, SubscribeOptions};
use serde_json::{Value, json};

const STREAM: &str = "demo/camera";

/// What the demo runs.
#[derive(Debug, Clone, Copy)]
pub struct Demo {
    /// How long the publisher publishes.
    pub seconds: u64,
    /// Frames per second.
    pub rate: u64,
    /// Bytes per frame.
    pub size: u32,
}

/// A child process killed if still running when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn me() -> Result<PathBuf> {
    std::env::current_exe().context("locating the memsock binary")
}

fn spawn(socket: &Path, args: &[String], name: &'static str, tx: &mpsc::Sender<(&'static str, Value)>) -> Result<Proc> {
    let mut child = Command::new(me()?)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send((name, v));
            }
        }
    });
    Ok(Proc(child))
}

/// Runs the demo.
pub fn run(demo: Demo) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("memsock-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let result = run_in(&dir, demo);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, demo: Demo) -> Result<()> {
    let socket = dir.join("broker.sock");
    println!(
        "memsock demo: broker, 1 publisher, 2 subscribers, {} s of {} B frames at {}/s",
        demo.seconds, demo.size, demo.rate
    );
    let broker = Proc(
        Command::new(me()?)
            .arg("--socket")
            .arg(&socket)
            .arg("broker")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .context("starting the broker")?,
    );
    let started = Instant::now();
    let client = loop {
        match Client::connect_to(&socket) {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => bail!("the broker did not come up: {e}"),
        }
    };
    println!("broker pid {} on {}", client.broker_pid(), socket.display());

    let (tx, rx) = mpsc::channel();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    // Subscribers first: they wait for the stream to appear.
    let _recorder =
        spawn(&socket, &s(&["demo-subscriber", "--policy", "lossless", "--credits", "8"]), "recorder", &tx)?;
    let _viewer = spawn(
        &socket,
        &s(&["demo-subscriber", "--policy", "keep-latest", "--credits", "2", "--work-us", "30000"]),
        "viewer",
        &tx,
    )?;
    let (seconds, rate, size) = (demo.seconds.to_string(), demo.rate.to_string(), demo.size.to_string());
    let publisher = spawn(
        &socket,
        &s(&["demo-publisher", "--seconds", &seconds, "--rate", &rate, "--size", &size]),
        "publisher",
        &tx,
    )?;
    drop(tx);
    println!("recorder: lossless, 8 credits; viewer: keep-latest, 2 credits, takes 30 ms per frame\n");
    println!(
        "{:>4}  {:>10}  {:>22}  {:>30}",
        "s", "published/s", "recorder got/s  p50 µs", "viewer got/s  dropped  p50 µs"
    );

    let mut last: std::collections::HashMap<&str, Value> = Default::default();
    let mut finals: std::collections::HashMap<&str, Value> = Default::default();
    let mut next_print = Instant::now() + Duration::from_secs(1);
    let (mut last_published, mut last_at, mut published_per_s, mut viewer_dropped) = (0u64, Instant::now(), 0.0, 0u64);
    let mut publisher = Some(publisher);
    let deadline = Instant::now() + Duration::from_secs(demo.seconds + 20);
    while finals.len() < 3 && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((name, v)) if v.get("summary").is_some() => {
                finals.insert(name, v["summary"].clone());
                if name == "publisher" {
                    // The publisher is done: close the stream so the
                    // subscribers finish what is queued and stop.
                    if let Some(mut p) = publisher.take() {
                        let _ = p.0.wait();
                    }
                    client.close_stream(STREAM).ok();
                }
            }
            Ok((name, v)) => {
                last.insert(name, v);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_print {
            next_print += Duration::from_secs(1);
            // Rates from the shared counters between two prints; after the
            // close the last figures stand.
            if let Some(s) = client.stats(Some(STREAM)).ok().and_then(|r| r.streams.into_iter().next()) {
                let now = Instant::now();
                published_per_s = (s.published - last_published) as f64 / now.duration_since(last_at).as_secs_f64();
                (last_published, last_at) = (s.published, now);
                let viewer = s.subscribers.iter().find(|u| u.policy == OverflowPolicy::KeepLatest);
                viewer_dropped = viewer.map_or(viewer_dropped, |u| u.dropped);
            }
            let f = |name: &str, key: &str| last.get(name).and_then(|v| v[key].as_f64()).unwrap_or(0.0);
            println!(
                "{:>4}  {:>10.0}  {:>14.0}  {:>6.0}  {:>14.0}  {:>7}  {:>6.0}",
                started.elapsed().as_secs(),
                published_per_s,
                f("recorder", "per_s"),
                f("recorder", "p50_us"),
                f("viewer", "per_s"),
                viewer_dropped,
                f("viewer", "p50_us"),
            );
        }
    }
    drop(broker);
    println!("\nsummary");
    let get = |name: &str, key: &str| finals.get(name).map_or(Value::Null, |v| v[key].clone());
    println!("  publisher  sent {} frames", get("publisher", "sent"));
    for name in ["recorder", "viewer"] {
        println!(
            "  {name:<9}  received {}, gaps {}, latency p50 {} µs p99 {} µs, ended: {}",
            get(name, "received"),
            get(name, "missing"),
            get(name, "p50_us"),
            get(name, "p99_us"),
            get(name, "end"),
        );
    }
    if get("recorder", "received") != get("publisher", "sent") {
        bail!("the lossless recorder did not receive every frame");
    }
    Ok(())
}

/// The demo's publisher process.
pub fn publisher(socket: &Path, seconds: u64, rate: u64, size: u32) -> Result<()> {
    let client = Client::connect_to(socket)?;
    let mut config = StreamConfig::new(size, 16);
    config.max_subscribers = 8;
    let mut publisher = client.publisher(STREAM, &config)?;
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut next = Instant::now();
    let mut sent = 0u64;
    while Instant::now() < end {
        let mut frame = publisher.loan()?;
        let buf = frame.as_mut_slice();
        buf[..8].copy_from_slice(&sent.to_le_bytes());
        buf[8..size as usize].fill(sent as u8);
        frame.set_len(size as usize);
        // Lossless recorder: wait for it rather than drop.
        frame.send_timeout(Duration::from_secs(5))?;
        sent += 1;
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    println!("{}", json!({"summary": {"sent": sent}}));
    Ok(())
}

/// The demo's subscriber process: reports once a second, and a summary.
pub fn subscriber(socket: &Path, policy: &str, credits: u32, work_us: u64) -> Result<()> {
    let client = Client::connect_to(socket)?;
    let policy = match policy {
        "lossless" => OverflowPolicy::Lossless,
        "keep-latest" => OverflowPolicy::KeepLatest,
        "drop-newest" => OverflowPolicy::DropNewest,
        other => bail!("unknown policy {other:?}"),
    };
    let options = SubscribeOptions { credits, policy, wait_for_stream: true, ..SubscribeOptions::default() };
    let sub = client.subscriber(STREAM, &options)?;
    let (mut received, mut missing, mut window) = (0u64, 0u64, 0u64);
    let mut last_seq: Option<u64> = None;
    let (mut lat, mut all_lat) = (Vec::new(), Vec::new());
    let mut tick = Instant::now();
    let end = loop {
        match sub.recv_timeout(Duration::from_millis(200)) {
            Ok(sample) => {
                let l = memsock::now_ns().saturating_sub(sample.timestamp_ns()) / 1000;
                lat.push(l);
                all_lat.push(l);
                if let Some(prev) = last_seq {
                    missing += sample.seq().saturating_sub(prev + 1);
                }
                last_seq = Some(sample.seq());
                received += 1;
                window += 1;
                if work_us > 0 {
                    std::thread::sleep(Duration::from_micros(work_us));
                }
            }
            Err(RecvError::Timeout | RecvError::PublisherGone | RecvError::PublisherBack) => {}
            Err(RecvError::Closed) => break "closed",
            Err(e) => return Err(e.into()),
        }
        if tick.elapsed() >= Duration::from_secs(1) {
            let per_s = window as f64 / tick.elapsed().as_secs_f64();
            println!("{}", json!({"per_s": per_s, "p50_us": pct(&mut lat, 0.5)}));
            lat.clear();
            window = 0;
            tick = Instant::now();
        }
    };
    println!(
        "{}",
        json!({"summary": {
            "received": received, "missing": missing, "end": end,
            "p50_us": pct(&mut all_lat, 0.5), "p99_us": pct(&mut all_lat, 0.99),
        }})
    );
    Ok(())
}

fn pct(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q) as usize]
}
