//! memsock's cross-process benchmark runner.
//!
//! `memsock-bench dataplane [--json]` measures streams between separate
//! processes and, in the same run, the references they are judged against
//! (memcpy, a minimal SPSC ring, cache-line and futex ping-pong), then
//! prints a table (or one JSON object per line) and the target ratios.
//! Each figure is the median of several interleaved rounds (`--rounds`),
//! and each target ratio the median of the ratios within each round.
//! Spinning cases pin the two processes to CPUs 0 and 1; run one benchmark
//! at a time.

mod broker;
mod cstream;
mod record;
mod reference;
mod seed_ring;
mod stream;
mod sys;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use stream::Case;

#[derive(Parser)]
#[command(name = "memsock-bench", about = "memsock benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Streams between processes, with memcpy, a minimal ring and
    /// ping-pong references measured in the same run.
    Dataplane {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Multiplies every message count (e.g. 0.1 for a quick look).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Runs only the stream cases whose description contains this
        /// (e.g. "1153434 B × 1"); the references always run.
        #[arg(long)]
        only: Option<String>,
        /// Backs stream pools with 2 MiB huge pages (needs pages reserved
        /// in /proc/sys/vm/nr_hugepages; falls back to ordinary pages).
        #[arg(long)]
        huge_pages: bool,
        /// Measures everything this many times, interleaved, reporting
        /// medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The stream cases through a running broker, next to the same cases
    /// set up directly, plus connect-to-first-frame time and broker CPU.
    Broker {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Multiplies every message count.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Measures everything this many times, interleaved, reporting medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Runs only the cases whose name contains this (`stream`,
        /// `connect`, `join_history`, `lease_reclaim`, `greedy_neighbour`,
        /// `stats_during_create`, `scrape`).
        #[arg(long)]
        only: Option<String>,
    },
    /// The C library against the Rust client: the same stream case in C
    /// and in Rust, and C or Rust publishers to a Python consumer, in one
    /// run (compiles bench/c/c_stream.c; needs target/pyenv or
    /// MEMSOCK_PYTHON for the Python side).
    C {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Multiplies every message count.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Measures everything this many times, interleaved, reporting
        /// medians (many short rounds: on a shared machine a pair's rate
        /// swings between rounds far more than within one).
        #[arg(long, default_value_t = 21)]
        rounds: usize,
        /// Only the pairs whose name contains this: `c_stream_64`,
        /// `c_stream_1153434`, `python_recv` (both APIs), `python_recv_batch`.
        #[arg(long)]
        only: Option<String>,
    },
    /// The MCAP recorder and replayer against the disk they write to:
    /// buffered writes to the same filesystem, lossless recordings of
    /// 64 B, 64 KiB and 1.1 MB frames (RSS against its bound), replay at
    /// full speed and the pacing of a 100 Hz stream at 1x, and a plugin
    /// host's idle CPU and wake latency with 100 streams. Writes under
    /// target/bench-record (or $MEMSOCK_BENCH_DIR).
    Record {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Multiplies every frame count.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Only the cases whose name contains this (`record_64_none`,
        /// `record_1153434`, `lz4`, `replay`, `plugin_idle`); the disk
        /// baseline always runs.
        #[arg(long)]
        only: Option<String>,
    },
    /// (internal) The seed article's hand-rolled ring producer, for the
    /// Python benchmark (`python -m memsock.bench`).
    #[command(hide = true)]
    RingProducer {
        #[arg(long)]
        path: std::path::PathBuf,
        #[arg(long)]
        count: u64,
    },
    /// (internal) A child process of a measurement.
    #[command(hide = true)]
    Child,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Dataplane { json, scale, only, huge_pages, rounds } => {
            dataplane(json, scale, only.as_deref(), huge_pages, rounds.max(1))
        }
        Command::Broker { json, scale, rounds, only } => broker_bench(json, scale, rounds.max(1), only.as_deref()),
        Command::C { json, scale, rounds, only } => c_bench(json, scale, rounds.max(1), only.as_deref()),
        Command::Record { json, scale, only } => record::run(json, scale, only.as_deref()),
        Command::RingProducer { path, count } => seed_ring::ring_producer(&path, count),
        Command::Child => child(),
    }
}

fn stream_cases(scale: f64, only: Option<&str>, huge_pages: bool) -> Vec<Case> {
    let n = |count: f64| ((count * scale) as u64).max(100);
    let mut cases: Vec<Case> = Vec::new();
    for size in [64usize, 1_153_434] {
        let (count, lat_count) = if size == 64 { (n(10e6), n(20e3)) } else { (n(4e3), n(2e3)) };
        for (subscribers, spin) in [(1, true), (1, false), (4, false)] {
            let count = if subscribers == 4 { count / 2 } else { count };
            cases.push(Case::new(size, subscribers, spin, count, lat_count, huge_pages));
        }
        let one_spin = Case::new(size, 1, true, count, lat_count, huge_pages);
        if size == 64 {
            // The clock read every stamped frame pays, and what a hostile
            // lossy subscriber costs the publisher.
            cases.push(Case { timestamps: false, ..one_spin });
            cases.push(Case { hostile: true, ..Case::new(size, 1, false, count, lat_count, huge_pages) });
        } else {
            // Routing by header: the payload is not read.
            cases.push(Case { read_header: true, ..one_spin });
        }
        // The last value kept for late joiners, next to the plain case.
        cases.push(Case { history: 1, ..one_spin });
    }
    cases.retain(|case| only.is_none_or(|o| case.describe().contains(o)));
    cases
}

/// `memsock-bench broker`: every stream case twice per round, directly and
/// through the broker, interleaved; then the connect time.
fn broker_bench(json_out: bool, scale: f64, rounds: usize, only: Option<&str>) -> Result<()> {
    let want = |case: &str| only.is_none_or(|o| case.contains(o));
    let broker = broker::BrokerProc::start()?;
    let mut cases = if want("stream") { stream_cases(scale, None, false) } else { Vec::new() };
    // The hostile peer needs the stream's files, which the broker keeps.
    cases.retain(|case| !case.hostile);
    let rounds_lines = measure_rounds(rounds, json_out, || {
        let mut lines = Vec::new();
        for case in &cases {
            lines.push(stream::run(*case)?);
            let (via, cpu) = broker::stream_case(&broker, *case)?;
            lines.push(via);
            lines.extend(cpu);
        }
        if want("connect") || want("join_history") {
            // A late joiner's first frame from a stream's history (its
            // writer gone, or attached and idle), next to a new client's
            // first live frame.
            lines.push(broker::connect(&broker, 20)?);
            lines.push(broker::join_history(&broker, 20, false)?);
            lines.push(broker::join_history(&broker, 20, true)?);
        }
        if want("lease_reclaim") {
            lines.push(broker::lease_reclaim(&broker, 20)?);
        }
        if want("greedy_neighbour") {
            lines.push(broker::greedy_neighbour(&broker, 300)?);
        }
        if want("stats_during_create") {
            lines.push(broker::stats_during_create(&broker, 1 << 30)?);
        }
        if want("scrape") {
            lines.push(broker::scrape(&broker, 64, 4)?);
            // A 64 B spinning stream with and without an exporter scraped
            // every 100 ms, alternated twice so drift falls on both.
            let case =
                Case::new(64, 1, true, ((10e6 * scale) as u64).max(100), ((20e3 * scale) as u64).max(100), false);
            for _ in 0..2 {
                lines.push(broker::stream_case_unscraped(&broker, case)?);
                lines.push(broker::stream_case_scraped(&broker, case)?);
            }
        }
        Ok(lines)
    })?;
    let (figures, round_targets, targets) = summarize_rounds(&rounds_lines, broker_targets);
    if json_out {
        print_json(&figures, &targets);
        return Ok(());
    }
    for line in &figures {
        println!("{line}");
    }
    println!("\ntargets (ratios within each round; median of {} rounds):", round_targets.len());
    if let Some(obj) = targets.as_object() {
        for (k, v) in obj {
            println!("  {k:<40} {v}");
        }
    }
    Ok(())
}

/// Through-broker ÷ direct for every stream figure, first-frame time and
/// broker CPU.
fn broker_targets(lines: &[Value]) -> Value {
    let mut t = serde_json::Map::new();
    t.insert("case".into(), "broker_targets".into());
    for via in lines.iter().filter(|v| v["case"] == "stream" && v["via"] == "broker" && v.get("scraped").is_none()) {
        let mut direct_of = via.clone();
        direct_of.as_object_mut().map(|o| o.remove("via"));
        let direct = lines.iter().find(|d| same_case(d, &direct_of));
        let name = stream::describe(via).trim_start_matches("stream ").replace([' ', '×'], "_").replace("__", "_");
        let ratio = |key: &str| num(Some(via), key) / num(direct, key);
        t.insert(format!("{name}_msgs_per_s_broker_vs_direct"), json!(ratio("msgs_per_s")));
        t.insert(format!("{name}_p50_broker_vs_direct"), json!(ratio("lat_p50_ns")));
    }
    t.insert("first_frame_us".into(), json!(num(find(lines, |v| v["case"] == "connect"), "first_frame_us")));
    t.insert("broker_cpu_percent".into(), json!(num(find(lines, |v| v["case"] == "broker_cpu"), "cpu_percent")));
    t.insert("lease_reclaim_ms".into(), json!(num(find(lines, |v| v["case"] == "lease_reclaim"), "ms")));
    // Target: a stats request while a 1 GiB stream is created takes at
    // most twice an idle one, plus 1 ms.
    let create = find(lines, |v| v["case"] == "stats_during_create");
    let (during, idle) = (num(create, "stats_ms"), num(create, "idle_stats_ms"));
    t.insert("stats_during_create_vs_2_idle_plus_1ms".into(), json!(during / (2.0 * idle + 1.0)));
    // Targets: a scrape of 64 streams × 4 subscribers within 5 ms, and a
    // stream scraped every 100 ms at ≥ 0.95 of its unscraped rate.
    t.insert("scrape_ms".into(), json!(num(find(lines, |v| v["case"] == "scrape"), "scrape_ms")));
    let rate = |scraped: bool| {
        let rates: Vec<f64> = lines
            .iter()
            .filter(|v| v["case"] == "stream" && v["scraped"] == scraped)
            .map(|v| num(Some(v), "msgs_per_s"))
            .collect();
        rates.iter().sum::<f64>() / rates.len() as f64
    };
    t.insert("stream_64_scraped_vs_unscraped".into(), json!(rate(true) / rate(false)));
    let greedy = find(lines, |v| v["case"] == "greedy_neighbour");
    t.insert("greedy_neighbour_cycle_vs_idle".into(), json!(num(greedy, "cycle_us") / num(greedy, "idle_cycle_us")));
    Value::Object(t)
}

/// `memsock-bench c`: C and Rust pairs interleaved, `rounds` times.
fn c_bench(json_out: bool, scale: f64, rounds: usize, only: Option<&str>) -> Result<()> {
    let mut setup = cstream::Setup::new(scale)?;
    let mut round = 0;
    let rounds_lines = measure_rounds(rounds, json_out, || {
        round += 1;
        cstream::round(&mut setup, round, only)
    })?;
    let (figures, round_targets, targets) = summarize_rounds(&rounds_lines, cstream::targets);
    if json_out {
        print_json(&figures, &targets);
    } else {
        print_table(&figures, &targets, &round_targets, &cstream::TARGETS);
    }
    Ok(())
}

fn child() -> Result<()> {
    let spec: Value = serde_json::from_str(&std::env::var(sys::CHILD_ENV)?)?;
    match spec["role"].as_str() {
        Some("ring_consumer") => reference::ring_consumer(&spec),
        Some("pong") => reference::pong(&spec),
        Some("stream_publisher") => stream::publisher_child(&spec),
        Some("stream_subscriber") => stream::subscriber_child(&spec),
        Some("hostile_subscriber") => stream::hostile_child(&spec),
        Some("broker") => broker::broker_child(&spec),
        Some("connect_publisher") => broker::connect_publisher(&spec),
        Some("connect_subscriber") => broker::connect_subscriber(&spec),
        Some("join_subscriber") => broker::join_subscriber(&spec),
        Some("lease_subscriber") => broker::lease_subscriber(&spec),
        Some("metrics_exporter") => broker::metrics_exporter_child(&spec),
        Some("cstream_publish") => cstream::publish_child(&spec),
        Some("cstream_subscribe") => cstream::subscribe_child(&spec),
        Some("record_recorder") => record::recorder_child(&spec),
        Some("record_publisher") => record::publisher_child(&spec),
        Some("record_drain") => record::drain_child(&spec),
        other => bail!("unknown child role {other:?}"),
    }
}

fn dataplane(json_out: bool, scale: f64, only: Option<&str>, huge_pages: bool, rounds: usize) -> Result<()> {
    let n = |count: f64| ((count * scale) as u64).max(100);
    let cases = stream_cases(scale, only, huge_pages);
    // This machine's speed drifts by up to 2× over minutes (shared host),
    // and now and then its two CPUs share a core for a while (a cache line
    // then crosses in ~20 ns instead of ~200). So every figure is measured
    // `rounds` times, references and streams interleaved; each round's
    // ratios compare figures taken seconds apart, and the report gives
    // the median of each figure and of each round's ratios.
    let rounds_lines = measure_rounds(rounds, json_out, || {
        let mut lines = vec![
            reference::memcpy(64, n(2e9) as usize),
            reference::memcpy(1_153_434, n(2e9) as usize),
            reference::clock(n(2e7)),
            reference::cacheline(n(5e5))?,
            reference::futex(n(5e3) as u32)?,
        ];
        // Each target compares a stream case with a reference ring: the
        // ring runs right before its case, so that the two figures of a
        // ratio are seconds apart, not a round apart (the machine drifts).
        let mut rings =
            vec![(64, true, false), (64, false, false), (1_153_434, false, false), (1_153_434, false, true)];
        let ring = |(size, stamped, header): (usize, bool, bool)| {
            let count = if size == 64 { n(10e6) } else { n(4e3) };
            reference::reference_ring(size, count, stamped, header)
        };
        for case in &cases {
            if let Some(i) = rings.iter().position(|&r| case.reference_ring() == Some(r)) {
                lines.push(ring(rings.remove(i))?);
            }
            lines.push(stream::run(*case)?);
        }
        for r in rings {
            lines.push(ring(r)?);
        }
        Ok(lines)
    })?;
    let (figures, round_targets, targets) = summarize_rounds(&rounds_lines, targets);
    if json_out {
        print_json(&figures, &targets);
    } else {
        print_table(&figures, &targets, &round_targets, &DATAPLANE_TARGETS);
    }
    Ok(())
}

/// Measures `rounds` rounds, telling progress on stderr for the table.
fn measure_rounds(
    rounds: usize,
    json_out: bool,
    mut one_round: impl FnMut() -> Result<Vec<Value>>,
) -> Result<Vec<Vec<Value>>> {
    let mut all = Vec::new();
    for round in 0..rounds {
        let lines = one_round()?;
        if !json_out {
            for line in &lines {
                eprintln!("  round {} measured {} {}", round + 1, describe(line), line["via"].as_str().unwrap_or(""));
            }
        }
        all.push(lines);
    }
    Ok(all)
}

/// Median figures, each round's targets, and their medians.
fn summarize_rounds(rounds: &[Vec<Value>], targets: fn(&[Value]) -> Value) -> (Vec<Value>, Vec<Value>, Value) {
    let figures = median_lines(rounds);
    let round_targets: Vec<Value> = rounds.iter().map(|l| targets(l)).collect();
    let medians = median_targets(&round_targets);
    (figures, round_targets, medians)
}

fn print_json(figures: &[Value], targets: &Value) {
    for line in figures {
        println!("{line}");
    }
    println!("{targets}");
}

/// The fields that name a case: every field that is not a figure (all
/// but numbers, and of numbers those of `NAMING_NUMBERS`).
fn identity(v: &Value) -> Vec<(&String, &Value)> {
    v.as_object()
        .map(|o| o.iter().filter(|(k, v)| !v.is_number() || NAMING_NUMBERS.contains(&k.as_str())).collect())
        .unwrap_or_default()
}

/// The numbers that name a case rather than measure it.
const NAMING_NUMBERS: [&str; 3] = ["size", "subscribers", "history"];

/// Whether two lines measure the same case (rounds merge by this).
fn same_case(a: &Value, b: &Value) -> bool {
    identity(a) == identity(b)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| !x.is_nan());
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 { xs[m] } else { (xs[m - 1] + xs[m]) / 2.0 }
}

