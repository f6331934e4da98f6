//! A peer process for memsock's cross-process tests: a publisher, a
//! (possibly slow, leaving or hanging) subscriber, or a hostile subscriber
//! that abuses its channel. Its role and parameters come as JSON in
//! `MEMSOCK_TEST_PEER`, its stream files as inherited descriptors; it
//! reports JSON lines on stdout, the last one `{"report": ...}`.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::shm::{
    LoanError, Publisher, RecvError, SendError, Subscriber, SubscriberTicket, TryRecvError, WaitStrategy,
};
use memsock_proto::shm::layout::ChannelHeader;
use memsock_tests::{PEER_ENV, check_frame, fill_frame, frame_len, inherited_fds, mix};
use serde_json::{Value, json};

fn say(v: Value) {
    println!("{v}");
}

fn main() -> Result<()> {
    let spec: Value = serde_json::from_str(&std::env::var(PEER_ENV).context("run by the tests only")?)?;
    match spec["role"].as_str() {
        Some("publisher") => publisher(&spec),
        Some("subscriber") => subscriber(&spec),
        Some("hostile") => hostile(&spec),
        Some("closer") => closer(&spec),
        other => bail!("unknown role {other:?}"),
    }
}

/// Closes the spec's stream through a client of its own; reports how that went.
fn closer(spec: &Value) -> Result<()> {
    let client = broker_client(spec)?.context("a socket")?;
    say(close_outcome(client.close_stream(spec["stream"].as_str().unwrap_or("test"))));
    Ok(())
}

fn close_outcome(result: Result<(), memsock::ClientError>) -> Value {
    match result {
        Ok(()) => json!({"report": {"closed": true}}),
        Err(e) => json!({"report": {"closed": false, "error": e.to_string()}}),
    }
}

fn u(spec: &Value, key: &str, default: u64) -> u64 {
    spec[key].as_u64().unwrap_or(default)
}

/// With `"socket"` in the spec, the peer gets its stream from the broker
/// listening there; otherwise from inherited descriptors.
fn broker_client(spec: &Value) -> Result<Option<memsock::Client>> {
    match spec["socket"].as_str() {
        Some(path) => Ok(Some(memsock::Client::connect_to(path)?)),
        None => Ok(None),
    }
}

fn stream_config(spec: &Value) -> memsock::StreamConfig {
    let mut config = memsock::StreamConfig::new(u(spec, "slot_size", 256) as u32, u(spec, "slot_count", 16) as u32);
    config.max_subscribers = u(spec, "max_subscribers", 8) as u32;
    config.history = u(spec, "history", 0) as u32;
    config
}

/// Sends `count` frames (forever if 0) until the stream closes.
///
/// With `"lease"` it publishes through a control connection of its own
/// (the raw protocol) and then, for `"hang_up"`, ends that connection
/// while it goes on publishing, or, for `"share"`, lets a child process
/// (`sleep`, reported as `{"child": pid}`) inherit it, so the connection
/// outlives this process.
fn publisher(spec: &Value) -> Result<()> {
    if let Some(lease) = spec["lease"].as_str() {
        let (socket, fds, grants) = publish_raw(spec)?;
        let channels: Vec<_> =
            grants.iter().zip(&fds[1..]).map(|(c, fd)| (c.index, c.generation, fd.as_fd())).collect();
        let mut publisher = Publisher::open(fds[0].as_fd(), &channels)?;
        match lease {
            "hang_up" => memsock_proto::platform::shutdown_socket(socket.as_fd())?,
            "share" => {
                let inherited = memsock_proto::platform::dup_for_child(socket.as_fd())?;
                let child = std::process::Command::new("sleep").arg("600").spawn()?;
                drop(inherited);
                say(json!({"child": child.id()}));
            }
            other => bail!("unknown lease {other:?}"),
        }
        return publish(spec, &mut publisher);
    }
    if let Some(client) = broker_client(spec)? {
        let name = spec["stream"].as_str().unwrap_or("test");
        let mut publisher = client.publisher(name, &stream_config(spec))?;
        if spec["close_own"] == true {
            // On the test's go-ahead (a line on stdin), closes its own
            // stream and reports how that went.
            say(json!({"published": name}));
            if std::io::stdin().read_line(&mut String::new())? == 0 {
                bail!("the test ended before its go-ahead");
            }
            say(close_outcome(client.close_stream(name)));
            return Ok(());
        }
        return publish(spec, &mut publisher);
    }
    // Every channel up front, one per index, each serving every generation (0).
    let fds = inherited_fds(spec);
    let channels: Vec<_> = fds[1..].iter().enumerate().map(|(i, fd)| (i as u32, 0, fd.as_fd())).collect();
    let mut publisher = Publisher::open(fds[0].as_fd(), &channels)?;
    publish(spec, &mut publisher)
}

