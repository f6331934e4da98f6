//! The ops tools against the real broker and the real `memsock` binary:
//! metrics (checked by `promtool`, and against the stats they come from),
//! the HTTP exporter, and errors that read as one line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use memsock::{Client, OverflowPolicy, StatsReport, StreamConfig, SubscribeOptions};
use memsock_tests::{Broker, TempDir, eventually, lossless, memsock_exe};

/// Only catches a hang: every wait below is for the event itself.
const DEADLINE: Duration = Duration::from_secs(20);

/// `memsock --socket S ARGS...`: its stdout, or its stderr as the error.
fn memsock(broker: &Broker, args: &[&str]) -> Result<String> {
    let out = Command::new(memsock_exe()).arg("--socket").arg(broker.socket()).args(args).output()?;
    ensure!(out.status.success(), "memsock {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// A metric's labels, sorted.
type Labels = BTreeMap<String, String>;

/// The samples of a Prometheus or OpenMetrics text exposition, by name and
/// labels (an independent reading of the text: not the crate that wrote it).
fn parse_exposition(text: &str) -> Result<BTreeMap<(String, Labels), f64>> {
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').with_context(|| format!("no value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').context("unclosed labels")?)?),
            None => (series, Labels::new()),
        };
        let value: f64 = value.parse().with_context(|| format!("value of {line}"))?;
        ensure!(samples.insert((name.to_owned(), labels), value).is_none(), "a series twice: {line}");
    }
    Ok(samples)
}

fn parse_labels(mut text: &str) -> Result<Labels> {
    let mut labels = Labels::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"").context("label without a value")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().context("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().context("a dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// `promtool check metrics` on `text` (the test command installs it with
/// Debian's prometheus package).
fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (scripts/need-tools promtool:prometheus installs it)")?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
    Ok(())
}

/// Three subscribers that lose frames in each of the ways there are: one
/// lossless that reads every frame, one keep-latest and one drop-newest
/// that read none. Then the metrics `memsock stats --format prometheus`
/// prints pass promtool and say what the stats say; for every subscriber,
/// delivered + dropped + queued is every frame published since it
/// attached.
#[test]
fn metrics_pass_promtool_and_account_for_every_frame() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_named(broker.socket(), "ops \"test\"")?;
    let mut config = StreamConfig::new(64, 64);
    config.max_subscribers = 4;
    let mut publisher = client.publisher("ops/a", &config)?;
    // Frames before anyone subscribed: not theirs to account for.
    for i in 0..7u64 {
        publisher.send_timeout(&i.to_le_bytes(), DEADLINE)?;
    }
    let reader = client.subscriber("ops/a", &lossless(16))?;
    let idle = |policy| SubscribeOptions { credits: 4, policy, ..SubscribeOptions::default() };
    let _latest = client.subscriber("ops/a", &idle(OverflowPolicy::KeepLatest))?;
    let _newest = client.subscriber("ops/a", &idle(OverflowPolicy::DropNewest))?;
    for round in 0..10u64 {
        for i in 0..10 {
            publisher.send_timeout(&(round * 10 + i).to_le_bytes(), DEADLINE)?;
        }
        for _ in 0..10 {
            reader.recv_timeout(DEADLINE)?;
        }
    }

    let stats: StatsReport = serde_json::from_str(&memsock(&broker, &["stats", "--format", "json"])?)?;
    let text = memsock(&broker, &["stats", "--format", "prometheus"])?;
    promtool_check(&text)?;
    let metrics = parse_exposition(&text)?;
    let get = |name: &str, l: &Labels| metrics.get(&(name.to_owned(), l.clone())).copied();

    let stream = stats.streams.iter().find(|s| s.name == "ops/a").context("the stream")?;
    assert_eq!(stream.published, 107);
    let s = labels(&[("stream", "ops/a")]);
    assert_eq!(get("memsock_stream_frames_published_total", &s), Some(107.0));
    assert_eq!(get("memsock_stream_bytes_published_total", &s), Some(107.0 * 8.0));
    assert_eq!(get("memsock_stream_slots", &s), Some(64.0));
    assert_eq!(get("memsock_stream_slots_free", &s), Some(f64::from(stream.free_slots)));
    assert_eq!(get("memsock_stream_publisher_attached", &s), Some(1.0));
    assert_eq!(get("memsock_broker_up", &Labels::new()), Some(1.0));
    assert_eq!(get("memsock_clients", &Labels::new()), Some(f64::from(stats.clients)));
    assert_eq!(stream.subscribers.len(), 3);
    for u in &stream.subscribers {
        assert_eq!(u.client_name, "ops \"test\"");
        assert_eq!(u.delivered + u.dropped + u.queued, stream.published - u.attach_seq, "subscriber {u:?}");
        let index = u.index.to_string();
        let policy = serde_json::to_value(u.policy)?.as_str().context("policy")?.to_owned();
        let l = labels(&[("stream", "ops/a"), ("index", &index), ("client", "ops \"test\""), ("policy", &policy)]);
        let with_cause = |cause: &str| {
            let mut l = l.clone();
            l.insert("cause".into(), cause.into());
            get("memsock_subscriber_frames_dropped_total", &l)
        };
        assert_eq!(get("memsock_subscriber_frames_delivered_total", &l), Some(u.delivered as f64), "{u:?}");
        assert_eq!(get("memsock_subscriber_queued", &l), Some(u.queued as f64), "{u:?}");
        assert_eq!(get("memsock_subscriber_credits", &l), Some(f64::from(u.credits)), "{u:?}");
        assert_eq!(with_cause("evicted"), Some(u.evicted as f64), "{u:?}");
        assert_eq!(with_cause("no_credit"), Some((u.dropped - u.evicted) as f64), "{u:?}");
        match u.policy {
            OverflowPolicy::Lossless => assert_eq!((u.delivered, u.dropped), (100, 0)),
            // Four queued, the rest evicted by newer frames.
            OverflowPolicy::KeepLatest => assert_eq!((u.queued, u.evicted, u.dropped), (4, 96, 96)),
            // Four queued, the rest published while it had no credit.
            OverflowPolicy::DropNewest => assert_eq!((u.queued, u.evicted, u.dropped), (4, 0, 96)),
        }
    }
    // No pid in any label unless asked for.
    assert!(metrics.keys().all(|(_, l)| !l.contains_key("pid")));
    Ok(())
}

