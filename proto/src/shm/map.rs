//! Mappings of a stream's shared files: [`StreamMap`] and [`ChannelMap`],
//! the production implementations of the core's memory traits.

use std::os::fd::{AsRawFd, BorrowedFd};

use memmap2::{MmapOptions, MmapRaw};

use super::core::mem::{ChannelMem, StreamMem};
use super::layout::{
    CHANNEL_MAGIC, ChannelHeader, Entry, FLAG_HUGE_PAGES, FLAG_MLOCK, FLAG_PREFAULT, LAYOUT_VERSION, Layout,
    LayoutError, StreamHeader, SubscriberRecord, channel_len,
};
use crate::platform;
use crate::primitive::{AtomicU32, AtomicU64, Ordering};

/// Why a segment file could not be mapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// `mmap`, `fstat` or another system call failed.
    #[error("cannot map the segment: {0}")]
    Io(#[from] std::io::Error),
    /// The segment asks to be locked in memory and `mlock` failed (see
    /// `ulimit -l` / `RLIMIT_MEMLOCK`, or `CAP_IPC_LOCK`).
    #[error("cannot lock the segment in memory ({len} bytes): {source}")]
    Lock {
        /// Bytes that were to be locked.
        len: usize,
        /// The `mlock` error.
        source: std::io::Error,
    },
    /// The file is not a valid segment.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// A mapped data file.
#[derive(Debug)]
pub struct StreamMap {
    map: MmapRaw,
    layout: Layout,
    flags: u32,
}

// SAFETY: the mapping is plain memory shared with other processes; every
// access through it goes through atomics or through the slot protocol,
// which is what makes it safe to use from another thread as well.
unsafe impl Send for StreamMap {}
// SAFETY: as for `Send`: shared access is by atomics only.
unsafe impl Sync for StreamMap {}

pub(crate) fn map_file(fd: BorrowedFd<'_>, len: usize, writable: bool, flags: u32) -> Result<MmapRaw, MapError> {
    let mut opts = MmapOptions::new();
    opts.len(len);
    if flags & FLAG_PREFAULT != 0 {
        opts.populate();
    }
    let map = if writable { opts.map_raw(fd.as_raw_fd())? } else { opts.map_raw_read_only(fd.as_raw_fd())? };
    if flags & FLAG_HUGE_PAGES == 0 {
        // Transparent huge pages for shared memory, where the system
        // allows them (shmem_enabled=advise); a no-op elsewhere.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    if flags & FLAG_MLOCK != 0 {
        map.lock().map_err(|source| MapError::Lock { len, source })?;
    }
    Ok(map)
}

impl StreamMap {
    /// Maps a data file created by [`StreamMap::create`] (possibly in
    /// another process) and validates its header.
    pub(crate) fn open(fd: BorrowedFd<'_>, writable: bool) -> Result<Self, MapError> {
        let file_len = platform::file_len(fd)?;
        if file_len < std::mem::size_of::<StreamHeader>() as u64 {
            return Err(LayoutError::Inconsistent("file is shorter than a header").into());
        }
        // Read the header through a small mapping first: the flags say
        // how the whole file is to be mapped. It spans one of the file's
        // pages (2 MiB on hugetlbfs, where shorter unmaps would fail).
        let page = (rustix::fs::fstat(fd).map_err(std::io::Error::from)?.st_blksize as usize)
            .max(std::mem::size_of::<StreamHeader>())
            .min(file_len as usize);
        let probe = MmapOptions::new().len(page).map_raw_read_only(fd.as_raw_fd())?;
        // SAFETY: the probe mapping is at least one header long and page
        // aligned; the header consists of atomics, valid for any bytes.
        let header = unsafe { &*(probe.as_ptr() as *const StreamHeader) };
        let (layout, flags) = Layout::from_header(&header.ident, file_len)?;
        drop(probe);
        let map = map_file(fd, layout.total_len, writable, flags)?;
        Ok(Self { map, layout, flags })
    }

    /// Maps a freshly created, zero-filled file of `layout.total_len`
    /// bytes read-write and writes its header.
    pub(crate) fn create(fd: BorrowedFd<'_>, layout: Layout, flags: u32, loans: u32) -> Result<Self, MapError> {
        let map = map_file(fd, layout.total_len, true, flags)?;
        let this = Self { map, layout, flags };
        layout.write_header(this.header(), flags, loans);
        Ok(this)
    }

    /// `FLAG_*` bits of the stream.
    pub(crate) fn flags(&self) -> u32 {
        self.flags
    }

    /// The payload addresses, to compute apart from the map (see
    /// [`Payloads`]).
    pub(crate) fn payloads(&self) -> Payloads {
        Payloads {
            base: self.map.as_mut_ptr(),
            pool_offset: self.layout.pool_offset,
            slot_stride: self.layout.slot_stride,
            slot_count: self.layout.geometry.slot_count,
            slot_size: self.layout.geometry.slot_size,
        }
    }

    /// Address of slot `slot`'s payload.
    ///
    /// Panics if `slot` is out of range, so the pointer always lies in
    /// the mapping, `slot_size` bytes before its end at the latest.
    #[inline]
    pub(crate) fn payload_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.layout.geometry.slot_count, "slot {slot} out of range");
        // SAFETY: slot < slot_count, so the payload lies within
        // total_len (Layout::new sized the file to hold every slot).
        unsafe { self.map.as_mut_ptr().add(self.layout.slot_offset(slot)) }
    }

    #[inline(always)]
    fn at<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + std::mem::size_of::<T>() <= self.layout.total_len);
        debug_assert_eq!(offset % std::mem::align_of::<T>(), 0);
        // SAFETY: callers pass offsets from `Layout`, which are in bounds
        // and aligned for `T` (the mapping is page aligned); `T` is made
        // of atomics, valid for any bytes; the mapping outlives `&self`.
        unsafe { &*(self.map.as_ptr().add(offset) as *const T) }
    }

    #[inline(always)]
    fn slice_at<T>(&self, offset: usize, len: usize) -> &[T] {
        debug_assert!(offset + len * std::mem::size_of::<T>() <= self.layout.total_len);
        debug_assert_eq!(offset % std::mem::align_of::<T>(), 0);
        // SAFETY: as in `at`, for `len` consecutive values.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset) as *const T, len) }
    }
}

