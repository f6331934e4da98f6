//! The seed article's hand-rolled ring (a C producer writing 64-byte
//! messages into a file in /dev/shm): the producer the Python benchmark's
//! pure-Python ctypes consumer is measured with (`memsock.bench`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

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