/// `memsock metrics --listen 127.0.0.1:0`, and what it printed: the URL.
fn start_exporter(socket: &std::path::Path) -> Result<(Child, String)> {
    let mut child = Command::new(memsock_exe())
        .arg("--socket")
        .arg(socket)
        .args(["metrics", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let url = line.trim().strip_prefix("serving http://").context("the exporter's address")?;
    Ok((child, url.strip_suffix("/metrics").context("the path")?.to_owned()))
}

/// A GET over HTTP/1.1: (status line, content type, body).
fn http_get(addr: &str, path: &str, accept: &str) -> Result<(String, String, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    Ok((status, content_type, body.to_owned()))
}

/// What Prometheus sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// The exporter serves OpenMetrics to a scraper that takes it and the
/// Prometheus text format to one that does not; when its broker dies it
/// says so (`memsock_broker_up 0`) and keeps serving, and it finds the
/// next broker on the same socket by itself.
#[test]
fn the_exporter_negotiates_its_format_and_outlives_its_broker() -> Result<()> {
    let dir = TempDir::new("metrics")?;
    let socket = dir.path().join("run").join("broker.sock");
    let mut broker = Broker::start_at(dir, socket.clone())?;
    let (mut exporter, addr) = start_exporter(&socket)?;
    let result = (|| -> Result<()> {
        let (status, content_type, body) = http_get(&addr, "/metrics", PROMETHEUS_ACCEPT)?;
        assert!(status.contains("200"), "{status}");
        assert!(content_type.starts_with("application/openmetrics-text; version=1.0.0"), "{content_type}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(body.contains("\nmemsock_broker_up 1\n"), "{body}");

        let (status, content_type, body) = http_get(&addr, "/metrics", "text/plain")?;
        assert!(status.contains("200"), "{status}");
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        assert!(!body.contains("# EOF"), "{body}");
        promtool_check(&body)?;
        let metrics = parse_exposition(&body)?;
        assert_eq!(metrics.get(&("memsock_broker_up".into(), Labels::new())), Some(&1.0));

        let (status, _, _) = http_get(&addr, "/nothing", "*/*")?;
        assert!(status.contains("404"), "{status}");

        broker.signal_and_wait(libc::SIGKILL)?;
        let (_, _, body) = http_get(&addr, "/metrics", "text/plain")?;
        assert!(body.contains("\nmemsock_broker_up 0\n"), "{body}");
        assert!(body.contains("memsock_build_info{version="), "{body}");

        let broker = Broker::start_at(broker.into_dir(), socket.clone())?;
        let back = eventually(DEADLINE, || {
            http_get(&addr, "/metrics", "text/plain").is_ok_and(|(_, _, body)| body.contains("\nmemsock_broker_up 1\n"))
        });
        ensure!(back, "the exporter did not find the new broker");
        drop(broker);
        Ok(())
    })();
    let _ = exporter.kill();
    let _ = exporter.wait();
    result
}

/// A failing command prints one line — what failed and why — and no
/// backtrace, even with RUST_BACKTRACE=1.
#[test]
fn a_failing_command_says_so_in_one_line() -> Result<()> {
    let dir = TempDir::new("errors")?;
    let socket = dir.path().join("nobody.sock");
    for args in [&["stats"][..], &["stats", "--format", "prometheus"], &["record", "-o", "/nonexistent/x.mcap"]] {
        let out = Command::new(memsock_exe())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "off")
            .output()?;
        let stderr = String::from_utf8(out.stderr)?;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        if lines.len() != 1 || !lines[0].starts_with("memsock: ") {
            bail!("{args:?} printed {stderr:?}");
        }
        assert!(!stderr.contains("backtrace"), "{stderr}");
    }
    Ok(())
}

/// Publishes frames holding their sequence number (little-endian), one
/// about every `period`, from a thread, until the returned flag is set.
fn publish_in_background(
    client: &Client,
    stream: &str,
    period: Duration,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<Result<()>>)> {
    let mut publisher = client.publisher(stream, &StreamConfig::new(64, 64))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut seq = 0u64;
        while !stopped.load(Relaxed) {
            publisher.send_timeout(&seq.to_le_bytes(), DEADLINE)?;
            seq += 1;
            std::thread::sleep(period);
        }
        Ok(())
    });
    Ok((stop, thread))
}