/// Where a stream's payloads are, copied out of its [`StreamMap`]: for a
/// publisher whose map lives in a core it may share with another thread
/// (a serve, see `Served`), so that it computes a payload address without
/// reaching into the core. The addresses are those of the map they came
/// from, and valid while it lives (its holder keeps it for as long).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Payloads {
    base: *mut u8,
    pool_offset: usize,
    slot_stride: usize,
    slot_count: u32,
    slot_size: u32,
}

// SAFETY: addresses only; whoever dereferences one answers for the map's
// life and for exclusive use of the slot, as with `StreamMap::payload_ptr`.
unsafe impl Send for Payloads {}
// SAFETY: as for `Send`: nothing is reached through `&Payloads`.
unsafe impl Sync for Payloads {}

impl Payloads {
    /// As [`StreamMap::payload_ptr`]: panics if `slot` is out of range.
    #[inline(always)]
    pub(crate) fn ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slot_count, "slot {slot} out of range");
        // In the map while it lives (slot < slot_count, as in
        // `payload_ptr`); computed without `add`'s promise, as the map
        // may have gone (the pointer is then never dereferenced).
        self.base.wrapping_add(self.pool_offset + slot as usize * self.slot_stride)
    }

    /// Bytes per slot: the largest frame.
    #[inline(always)]
    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size as usize
    }
}

impl StreamMem for StreamMap {
    #[inline]
    fn layout(&self) -> &Layout {
        &self.layout
    }

    #[inline]
    fn header(&self) -> &StreamHeader {
        self.at(0)
    }

    #[inline(always)]
    fn record(&self, index: usize) -> &SubscriberRecord {
        assert!(index < self.layout.geometry.max_subscribers as usize);
        self.at(self.layout.table_offset + index * std::mem::size_of::<SubscriberRecord>())
    }

    #[inline(always)]
    fn ring(&self, index: usize) -> &[Entry] {
        assert!(index < self.layout.geometry.max_subscribers as usize);
        self.slice_at(self.layout.ring_offset(index), self.layout.geometry.queue_capacity as usize)
    }

    #[inline]
    fn prefetch_slot(&self, slot: u32) {
        if slot < self.layout.geometry.slot_count {
            // Pointer arithmetic only; a prefetch never faults.
            let base = self.map.as_ptr().wrapping_add(self.layout.slot_offset(slot));
            platform::prefetch_for_write(base);
            if self.layout.geometry.slot_size > 64 {
                platform::prefetch_for_write(base.wrapping_add(64));
            }
        }
    }