/// Says Hello and Publish on a connection of our own; returns it and the
/// stream's descriptors.
fn publish_raw(
    spec: &Value,
) -> Result<(memsock_tests::RawConn, Vec<std::os::fd::OwnedFd>, Vec<memsock_proto::control::ChannelGrant>)> {
    use memsock_proto::control::Request;
    let mut conn = memsock_tests::RawConn::connect(std::path::Path::new(spec["socket"].as_str().context("a socket")?))?;
    conn.hello()?;
    let name = spec["stream"].as_str().unwrap_or("test").to_owned();
    let (result, fds) = conn.ask(2, Request::Publish { stream: name, config: stream_config(spec) })?;
    let memsock_proto::control::Reply::Published { channels, .. } = result? else { bail!("not a Published reply") };
    Ok((conn, fds, channels))
}

fn publish(spec: &Value, publisher: &mut Publisher) -> Result<()> {
    let slot_size = publisher.slot_size();
    let count = u(spec, "count", 0);
    let pace = Duration::from_nanos(u(spec, "pace_ns", 0));
    let every = u(spec, "report_every", 0);
    say(json!({"ready": true}));
    let (mut sent, mut timeouts) = (0u64, 0u64);
    let mut seq = publisher.next_seq();
    while count == 0 || sent < count {
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
        let mut sample = match publisher.loan() {
            Ok(sample) => sample,
            Err(LoanError::Closed) => {
                say(json!({"report": {"sent": sent, "timeouts": timeouts, "closed": true}}));
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let len = frame_len(seq, slot_size);
        fill_frame(seq, &mut sample.as_mut_slice()[..len]);
        sample.set_len(len);
        loop {
            match sample.try_send_timeout(Duration::from_secs(1)) {
                Ok(info) => {
                    assert_eq!(info.seq, seq, "sequence numbers are consecutive");
                    break;
                }
                Err(unsent) if unsent.error == SendError::Timeout => {
                    timeouts += 1;
                    sample = unsent.sample;
                }
                Err(unsent) if unsent.error == SendError::Closed => {
                    say(json!({"report": {"sent": sent, "timeouts": timeouts, "closed": true}}));
                    return Ok(());
                }
                Err(unsent) => return Err(unsent.error.into()),
            }
        }
        sent += 1;
        seq += 1;
        if every != 0 && sent % every == 0 {
            say(json!({"sent": sent}));
        }
        if sent == u(spec, "fork_after", 0) {
            say(json!({"child_exit": fork_and_try(publisher)?}));
        }
    }
    say(json!({"report": {"sent": sent, "timeouts": timeouts, "closed": false}}));
    Ok(())
}

/// Forks; the child tries to loan from its copy of `publisher`, drops it
/// and exits with 0 if the loan was refused as `Forked`, 1 if it was
/// granted. Returns the child's exit status. (Only where this peer has no
/// other thread: the raw `"lease"` modes.)
fn fork_and_try(publisher: &mut Publisher) -> Result<i32> {
    // SAFETY: this process has one thread, so the child may run anything;
    // it ends with `_exit`, running no destructor but the one below.
    match unsafe { libc::fork() } {
        0 => {
            let code = match publisher.loan() {
                Err(LoanError::Forked) => 0,
                Ok(_) => 1,
                Err(_) => 2,
            };
            // SAFETY: the child's own copy of the publisher, dropped once;
            // nothing uses it afterwards (the child exits at once).
            unsafe { std::ptr::drop_in_place(std::ptr::from_mut(publisher)) };
            // SAFETY: ends the child without unwinding or running atexit.
            unsafe { libc::_exit(code) }
        }
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        child => {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out-parameter.
            if unsafe { libc::waitpid(child, &mut status, 0) } != child {
                bail!("waitpid: {}", std::io::Error::last_os_error());
            }
            Ok(libc::WEXITSTATUS(status))
        }
    }
}

fn ticket(spec: &Value) -> SubscriberTicket {
    SubscriberTicket {
        index: u(spec, "index", 0) as u32,
        generation: u(spec, "generation", 0),
        wait: match spec["wait"].as_str() {
            Some("spin") => WaitStrategy::Spin,
            Some("park") => WaitStrategy::Park,
            _ => WaitStrategy::default(),
        },
    }
}

/// Receives and checks every frame until the stream closes, it is
/// detached, or `max_frames` arrived; or takes `hold` frames and hangs.
fn subscriber(spec: &Value) -> Result<()> {
    if let Some(client) = broker_client(spec)? {
        let name = spec["stream"].as_str().unwrap_or("test");
        let options = memsock::SubscribeOptions {
            credits: u(spec, "credits", 4) as u32,
            policy: match spec["policy"].as_str() {
                Some("lossless") => memsock::OverflowPolicy::Lossless,
                Some("keep_latest") => memsock::OverflowPolicy::KeepLatest,
                _ => memsock::OverflowPolicy::DropNewest,
            },
            wait: ticket(spec).wait,
            wait_for_stream: spec["wait_for_stream"].as_bool().unwrap_or(false),
            credits_up_to: false,
            history: spec["history"].as_u64().map_or(u32::MAX, |h| h as u32),
        };
        let sub = client.subscriber(name, &options)?;
        return receive(spec, &sub);
    }
    let fds = inherited_fds(spec);
    let sub = Subscriber::open(fds[0].as_fd(), fds[1].as_fd(), ticket(spec))?;
    receive(spec, &sub)
}

fn receive(spec: &Value, sub: &Subscriber) -> Result<()> {
    let slot_size = sub.slot_size();
    let max_frames = u(spec, "max_frames", 0);
    let hold = u(spec, "hold", 0);
    let slow = Duration::from_micros(u(spec, "slow_us", 0));
    let slow_every = u(spec, "slow_every", 1).max(1);
    let mut scratch = vec![0u8; slot_size];
    say(json!({"ready": true}));

    if hold > 0 {
        let mut held = Vec::new();
        while held.len() < hold as usize {
            match sub.recv() {
                Ok(sample) => held.push(sample),
                Err(e) if e.is_publisher_event() => {}
                Err(e) => return Err(e.into()),
            }
        }
        say(json!({"holding": held.len()}));
        loop {
            std::thread::park(); // until SIGKILL
        }
    }

    let (mut received, mut missing, mut bad) = (0u64, 0u64, 0u64);
    let (mut publisher_gone, mut publisher_back) = (0u64, 0u64);
    let (mut first, mut last) = (None, None::<u64>);
    let end = loop {
        if max_frames != 0 && received == max_frames {
            break "max";
        }
        let sample = match sub.recv_timeout(Duration::from_secs(60)) {
            Ok(s) => s,
            Err(RecvError::Closed) => break "closed",
            Err(RecvError::Detached) => break "detached",
            Err(RecvError::PublisherGone) => {
                publisher_gone += 1;
                say(json!({"publisher_gone": publisher_gone}));
                continue;
            }
            Err(RecvError::PublisherBack) => {
                publisher_back += 1;
                continue;
            }
            Err(e) => bail!("receive failed after {received} frames: {e}"),
        };
        let seq = sample.seq();
        if let Some(prev) = last {
            if seq <= prev {
                bail!("sequence went from {prev} to {seq}");
            }
            missing += seq - prev - 1;
        }
        first.get_or_insert(seq);
        last = Some(seq);
        if !check_frame(seq, slot_size, &sample, &mut scratch) {
            bad += 1;
        }
        received += 1;
        drop(sample);
        if !slow.is_zero() && received % slow_every == 0 {
            std::thread::sleep(slow);
        }
    };
    say(json!({"report": {
        "received": received, "missing": missing, "bad": bad,
        "first": first, "last": last, "end": end, "faults": sub.faults(), "publisher_gone": publisher_gone, "publisher_back": publisher_back,
    }}));
    Ok(())
}

/// A subscriber that does, at random, everything a buggy or hostile one
/// could to its own channel, for `duration_ms` or until the stream closes.
fn hostile(spec: &Value) -> Result<()> {
    let fds = inherited_fds(spec);
    let sub = Subscriber::open(fds[0].as_fd(), fds[1].as_fd(), ticket(spec))?;
    let capacity = u(spec, "queue_capacity", 1) as usize;
    let slot_count = u(spec, "slot_count", 1);
    let len = rustix::fs::fstat(&fds[1])?.st_size as usize;
    let map = memmap2::MmapOptions::new().len(len).map_raw(fds[1].as_raw_fd())?;
    // SAFETY: the channel file starts with a `ChannelHeader` (atomics only,
    // valid for any bytes); the mapping is page aligned and outlives `ch`.
    let ch = unsafe { &*(map.as_ptr() as *const ChannelHeader) };
    let ret_base = std::mem::size_of::<ChannelHeader>();
    let word = |offset: usize| -> &AtomicU64 {
        // SAFETY: callers pass 8-aligned offsets inside the mapping; an
        // atomic is valid for any bytes.
        unsafe { &*(map.as_ptr().add(offset) as *const AtomicU64) }
    };
    let deadline = Instant::now() + Duration::from_millis(u(spec, "duration_ms", 2000));
    let mut rng = u(spec, "seed", 1);
    let mut next = || {
        rng = mix(rng);
        rng
    };
    say(json!({"ready": true}));
    let (mut actions, mut errors) = (0u64, 0u64);
    let mut held = Vec::new();
    let mut last_slot = 0u32;
    while Instant::now() < deadline {
        actions += 1;
        let r = next();
        match r % 10 {
            0..=3 => match sub.try_recv() {
                Ok(s) => {
                    last_slot = s.info().slot;
                    if held.len() < 2 && r & 0x100 != 0 {
                        held.push(s);
                    }
                }
                Err(TryRecvError::Closed) => break,
                Err(TryRecvError::Empty) => std::thread::yield_now(),
                Err(e) if e.is_publisher_event() => {}
                Err(_) => {
                    errors += 1;
                    held.clear();
                }
            },
            4 => {
                // Return the slot it last had once more, and a random one.
                for slot in [last_slot, (next() % (2 * slot_count)) as u32] {
                    let tail = ch.returned.load(Relaxed);
                    word((ret_base + (tail as usize % capacity) * 4) & !7)
                        .store(u64::from(slot) * 0x1_0000_0001, Relaxed);
                    ch.returned.store(tail + 1, Relaxed);
                }
            }
            5 => ch.returned.store(next(), Relaxed),
            6 => ch.queue_head.store(ch.queue_head.load(Relaxed).wrapping_add(next() % 5).wrapping_sub(2), Relaxed),
            7 => {
                ch.waiting.store(1, Relaxed);
                ch.pub_waiting.store(next() as u32, Relaxed);
            }
            8 => {
                // Scribble anywhere in its channel, header included.
                let offset = (next() as usize % (len / 8)) * 8;
                word(offset).store(next(), Relaxed);
            }
            _ => held.clear(),
        }
    }
    drop(held);
    say(json!({"report": {"actions": actions, "errors": errors}}));
    Ok(())
}
