//! The writer role as a value, and the holder-mask bits only a writer
//! changes.
//!
//! One rule carries the crash design: only the current writer — the
//! publisher, or the owner while none is attached — changes holder masks,
//! delivery rings and the recovery state. A [`Writer`] is the proof of
//! that role. Only winning the `writer` compare-and-swap of
//! [`StreamControl`] makes one ([`Writer::acquire`]); every function that
//! changes a mask or a ring, recovers or reclaims takes one, so within a
//! process the compiler checks who may write. (Acknowledging a close is
//! not among them: the owner may end one while a live publisher keeps the
//! role — see `OwnerCore::end_for_subscribers`.) Across processes the token carries the writer epoch it set in
//! shared memory: a writer the owner declared gone holds a stale token,
//! which [`Writer::is_current`] refuses where it matters (the publisher's
//! look at the subscriber table, before its next loan or send).
//!
//! No type catches a wrong order of stores under a crash: the step-k tests
//! (`crash_tests`) do.

use crate::primitive::AtomicU64;
use crate::primitive::Ordering::{Acquire, Relaxed, Release};
use crate::shm::layout::{StreamControl, WRITER_NONE};

/// Proof that this thread holds a stream's writer role (see the module
/// docs). Neither `Clone` nor `Copy`: one per acquisition.
#[derive(Debug)]
pub(crate) struct Writer {
    /// `WRITER_PUBLISHER` or `WRITER_OWNER`; `WRITER_NONE` once disowned.
    role: u32,
    /// The writer epoch this acquisition set.
    epoch: u64,
    /// The publisher's loan budget: slots on loan now (samples being
    /// written and detached loans), and the most the stream allows. The
    /// owner keeps that many out of the subscribers' credits, which is what
    /// makes a loan always find a free slot. (0 for the owner: it loans
    /// nothing.)
    loans_out: u32,
    loan_budget: u32,
}

impl Writer {
    /// Takes the writer role over from `from` (`WRITER_NONE`; or
    /// `WRITER_PUBLISHER`, for the owner taking it from a dead publisher)
    /// as `role`, and starts a new writer epoch.
    ///
    /// # Errors
    /// The role's holder if it was not `from`.
    pub(crate) fn acquire(ctl: &StreamControl, from: u32, role: u32) -> Result<Self, u32> {
        debug_assert_ne!(role, WRITER_NONE);
        // Acquire pairs with the Release of the previous writer's
        // `release` (or of a dead writer's last stores, seen through
        // whoever declared it dead): its masks and rings are visible.
        ctl.writer.compare_exchange(from, role, Acquire, Relaxed)?;
        // Only the holder writes the epoch: no read-modify-write needed.
        let epoch = ctl.publisher_epoch.load(Relaxed).wrapping_add(1);
        ctl.publisher_epoch.store(epoch, Relaxed);
        Ok(Self { role, epoch, loans_out: 0, loan_budget: 0 })
    }

    /// A token that authorises nothing: what a copy of a publisher in a
    /// forked child holds once it has disowned the parent's role.
    pub(crate) fn disowned() -> Self {
        Self { role: WRITER_NONE, epoch: 0, loans_out: 0, loan_budget: 0 }
    }

    /// The role held (`WRITER_NONE` if disowned).
    pub(crate) fn role(&self) -> u32 {
        self.role
    }

    /// Whether shared memory still names this token's holder the writer:
    /// false once the owner declared it gone, even if another acquisition
    /// of the same role followed.
    pub(crate) fn is_current(&self, ctl: &StreamControl) -> bool {
        // Acquire pairs with `release`'s Release CAS, through the release
        // sequence the next `acquire` CAS continues: a revoked holder that
        // reads a later holder's role sees the epoch stored before it.
        self.role != WRITER_NONE
            && ctl.writer.load(Acquire) == self.role
            && ctl.publisher_epoch.load(Relaxed) == self.epoch
    }

