//! Streams obtained through a running broker, measured against the same
//! streams set up directly, in the same run; the time from a client's
//! start to its first frame; and the broker's CPU while frames stream.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::{Client, StreamConfig, SubscribeOptions};
use serde_json::{Value, json};

use crate::stream::{self, Case};
use crate::sys::{ChildProc, report};

/// A broker in a child process, on a private socket.
pub struct BrokerProc {
    child: ChildProc,
    pid: u32,
    dir: std::path::PathBuf,
    /// Its socket, for the lifetime of the run.
    pub socket: &'static str,
}

impl BrokerProc {
    /// Starts the broker and waits until it answers.
    pub fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("memsock-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let socket: &'static str = dir.join("broker.sock").to_string_lossy().into_owned().leak();
        let (mut child, _) = ChildProc::spawn(&json!({"role": "broker", "socket": socket}), &[])?;
        let pid = child.read()?["pid"].as_u64().context("broker pid")? as u32;
        let start = Instant::now();
        while Client::connect_to(socket).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the broker did not come up");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Self { child, pid, dir, socket })
    }

    /// CPU time the broker has used so far, in nanoseconds (all threads).
    pub fn cpu_ns(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else { return 0 };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.child.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Child: the broker itself.
pub fn broker_child(spec: &Value) -> Result<()> {
    let socket = spec["socket"].as_str().context("socket")?.into();
    report(&json!({"pid": std::process::id()}));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    Ok(runtime.block_on(memsock_broker::server::serve(memsock_broker::server::Options::new(socket)))?)
}

/// The stream case through the broker, with the broker's CPU use around it.
pub fn stream_case(broker: &BrokerProc, case: Case) -> Result<(Value, Option<Value>)> {
    let case = Case { broker: Some(broker.socket), ..case };
    let (cpu0, t0) = (broker.cpu_ns(), Instant::now());
    let line = stream::run(case)?;
    let (cpu1, wall) = (broker.cpu_ns(), t0.elapsed());
    let cpu = (case.size == 64 && case.subscribers == 1 && case.spin)
        .then(|| json!({"case": "broker_cpu", "cpu_percent": (cpu1 - cpu0) as f64 / wall.as_nanos() as f64 * 100.0}));
    Ok((line, cpu))
}

/// `{"case":"connect","first_frame_us":X}`: a new client process connects,
/// subscribes to a stream being published and receives its first frame;
/// the median of `tries`.
pub fn connect(broker: &BrokerProc, tries: u32) -> Result<Value> {
    let client = Client::connect_to(broker.socket)?;
    let mut publisher = ChildProc::spawn(&json!({"role": "connect_publisher", "socket": broker.socket}), &[])?.0;
    publisher.read()?; // publishing
    let mut times = Vec::new();
    for _ in 0..tries {
        let (child, _) = ChildProc::spawn(&json!({"role": "connect_subscriber", "socket": broker.socket}), &[])?;
        times.push(child.finish()?["first_frame_ns"].as_u64().context("first frame")?);
    }
    client.close_stream("connect")?;
    publisher.finish()?;
    let p50 = crate::sys::quantile(&mut times, 0.5);
    Ok(json!({"case": "connect", "first_frame_us": p50 as f64 / 1e3}))
}

/// Child: publishes a small frame every 10 µs until the stream closes.
pub fn connect_publisher(spec: &Value) -> Result<()> {
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let mut publisher = client.publisher("connect", &StreamConfig::new(64, 64))?;
    report(&json!({"publishing": true}));
    let mut next = Instant::now();
    loop {
        match publisher.send(&[0; 64]) {
            Ok(_) => {}
            Err(memsock::SendError::Closed) => break,
            Err(e) => return Err(e.into()),
        }
        next += Duration::from_micros(10);
        while Instant::now() < next {
            std::hint::spin_loop();
        }
    }
    report(&json!({"done": true}));
    Ok(())
}

/// Child: time from before connecting to the first frame received.
pub fn connect_subscriber(spec: &Value) -> Result<()> {
    let start = Instant::now();
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let sub = client.subscriber("connect", &SubscribeOptions::default())?;
    let _first = sub.recv()?;
    let ns = start.elapsed().as_nanos() as u64;
    report(&json!({"first_frame_ns": ns}));
    Ok(())
}

/// `{"case":"join_history",...}`: a stream keeping its last frame, whose
/// writer has gone (or, `idle_writer`, is attached but sends no more:
/// `join_history_idle_writer`); a new process connects and subscribes,
/// and gets that frame from the history: the time from before
/// connecting, and from before subscribing, to it (medians of `tries`).
/// Next to `connect`, where the first frame is a live one.
pub fn join_history(broker: &BrokerProc, tries: u32, idle_writer: bool) -> Result<Value> {
    let client = Client::connect_to(broker.socket)?;
    let config = StreamConfig { history: 1, ..StreamConfig::new(64, 64) };
    let mut publisher = client.publisher("join", &config)?;
    publisher.send(&[7; 64])?;
    // Kept to the end (idle), or gone before the first joiner.
    let writer = idle_writer.then_some(publisher);
    let (mut connect, mut subscribe) = (Vec::new(), Vec::new());
    for _ in 0..tries {
        let (child, _) = ChildProc::spawn(&json!({"role": "join_subscriber", "socket": broker.socket}), &[])?;
        let got = child.finish()?;
        connect.push(got["first_frame_ns"].as_u64().context("first frame")?);
        subscribe.push(got["subscribe_ns"].as_u64().context("subscribe")?);
    }
    drop(writer);
    client.close_stream("join")?;
    let p50 = |v: &mut Vec<u64>| crate::sys::quantile(v, 0.5) as f64 / 1e3;
    let case = if idle_writer { "join_history_idle_writer" } else { "join_history" };
    Ok(json!({"case": case, "first_frame_us": p50(&mut connect), "subscribe_to_frame_us": p50(&mut subscribe)}))
}

/// Child of `join_history`: times to the first (history) frame.
pub fn join_subscriber(spec: &Value) -> Result<()> {
    let start = Instant::now();
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let subscribing = Instant::now();
    let sub = client.subscriber("join", &SubscribeOptions::default())?;
    let first = sub.recv()?;
    let (ns, subscribe_ns) = (start.elapsed().as_nanos() as u64, subscribing.elapsed().as_nanos() as u64);
    if !first.is_history() {
        bail!("the first frame was not the history's");
    }
    report(&json!({"first_frame_ns": ns, "subscribe_ns": subscribe_ns}));
    Ok(())
}

/// `{"case":"lease_reclaim","ms":X}`: a subscriber process holding two
/// slots is killed (SIGKILL); the time until the broker has removed it and
/// every slot is free again (the publisher loaning meanwhile, as a live
/// one would); the median of `tries`.
pub fn lease_reclaim(broker: &BrokerProc, tries: u32) -> Result<Value> {
    let client = Client::connect_to(broker.socket)?;
    let mut publisher = client.publisher("lease", &StreamConfig::new(64, 16))?;
    let mut times = Vec::new();
    for _ in 0..tries {
        let (mut child, _) = ChildProc::spawn(&json!({"role": "lease_subscriber", "socket": broker.socket}), &[])?;
        child.read()?; // subscribed
        publisher.send(&[1])?;
        publisher.send(&[2])?;
        child.read()?; // holding both
        let start = Instant::now();
        child.kill();
        loop {
            drop(publisher.loan()?);
            let stats = client.stats(Some("lease"))?;
            let stream = stats.streams.first().context("lease stream")?;
            if stream.subscribers.is_empty() && stream.free_slots == stream.slot_count {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("a killed subscriber was not reclaimed in 10 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(start.elapsed().as_nanos() as u64);
    }
    let p50 = crate::sys::quantile(&mut times, 0.5);
    let max = times.iter().copied().max().unwrap_or(0);
    Ok(json!({"case": "lease_reclaim", "ms": p50 as f64 / 1e6, "max_ms": max as f64 / 1e6}))
}

/// Child: subscribes, takes two frames and holds them until killed.
pub fn lease_subscriber(spec: &Value) -> Result<()> {
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let sub = client.subscriber("lease", &SubscribeOptions::default())?;
    report(&json!({"subscribed": true}));
    let held = [sub.recv()?, sub.recv()?];
    report(&json!({"holding": held.len()}));
    loop {
        std::thread::park();
    }
}

/// `{"case":"stats_during_create","stream_bytes":N,"stats_ms":X,"idle_stats_ms":Y,...}`:
/// the 99th percentile of a `stats` request's time while another client
/// creates a pre-faulted stream of `bytes` (1 MiB slots) and then drops
/// it, the median with nothing being created, and the median and maximum
/// during; the creation's own time, and how many requests were answered
/// during it.
pub fn stats_during_create(broker: &BrokerProc, bytes: u64) -> Result<Value> {
    let client = Client::connect_to(broker.socket)?;
    let timed = |client: &Client| -> Result<u64> {
        let start = Instant::now();
        client.stats(None)?;
        Ok(start.elapsed().as_nanos() as u64)
    };
    let mut idle = (0..200).map(|_| timed(&client)).collect::<Result<Vec<_>>>()?;
    let socket = broker.socket;
    let creator = std::thread::spawn(move || -> Result<u64> {
        let client = Client::connect_to(socket)?;
        let mut config = StreamConfig::new(1 << 20, (bytes >> 20) as u32);
        config.prefault = true;
        let start = Instant::now();
        let publisher = client.publisher("stats_during_create", &config)?;
        let ns = start.elapsed().as_nanos() as u64;
        drop(publisher);
        Ok(ns)
    });
    let mut during = Vec::new();
    while !creator.is_finished() {
        during.push(timed(&client)?);
    }
    let create_ns = creator.join().map_err(|_| anyhow::anyhow!("the creating thread panicked"))??;
    let answered = during.len();
    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(json!({
        "case": "stats_during_create", "stream_bytes": bytes,
        "stats_ms": ms(crate::sys::quantile(&mut during, 0.99)),
        "stats_p50_ms": ms(crate::sys::quantile(&mut during, 0.5)),
        "stats_max_ms": ms(during.iter().copied().max().unwrap_or(0)),
        "idle_stats_ms": ms(crate::sys::quantile(&mut idle, 0.5)),
        "create_ms": ms(create_ns), "answered_during": answered,
    }))
}

/// `{"case":"greedy_neighbour","cycle_us":X,"idle_cycle_us":Y,...}`: the
/// median time another client takes to create a stream, subscribe to it,
/// read stats and drop both, while a greedy client creates small streams
/// until its limit refuses it, drops them and starts again — and the same
/// with nobody greedy. Also how often the greedy one was refused.
pub fn greedy_neighbour(broker: &BrokerProc, cycles: usize) -> Result<Value> {
    let client = Client::connect_to(broker.socket)?;
    let cycle = |n: usize| -> Result<u64> {
        let start = Instant::now();
        let publisher = client.publisher(&format!("neighbour-{n}"), &StreamConfig::new(64, 8))?;
        let subscriber = client.subscriber(publisher.stream(), &SubscribeOptions::default())?;
        client.stats(None)?;
        drop((subscriber, publisher));
        Ok(start.elapsed().as_nanos() as u64)
    };
    let mut idle = (0..cycles).map(cycle).collect::<Result<Vec<_>>>()?;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let (stop, refusals) = (std::sync::Arc::new(AtomicBool::new(false)), std::sync::Arc::new(AtomicU64::new(0)));
    let (socket, flag, refused) = (broker.socket, stop.clone(), refusals.clone());
    let greedy = std::thread::spawn(move || -> Result<()> {
        let client = Client::connect_to(socket)?;
        let mut held = Vec::new();
        while !flag.load(Relaxed) {
            match client.publisher(&format!("greedy-{}", held.len()), &StreamConfig::new(64, 8)) {
                Ok(p) => held.push(p),
                Err(memsock::ClientError::Refused(memsock::ControlError::LimitReached { .. })) => {
                    refused.fetch_add(1, Relaxed);
                    held.clear();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    });
    // Measure once it has met its limit.
    let deadline = Instant::now() + Duration::from_secs(60);
    while refusals.load(Relaxed) == 0 && !greedy.is_finished() && Instant::now() < deadline {
        std::thread::yield_now();
    }
    let mut busy = (0..cycles).map(|n| cycle(cycles + n)).collect::<Result<Vec<_>>>()?;
    stop.store(true, Relaxed);
    greedy.join().map_err(|_| anyhow::anyhow!("the greedy thread panicked"))??;
    let refusals = refusals.load(Relaxed);
    let us = |ns: u64| ns as f64 / 1e3;
    Ok(json!({
        "case": "greedy_neighbour",
        "cycle_us": us(crate::sys::quantile(&mut busy, 0.5)),
        "cycle_p99_us": us(crate::sys::quantile(&mut busy, 0.99)),
        "idle_cycle_us": us(crate::sys::quantile(&mut idle, 0.5)),
        "greedy_refusals": refusals,
    }))
}

/// Child: the metrics exporter (`memsock metrics`) on a free port of
/// 127.0.0.1; reports `{"addr": ...}` once it listens, serves until killed.
pub fn metrics_exporter_child(spec: &Value) -> Result<()> {
    use memsock_broker::metrics::{Exporter, LabelOptions, serve};
    let socket = std::path::Path::new(spec["socket"].as_str().context("socket")?);
    let listen = "127.0.0.1:0".parse()?;
    serve(Exporter::new(socket, LabelOptions::default()), listen, |addr| report(&json!({"addr": addr.to_string()})))?;
    Ok(())
}

/// A real exporter process on `broker`, and its address.
fn start_exporter(broker: &BrokerProc) -> Result<(ChildProc, String)> {
    let (mut exporter, _) = ChildProc::spawn(&json!({"role": "metrics_exporter", "socket": broker.socket}), &[])?;
    let addr = exporter.read()?["addr"].as_str().context("the exporter's address")?.to_owned();
    Ok((exporter, addr))
}

/// One scrape as Prometheus makes it (HTTP/1.1 GET of /metrics, asking
/// for OpenMetrics): the body's length.
fn scrape_once(addr: &str) -> Result<usize> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "scrape: {}", String::from_utf8_lossy(&response));
    Ok(response.len())
}

/// `{"case":"scrape","streams":S,"subscribers_per_stream":N,"scrape_ms":X}`:
/// the median time of a scrape of a real exporter process while the
/// broker has `streams` streams of `subscribers` subscribers each (every
/// subscriber with a latency histogram): the exporter's stats request, the
/// broker reading every stream's shared counters, the encoding, HTTP.
pub fn scrape(broker: &BrokerProc, streams: u32, subscribers: u32) -> Result<Value> {
    let client = Client::connect_to(broker.socket)?;
    let mut held = Vec::new();
    for s in 0..streams {
        let mut config = StreamConfig::new(64, 4 * subscribers + 4);
        config.max_subscribers = subscribers;
        let name = format!("scrape/{s}");
        let mut publisher = client.publisher(&name, &config)?;
        let subs = (0..subscribers)
            .map(|_| client.subscriber(&name, &SubscribeOptions { credits: 4, ..SubscribeOptions::default() }))
            .collect::<Result<Vec<_>, _>>()?;
        // A frame each, received: every subscriber has a latency sample.
        publisher.send(&[1; 64])?;
        for sub in &subs {
            drop(sub.recv_timeout(Duration::from_secs(10))?);
        }
        held.push((publisher, subs));
    }
    let (mut exporter, addr) = start_exporter(broker)?;
    let mut bytes = 0;
    for _ in 0..5 {
        bytes = scrape_once(&addr)?;
    }
    let mut times = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        scrape_once(&addr)?;
        times.push(start.elapsed().as_nanos() as u64);
    }
    exporter.kill();
    for s in 0..streams {
        client.close_stream(&format!("scrape/{s}"))?;
    }
    drop(held);
    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(json!({
        "case": "scrape", "streams": streams, "subscribers_per_stream": subscribers,
        "scrape_ms": ms(crate::sys::quantile(&mut times, 0.5)),
        "scrape_p99_ms": ms(crate::sys::quantile(&mut times, 0.99)),
        "response_bytes": bytes,
    }))
}

/// The stream case through the broker with an exporter process scraped
/// every 100 ms meanwhile (as Prometheus would, a fast one): its line,
/// marked `"scraped":true`, and how many scrapes there were.
pub fn stream_case_scraped(broker: &BrokerProc, case: Case) -> Result<Value> {
    let (mut exporter, addr) = start_exporter(broker)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64> {
            let mut scrapes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                scrape_once(&addr)?;
                scrapes += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(scrapes)
        })
    };
    let line = stream::run(Case { broker: Some(broker.socket), ..case });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.join().map_err(|_| anyhow::anyhow!("the scraper panicked"))?;
    exporter.kill();
    let mut line = line?;
    line["scraped"] = json!(true);
    line["scrapes"] = json!(scrapes?);
    Ok(line)
}

/// The stream case through the broker with no exporter: the line
/// [`stream_case_scraped`] is compared with, marked `"scraped":false`.
pub fn stream_case_unscraped(broker: &BrokerProc, case: Case) -> Result<Value> {
    let (mut line, _) = stream_case(broker, case)?;
    line["scraped"] = json!(false);
    Ok(line)
}
