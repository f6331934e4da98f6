//! Typed access to the structures of [`layout`](crate::shm::layout).
//!
//! The algorithms in `publisher`, `subscriber` and `owner` are written
//! against the [`StreamMem`] and [`ChannelMem`] traits. Two kinds of memory
//! implement them: `StreamMap`/`ChannelMap` (the `map` module, the only
//! place that turns offsets in a mapping into references), mappings of
//! shared files, and (for unit tests and the loom model) plain heap
//! allocations, which is what lets the model checker run the very code that
//! runs in production.

use crate::primitive::{AtomicU32, AtomicU64};
use crate::shm::layout::{ChannelHeader, Entry, Layout, StreamHeader, SubscriberRecord};

/// Typed view of a stream's data file.
pub(crate) trait StreamMem {
    /// The validated layout.
    fn layout(&self) -> &Layout;
    /// The header.
    fn header(&self) -> &StreamHeader;
    /// Subscriber `index`'s record. Panics if `index` is out of range.
    fn record(&self, index: usize) -> &SubscriberRecord;
    /// Subscriber `index`'s delivery ring. Panics if `index` is out of range.
    fn ring(&self, index: usize) -> &[Entry];
    /// Slot `slot`'s holder mask. Panics if `slot` is out of range.
    fn mask(&self, slot: u32) -> &[AtomicU64];
    /// The history ring (empty if the stream keeps no history).
    fn history(&self) -> &[Entry];
    /// Starts fetching the first lines of slot `slot` for writing.
    fn prefetch_slot(&self, _slot: u32) {}
    /// Starts fetching the line of subscriber `index`'s ring entry `pos` for writing.
    fn prefetch_entry(&self, _index: usize, _pos: usize) {}
}

/// Typed view of one subscriber's channel file.
pub(crate) trait ChannelMem {
    /// The header.
    fn header(&self) -> &ChannelHeader;
    /// The return ring.
    fn returns(&self) -> &[AtomicU32];
}

/// Memory reached through a pointer is the memory pointed to: `Arc`s for
/// handles that share a mapping, references for a writer the owner runs
/// for a moment on its own mapping.
macro_rules! forward_mem {
    ($($ptr:ty),*) => {$(
        impl<T: StreamMem + ?Sized> StreamMem for $ptr {
            fn layout(&self) -> &Layout {
                (**self).layout()
            }
            fn header(&self) -> &StreamHeader {
                (**self).header()
            }
            fn record(&self, index: usize) -> &SubscriberRecord {
                (**self).record(index)
            }
            fn ring(&self, index: usize) -> &[Entry] {
                (**self).ring(index)
            }
            fn mask(&self, slot: u32) -> &[AtomicU64] {
                (**self).mask(slot)
            }
            fn history(&self) -> &[Entry] {
                (**self).history()
            }
            fn prefetch_slot(&self, slot: u32) {
                (**self).prefetch_slot(slot)
            }
            fn prefetch_entry(&self, index: usize, pos: usize) {
                (**self).prefetch_entry(index, pos)
            }
        }

        impl<T: ChannelMem + ?Sized> ChannelMem for $ptr {
            fn header(&self) -> &ChannelHeader {
                (**self).header()
            }
            fn returns(&self) -> &[AtomicU32] {
                (**self).returns()
            }
        }
    )*};
}

forward_mem!(std::sync::Arc<T>, &T);

/// Heap-allocated stand-ins for the mapped files, for unit tests and loom.
#[cfg(any(test, loom))]
pub(crate) mod heap {
    use super::*;
    use crate::primitive::Ordering;
    use crate::shm::layout::{Geometry, LAYOUT_VERSION, PAGE};

    /// A stream "segment" on the heap.
    #[derive(Debug)]
    pub(crate) struct HeapStream {
        layout: Layout,
        header: Box<StreamHeader>,
        records: Box<[SubscriberRecord]>,
        rings: Box<[Box<[Entry]>]>,
        masks: Box<[AtomicU64]>,
        history: Box<[Entry]>,
    }

    impl HeapStream {
        pub(crate) fn new(geometry: Geometry) -> Self {
            let layout = Layout::new(geometry, PAGE).expect("valid test geometry");
            let g = geometry;
            let subs = g.max_subscribers as usize;
            let this = Self {
                layout,
                header: Box::default(),
                records: (0..subs).map(|_| SubscriberRecord::default()).collect(),
                rings: (0..subs).map(|_| (0..g.queue_capacity).map(|_| Entry::default()).collect()).collect(),
                masks: (0..g.slot_count as usize * g.mask_words()).map(|_| AtomicU64::new(0)).collect(),
                history: (0..g.history_capacity()).map(|_| Entry::default()).collect(),
            };
            layout.write_header(&this.header, 0, crate::shm::layout::PUBLISHER_LOANS);
            this
        }
    }

    impl StreamMem for HeapStream {
        fn layout(&self) -> &Layout {
            &self.layout
        }
        fn header(&self) -> &StreamHeader {
            &self.header
        }
        fn record(&self, index: usize) -> &SubscriberRecord {
            &self.records[index]
        }
        fn ring(&self, index: usize) -> &[Entry] {
            &self.rings[index]
        }
        fn mask(&self, slot: u32) -> &[AtomicU64] {
            let w = self.layout.geometry.mask_words();
            &self.masks[slot as usize * w..][..w]
        }
        fn history(&self) -> &[Entry] {
            &self.history
        }
    }

    /// A channel "file" on the heap.
    #[derive(Debug)]
    pub(crate) struct HeapChannel {
        header: Box<ChannelHeader>,
        returns: Box<[AtomicU32]>,
    }

    impl HeapChannel {
        pub(crate) fn new(index: u32, capacity: u32) -> Self {
            let header: Box<ChannelHeader> = Box::default();
            header.ident.index.store(index, Ordering::Relaxed);
            header.ident.capacity.store(capacity, Ordering::Relaxed);
            header.ident.version.store(LAYOUT_VERSION, Ordering::Release);
            Self { header, returns: (0..capacity).map(|_| AtomicU32::new(0)).collect() }
        }
    }

    impl ChannelMem for HeapChannel {
        fn header(&self) -> &ChannelHeader {
            &self.header
        }
        fn returns(&self) -> &[AtomicU32] {
            &self.returns
        }
    }
}