    /// Sets the loan budget (the stream's `publisher_loans`).
    pub(crate) fn set_loan_budget(&mut self, budget: u32) {
        self.loan_budget = budget;
    }

    /// Counts one more slot on loan.
    ///
    /// # Errors
    /// The budget, if every loan is out.
    #[inline]
    pub(crate) fn take_loan(&mut self) -> Result<(), u32> {
        if self.loans_out >= self.loan_budget {
            return Err(self.loan_budget);
        }
        self.loans_out += 1;
        Ok(())
    }

    /// A loan came back (sent, or given back unsent).
    #[inline]
    pub(crate) fn end_loan(&mut self) {
        self.loans_out -= 1;
    }

    /// Lets go of the role; false (changing nothing) if it was no longer
    /// ours. Release pairs with the next writer's Acquire in
    /// [`acquire`](Self::acquire): everything we wrote is visible to it.
    pub(crate) fn release(self, ctl: &StreamControl) -> bool {
        self.role != WRITER_NONE && ctl.writer.compare_exchange(self.role, WRITER_NONE, Release, Relaxed).is_ok()
    }

    /// Releases the role if it is still ours, touching nothing else: for a
    /// writer whose own code panicked part-way (`dirty` stays set, so the
    /// next writer repairs). Returns whether it released.
    pub(crate) fn let_go(self, ctl: &StreamControl) -> bool {
        self.is_current(ctl) && self.release(ctl)
    }
}

/// Subscriber `s`'s bit in a slot's holder mask (one bit per subscriber
/// index, in words of 64). A slot is free when no bit of its mask is set.
///
/// Only the writer changes masks, so setting and clearing are a load and
/// a store (no read-modify-write instruction); subscribers never read
/// them. A caller whose crash invariant rests on the order of the store
/// against its other stores puts a crash point after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HolderBit {
    word: usize,
    bit: u64,
}

impl HolderBit {
    /// Subscriber `s`'s bit.
    #[inline(always)]
    pub(crate) fn of(s: usize) -> Self {
        Self { word: s / 64, bit: 1 << (s % 64) }
    }

    /// The history's bit: the index after the last subscriber's (see
    /// `Geometry::mask_words`).
    #[inline(always)]
    pub(crate) fn history(max_subscribers: u32) -> Self {
        Self::of(max_subscribers as usize)
    }

    /// Whether the bit is set in `mask`.
    #[inline(always)]
    pub(crate) fn is_set(self, mask: &[AtomicU64]) -> bool {
        mask[self.word].load(Relaxed) & self.bit != 0
    }

    /// Sets the bit in `mask`.
    #[inline(always)]
    pub(crate) fn set(self, writer: &Writer, mask: &[AtomicU64]) {
        debug_assert_ne!(writer.role, WRITER_NONE, "a disowned writer writes nothing");
        let word = &mask[self.word];
        word.store(word.load(Relaxed) | self.bit, Relaxed);
    }

    /// Clears the bit in `mask`: `None` (changing nothing) if it was not
    /// set, else whether the slot is free now.
    #[inline(always)]
    pub(crate) fn clear(self, writer: &Writer, mask: &[AtomicU64]) -> Option<bool> {
        debug_assert_ne!(writer.role, WRITER_NONE, "a disowned writer writes nothing");
        let word = mask[self.word].load(Relaxed);
        if word & self.bit == 0 {
            return None;
        }
        mask[self.word].store(word & !self.bit, Relaxed);
        Some(word == self.bit && is_free(mask))
    }
}

/// Whether no subscriber holds the slot of `mask`.
#[inline(always)]
pub(crate) fn is_free(mask: &[AtomicU64]) -> bool {
    mask.iter().all(|w| w.load(Relaxed) == 0)
}

/// The subscriber indices whose bits are set in `mask`.
pub(crate) fn holders(mask: &[AtomicU64]) -> impl Iterator<Item = usize> + '_ {
    mask.iter().enumerate().flat_map(|(w, word)| {
        let mut bits = word.load(Relaxed);
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let s = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                s
            })
        })
    })
}
