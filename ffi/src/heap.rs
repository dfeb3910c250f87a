//! The C allocator's own bookkeeping: handing freed heap memory back to the system.

/// Returns the free memory of every malloc arena to the system (glibc's `malloc_trim(0)`):
/// after a buffer of a few tens of MB was freed inside a thread's arena, the pages stay
/// resident until reused; this gives them back. A few ms at most; for the rare moment after an
/// outsized request, never per request. A no-op where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists under its arena locks;
    // it takes no pointer from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