/// Each case once, every figure the median of its rounds.
fn median_lines(rounds: &[Vec<Value>]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for line in rounds.iter().flatten() {
        if out.iter().any(|o| same_case(o, line)) {
            continue;
        }
        let mut m = line.clone();
        let same: Vec<&Value> = rounds.iter().flatten().filter(|l| same_case(l, line)).collect();
        if let Some(obj) = m.as_object_mut() {
            for (k, v) in obj.iter_mut() {
                if v.is_f64() || (v.is_u64() && !NAMING_NUMBERS.contains(&k.as_str())) {
                    let x = median(same.iter().filter_map(|l| l[k].as_f64()).collect());
                    *v = json!(x);
                }
            }
        }
        out.push(m);
    }
    out
}

/// The median of each target ratio over the rounds.
fn median_targets(rounds: &[Value]) -> Value {
    let mut m = rounds.first().cloned().unwrap_or_else(|| json!({}));
    if let Some(obj) = m.as_object_mut() {
        for (k, v) in obj.iter_mut() {
            if v.is_number() {
                *v = json!(median(rounds.iter().filter_map(|r| r[k].as_f64()).collect()));
            }
        }
        obj.insert("rounds".into(), json!(rounds.len()));
    }
    m
}

fn find(lines: &[Value], pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    lines.iter().find(|v| pred(v))
}

