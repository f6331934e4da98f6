//! Late joiners across processes: a stream that keeps its last frames
//! hands them to readers that come later — after the writer's last frame,
//! after it exited, after it was killed — and a new writer takes over.
//! The real broker and the real `memsock publish` as the writer.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Result, ensure};
use memsock::{Client, OverflowPolicy, StreamConfig, SubscribeOptions, TryRecvError};
use memsock_tests::{Broker, eventually, memsock_exe};

const DEADLINE: Duration = Duration::from_secs(20);

/// `memsock publish` of `count` 64-byte frames (the sequence number in the
/// first 8 bytes) keeping `history` of them, at `rate` per second (0: at once).
fn writer(broker: &Broker, stream: &str, history: u32, count: u64, rate: u64) -> Result<Child> {
    Ok(Command::new(memsock_exe())
        .arg("--socket")
        .arg(broker.socket())
        .args(["publish", "--stream", stream, "--size", "64", "--slots", "8"])
        .args(["--history", &history.to_string(), "--count", &count.to_string(), "--rate", &rate.to_string()])
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .spawn()?)
}

fn report(client: &Client, stream: &str) -> Option<memsock::StreamReport> {
    client.stats(Some(stream)).ok()?.streams.into_iter().find(|s| s.name == stream)
}

/// Everything queued for `sub` now: (seq, history flag, seq written in the payload).
fn drain(sub: &memsock::Subscriber) -> Result<Vec<(u64, bool, u64)>> {
    let mut got = Vec::new();
    loop {
        match sub.try_recv() {
            Ok(sample) => {
                let written = u64::from_le_bytes(sample[..8].try_into()?);
                got.push((sample.seq(), sample.is_history(), written));
            }
            Err(TryRecvError::Empty) => return Ok(got),
            Err(e) if e.is_publisher_event() => {}
            Err(e) => anyhow::bail!("{e}"),
        }
    }
}

#[test]
fn a_reader_after_the_writer_exited_gets_its_last_frames_and_a_new_writer_follows() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    // The writer sends 10 frames and exits: its stream stays for its history.
    ensure!(writer(&broker, "state", 2, 10, 0)?.wait()?.success());
    // Kept once the broker has seen the writer's lease end.
    let retained = || report(&client, "state").is_some_and(|s| s.retained_ns.is_some());
    ensure!(eventually(DEADLINE, retained), "the stream stays after its writer exits");
    let kept = report(&client, "state").expect("kept");
    ensure!((kept.history, kept.history_held, kept.published) == (2, 2, 10), "{kept:?}");
    ensure!(kept.publisher_pid.is_none(), "{kept:?}");
    // A reader started afterwards gets the last two, intact, flagged.
    // (8 slots: 2 kept for the publisher's loans, 2 for the history, 4 to promise.)
    let sub = client.subscriber("state", &SubscribeOptions { credits: 2, ..SubscribeOptions::default() })?;
    ensure!(drain(&sub)? == [(8, true, 8), (9, true, 9)]);
    // One that declines gets nothing until a new frame.
    let none = client.subscriber("state", &SubscribeOptions { credits: 2, history: 0, ..Default::default() })?;
    ensure!(drain(&none)?.is_empty());
    // A new writer of the same geometry takes over: its frames follow, no gap.
    let mut publisher = client.publisher("state", &StreamConfig { history: 2, ..StreamConfig::new(64, 8) })?;
    publisher.send(&10u64.to_le_bytes())?;
    ensure!(drain(&sub)? == [(10, false, 10)]);
    ensure!(drain(&none)? == [(10, false, 10)]);
    // Closed, it goes, and everything with it.
    drop((sub, none, publisher));
    client.close_stream("state")?;
    ensure!(eventually(DEADLINE, || report(&client, "state").is_none()));
    Ok(())
}

#[test]
fn a_reader_after_the_writer_was_killed_gets_its_last_frame() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let mut killed = writer(&broker, "killed", 1, 1_000_000_000, 200)?;
    ensure!(eventually(DEADLINE, || report(&client, "killed").is_some_and(|s| s.published >= 5)));
    killed.kill()?;
    killed.wait()?;
    ensure!(eventually(DEADLINE, || report(&client, "killed").is_some_and(|s| s.publisher_pid.is_none())));
    let kept = report(&client, "killed").expect("the stream stays after its writer was killed");
    let sub = client.subscriber("killed", &SubscribeOptions { credits: 2, ..Default::default() })?;
    let last = kept.published - 1;
    ensure!(drain(&sub)? == [(last, true, last)], "the last frame sent, {last}");
    Ok(())
}

