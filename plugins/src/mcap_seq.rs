//! memsock's 64-bit sequence numbers in MCAP, whose message `sequence` is
//! 32 bits: the message carries the low half, and the recorder writes the
//! high half on the events channel ([`EVENTS_TOPIC`]) as a `seq_high`
//! event before the first frame of each stream in each file and before
//! every frame whose high half differs from the last one written. A reader
//! keeps the latest high half per stream ([`SeqJoiner`]).

use std::collections::HashMap;

/// The topic of the recorder's events channel (JSON messages).
pub const EVENTS_TOPIC: &str = "memsock/events";

/// The low half of `seq`: MCAP's message sequence.
#[inline]
pub fn low(seq: u64) -> u32 {
    seq as u32
}

/// The high half of `seq`.
#[inline]
pub fn high(seq: u64) -> u32 {
    (seq >> 32) as u32
}

/// The writer's side: whether a frame needs a `seq_high` event first.
#[derive(Debug, Default)]
pub struct SeqSplitter {
    written: Option<u32>,
}

impl SeqSplitter {
    /// The high half to record before the frame numbered `seq`, if it
    /// differs from the last one recorded (or none was).
    #[inline]
    pub fn high_to_record(&mut self, seq: u64) -> Option<u32> {
        let h = high(seq);
        (self.written != Some(h)).then(|| {
            self.written = Some(h);
            h
        })
    }

    /// A new file begins: the next frame records its high half again.
    pub fn reset(&mut self) {
        self.written = None;
    }
}

/// The reader's side: full sequence numbers, per stream.
#[derive(Debug, Default)]
pub struct SeqJoiner {
    high: HashMap<String, u32>,
}

impl SeqJoiner {
    /// A `seq_high` event for `stream`.
    pub fn set_high(&mut self, stream: &str, high: u32) {
        self.high.insert(stream.to_owned(), high);
    }

    /// The full sequence number of a message of `stream` with MCAP
    /// sequence `low` (high half 0 if none was recorded).
    pub fn join(&self, stream: &str, low: u32) -> u64 {
        u64::from(self.high.get(stream).copied().unwrap_or(0)) << 32 | u64::from(low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sequence numbers across 2³² come back whole: the high half is
    /// recorded at the first frame and at the wrap, and nowhere else.
    #[test]
    fn sequence_numbers_past_2_pow_32_survive_the_32_bit_field() {
        let start = (1u64 << 32) - 3;
        let mut splitter = SeqSplitter::default();
        let mut joiner = SeqJoiner::default();
        let mut records = 0;
        for seq in start..start + 6 {
            if let Some(h) = splitter.high_to_record(seq) {
                records += 1;
                joiner.set_high("s", h);
            }
            assert_eq!(joiner.join("s", low(seq)), seq);
        }
        assert_eq!(records, 2, "at the first frame and at the wrap");
        splitter.reset();
        assert_eq!(splitter.high_to_record(u64::MAX), Some(u32::MAX), "again in a new file");
        assert_eq!(joiner.join("other", 7), 7);
    }
}