/// The line of the case whose identity includes every field of `pattern`,
/// with the defaults (stamped, read whole, no hostile peer, direct) for
/// fields the pattern does not give.
fn line_like(lines: &[Value], pattern: Value) -> Option<&Value> {
    let mut want = json!({"timestamps": true, "read": "whole", "hostile": false, "history": 0});
    if pattern["case"] != "stream" {
        want = json!({});
    }
    want.as_object_mut()?.extend(pattern.as_object()?.clone());
    let want = want.as_object()?;
    find(lines, |v| want.iter().all(|(k, x)| &v[k] == x) && v["via"].is_null())
}

fn stream_line<'a>(lines: &'a [Value], size: u64, subs: u64, wait: &str) -> Option<&'a Value> {
    line_like(lines, json!({"case": "stream", "size": size, "subscribers": subs, "wait": wait}))
}

fn num(v: Option<&Value>, key: &str) -> f64 {
    v.and_then(|v| v[key].as_f64()).unwrap_or(f64::NAN)
}

/// The targets, as ratios of figures from this run.
fn targets(lines: &[Value]) -> Value {
    let reference_ring = num(find(lines, |v| v["case"] == "reference_ring" && v["size"] == 64), "msgs_per_s");
    let stamped_ring = num(find(lines, |v| v["case"] == "reference_ring_stamped"), "msgs_per_s");
    let big_ring = |read: &str| {
        num(line_like(lines, json!({"case": "reference_ring", "size": 1_153_434, "read": read})), "gbytes_per_s")
    };
    let reference_ring_big = big_ring("whole");
    let nostamp = num(
        line_like(lines, json!({"case": "stream", "size": 64, "subscribers": 1, "wait": "spin", "timestamps": false})),
        "msgs_per_s",
    );
    let header = num(
        line_like(
            lines,
            json!({"case": "stream", "size": 1_153_434, "subscribers": 1, "wait": "spin", "read": "header"}),
        ),
        "gbytes_per_s",
    );
    let hostile = num(
        line_like(lines, json!({"case": "stream", "size": 64, "subscribers": 1, "wait": "block", "hostile": true})),
        "pub_cpu_ns_per_msg",
    );
    let history1 = |size: u64, key| {
        let plain = num(stream_line(lines, size, 1, "spin"), key);
        let kept = num(
            line_like(lines, json!({"case": "stream", "size": size, "subscribers": 1, "wait": "spin", "history": 1})),
            key,
        );
        kept / plain
    };
    let memcpy_big = num(find(lines, |v| v["case"] == "memcpy" && v["size"] == 1_153_434), "gbytes_per_s");
    let cacheline = num(find(lines, |v| v["case"] == "cacheline"), "one_way_ns");
    let futex = num(find(lines, |v| v["case"] == "futex"), "one_way_ns");
    let s = |size, subs, wait, key| num(stream_line(lines, size, subs, wait), key);
    let max_minflt = lines
        .iter()
        .filter(|v| v["case"] == "stream")
        .map(|v| v["minflt_per_msg"].as_f64().unwrap_or(f64::NAN))
        .fold(0.0, f64::max);
    json!({
        "case": "targets",
        "small_spin_vs_reference_ring": s(64, 1, "spin", "msgs_per_s") / reference_ring,
        "small_spin_nostamp_vs_reference_ring": nostamp / reference_ring,
        "small_spin_vs_stamped_ring": s(64, 1, "spin", "msgs_per_s") / stamped_ring,
        "stamped_ring_vs_reference_ring": stamped_ring / reference_ring,
        "big_spin_vs_memcpy": s(1_153_434, 1, "spin", "gbytes_per_s") / memcpy_big,
        "big_block_vs_memcpy": s(1_153_434, 1, "block", "gbytes_per_s") / memcpy_big,
        "big_spin_vs_reference_ring": s(1_153_434, 1, "spin", "gbytes_per_s") / reference_ring_big,
        "big_spin_header_vs_reference_ring_header": header / big_ring("header"),
        "big_reference_ring_vs_memcpy": reference_ring_big / memcpy_big,
        "small_spin_p50_vs_cacheline": s(64, 1, "spin", "lat_p50_ns") / cacheline,
        "small_block_p50_vs_futex": s(64, 1, "block", "lat_p50_ns") / futex,
        "small_pub_cpu_4_vs_1": s(64, 4, "block", "pub_cpu_ns_per_msg") / s(64, 1, "block", "pub_cpu_ns_per_msg"),
        "small_pub_cpu_hostile_vs_plain": hostile / s(64, 1, "block", "pub_cpu_ns_per_msg"),
        "big_pub_cpu_4_vs_1": s(1_153_434, 4, "block", "pub_cpu_ns_per_msg") / s(1_153_434, 1, "block", "pub_cpu_ns_per_msg"),
        "max_minflt_per_msg": max_minflt,
        "small_spin_history1_vs_plain": history1(64, "msgs_per_s"),
        "big_spin_history1_vs_plain": history1(1_153_434, "gbytes_per_s"),
    })
}