    #[inline]
    fn prefetch_entry(&self, index: usize, pos: usize) {
        let offset = self.layout.ring_offset(index) + pos * std::mem::size_of::<Entry>();
        platform::prefetch_for_write(self.map.as_ptr().wrapping_add(offset));
    }

    #[inline(always)]
    fn mask(&self, slot: u32) -> &[AtomicU64] {
        assert!(slot < self.layout.geometry.slot_count);
        self.slice_at(self.layout.mask_offset(slot), self.layout.geometry.mask_words())
    }

    #[inline(always)]
    fn history(&self) -> &[Entry] {
        self.slice_at(self.layout.history_offset, self.layout.geometry.history_capacity())
    }
}

/// A mapped channel file.
#[derive(Debug)]
pub struct ChannelMap {
    map: MmapRaw,
    capacity: u32,
}

// SAFETY: see `StreamMap`.
unsafe impl Send for ChannelMap {}
// SAFETY: see `StreamMap`.
unsafe impl Sync for ChannelMap {}

impl ChannelMap {
    /// Maps a channel file read-write for the publisher. Only the size is
    /// checked: everything else in the file is the subscriber's to write
    /// (and possibly scribble over), so nothing in it may stop a
    /// publisher from attaching.
    pub(crate) fn open_for_publisher(fd: BorrowedFd<'_>, capacity: u32, flags: u32) -> Result<Self, MapError> {
        let len = channel_len(capacity);
        if platform::file_len(fd)? < len as u64 {
            return Err(LayoutError::Inconsistent("channel file is too short").into());
        }
        Ok(Self { map: map_file(fd, len, true, flags & !FLAG_HUGE_PAGES)?, capacity })
    }

    /// Maps a channel file read-write for its subscriber, checking that
    /// it is the channel of subscriber `index` in a stream of the given
    /// queue capacity.
    pub(crate) fn open(fd: BorrowedFd<'_>, index: u32, capacity: u32, flags: u32) -> Result<Self, MapError> {
        let this = Self::open_for_publisher(fd, capacity, flags)?;
        let id = &this.header().ident;
        // Acquire pairs with the Release store of `version` in `create`.
        match id.version.load(Ordering::Acquire) {
            0 => return Err(LayoutError::NotReady.into()),
            LAYOUT_VERSION => {}
            found => return Err(LayoutError::VersionMismatch { found }.into()),
        }
        if id.magic.load(Ordering::Relaxed) != CHANNEL_MAGIC {
            return Err(LayoutError::BadMagic("channel").into());
        }
        if id.index.load(Ordering::Relaxed) != index || id.capacity.load(Ordering::Relaxed) != capacity {
            return Err(LayoutError::Inconsistent("channel belongs to another subscriber or stream").into());
        }
        Ok(this)
    }

    /// Maps a fresh channel file read-write and writes its identity.
    pub(crate) fn create(fd: BorrowedFd<'_>, index: u32, capacity: u32, flags: u32) -> Result<Self, MapError> {
        let len = channel_len(capacity);
        let this = Self { map: map_file(fd, len, true, flags & !FLAG_HUGE_PAGES)?, capacity };
        let id = &this.header().ident;
        id.magic.store(CHANNEL_MAGIC, Ordering::Relaxed);
        id.index.store(index, Ordering::Relaxed);
        id.capacity.store(capacity, Ordering::Relaxed);
        // Release pairs with the Acquire load in `open`.
        id.version.store(LAYOUT_VERSION, Ordering::Release);
        Ok(this)
    }
}

impl ChannelMem for ChannelMap {
    #[inline]
    fn header(&self) -> &ChannelHeader {
        // SAFETY: the mapping is `channel_len(capacity)` bytes, page
        // aligned, and starts with a header made of atomics.
        unsafe { &*(self.map.as_ptr() as *const ChannelHeader) }
    }

    #[inline]
    fn returns(&self) -> &[AtomicU32] {
        // SAFETY: `channel_len` reserves `capacity` u32s right after the
        // header (whose size is a multiple of their alignment).
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(std::mem::size_of::<ChannelHeader>()) as *const AtomicU32,
                self.capacity as usize,
            )
        }
    }
}
