//! Giving back, once a process is up, the memory that only its start-up used (issue 18,
//! docs/benchmarks.md "Where the memory goes").
//!
//! Two kinds of pages stay with a process after its start-up for no use:
//!
//! * **Its executable's read-only pages** (code, constants): start-up runs code (configuration
//!   parsing, the command line, certificates, provisioning) that the running process never runs
//!   again, and the kernel maps 64 KiB around each page touched. Unmapping them all lets the
//!   running process map back, on its next touch of each, only what it uses; the file's pages stay
//!   in the page cache, where the kernel can reclaim those no process maps any more.
//! * **Freed heap**: glibc keeps memory freed below the top of its heap; `malloc_trim` returns the
//!   whole free pages to the kernel.
//!
//! Only segments the program never writes are unmapped (`MADV_DONTNEED` on them drops nothing
//! but the mapping): no writable or relocated (RELRO) segment, whose pages hold what the loader
//! wrote. The agent's executables have no text relocations (lld refuses them), so their
//! read-only segments are the file's bytes. A debugger's breakpoint written into the code before
//! the call would be lost with the page.

/// What [`release`] gave back, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Released {
    /// Bytes of the executable's read-only segments unmapped (resident or not).
    pub unmapped: usize,
    /// Whether glibc returned free heap pages to the kernel.
    pub trimmed: bool,
}

/// Unmaps this process's executable's read-only segments and returns free heap pages to the
/// kernel. Call it once start-up is over; the process keeps running as before (each page it
/// touches next is mapped again from the page cache).
pub fn release() -> Released {
    let mut released = Released::default();
    for (start, len) in read_only_segments() {
        // SAFETY: the range covers whole pages of a read-only, file-backed mapping of the
        // executable that nothing writes (see the module comment): dropping it changes no byte
        // the process reads, only when the kernel maps it again.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0 {
            released.unmapped += len;
        }
    }
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: glibc's malloc_trim takes the allocator's locks; callable from any thread.
        released.trimmed = unsafe { libc::malloc_trim(0) } == 1;
    }
    released
}

/// The page-aligned address ranges of the main executable's loaded segments without write
/// permission, shrunk to whole pages inside each segment.
fn read_only_segments() -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    // SAFETY: dl_iterate_phdr calls `collect` with valid `dl_phdr_info` pointers, on this thread,
    // before it returns; `collect` only reads them and writes to `ranges` through `data`.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect),
            (&mut ranges as *mut Vec<(usize, usize)>).cast(),
        );
    }
    ranges
}

/// `dl_iterate_phdr`'s callback: the first object it reports is the main executable.
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: see `read_only_segments`.
    let (info, ranges) = unsafe { (&*info, &mut *data.cast::<Vec<(usize, usize)>>()) };
    let page = page_size();
    let headers: &[ProgramHeader] = if info.dlpi_phdr.is_null() {
        &[]
    } else {
        // SAFETY: the loader's program headers of this object, `dlpi_phnum` of them.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr.cast(), usize::from(info.dlpi_phnum)) }
    };
    for header in headers {
        if header.p_type != libc::PT_LOAD || header.p_flags & libc::PF_W != 0 {
            continue;
        }
        let begin = info.dlpi_addr as usize + header.p_vaddr as usize;
        let end = begin + header.p_memsz as usize;
        let (first, last) = (begin.next_multiple_of(page), end / page * page);
        if last > first {
            ranges.push((first, last - first));
        }
    }
    1 // stop after the main executable
}

#[cfg(target_pointer_width = "64")]
type ProgramHeader = libc::Elf64_Phdr;
#[cfg(target_pointer_width = "32")]
type ProgramHeader = libc::Elf32_Phdr;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static WRITTEN: AtomicUsize = AtomicUsize::new(0);

    /// Pages of `ranges` mapped into this process now (/proc/self/pagemap, bit 63).
    fn mapped_pages(ranges: &[(usize, usize)]) -> usize {
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let page = page_size();
        let mut mapped = 0;
        for &(start, len) in ranges {
            let mut entries = vec![0u8; len / page * 8];
            pagemap
                .seek(SeekFrom::Start((start / page * 8) as u64))
                .unwrap();
            pagemap.read_exact(&mut entries).unwrap();
            mapped += entries
                .chunks_exact(8)
                .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
                .count();
        }
        mapped
    }

    #[test]
    fn the_executables_read_only_pages_are_unmapped_and_it_runs_on() {
        let segments = read_only_segments();
        let inside = |address: usize| {
            segments
                .iter()
                .any(|&(start, len)| (start..start + len).contains(&address))
        };
        // This function's code is in them; a static the program writes is not.
        let code = mapped_pages as fn(&[(usize, usize)]) -> usize as usize;
        assert!(inside(code), "{code:#x} not in {segments:x?}");
        WRITTEN.fetch_add(1, Ordering::Relaxed);
        assert!(!inside(&WRITTEN as *const AtomicUsize as usize));

        let before = mapped_pages(&segments);
        assert!(before > 0);
        let released = release();
        assert_eq!(
            released.unmapped,
            segments.iter().map(|&(_, len)| len).sum::<usize>()
        );
        let after = mapped_pages(&segments);
        // What runs from here on (this test, the harness) is mapped again as it is touched, 64
        // KiB around each page: fewer pages than all that ran before, not none.
        assert!(after < before, "{after} of the {before} pages still mapped");
        assert_eq!(WRITTEN.load(Ordering::Relaxed), 1);
    }
}
