//! Crash points: the places in a writer's work where a `kill -9` may stop
//! it, as far as the order of its stores to shared memory matters to
//! recovery.
//!
//! Each point is a compiler fence, so the stores before it are emitted
//! before the stores after it and what a kill leaves behind is a prefix of
//! the writer's program order. (The processor adds nothing: a killed thread
//! stops at an instruction boundary with every earlier store committed, and
//! whoever recovers synchronises with the death before looking.) A crash
//! invariant that rests on the order of two stores has a point between
//! them.
//!
//! Under test a point can also stop the writer: [`hook::arm`]`(k)` makes the
//! `k`-th point reached on this thread unwind with [`hook::Crash`]; the test
//! catches it and forgets the writer, as if its process had died there.

/// A point where the writer may die: stores before it happen before stores
/// after it.
#[inline(always)]
#[cfg_attr(all(test, not(loom)), track_caller)]
pub(crate) fn point() {
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    #[cfg(all(test, not(loom)))]
    hook::reached();
}

#[cfg(all(test, not(loom)))]
pub(crate) mod hook {
    use std::cell::Cell;

    /// An action to run at a point, its lifetime erased (see [`act_at`]).
    type Action = *mut (dyn FnMut() + 'static);

    thread_local! {
        /// Points still to pass before the crash, if one is armed.
        static LEFT: Cell<Option<u32>> = const { Cell::new(None) };
        /// Set from a simulated kill until [`run`] catches it: the dying
        /// thread runs no destructor of a writer.
        static DYING: Cell<bool> = const { Cell::new(false) };
        /// Where the last crash happened.
        static AT: Cell<Option<&'static std::panic::Location<'static>>> = const { Cell::new(None) };
        /// Points still to pass before running the action of [`act_at`].
        static ACTION: Cell<Option<(u32, Action)>> = const { Cell::new(None) };
    }

    /// Runs `body`; when it reaches its `k`-th point (0: the first), runs
    /// `action` there, once, as another thread would if this one were
    /// preempted at that point. Returns `body`'s result and whether the
    /// action ran.
    pub(crate) fn act_at<R>(k: u32, action: &mut dyn FnMut(), body: impl FnOnce() -> R) -> (R, bool) {
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                ACTION.with(|a| a.set(None));
            }
        }
        // SAFETY: only the lifetime is erased. The pointer is used by
        // `reached` on this thread while `body` runs, and `Clear` removes
        // it before `action`'s borrow ends, on return and on unwind alike.
        let erased: Action = unsafe { std::mem::transmute(action) };
        ACTION.with(|a| a.set(Some((k, erased))));
        let clear = Clear;
        let r = body();
        let ran = ACTION.with(Cell::get).is_none();
        drop(clear);
        (r, ran)
    }

    /// Where the last simulated kill stopped the thread.
    pub(crate) fn last() -> String {
        AT.with(|at| at.get().map_or_else(|| "nowhere".into(), |l| format!("{}:{}", l.file(), l.line())))
    }

    /// The unwinding payload of a simulated kill.
    #[derive(Debug)]
    pub(crate) struct Crash;

    /// Makes the thread "die" at the `k`-th point from now (0: the next one).
    pub(crate) fn arm(k: u32) {
        LEFT.with(|left| left.set(Some(k)));
    }

    /// Disarms; returns whether the crash was still pending (not reached).
    pub(crate) fn disarm() -> bool {
        LEFT.with(|left| left.take().is_some())
    }

    #[track_caller]
    pub(super) fn reached() {
        if let Some((n, action)) = ACTION.with(Cell::get) {
            ACTION.with(|a| a.set(n.checked_sub(1).map(|left| (left, action))));
            if n == 0 {
                // SAFETY: set by `act_at`, whose frame (and the borrow
                // behind the pointer) is still live below us; taken out of
                // the cell first, so it runs once and never re-entrantly.
                unsafe { (*action)() };
            }
        }
        let here = std::panic::Location::caller();
        LEFT.with(|left| match left.get() {
            Some(0) => {
                left.set(None);
                AT.with(|at| at.set(Some(here)));
                DYING.with(|dying| dying.set(true));
                // `resume_unwind` skips the panic hook: nothing is printed.
                std::panic::resume_unwind(Box::new(Crash));
            }
            Some(n) => left.set(Some(n - 1)),
            None => {}
        });
    }

    /// Whether this thread is unwinding from a simulated kill: a writer's
    /// `Drop` then does nothing, as a killed process runs no code.
    pub(crate) fn dying() -> bool {
        DYING.with(Cell::get)
    }

    /// Runs `f`, which may crash at an armed point: `Some` with its result
    /// if it finished, `None` if it "died".
    pub(crate) fn run<R>(f: impl FnOnce() -> R) -> Option<R> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => Some(r),
            Err(payload) if payload.is::<Crash>() => {
                DYING.with(|dying| dying.set(false));
                None
            }
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }
}
