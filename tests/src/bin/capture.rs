//! Records the control traffic of a real session as seeds for the
//! control-decoder fuzzer: a real broker, real clients, and a proxy
//! between them that writes each connection's bytes, both ways, to
//! `<out>/session-<n>-{client,broker}` (each file starts with the byte
//! the fuzz target cuts the rest by). With a second directory, also seeds
//! for the segment fuzzer: the data file of a real stream after a few
//! frames, and scripts of the usual operations.
//!
//! `cargo run -p memsock-tests --bin memsock-capture-session -- fuzz/seeds/control_decoder fuzz/seeds/segment_open`

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use memsock::{Client, ClientError, OverflowPolicy, StreamConfig, SubscribeOptions};
use memsock_proto::platform;
use memsock_tests::{Broker, TempDir};

type Recording = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn main() -> Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).context("usage: memsock-capture-session <out-dir>")?);
    std::fs::create_dir_all(&out)?;
    let mut broker = Broker::start()?;
    let dir = TempDir::new("capture")?;
    let proxy = dir.path().join("proxy.sock");
    let listener = UnixListener::bind(&proxy)?;
    let recording = Recording::default();
    let pumps: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    {
        let (socket, recording, pumps) = (broker.socket().to_owned(), recording.clone(), pumps.clone());
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                let Ok(upstream) = UnixStream::connect(&socket) else { return };
                let mut pumps = pumps.lock().expect("not poisoned");
                let (client_side, upstream_side) =
                    (client.try_clone().expect("dup"), upstream.try_clone().expect("dup"));
                pumps.push(pump(client_side, upstream_side, n, "client", &recording));
                pumps.push(pump(upstream, client, n, "broker", &recording));
            }
        });
    }
    let clients = session(&proxy)?;
    // The shutdown notice is part of a real session too; then every
    // connection ends and its pumps with it.
    broker.signal_and_wait(15)?;
    drop(clients);
    for handle in pumps.lock().expect("not poisoned").drain(..) {
        let _ = handle.join();
    }
    for (name, bytes) in recording.lock().expect("not poisoned").iter() {
        let mut seed = vec![7u8];
        seed.extend_from_slice(bytes);
        std::fs::write(out.join(name), seed)?;
    }
    eprintln!("wrote {} seeds to {}", recording.lock().expect("not poisoned").len(), out.display());
    if let Some(segments) = std::env::args().nth(2) {
        segment_seeds(Path::new(&segments))?;
    }
    Ok(())
}

/// Seeds for `segment_open` (its script format is in `memsock_tests::fuzz`).
fn segment_seeds(out: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(out)?;
    let mut config = StreamConfig::new(64, 6);
    config.max_subscribers = 2;
    let mut segment = memsock::shm::StreamSegment::create("seed", &config)?;
    let mut publisher = segment.open_publisher()?;
    let subscriber = segment.open_subscriber(&memsock::shm::SubscriberOptions::default())?;
    for n in 0..3u8 {
        publisher.send(&[n; 16])?;
    }
    let _ = subscriber.try_recv().map(|s| s.len());
    let data = std::fs::File::from(segment.data_fd().try_clone_to_owned()?);
    let mut bytes = vec![0u8; data.metadata()?.len() as usize];
    data.read_exact_at(&mut bytes, 0)?;
    let mut whole = vec![1u8];
    whole.extend_from_slice(&bytes);
    std::fs::write(out.join("real-data-file"), whole)?;
    // Scripts: open both ends, send and receive, read stats; then the same
    // with the header, a table and the channel scribbled on in between.
    let scripts: [(&str, &[u8]); 4] = [
        ("ops", &[0, 2, 3, 4, 5, 4, 5, 6, 7, 3, 6]),
        ("header", &[0, 2, 3, 4, 0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 4, 5, 6]),
        ("table", &[0, 2, 3, 0, 0x00, 0x01, 4, 0xff, 0xff, 0xff, 0x7f, 4, 4, 5, 5, 6, 7, 0]),
        ("channel", &[0, 3, 2, 1, 0, 0, 16, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 4, 5, 6, 7, 2, 6, 7, 4]),
    ];
    for (name, script) in scripts {
        std::fs::write(out.join(name), script)?;
    }
    eprintln!("wrote 5 seeds to {}", out.display());
    Ok(())
}