/// `memsock echo` prints each frame's number, length, latency and first
/// bytes (what the publisher put there); `memsock hz` a rate consistent
/// with its intervals. Both started before the stream exists.
#[test]
fn echo_and_hz_show_what_the_publisher_sends() -> Result<()> {
    let broker = Broker::start()?;
    let run = |args: &[&str]| {
        Command::new(memsock_exe()).arg("--socket").arg(broker.socket()).args(args).stdout(Stdio::piped()).spawn()
    };
    let echo = run(&["echo", "ops/e", "--count", "5", "--json", "--bytes", "8"])?;
    let hz = run(&["hz", "ops/e", "--count", "2", "--every", "0.3", "--json"])?;
    // Both wait for the stream: create it once both are subscribed.
    let client = Client::connect_to(broker.socket())?;
    ensure!(
        eventually(DEADLINE, || client.stats(None).is_ok_and(|s| s.waiting_subscribers == 2)),
        "echo and hz did not come"
    );
    let (stop, publisher) = publish_in_background(&client, "ops/e", Duration::from_micros(500))?;
    let echoed = echo.wait_with_output()?;
    let rates = hz.wait_with_output()?;
    stop.store(true, Relaxed);
    publisher.join().map_err(|_| anyhow::anyhow!("the publisher panicked"))??;
    ensure!(echoed.status.success() && rates.status.success(), "echo or hz failed");

    let lines: Vec<serde_json::Value> =
        String::from_utf8(echoed.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 5, "{lines:?}");
    let mut last = None;
    for line in &lines {
        let seq = line["seq"].as_u64().context("seq")?;
        let hex: String = seq.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        assert_eq!(line["hex"], hex.as_str(), "{line}");
        assert_eq!(line["len"], 8, "{line}");
        assert!(line["latency_us"].as_f64().is_some_and(|us| us >= 0.0), "{line}");
        assert!(last.is_none_or(|l| seq > l), "{lines:?}");
        last = Some(seq);
    }
    let reports: Vec<serde_json::Value> =
        String::from_utf8(rates.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(reports.len(), 2, "{reports:?}");
    let last = &reports[1];
    let rate = last["rate_hz"].as_f64().context("a rate")?;
    let mean_ms = last["interval_ms"]["mean"].as_f64().context("a mean interval")?;
    // Frames 0.5 ms apart at the least (sleeps only lengthen them).
    assert!(rate > 0.0 && rate <= 2000.0 * 1.05, "{last}");
    assert!(mean_ms >= 0.5 * 0.95, "{last}");
    // Every frame was taken (keep-latest with room to spare): the rate is
    // the inverse of the mean interval.
    assert!((rate * mean_ms / 1e3 - 1.0).abs() < 0.05, "{last}");
    Ok(())
}

/// `memsock doctor --json ARGS` (after `wrapper`): its exit code and checks
/// by name.
fn doctor(broker: &Broker, wrapper: &[&str], args: &[&str]) -> Result<(i32, BTreeMap<String, serde_json::Value>)> {
    let exe = memsock_exe();
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let out = command.arg("--socket").arg(broker.socket()).args(["doctor", "--json"]).args(args).output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("doctor printed {}", String::from_utf8_lossy(&out.stderr)))?;
    let checks = report["checks"].as_array().context("checks")?;
    let by_name = checks.iter().map(|c| (c["check"].as_str().unwrap_or_default().to_owned(), c.clone())).collect();
    let failed = checks.iter().any(|c| c["status"] == "fail");
    assert_eq!(report["ok"], !failed, "{report}");
    let code = out.status.code().context("killed")?;
    assert_eq!(code, i32::from(failed), "{report}");
    Ok((code, by_name))
}

