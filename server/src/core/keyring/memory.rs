//! The key cache's memory: its records and table in a region of their own,
//! advised for transparent huge pages.
//!
//! A call on a key no recent call used reads the table's control bytes and
//! slot, the cached key and its counters: each in cold memory, on a
//! different 4 KiB page. A table of a million keys spans hundreds of MiB,
//! far past what the TLB maps in 4 KiB pages, so each of those reads also
//! walks the page tables (two of them in a virtual machine). In 2 MiB
//! pages the whole cache is a few hundred TLB entries.
//!
//! The process allocator ([`Allocator`], mimalloc) serves an allocation
//! made inside [`in_cache_memory`] from a mimalloc heap bound to one
//! region, mapped once (reserved, not committed) and advised
//! `MADV_HUGEPAGE`; every other allocation stays in mimalloc's own heaps
//! in 4 KiB pages (the whole heap in huge pages costs a small broker
//! 11 MiB more at rest). The region is mapped only when the cache first
//! holds [`HUGE_PAGES_FROM`] keys, so a broker with few keys maps nothing.
//! When it is full, or cannot be mapped, allocations go to the usual heap.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

/// The cache's keys at which its region is mapped (about 2 MiB of records:
/// one huge page).
pub const HUGE_PAGES_FROM: usize = 4096;

/// Bytes of address space the region reserves (committed as it is used):
/// about four million cached keys.
pub const REGION_BYTES: usize = 2 << 30;

/// Alignment of the region: a huge page (and a multiple of mimalloc's
/// arena slice).
const HUGE_PAGE: usize = 2 << 20;

/// The heap bound to the region; null until it is mapped (or when it
/// could not be).
static CACHE_HEAP: AtomicPtr<libmimalloc_sys::mi_heap_t> = AtomicPtr::new(std::ptr::null_mut());

/// The region, once mapping it was tried: its start and length.
static REGION: OnceLock<Option<(usize, usize)>> = OnceLock::new();

thread_local! {
    /// Set while this thread allocates for the key cache.
    static IN_CACHE: Cell<bool> = const { Cell::new(false) };
}

/// The process allocator: mimalloc, with the key cache's allocations in
/// their own region (see the module).
pub struct Allocator;

