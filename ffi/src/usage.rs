//! The process's own resource usage: CPU time and peak resident memory (`getrusage`), and the
//! kernel's clock tick (`sysconf`) for reading another process's `/proc/<pid>/stat`.

/// CPU time and peak memory of this process so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SelfUsage {
    pub user_us: u64,
    pub system_us: u64,
    /// Peak resident memory (ru_maxrss), KiB.
    pub max_rss_kib: u64,
}

/// `getrusage(RUSAGE_SELF)`: every thread of the process, microsecond resolution. All zero
/// in the (documented-impossible) case the call fails.
pub fn self_usage() -> SelfUsage {
    // SAFETY: rusage is plain old data; all-zero is a valid value of it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a live, writable rusage; RUSAGE_SELF needs nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return SelfUsage::default();
    }
    let us = |t: libc::timeval| t.tv_sec.max(0) as u64 * 1_000_000 + t.tv_usec.max(0) as u64;
    SelfUsage {
        user_us: us(ru.ru_utime),
        system_us: us(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss.max(0) as u64,
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, the unit of `/proc/<pid>/stat`'s CPU
/// times); 100 when the call fails (Linux's fixed USER_HZ).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes a constant name and has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// The system's page size in bytes (`/proc/<pid>/statm` counts pages); 4096 on failure.
pub fn page_size() -> u64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}