/// Whether this process has CAP_IPC_LOCK (then no memlock limit applies to
/// it, nor to what it starts unless the capability is dropped).
fn has_ipc_lock() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap_or("0");
    u64::from_str_radix(caps.trim(), 16).is_ok_and(|c| c & (1 << 14) != 0)
}

/// `memsock doctor` on this machine: every check runs, a stream can be
/// created and locked, the exit status says whether one failed. With
/// RLIMIT_MEMLOCK lowered by `prlimit` below what a locked stream needs
/// (and CAP_IPC_LOCK dropped, when running as root), it names that
/// problem and how to fix it, and exits non-zero.
#[test]
fn doctor_checks_this_machine_and_names_a_low_memlock_limit() -> Result<()> {
    let broker = Broker::start()?;
    let (_, checks) = doctor(&broker, &[], &[])?;
    let names: Vec<&str> = checks.keys().map(String::as_str).collect();
    for name in
        ["broker", "memfd", "memlock", "huge_pages", "memory_cgroup", "pid_namespace", "socket_dir", "descriptors"]
    {
        assert!(names.contains(&name), "no {name} check in {names:?}");
    }
    for name in ["broker", "memfd", "memlock", "pid_namespace", "socket_dir"] {
        assert_eq!(checks[name]["status"], "ok", "{}", checks[name]);
    }

    let mut wrapper = vec!["prlimit", "--memlock=65536:65536"];
    if has_ipc_lock() {
        wrapper.extend(["setpriv", "--bounding-set=-ipc_lock"]);
    }
    let (code, checks) = doctor(&broker, &wrapper, &["--mlock-size", "16M"])?;
    assert_eq!(code, 1);
    let memlock = &checks["memlock"];
    assert_eq!(memlock["status"], "fail", "{memlock}");
    assert!(memlock["detail"].as_str().is_some_and(|d| d.contains("RLIMIT_MEMLOCK is 64 KiB")), "{memlock}");
    assert!(memlock["advice"].as_str().is_some_and(|a| a.contains("LimitMEMLOCK=")), "{memlock}");
    assert_eq!(checks["memfd"]["status"], "ok");
    Ok(())
}

/// The scrape job in deploy/ is one Prometheus accepts.
#[test]
fn the_scrape_example_is_valid_prometheus_configuration() -> Result<()> {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus-scrape.yml");
    let out = Command::new("promtool").args(["check", "config"]).arg(&config).output().context("running promtool")?;
    ensure!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The text of tmux session `session`'s pane.
fn capture(session: &str) -> String {
    Command::new("tmux")
        .args(["capture-pane", "-p", "-t", session])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The whitespace-separated fields of the first line of `screen`
/// containing `needle`.
fn fields_of(screen: &str, needle: &str) -> Vec<String> {
    screen
        .lines()
        .find(|l| l.contains(needle))
        .map_or_else(Vec::new, |l| l.split_whitespace().map(str::to_owned).collect())
}

/// A tmux session, ended when dropped.
struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).output();
    }
}

