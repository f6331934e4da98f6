//! `memsock-bench c`: the C library against the Rust client, in one run.
//!
//! `c_stream`: the same publisher → subscriber case, through the broker,
//! written once in C (bench/c/c_stream.c over libmemsock) and once in Rust
//! (the children below), each pair doing the same work per frame: the
//! publisher loans a slot, fills it with one byte (memset) and sends it,
//! waiting for room (a lossless subscriber); the subscriber, spinning,
//! checks the byte against the sequence number and that every byte equals
//! the first (memcmp of the frame with itself shifted by one), then
//! releases it. `c_to_python` / `rust_to_python`: a C or a Rust publisher
//! of 64-byte frames to the same Python consumer (bench/c/py_consumer.py),
//! receiving one frame at a time (`recv`) or in batches (`recv_batch`).
//!
//! The C programs are compiled here, with the system's C compiler, against
//! the libmemsock that `cargo build --release -p memsock-c` leaves next to
//! this binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::{Client, OverflowPolicy, RecvError, StreamConfig, SubscribeOptions, WaitStrategy};
use serde_json::{Value, json};

use crate::broker::BrokerProc;
use crate::sys::{ChildProc, report};

/// The sizes measured: a market-data message and a 1.1 MB video frame.
pub const SIZES: [usize; 2] = [64, 1_153_434];

/// Slots and credits per size: room for the publisher to run ahead.
fn geometry(size: usize) -> (u32, u32) {
    if size <= 4096 { (256, 128) } else { (8, 4) }
}

/// The CPUs of a pair: the publisher on 0, the subscriber on 1, in every
/// language (whole processes, from their start).
const PUBLISHER_CPU: usize = 0;
const SUBSCRIBER_CPU: usize = 1;