/// A session touching every request, event and the usual refusals.
fn session(proxy: &Path) -> Result<(Client, Client)> {
    let camera = Client::connect_to(proxy)?;
    let viewer = Client::connect_to(proxy)?;
    let mut config = StreamConfig::new(64, 8);
    config.max_subscribers = 4;
    let mut publisher = camera.publisher("cam", &config)?;
    let options = SubscribeOptions { credits: 2, policy: OverflowPolicy::KeepLatest, ..Default::default() };
    let subscriber = viewer.subscriber("cam", &options)?;
    for n in 0..3u8 {
        publisher.send(&[n; 16])?;
    }
    let _ = subscriber.try_recv().map(|s| s.len());
    subscriber.set_credits(3)?;
    let _ = viewer.stats(None)?;
    let _ = viewer.stats(Some("cam"))?;
    let refused = |r: Result<_, ClientError>| r.err().context("a refusal");
    let _ = viewer.list("**")?;
    refused(viewer.list("a**").map(drop))?;
    let watch = viewer.subscribe_pattern("la*", &SubscribeOptions { credits: 2, credits_up_to: true, ..options })?;
    refused(camera.publisher("cam", &StreamConfig::new(128, 8)).map(drop))?;
    refused(viewer.subscriber("nope", &SubscribeOptions::default()).map(drop))?;
    refused(viewer.subscriber("cam", &SubscribeOptions { credits: 99, ..Default::default() }).map(drop))?;
    refused(camera.publisher("bad", &StreamConfig::new(64, 1)).map(drop))?;
    drop(subscriber);
    let waiting = {
        let viewer = viewer.clone();
        std::thread::spawn(move || {
            viewer.subscriber("later", &SubscribeOptions { wait_for_stream: true, ..Default::default() })
        })
    };
    while viewer.stats(None)?.waiting_subscribers == 0 {
        std::thread::yield_now();
    }
    let later = camera.publisher("later", &config)?;
    let late = waiting.join().expect("no panic")?;
    // The watch saw "later" created and subscribed to it.
    while !matches!(
        watch.next_timeout(std::time::Duration::from_secs(10))?,
        Some(memsock::WatchEvent::Subscribed { .. })
    ) {}
    drop(watch);
    drop(later);
    let _ = late.try_recv().map(|s| s.len());
    let _back = camera.publisher("later", &config)?;
    camera.close_stream("cam")?;
    refused(camera.close_stream("cam"))?;
    drop(publisher);
    Ok((camera, viewer))
}

/// Forwards bytes and descriptors from `from` to `to`, recording the bytes.
fn pump(from: UnixStream, to: UnixStream, n: usize, who: &str, recording: &Recording) -> JoinHandle<()> {
    let (name, recording) = (format!("session-{n}-{who}"), recording.clone());
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut fds: Vec<OwnedFd> = Vec::new();
            let got = match platform::recv_with_fds(from.as_fd(), &mut buf, &mut fds) {
                Ok(0) | Err(_) => break,
                Ok(got) => got,
            };
            seen.extend_from_slice(&buf[..got]);
            if forward(to.as_fd(), &buf[..got], &fds).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
        recording.lock().expect("not poisoned").push((name, seen));
    })
}

fn forward(to: BorrowedFd<'_>, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        let with: Vec<BorrowedFd<'_>> = if sent == 0 { fds.iter().map(AsFd::as_fd).collect() } else { Vec::new() };
        sent += platform::send_with_fds(to, &bytes[sent..], &with)?;
    }
    Ok(())
}
