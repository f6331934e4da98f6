//! The bodies of the fuzz targets (`fuzz/`), here so that the ordinary
//! tests replay the seed corpus and every input a fuzzer ever found
//! (`tests/tests/fuzz_regressions.rs`) through exactly the code the
//! fuzzer runs. Each body must return for any input: a panic, a crash or
//! a hang is a finding.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use memsock_proto::control::{ClientMessage, FrameError, FrameReader, Framed, ServerMessage, encode};
use memsock_proto::platform;
use memsock_proto::shm::{
    OverflowPolicy, Publisher, StreamConfig, StreamSegment, Subscriber, SubscriberOptions, WaitStrategy,
};
use serde::Serialize;

/// Control frames as the broker reads them from a client, and as a
/// client reads them from the broker: every input either decodes into
/// messages or is refused, and whatever decodes encodes back to bytes
/// that decode to the same message.
pub fn control_decoder(input: &[u8]) {
    decode_all::<ClientMessage>(input);
    decode_all::<ServerMessage>(input);
}

fn decode_all<T: Framed + Serialize>(input: &[u8]) {
    let mut reader = FrameReader::<T>::new();
    // The first byte cuts the rest as a socket might.
    let Some((&cut, bytes)) = input.split_first() else { return };
    for piece in bytes.chunks(usize::from(cut).max(1)) {
        reader.push(piece);
        loop {
            match reader.next_message() {
                Ok(Some((message, _))) => reencodes_stably(&message),
                Ok(None) => break,
                // The frame is consumed: the reader may go on (a recording
                // has the bytes of a reply, not its descriptors).
                Err(FrameError::MissingDescriptors { .. }) => {}
                Err(_) => return,
            }
        }
    }
}

/// Encoding is a function of the message: encode, decode, encode again
/// gives the same bytes (compared as bytes, so NaN counters compare).
fn reencodes_stably<T: Framed + Serialize>(message: &T) {
    let mut first = Vec::new();
    encode(message, &mut first).expect("a decoded message fits a frame again");
    if message.fd_count() > 0 {
        return; // its descriptors did not come with it here
    }
    let mut reader = FrameReader::<T>::new();
    reader.push(&first);
    let (again, _) = reader.next_message().expect("its own encoding decodes").expect("whole");
    let mut second = Vec::new();
    encode(&again, &mut second).expect("encodes");
    assert_eq!(first, second, "re-encoding changed the bytes");
}

/// A stream segment that a hostile or broken peer scribbles on, between
/// the operations of its owner, its publisher and a subscriber — each of
/// which must refuse or survive what it finds, never panic, crash or hang.
///
/// The input is a script: the first byte picks the mode. Even: a real
/// segment, then operations (`op % 8`): 0 and 1 patch the data or the
/// channel file (`offset: u16 le, len: u8, bytes`), 2 opens a publisher,
/// 3 a subscriber, 4 sends, 5 receives, 6 reads stats and reclaims, 7 an
/// owner operation chosen by the next byte. Odd: the rest of the input is
/// the whole data file, opened by a publisher and a subscriber.
pub fn segment_open(input: &[u8]) {
    let Some((&mode, script)) = input.split_first() else { return };
    if mode % 2 == 1 {
        return garbage_file(script);
    }
    let mut config = StreamConfig::new(64, 6);
    config.max_subscribers = 2;
    let mut segment = StreamSegment::create("fuzz", &config).expect("a valid configuration");
    let options = SubscriberOptions {
        credits: 2,
        policy: OverflowPolicy::DropNewest,
        wait: WaitStrategy::Park,
        ..SubscriberOptions::default()
    };
    let pid = platform::current_pid();
    let ticket = segment.add_subscriber(&options, pid).expect("admitted");
    let data = File::from(segment.data_fd().try_clone_to_owned().expect("dup"));
    let channel = File::from(segment.channel_fd(ticket.index).expect("its channel").try_clone_to_owned().expect("dup"));
    let read_only = segment.read_only_data_fd().expect("reopen");
    let mut publisher: Option<Publisher> = None;
    let mut subscriber: Option<Subscriber> = None;
    let mut ops = script;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op % 8 {
            0 | 1 => {
                let Some((patch, rest)) = take_patch(ops) else { return };
                ops = rest;
                let file = if op % 8 == 0 { &data } else { &channel };
                scribble(file, patch);
            }
            2 => publisher = Publisher::open(segment.data_fd(), &segment.channel_fds()).ok(),
            3 => subscriber = Subscriber::open(read_only.as_fd(), channel.as_fd(), ticket).ok(),
            4 => {
                if let Some(Ok(mut sample)) = publisher.as_mut().map(Publisher::loan) {
                    let len = sample.capacity().min(usize::from(op));
                    sample.as_mut_slice()[..len].fill(op);
                    sample.set_len(len);
                    let _ = sample.try_send();
                }
            }
            5 => {
                if let Some(sub) = &subscriber {
                    let _ = sub.try_recv().map(|sample| sample.len());
                }
            }
            6 => {
                let _ = segment.stats();
                segment.reclaim();
            }
            _ => {
                let Some((&which, rest)) = ops.split_first() else { return };
                ops = rest;
                match which % 5 {
                    0 => segment.publisher_gone(),
                    1 => segment.publisher_released(),
                    2 => drop(segment.remove_subscriber(ticket.index)),
                    3 => drop(segment.set_credits(ticket.index, u32::from(which % 4))),
                    _ => segment.close(),
                }
            }
        }
    }
}

/// Bytes to write at an offset.
type Patch<'a> = (u64, &'a [u8]);

/// The patch at the front of `ops`, and the rest.
fn take_patch(ops: &[u8]) -> Option<(Patch<'_>, &[u8])> {
    let (&[lo, hi, len], rest) = ops.split_first_chunk::<3>()?;
    let len = usize::from(len).min(rest.len());
    let (bytes, rest) = rest.split_at(len);
    Some(((u64::from(u16::from_le_bytes([lo, hi])), bytes), rest))
}

/// Writes a patch into a shared file at its offset, wrapped to the file.
fn scribble(file: &File, (offset, bytes): Patch<'_>) {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return;
    }
    let at = offset % len;
    let fit = bytes.len().min((len - at) as usize);
    file.write_all_at(&bytes[..fit], at).expect("the file takes writes");
}

/// A data file with arbitrary contents: refused at open, or survived.
fn garbage_file(bytes: &[u8]) {
    let fd = platform::create_shared_file("fuzz-garbage", bytes.len() as u64, false).expect("memfd");
    File::from(fd.try_clone().expect("dup")).write_all_at(bytes, 0).expect("write");
    if let Ok(mut publisher) = Publisher::open(fd.as_fd(), &[(0, 1, fd.as_fd())]) {
        if let Ok(sample) = publisher.loan() {
            let _ = sample.try_send();
        }
    }
    let ticket = memsock_proto::shm::SubscriberTicket { index: 0, generation: 0, wait: WaitStrategy::Park };
    if let Ok(subscriber) = Subscriber::open(fd.as_fd(), fd.as_fd(), ticket) {
        let _ = subscriber.try_recv().map(|sample| sample.len());
    }
}