/// `program` run on `cpu` only (through taskset, so all its threads).
fn on_cpu(cpu: usize, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

/// What a round runs with.
pub struct Setup {
    root: PathBuf,
    c_stream: PathBuf,
    python: PathBuf,
    broker: BrokerProc,
    scale: f64,
    streams: u32,
}

impl Setup {
    /// Builds libmemsock and the C program, finds Python, starts a broker.
    pub fn new(scale: f64) -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("repository root")?.to_path_buf();
        let lib_dir = std::env::current_exe()?.parent().context("binary directory")?.to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let profile = lib_dir.file_name().and_then(|n| n.to_str()).unwrap_or("release").to_owned();
        let profile = if profile == "debug" { "dev".to_owned() } else { profile };
        let status = Command::new(&cargo)
            .args(["build", "--locked", "--quiet", "-p", "memsock-c", "--profile", &profile])
            .current_dir(&root)
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("cargo build -p memsock-c failed");
        }
        // Its own directory, where the library goes by its soname, as
        // installed.
        let dir = lib_dir.join("c-bench");
        std::fs::create_dir_all(&dir)?;
        let soname = dir.join("libmemsock.so.0");
        let _ = std::fs::remove_file(&soname);
        std::os::unix::fs::symlink(lib_dir.join("libmemsock.so"), &soname)?;
        let c_stream = dir.join("c_stream");
        let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        let status = Command::new(&cc)
            .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
            .arg("-I")
            .arg(root.join("client-c/include"))
            .arg(root.join("bench/c/c_stream.c"))
            .arg("-L")
            .arg(&lib_dir)
            .arg(format!("-Wl,-rpath,{}", dir.display()))
            .args(["-lmemsock", "-o"])
            .arg(&c_stream)
            .status()
            .context("running the C compiler")?;
        if !status.success() {
            bail!("compiling bench/c/c_stream.c failed");
        }
        let python = std::env::var_os("MEMSOCK_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/pyenv/bin/python"));
        let ok = Command::new(&python).args(["-c", "import memsock"]).stderr(Stdio::null()).status();
        if !ok.is_ok_and(|s| s.success()) {
            bail!("no Python with memsock at {} (set MEMSOCK_PYTHON, or run scripts/test-all once)", python.display());
        }
        Ok(Self { root, c_stream, python, broker: BrokerProc::start()?, scale, streams: 0 })
    }

    fn count(&self, n: f64) -> u64 {
        ((n * self.scale) as u64).max(100)
    }

    fn stream_name(&mut self) -> String {
        self.streams += 1;
        format!("c-bench-{}", self.streams)
    }

    /// Waits until `n` subscribers wait for a stream (they then get every
    /// frame from the first).
    fn await_waiting(&self, n: u32) -> Result<()> {
        let client = Client::connect_to(self.broker.socket)?;
        let start = Instant::now();
        while client.stats(None)?.waiting_subscribers != n {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the subscriber never subscribed");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// A publisher of `count` frames of `size` in `lang`.
    fn publisher(&self, lang: &str, stream: &str, size: usize, count: u64) -> Result<ChildProc> {
        let slots = geometry(size).0;
        if lang == "c" {
            let args =
                ["publish", self.broker.socket, stream, &size.to_string(), &count.to_string(), &slots.to_string()];
            return ChildProc::command(on_cpu(PUBLISHER_CPU, &self.c_stream).args(args));
        }
        let spec = json!({"role": "cstream_publish", "socket": self.broker.socket, "stream": stream,
                          "size": size, "count": count, "slots": slots, "cpu": PUBLISHER_CPU});
        Ok(ChildProc::spawn(&spec, &[])?.0)
    }

    /// `{"case":"c_stream","size":S,"lang":L,"msgs_per_s":X,"gbytes_per_s":Y}`.
    pub fn c_stream(&mut self, size: usize, lang: &str) -> Result<Value> {
        let count = if size <= 4096 { self.count(1e6) } else { self.count(3e3) };
        let credits = geometry(size).1;
        let stream = self.stream_name();
        let subscriber = if lang == "c" {
            let args = ["subscribe", self.broker.socket, &stream, &count.to_string(), &credits.to_string()];
            ChildProc::command(on_cpu(SUBSCRIBER_CPU, &self.c_stream).args(args))?
        } else {
            let spec = json!({"role": "cstream_subscribe", "socket": self.broker.socket, "stream": stream,
                              "count": count, "credits": credits, "cpu": SUBSCRIBER_CPU});
            ChildProc::spawn(&spec, &[])?.0
        };
        self.await_waiting(1)?;
        let publisher = self.publisher(lang, &stream, size, count)?;
        let got = subscriber.finish()?;
        publisher.finish()?;
        if got["received"] != count || got["bad"] != 0 {
            bail!("{lang} subscriber: {got}");
        }
        let secs = got["ns"].as_f64().context("ns")? / 1e9;
        let rate = (count - 1) as f64 / secs;
        Ok(json!({"case": "c_stream", "size": size, "lang": lang, "msgs_per_s": rate,
                  "gbytes_per_s": rate * size as f64 / 1e9}))
    }

    /// `{"case":"c_to_python"|"rust_to_python","size":64,"api":A,"msgs_per_s":X}`.
    pub fn python_case(&mut self, lang: &str, api: &str) -> Result<Value> {
        let count = if api == "recv" { self.count(3e5) } else { self.count(2e6) };
        let stream = self.stream_name();
        let script = self.root.join("bench/c/py_consumer.py");
        let consumer = ChildProc::command(on_cpu(SUBSCRIBER_CPU, &self.python).arg(script).args([
            self.broker.socket,
            &stream,
            &count.to_string(),
            api,
        ]))?;
        self.await_waiting(1)?;
        let publisher = self.publisher(lang, &stream, 64, count)?;
        let got = consumer.finish()?;
        publisher.finish()?;
        if got["received"] != count {
            bail!("python consumer: {got}");
        }
        let rate = (count - 1) as f64 / (got["ns"].as_f64().context("ns")? / 1e9);
        Ok(json!({"case": format!("{lang}_to_python"), "size": 64, "api": api, "msgs_per_s": rate}))
    }
}

/// One round: every case, the C and Rust sides of a pair back to back (in
/// an order that alternates between rounds, against drift).
pub fn round(setup: &mut Setup, round: usize, only: Option<&str>) -> Result<Vec<Value>> {
    let langs = if round % 2 == 0 { ["c", "rust"] } else { ["rust", "c"] };
    let want = |pair: &str| only.is_none_or(|o| pair.contains(o));
    let mut lines = Vec::new();
    for size in SIZES.into_iter().filter(|size| want(&format!("c_stream_{size}"))) {
        for lang in langs {
            lines.push(setup.c_stream(size, lang)?);
        }
    }
    for api in ["recv", "recv_batch"].into_iter().filter(|api| want(&format!("python_{api}"))) {
        for lang in langs {
            lines.push(setup.python_case(lang, api)?);
        }
    }
    Ok(lines)
}

/// The targets of [`targets`]: key, what it compares, goal.
pub const TARGETS: [(&str, &str, &str); 4] = [
    ("c_vs_rust_64", "64 B C pair msgs/s ÷ Rust pair", ">= 0.95"),
    ("c_vs_rust_1153434", "1.1 MB C pair msgs/s ÷ Rust pair", ">= 0.95"),
    ("c_to_python_vs_rust_to_python_recv", "C → Python ÷ Rust → Python, recv", ">= 0.95"),
    ("c_to_python_vs_rust_to_python_recv_batch", "C → Python ÷ Rust → Python, recv_batch", ">= 0.95"),
];

/// The round's ratios: C ÷ Rust per size, C → Python ÷ Rust → Python per
/// API (targets: at least 0.95).
pub fn targets(lines: &[Value]) -> Value {
    let rate = |f: &dyn Fn(&Value) -> bool| {
        lines.iter().find(|v| f(v)).and_then(|v| v["msgs_per_s"].as_f64()).unwrap_or(f64::NAN)
    };
    let mut t = serde_json::Map::new();
    t.insert("case".into(), "c_targets".into());
    for size in SIZES {
        let of = |lang: &'static str| rate(&|v| v["case"] == "c_stream" && v["size"] == size && v["lang"] == lang);
        t.insert(format!("c_vs_rust_{size}"), json!(of("c") / of("rust")));
    }
    for api in ["recv", "recv_batch"] {
        let of = |case: &'static str| rate(&|v| v["case"] == case && v["api"] == api);
        t.insert(format!("c_to_python_vs_rust_to_python_{api}"), json!(of("c_to_python") / of("rust_to_python")));
    }
    Value::Object(t)
}

/// Child: the Rust publisher of a pair (as c_stream.c's `publish`).
pub fn publish_child(spec: &Value) -> Result<()> {
    crate::sys::pin(spec["cpu"].as_u64().context("cpu")? as usize);
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let size = spec["size"].as_u64().context("size")? as usize;
    let mut config = StreamConfig::new(size as u32, spec["slots"].as_u64().context("slots")? as u32);
    config.timestamps = false;
    let mut publisher = client.publisher(spec["stream"].as_str().context("stream")?, &config)?;
    report(&json!({"ready": true}));
    let count = spec["count"].as_u64().context("count")?;
    for seq in 0..count {
        let mut sample = publisher.loan()?;
        sample.as_mut_slice()[..size].fill(seq as u8);
        sample.set_len(size);
        loop {
            match sample.try_send_timeout(Duration::from_secs(3600)) {
                Ok(_) => break,
                Err(unsent) if unsent.error == memsock::SendError::Timeout => sample = unsent.sample,
                Err(unsent) => return Err(unsent.error.into()),
            }
        }
    }
    report(&json!({"sent": count}));
    Ok(())
}

/// Child: the Rust subscriber of a pair (as c_stream.c's `subscribe`).
pub fn subscribe_child(spec: &Value) -> Result<()> {
    crate::sys::pin(spec["cpu"].as_u64().context("cpu")? as usize);
    let client = Client::connect_to(spec["socket"].as_str().context("socket")?)?;
    let options = SubscribeOptions {
        credits: spec["credits"].as_u64().context("credits")? as u32,
        policy: OverflowPolicy::Lossless,
        wait: WaitStrategy::Spin,
        wait_for_stream: true,
        credits_up_to: false,
        history: u32::MAX,
    };
    let sub = client.subscriber(spec["stream"].as_str().context("stream")?, &options)?;
    let count = spec["count"].as_u64().context("count")?;
    let (mut bad, mut start) = (0u64, Instant::now());
    for i in 0..count {
        let sample = loop {
            match sub.recv() {
                Err(RecvError::PublisherBack) => {}
                other => break other?,
            }
        };
        if i == 0 {
            start = Instant::now();
        }
        let p: &[u8] = &sample;
        bad += u64::from(p.is_empty() || p[0] != sample.seq() as u8 || p[..p.len() - 1] != p[1..]);
    }
    let ns = start.elapsed().as_nanos() as u64;
    report(&json!({"received": count, "bad": bad, "ns": ns}));
    Ok(())
}
