//! Small tools on the command line: `memsock publish` (a native producer
//! for tests, examples and benchmarks) and the hand-rolled ring producer
//! the Python benchmark measures memsock against.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::{Client, LoanError, SendError, StreamConfig};
use serde_json::json;

/// What `memsock publish` sends.
pub struct PublishArgs<'a> {
    pub stream: &'a str,
    pub size: u32,
    pub slots: u32,
    pub count: u64,
    pub rate: u64,
    pub subscribers: u32,
    pub timestamps: bool,
}

/// Publishes `count` frames of `size` bytes (the sequence number in the
/// first 8 bytes, little-endian), as fast as lossless subscribers allow or
/// at `rate` per second, after `subscribers` subscribers have attached.
/// Prints one JSON line at the end.
pub fn publish(socket: &Path, a: &PublishArgs<'_>) -> Result<()> {
    let client = Client::connect_to(socket)?;
    let mut config = StreamConfig::new(a.size, a.slots);
    config.max_subscribers = config.max_subscribers.max(a.subscribers);
    config.timestamps = a.timestamps;
    let mut publisher = client.publisher(a.stream, &config)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.stats(Some(a.stream))?.streams.first().map_or(0, |s| s.subscribers.len()) < a.subscribers as usize {
        if Instant::now() > deadline {
            bail!("fewer than {} subscribers came within 60 s", a.subscribers);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let period = (a.rate > 0).then(|| Duration::from_secs_f64(1.0 / a.rate as f64));
    let start = Instant::now();
    let mut next = start;
    let mut sent = 0u64;
    while sent < a.count {
        let mut frame = match publisher.loan() {
            Ok(frame) => frame,
            Err(LoanError::Closed) => break,
            Err(e) => return Err(e.into()),
        };
        let buf = frame.as_mut_slice();
        let head = buf.len().min(8);
        buf[..head].copy_from_slice(&sent.to_le_bytes()[..head]);
        frame.set_len(a.size as usize);
        match frame.send_timeout(Duration::from_secs(10)) {
            Ok(_) => sent += 1,
            Err(SendError::Closed) => break,
            Err(e) => return Err(e).context("sending"),
        }
        if let Some(period) = period {
            next += period;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{}", json!({"sent": sent, "seconds": seconds}));
    Ok(())
}

/// Slots of the hand-rolled ring: the layout of the seed article's
/// C producer (`write_index`, `read_index`, 1024 messages of 64 bytes).
const RING_SLOTS: u64 = 1024;
const RING_MSG: usize = 64;
const RING_LEN: usize = 16 + RING_SLOTS as usize * RING_MSG;

/// Fills the seed article's ring in the file at `path` with `count`
/// messages, as fast as its consumer drains it: the reference a pure
/// Python mmap + ctypes consumer is measured with.
pub fn ring_producer(path: &Path, count: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).context("opening the ring file")?;
    file.set_len(RING_LEN as u64)?;
    let map = memmap2::MmapRaw::map_raw(&file)?;
    let base = map.as_mut_ptr();
    // SAFETY: the mapping is RING_LEN bytes, page aligned; the two index
    // words at offsets 0 and 8 are only ever accessed as atomics here (the
    // Python consumer reads and writes them as aligned 8-byte words).
    let (write_index, read_index) = unsafe { (&*base.cast::<AtomicU64>(), &*base.add(8).cast::<AtomicU64>()) };
    let mut msg = [b'm'; RING_MSG];
    msg[RING_MSG - 1] = 0;
    for i in 0..count {
        // Acquire pairs with the consumer's store of `read_index` (plain
        // on its side, strongly ordered on x86).
        let mut spins = 0u32;
        while i - read_index.load(Ordering::Acquire) >= RING_SLOTS {
            // Spin, but leave the core to the consumer now and then (a
            // machine with few cores would otherwise starve it).
            spins += 1;
            if spins % 256 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let n = i.to_le_bytes();
        msg[..8].copy_from_slice(&n);
        let slot = (i % RING_SLOTS) as usize;
        // SAFETY: slot < RING_SLOTS, so the message lies in the mapping;
        // the consumer does not read it until `write_index` passes it.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), base.add(16 + slot * RING_MSG), RING_MSG) };
        // Release pairs with the consumer's load of `write_index`.
        write_index.store(i + 1, Ordering::Release);
    }
    Ok(())
}