fn describe(v: &Value) -> String {
    match v["case"].as_str() {
        Some("stream") => stream::describe(v),
        Some(c) => {
            let size = if v["size"].is_null() { String::new() } else { format!(" {} B", v["size"]) };
            let read = if v["read"] == "header" { " header" } else { "" };
            format!("{c}{size}{read}")
        }
        None => v.to_string(),
    }
}

/// The dataplane's targets: key, what it compares, goal.
const DATAPLANE_TARGETS: [(&str, &str, &str); 17] = [
    ("small_spin_nostamp_vs_reference_ring", "64 B spin, no timestamps, msgs/s ÷ reference ring", ">= 0.5"),
    ("small_spin_vs_stamped_ring", "64 B spin msgs/s ÷ ring + clock read", ">= 0.9"),
    ("small_spin_vs_reference_ring", "64 B spin msgs/s ÷ reference ring (info)", "-"),
    ("stamped_ring_vs_reference_ring", "ring + clock read ÷ reference ring (info)", "-"),
    ("big_spin_vs_memcpy", "1.1 MB spin GB/s ÷ memcpy", ">= 0.9"),
    ("big_block_vs_memcpy", "1.1 MB block GB/s ÷ memcpy", ">= 0.9"),
    ("big_spin_vs_reference_ring", "1.1 MB spin GB/s ÷ bare ring", ">= 0.95"),
    ("big_spin_header_vs_reference_ring_header", "1.1 MB spin, header read, ÷ bare ring read so", ">= 0.95"),
    ("big_reference_ring_vs_memcpy", "1.1 MB bare ring GB/s ÷ memcpy (info)", "-"),
    ("small_spin_p50_vs_cacheline", "64 B spin p50 ÷ cache-line one-way", "<= 2"),
    ("small_block_p50_vs_futex", "64 B block p50 ÷ futex one-way", "<= 1.2"),
    ("small_pub_cpu_4_vs_1", "64 B block publisher CPU, 4 subs ÷ 1", "<= 2"),
    ("big_pub_cpu_4_vs_1", "1.1 MB block publisher CPU, 4 subs ÷ 1", "<= 2"),
    ("small_pub_cpu_hostile_vs_plain", "64 B block publisher CPU, hostile peer ÷ none", "~ 1"),
    ("max_minflt_per_msg", "minor faults per message, worst case", "<= 0.001"),
    ("small_spin_history1_vs_plain", "64 B spin msgs/s, history 1 ÷ none", "~ 1"),
    ("big_spin_history1_vs_plain", "1.1 MB spin GB/s, history 1 ÷ none", "~ 1"),
];