/// `memsock top` in a real terminal (tmux): the stream and both its
/// subscribers by their clients' names, the stream's rate and the idle
/// keep-latest subscriber's drops moving; "broker gone" once the broker
/// is killed; `q` quits.
#[test]
fn top_shows_live_streams_in_a_terminal_and_says_when_the_broker_is_gone() -> Result<()> {
    let mut broker = Broker::start()?;
    let publisher_client = Client::connect_named(broker.socket(), "cam-grabber")?;
    let (stop, publisher) = publish_in_background(&publisher_client, "ops/top", Duration::from_millis(1))?;
    let reader = Client::connect_named(broker.socket(), "reader")?.subscriber("ops/top", &lossless(16))?;
    let idle = SubscribeOptions { credits: 4, policy: OverflowPolicy::KeepLatest, ..SubscribeOptions::default() };
    let _idler = Client::connect_named(broker.socket(), "idler")?.subscriber("ops/top", &idle)?;
    let reading = Arc::new(AtomicBool::new(true));
    let reader_thread = {
        let reading = reading.clone();
        std::thread::spawn(move || {
            while reading.load(Relaxed) {
                let _ = reader.recv_timeout(Duration::from_millis(100));
            }
        })
    };
    let session = Tmux(format!("memsock-top-{}", std::process::id()));
    let command = format!("{} --socket {} top --interval 0.2", memsock_exe().display(), broker.socket().display());
    let started = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session.0, "-x", "170", "-y", "30", &command])
        .status()?;
    ensure!(started.success(), "tmux new-session failed");

    let result = (|| -> Result<()> {
        let moving = eventually(DEADLINE, || {
            let screen = capture(&session.0);
            let stream = fields_of(&screen, "ops/top");
            let idler = fields_of(&screen, "idler");
            // ops/top PID cam-grabber FRAMES/S ...; ├─ #i PID idler keep_latest FRAMES/S CREDITS QUEUED LAG DROPS/S
            let rate = stream.get(3).and_then(|r| r.parse::<f64>().ok()).unwrap_or(0.0);
            let drops = idler.get(9).and_then(|r| r.parse::<f64>().ok()).unwrap_or(0.0);
            screen.contains("cam-grabber") && screen.contains("reader") && rate > 0.0 && drops > 0.0
        });
        ensure!(moving, "top did not show the stream moving:\n{}", capture(&session.0));
        broker.signal_and_wait(libc::SIGKILL)?;
        ensure!(
            eventually(DEADLINE, || capture(&session.0).contains("broker gone")),
            "top did not say the broker is gone:\n{}",
            capture(&session.0)
        );
        Command::new("tmux").args(["send-keys", "-t", &session.0, "q"]).status()?;
        let quit = eventually(DEADLINE, || {
            !Command::new("tmux").args(["has-session", "-t", &session.0]).status().is_ok_and(|s| s.success())
        });
        ensure!(quit, "q did not quit top");
        Ok(())
    })();
    stop.store(true, Relaxed);
    reading.store(false, Relaxed);
    let _ = publisher.join();
    let _ = reader_thread.join();
    result
}

/// The latency of `client`'s subscribers on `stream` over the broker's
/// last one-second look, by client name (waits until each has one).
fn latencies(client: &Client, stream: &str, names: &[&str]) -> Result<BTreeMap<String, memsock::LatencySummary>> {
    let mut got = BTreeMap::new();
    let seen = eventually(DEADLINE, || {
        let Ok(report) = client.stats(Some(stream)) else { return false };
        got = report.streams[0]
            .subscribers
            .iter()
            .filter_map(|u| Some((u.client_name.clone(), u.latency.as_ref()?.last_interval?)))
            .collect();
        names.iter().all(|n| got.contains_key(*n))
    });
    ensure!(seen, "no latency for all of {names:?}: {got:?}");
    Ok(got)
}