#[allow(unsafe_code)]
// SAFETY: every block comes from mimalloc (`mi_heap_malloc_aligned` for the
// cache's heap, `mi_malloc_aligned` otherwise), whose `mi_free` and
// `mi_realloc_aligned` take a block of any of its heaps from any thread
// (mimalloc v3: first-class heaps). Sizes and alignments are passed as the
// layout gives them. The thread-local read allocates nothing (a `const`
// `Cell` without a destructor), so it cannot re-enter this allocator.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if IN_CACHE.with(Cell::get) {
            let heap = CACHE_HEAP.load(Ordering::Acquire);
            if !heap.is_null() {
                // SAFETY: `heap` was made by `mi_heap_new_in_arena` and is never deleted.
                let block = unsafe { libmimalloc_sys::mi_heap_malloc_aligned(heap, layout.size(), layout.align()) };
                if !block.is_null() {
                    return block.cast();
                }
            }
        }
        // SAFETY: as the trait requires, with the layout's size and alignment.
        unsafe { libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast() }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` or `realloc` above: a mimalloc block.
        unsafe { libmimalloc_sys::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is a mimalloc block of `layout`'s alignment.
        unsafe { libmimalloc_sys::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast() }
    }
}

/// Runs `make` with its allocations in the cache's region (when the
/// process allocator is [`Allocator`] and the region is mapped). `make`
/// must not hold the setting across an await: it is a plain closure.
pub(crate) fn in_cache_memory<R>(make: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_CACHE.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(IN_CACHE.with(|c| c.replace(true)));
    make()
}

/// Maps the region and binds the cache's heap to it, once (later calls do
/// nothing). A failure is logged and leaves the cache in the usual heap.
pub(crate) fn map_region() {
    REGION.get_or_init(|| match map(REGION_BYTES) {
        Ok(region) => {
            tracing::info!(
                bytes = REGION_BYTES,
                "key cache memory: a region of its own, in transparent huge pages where the kernel allows"
            );
            Some(region)
        }
        Err(reason) => {
            tracing::warn!(%reason, "key cache memory: no region of its own; the cache stays in the usual heap");
            None
        }
    });
}

/// The region's start and length, once mapped.
#[cfg(test)]
pub(crate) fn region() -> Option<(usize, usize)> {
    REGION.get().copied().flatten()
}

#[allow(unsafe_code)]
fn map(bytes: usize) -> Result<(usize, usize), String> {
    use rustix::mm::{Advice, MapFlags, ProtFlags};
    let len = bytes + HUGE_PAGE;
    // SAFETY: a new anonymous private mapping at an address the kernel
    // chooses: it aliases nothing. It is never unmapped (the heap bound to
    // it lives as long as the process).
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .map_err(|e| format!("mmap of {len} bytes: {e}"))?;
    let start = (base.addr() + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let start_ptr = base.cast::<u8>().wrapping_add(start - base.addr()).cast::<c_void>();
    // SAFETY: the range lies inside the mapping just made; the advice
    // changes how it is backed, not its contents. Refused (THP off in this
    // kernel) it is only a hint not taken: the region is still used.
    if let Err(e) = unsafe { rustix::mm::madvise(start_ptr, bytes, Advice::LinuxHugepage) } {
        tracing::info!(error = %e, "key cache memory: the kernel declined huge pages for the region");
    }
    let mut arena: libmimalloc_sys::mi_arena_id_t = std::ptr::null_mut();
    // SAFETY: mimalloc takes the range (inside the mapping, zeroed, writable
    // and never unmapped) as an arena of its own, used only by heaps bound
    // to it; `arena` is a valid place for the id.
    let managed =
        unsafe { libmimalloc_sys::mi_manage_os_memory_ex(start_ptr, bytes, true, false, true, -1, true, &mut arena) };
    if !managed {
        return Err("mimalloc did not take the region as an arena".to_owned());
    }
    // SAFETY: `arena` is the id mimalloc just returned.
    let heap = unsafe { libmimalloc_sys::mi_heap_new_in_arena(arena) };
    if heap.is_null() {
        return Err("mimalloc made no heap in the region".to_owned());
    }
    CACHE_HEAP.store(heap, Ordering::Release);
    Ok((start, bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn in_region(p: *const u8) -> bool {
        let (start, len) = region().expect("the region is mapped");
        (start..start + len).contains(&p.addr())
    }

    /// The test binary's allocator is [`Allocator`] (lib.rs), as in the
    /// broker's binary.
    #[test]
    fn cache_allocations_go_to_a_region_advised_for_huge_pages_and_others_do_not() {
        map_region();
        let cached = in_cache_memory(|| Box::new([7u8; 300]));
        let other = Box::new([9u8; 300]);
        assert!(in_region(cached.as_ptr()), "an allocation for the cache is in its region");
        assert!(!in_region(other.as_ptr()), "an allocation outside in_cache_memory is not");
        // Nested calls keep the setting; it ends with the outer call.
        let (inner, after) = in_cache_memory(|| (in_cache_memory(|| vec![1u64; 64]), vec![2u64; 64]));
        assert!(in_region(inner.as_ptr().cast()) && in_region(after.as_ptr().cast()));
        assert!(!in_region(vec![3u64; 64].as_ptr().cast()));
        // Freed and grown from any thread, like any block.
        let grown = std::thread::spawn(move || {
            let mut v = inner;
            v.extend_from_slice(&[4u64; 4096]);
            v.iter().sum::<u64>()
        })
        .join()
        .unwrap();
        assert_eq!(grown, 64 + 4 * 4096);
        assert_eq!(cached.iter().map(|b| u64::from(*b)).sum::<u64>(), 7 * 300);

        // The kernel takes the advice unless THP is off altogether.
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if !thp.is_empty() && !thp.contains("[never]") {
            let (start, _) = region().unwrap();
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut lines = smaps.lines();
            let mut eligible = None;
            while let Some(line) = lines.next() {
                let Some((range, _)) = line.split_once(' ') else { continue };
                let Some((lo, hi)) = range.split_once('-') else { continue };
                let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) else {
                    continue;
                };
                if (lo..hi).contains(&start) {
                    eligible = lines.by_ref().find_map(|l| l.strip_prefix("THPeligible:")).map(str::trim);
                    break;
                }
            }
            assert_eq!(eligible, Some("1"), "the region is eligible for transparent huge pages ({thp:?})");
        }
    }
}