/// Receives `n` frames, waiting for each (past publisher news).
fn receive(sub: &memsock::Subscriber, n: usize) -> Result<Vec<(u64, bool, u64)>> {
    let mut got = Vec::new();
    while got.len() < n {
        match sub.recv_timeout(DEADLINE) {
            Ok(sample) => got.push((sample.seq(), sample.is_history(), u64::from_le_bytes(sample[..8].try_into()?))),
            Err(e) if e.is_publisher_event() => {}
            Err(e) => anyhow::bail!("{e}"),
        }
    }
    Ok(got)
}

#[test]
fn a_reader_of_an_idle_live_writer_gets_the_last_frames_at_once() -> Result<()> {
    let broker = Broker::start()?;
    // The writer, in its own process, sends 10 frames and then idles,
    // attached, until its stdin ends.
    let mut idle = Command::new(memsock_exe())
        .arg("--socket")
        .arg(broker.socket())
        .args(["publish", "--stream", "idle", "--size", "64", "--slots", "8", "--history", "2", "--count", "10"])
        .arg("--hold")
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let client = Client::connect_to(broker.socket())?;
    ensure!(eventually(DEADLINE, || report(&client, "idle").is_some_and(|s| s.published == 10)));
    let sub = client.subscriber("idle", &SubscribeOptions { credits: 2, ..Default::default() })?;
    ensure!(receive(&sub, 2)? == [(8, true, 8), (9, true, 9)]);
    ensure!(report(&client, "idle").is_some_and(|s| s.publisher_pid == Some(idle.id())), "still attached, idle");
    drop(idle.stdin.take());
    ensure!(idle.wait()?.success());
    Ok(())
}

#[test]
fn joiners_of_every_policy_get_the_history_then_the_live_frames() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let mut publisher = client.publisher("live", &StreamConfig { history: 3, ..StreamConfig::new(64, 20) })?;
    for seq in 0..5u64 {
        publisher.send(&seq.to_le_bytes())?;
    }
    let mut subs = Vec::new();
    for policy in [OverflowPolicy::DropNewest, OverflowPolicy::KeepLatest, OverflowPolicy::Lossless] {
        subs.push(client.subscriber("live", &SubscribeOptions { credits: 4, policy, ..Default::default() })?);
    }
    // This process publishes too: its own connection thread hands the
    // history over while the publisher idles.
    for sub in &subs {
        ensure!(receive(sub, 3)? == [(2, true, 2), (3, true, 3), (4, true, 4)], "{:?}", sub.policy());
    }
    publisher.send(&5u64.to_le_bytes())?;
    for sub in &subs {
        ensure!(drain(sub)? == [(5, false, 5)], "{:?}", sub.policy());
    }
    Ok(())
}

#[test]
fn a_kept_stream_expires_after_its_idle_time_and_is_replaced_by_another_geometry() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let config = StreamConfig { history: 1, history_idle_ms: 300, ..StreamConfig::new(64, 8) };
    client.publisher("brief", &config)?.send(&[1; 8])?;
    let kept = |c: &Client| report(c, "brief").is_some_and(|s| s.retained_ns.is_some());
    ensure!(eventually(DEADLINE, || kept(&client)), "kept for its history");
    ensure!(eventually(DEADLINE, || report(&client, "brief").is_none()), "gone after its idle time");
    // Kept until closed; a restarted producer with another frame size
    // replaces it; one with the same takes over.
    let forever = StreamConfig { history: 1, ..StreamConfig::new(64, 8) };
    client.publisher("long", &forever)?.send(&[1; 8])?;
    ensure!(eventually(DEADLINE, || report(&client, "long").is_some_and(|s| s.retained_ns.is_some())));
    let bigger = client.publisher("long", &StreamConfig { history: 1, ..StreamConfig::new(128, 8) })?;
    ensure!(report(&client, "long").is_some_and(|s| (s.slot_size, s.published) == (128, 0)));
    drop(bigger);
    Ok(())
}

#[test]
fn echo_shows_the_history_first_and_flags_it() -> Result<()> {
    let broker = Broker::start()?;
    ensure!(writer(&broker, "shown", 2, 6, 0)?.wait()?.success());
    let echo = Command::new(memsock_exe())
        .arg("--socket")
        .arg(broker.socket())
        .args(["echo", "shown", "--count", "2", "--json", "--bytes", "8"])
        .stdout(Stdio::piped())
        .output()?;
    ensure!(echo.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8(echo.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let seen: Vec<_> =
        lines.iter().map(|l| (l["seq"].as_u64(), l["history"].as_bool(), l["latency_us"].is_null())).collect();
    ensure!(seen == [(Some(4), Some(true), true), (Some(5), Some(true), true)], "{lines:?}");
    Ok(())
}