/// A lossless subscriber that sleeps 5 ms before each receive holds its
/// publisher back, so every frame it gets waited at least that long: its
/// p50 says so. A subscriber of the same stream that receives at once
/// shows less. A stream without timestamps shows no latency. And the
/// exported histogram counts what the stats count.
#[test]
fn a_slow_subscriber_s_latency_shows_its_sleep() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_named(broker.socket(), "latency-test")?;
    let mut config = StreamConfig::new(64, 64);
    config.max_subscribers = 4;
    let mut publisher = client.publisher("ops/lat", &config)?;
    let slow = Client::connect_named(broker.socket(), "slow")?.subscriber("ops/lat", &lossless(4))?;
    let fast = Client::connect_named(broker.socket(), "fast")?.subscriber("ops/lat", &lossless(4))?;
    let running = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = [(slow, Duration::from_millis(5)), (fast, Duration::ZERO)]
        .into_iter()
        .map(|(sub, nap)| {
            let running = running.clone();
            std::thread::spawn(move || {
                while running.load(Relaxed) {
                    std::thread::sleep(nap);
                    let _ = sub.recv_timeout(Duration::from_millis(100));
                }
            })
        })
        .collect();
    let sender = {
        let running = running.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut seq = 0u64;
            while running.load(Relaxed) {
                match publisher.send_timeout(&seq.to_le_bytes(), Duration::from_millis(100)) {
                    Ok(_) => seq += 1,
                    Err(memsock::SendError::Timeout) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
    };
    let result = (|| -> Result<()> {
        let got = latencies(&client, "ops/lat", &["slow", "fast"])?;
        let (slow, fast) = (got["slow"], got["fast"]);
        assert!(slow.p50_ns >= 5_000_000, "slow: {slow:?}");
        assert!(slow.max_ns >= slow.p99_ns && slow.p99_ns >= slow.p50_ns, "{slow:?}");
        assert!(fast.p50_ns < slow.p50_ns, "fast {fast:?}, slow {slow:?}");

        let stats: StatsReport = serde_json::from_str(&memsock(&broker, &["stats", "--format", "json"])?)?;
        let text = memsock(&broker, &["stats", "--format", "prometheus"])?;
        promtool_check(&text)?;
        let metrics = parse_exposition(&text)?;
        for u in &stats.streams[0].subscribers {
            let counted: u64 = u.latency.as_ref().context("latency")?.buckets.iter().map(|(_, c)| c).sum();
            let policy = serde_json::to_value(u.policy)?.as_str().context("policy")?.to_owned();
            let index = u.index.to_string();
            let l =
                labels(&[("stream", "ops/lat"), ("index", &index), ("client", &u.client_name), ("policy", &policy)]);
            let count = metrics.get(&("memsock_subscriber_latency_seconds_count".into(), l.clone())).copied();
            // (Read a moment apart: the exposition counts at least what the stats did.)
            assert!(count.is_some_and(|c| c >= counted as f64), "{count:?} vs {counted}");
            let mut inf = l.clone();
            inf.insert("le".into(), "+Inf".into());
            assert_eq!(metrics.get(&("memsock_subscriber_latency_seconds_bucket".into(), inf)).copied(), count);
        }
        Ok(())
    })();
    running.store(false, Relaxed);
    for r in readers {
        let _ = r.join();
    }
    sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    result?;

    // No timestamps, no latency.
    let mut plain = StreamConfig::new(64, 8);
    plain.timestamps = false;
    let mut publisher = client.publisher("ops/plain", &plain)?;
    let sub = client.subscriber("ops/plain", &lossless(4))?;
    publisher.send_timeout(b"x", DEADLINE)?;
    drop(sub.recv_timeout(DEADLINE)?);
    let report = client.stats(Some("ops/plain"))?;
    assert_eq!(report.streams[0].subscribers[0].latency, None);
    Ok(())
}

/// The broker's JSON log lines so far, each parsed.
fn json_log(broker: &Broker) -> Result<Vec<serde_json::Value>> {
    broker.log().lines().map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l:?}"))).collect()
}

/// Whether `log` holds an event with `message` whose fields include `fields`.
fn logged(log: &[serde_json::Value], message: &str, fields: &[(&str, serde_json::Value)]) -> bool {
    log.iter().any(|e| e["message"] == message && fields.iter().all(|(k, v)| &e[*k] == v))
}