/// The figures as a table, then each target (`rows`: key, what, goal)
/// with its median and range over the rounds.
fn print_table(lines: &[Value], targets: &Value, rounds: &[Value], rows: &[(&str, &str, &str)]) {
    let f = |v: &Value, k: &str, scale: f64, prec: usize| match v[k].as_f64() {
        Some(x) => format!("{:.*}", prec, x / scale),
        None => "-".into(),
    };
    println!(
        "{:<22} {:>9} {:>5} {:>6} {:>16} {:>10} {:>8} {:>9} {:>9} {:>10} {:>10}",
        "case", "size", "subs", "wait", "variant", "Mmsg/s", "GB/s", "p50 ns", "p99 ns", "pub ns/msg", "minflt/msg"
    );
    for v in lines {
        let case = v["case"].as_str().unwrap_or("?");
        let oneway = f(v, "one_way_ns", 1.0, 1);
        let mut variant: Vec<&str> = stream::variant(v);
        // The C benchmark's lines name their language or API instead.
        variant.extend(["lang", "api"].iter().filter_map(|k| v[*k].as_str()));
        println!(
            "{:<22} {:>9} {:>5} {:>6} {:>16} {:>10} {:>8} {:>9} {:>9} {:>10} {:>10}",
            case,
            v["size"].as_u64().map_or("-".into(), |s| s.to_string()),
            v["subscribers"].as_u64().map_or("-".into(), |s| s.to_string()),
            v["wait"].as_str().unwrap_or("-"),
            if variant.is_empty() { "-".to_string() } else { variant.join(",") },
            f(v, "msgs_per_s", 1e6, 2),
            f(v, "gbytes_per_s", 1.0, 2),
            match case {
                "stream" => f(v, "lat_p50_ns", 1.0, 0),
                "clock" => f(v, "ns_per_read", 1.0, 1),
                _ => oneway.clone(),
            },
            f(v, "lat_p99_ns", 1.0, 0),
            f(v, "pub_cpu_ns_per_msg", 1.0, 1),
            f(v, "minflt_per_msg", 1.0, 5),
        );
    }
    println!("\ntargets (ratios within each round; median and range of {} rounds):", rounds.len());
    for &(key, what, goal) in rows {
        let each: Vec<f64> = rounds.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect();
        let (lo, hi) = each.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
        println!("  {what:<44} {:>9.4}  ({lo:.3}–{hi:.3})   target {goal}", targets[key].as_f64().unwrap_or(f64::NAN));
    }
}