#[test]
fn the_broker_logs_what_ops_need_as_json_lines() -> Result<()> {
    let dir = TempDir::new("json-logs")?;
    let socket = dir.path().join("broker.sock");
    let broker = Broker::start_with(dir, socket, &["--log-format", "json"])?;
    let client = Client::connect_named(broker.socket(), "log-test")?;
    let publisher = client.publisher("logs/a", &StreamConfig::new(64, 8))?;
    let subscriber = client.subscriber("logs/a", &lossless(4))?;
    let refusal = client.close_stream("logs/nope");
    ensure!(refusal.is_err(), "closing a stream that does not exist succeeded");
    client.close_stream("logs/a")?;
    drop(subscriber);
    drop(publisher);
    // A publisher killed: its lease is reclaimed.
    let mut killed = Command::new(memsock_exe())
        .arg("--socket")
        .arg(broker.socket())
        .args(["publish", "--stream", "logs/b", "--count", "1000000000", "--rate", "100"])
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .spawn()?;
    ensure!(
        eventually(DEADLINE, || client.stats(None).is_ok_and(|s| s.streams.iter().any(|s| s.name == "logs/b"))),
        "the publisher did not come"
    );
    killed.kill()?;
    killed.wait()?;
    drop(client);
    let me = serde_json::json!(std::process::id());
    ensure!(
        eventually(DEADLINE, || json_log(&broker).is_ok_and(|log| {
            logged(&log, "client disconnected", &[("client", "log-test".into()), ("pid", me.clone())])
                && logged(&log, "publisher gone: its lease is reclaimed", &[("stream", "logs/b".into())])
        })),
        "the disconnects were not logged: {}",
        broker.log()
    );
    let log = json_log(&broker)?;
    for event in &log {
        ensure!(event["timestamp"].is_string() && event["level"].is_string(), "{event}");
    }
    let uid = serde_json::json!(rustix::process::getuid().as_raw());
    assert!(
        logged(&log, "client connected", &[("client", "log-test".into()), ("pid", me.clone()), ("uid", uid)]),
        "{log:#?}"
    );
    assert!(logged(&log, "client connected", &[("client", "memsock".into())]), "{log:#?}");
    assert!(logged(&log, "publisher attached", &[("stream", "logs/a".into())]), "{log:#?}");
    assert!(logged(&log, "subscriber attached", &[("stream", "logs/a".into())]), "{log:#?}");
    assert!(logged(&log, "stream closed", &[("stream", "logs/a".into())]), "{log:#?}");
    let refused = log.iter().find(|e| e["message"] == "refused").context("no refusal logged")?;
    assert!(refused["reason"].as_str().is_some_and(|r| r.contains("logs/nope")), "{refused}");
    Ok(())
}

/// A real client process (`memsock echo`) whose broker is killed: it logs a
/// warning saying so, and goes on printing the frames that keep coming.
#[test]
fn a_client_whose_broker_dies_warns_and_keeps_receiving() -> Result<()> {
    let mut broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let (stop, publisher) = publish_in_background(&client, "ops/orphan", Duration::from_millis(2))?;
    let mut echo = Command::new(memsock_exe())
        .arg("--socket")
        .arg(broker.socket())
        .args(["echo", "ops/orphan", "--json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(echo.stdout.take().context("stdout")?).lines();
    let stderr = echo.stderr.take().context("stderr")?;
    let warned = std::thread::spawn(move || {
        BufReader::new(stderr).lines().map_while(Result::ok).find(|l| l.contains("broker is gone"))
    });
    lines.next().context("echo printed nothing")??;
    broker.signal_and_wait(9)?;
    let warning = warned.join().map_err(|_| anyhow::anyhow!("the stderr reader panicked"))?;
    let result = (|| -> Result<()> {
        let warning = warning.context("no warning that the broker is gone")?;
        ensure!(warning.contains("WARN") && warning.contains("keep flowing"), "{warning}");
        // Frames published after the broker died still come.
        for _ in 0..20 {
            let line: serde_json::Value = serde_json::from_str(&lines.next().context("echo stopped")??)?;
            ensure!(line["seq"].is_u64(), "{line}");
        }
        Ok(())
    })();
    stop.store(true, Relaxed);
    let _ = echo.kill();
    let _ = echo.wait();
    publisher.join().map_err(|_| anyhow::anyhow!("the publisher panicked"))??;
    result
}
