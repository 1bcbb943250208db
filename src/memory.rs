//! Peak memory measurement for progress reports and benchmarks.
//!
//! - Accelerator: the caching allocator's statistics, the same numbers as
//!   `torch.cuda.max_memory_allocated()` / `torch.cuda.memory_allocated()` (read through
//!   libtorch's device-generic `at::accelerator` API by a small C++ shim, csrc/torch_shim.cpp),
//!   with a peak reset like `torch.cuda.reset_peak_memory_stats()`, the device's free/total
//!   memory like `torch.cuda.mem_get_info()` and a release of unused cached blocks like
//!   `torch.cuda.empty_cache()`. When no accelerator is
//!   present (CPU-only machine, or libtorch_cuda not loaded) the queries return `Ok(None)` and
//!   the reset does nothing.
//! - Host: the process's resident-set high-water mark (`VmHWM` of /proc/self/status) and its
//!   current size (`VmRSS`); the mark is reset by writing `5` to /proc/self/clear_refs where
//!   the kernel allows it.

use std::ffi::{c_char, c_int, CStr};

extern "C" {
    fn vla_accelerator_memory_stats(device: c_int, out: *mut i64, err: *mut c_char, err_len: usize) -> c_int;
    fn vla_accelerator_reset_peak(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn vla_accelerator_memory_info(device: c_int, out: *mut i64, err: *mut c_char, err_len: usize) -> c_int;
    fn vla_accelerator_empty_cache(err: *mut c_char, err_len: usize) -> c_int;
}

/// Errors of the memory queries.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// libtorch raised an error while reading or resetting allocator statistics.
    #[error("accelerator {device}: allocator statistics failed: {message}")]
    Allocator {
        /// Accelerator index.
        device: usize,
        /// libtorch's message.
        message: String,
    },
    /// /proc could not be read or parsed.
    #[error("{path}: {message}")]
    Proc {
        /// The /proc file.
        path: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// Caching-allocator statistics of one accelerator, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceleratorMemory {
    /// Bytes held by live tensors now (`torch.cuda.memory_allocated`).
    pub allocated: u64,
    /// Highest `allocated` since the last reset (`torch.cuda.max_memory_allocated`).
    pub peak_allocated: u64,
    /// Bytes reserved from the device by the allocator now (`torch.cuda.memory_reserved`).
    pub reserved: u64,
    /// Highest `reserved` since the last reset (`torch.cuda.max_memory_reserved`).
    pub peak_reserved: u64,
}

const ERR_LEN: usize = 512;

fn message(buf: &[c_char]) -> String {
    // SAFETY: the shim always NUL-terminates within the buffer (which starts zeroed).
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// Allocator statistics of accelerator `device`, or `None` when there is no such accelerator.
pub fn accelerator_memory(device: usize) -> Result<Option<AcceleratorMemory>, MemoryError> {
    let mut out = [0i64; 4];
    let mut err = [0 as c_char; ERR_LEN];
    let index = c_int::try_from(device).unwrap_or(c_int::MAX);
    // SAFETY: `out` holds the 4 values the shim writes; `err` is a writable buffer of ERR_LEN.
    let rc = unsafe { vla_accelerator_memory_stats(index, out.as_mut_ptr(), err.as_mut_ptr(), ERR_LEN) };
    match rc {
        1 => Ok(Some(AcceleratorMemory {
            allocated: out[0].max(0) as u64,
            peak_allocated: out[1].max(0) as u64,
            reserved: out[2].max(0) as u64,
            peak_reserved: out[3].max(0) as u64,
        })),
        0 => Ok(None),
        _ => Err(MemoryError::Allocator { device, message: message(&err) }),
    }
}

/// Free and total memory of one accelerator, in bytes (`torch.cuda.mem_get_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceleratorCapacity {
    /// Bytes the device can still hand out (other processes' use and this process's reserved
    /// but unused allocator blocks count as used).
    pub free: u64,
    /// The device's total memory.
    pub total: u64,
}

/// Free/total memory of accelerator `device`, or `None` when there is no such accelerator.
pub fn accelerator_capacity(device: usize) -> Result<Option<AcceleratorCapacity>, MemoryError> {
    let mut out = [0i64; 2];
    let mut err = [0 as c_char; ERR_LEN];
    let index = c_int::try_from(device).unwrap_or(c_int::MAX);
    // SAFETY: `out` holds the 2 values the shim writes; `err` is a writable buffer of ERR_LEN.
    let rc = unsafe { vla_accelerator_memory_info(index, out.as_mut_ptr(), err.as_mut_ptr(), ERR_LEN) };
    match rc {
        1 => Ok(Some(AcceleratorCapacity { free: out[0].max(0) as u64, total: out[1].max(0) as u64 })),
        0 => Ok(None),
        _ => Err(MemoryError::Allocator { device, message: message(&err) }),
    }
}

/// Peak bytes allocated on accelerator `device` since the last reset, like
/// `torch.cuda.max_memory_allocated(device)`; `None` without such an accelerator.
pub fn max_memory_allocated(device: usize) -> Result<Option<u64>, MemoryError> {
    Ok(accelerator_memory(device)?.map(|m| m.peak_allocated))
}

/// Resets the peak statistics of accelerator `device` (`torch.cuda.reset_peak_memory_stats`).
/// Returns whether an accelerator was there to reset.
pub fn reset_peak_memory_stats(device: usize) -> Result<bool, MemoryError> {
    let mut err = [0 as c_char; ERR_LEN];
    let index = c_int::try_from(device).unwrap_or(c_int::MAX);
    // SAFETY: `err` is a writable buffer of ERR_LEN bytes.
    let rc = unsafe { vla_accelerator_reset_peak(index, err.as_mut_ptr(), ERR_LEN) };
    match rc {
        1 => Ok(true),
        0 => Ok(false),
        _ => Err(MemoryError::Allocator { device, message: message(&err) }),
    }
}

/// Returns the caching allocator's unused blocks to the accelerator (`torch.cuda.empty_cache`),
/// so `reserved` drops to what live tensors hold. Returns whether an accelerator was there.
pub fn release_cached_accelerator_memory() -> Result<bool, MemoryError> {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: `err` is a writable buffer of ERR_LEN bytes.
    let rc = unsafe { vla_accelerator_empty_cache(err.as_mut_ptr(), ERR_LEN) };
    match rc {
        1 => Ok(true),
        0 => Ok(false),
        _ => Err(MemoryError::Allocator { device: 0, message: message(&err) }),
    }
}

/// Host memory of this process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// Resident set size now (`VmRSS`).
    pub rss: u64,
    /// Resident set high-water mark (`VmHWM`), since process start or the last successful reset.
    pub peak_rss: u64,
}

const STATUS: &str = "/proc/self/status";

/// Reads `VmRSS` and `VmHWM` from /proc/self/status (Linux).
pub fn host_memory() -> Result<HostMemory, MemoryError> {
    let text =
        std::fs::read_to_string(STATUS).map_err(|e| MemoryError::Proc { path: STATUS, message: e.to_string() })?;
    parse_status(&text)
}

/// Parses the `VmRSS`/`VmHWM` lines of a /proc/<pid>/status text.
pub fn parse_status(text: &str) -> Result<HostMemory, MemoryError> {
    let field = |name: &str| -> Result<u64, MemoryError> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))
            .ok_or_else(|| MemoryError::Proc { path: STATUS, message: format!("no {name} line") })?;
        let rest = line[name.len() + 1..].trim();
        let kb = rest.strip_suffix("kB").map(str::trim).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
            MemoryError::Proc { path: STATUS, message: format!("{name}: expected `<n> kB`, found `{rest}`") }
        })?;
        Ok(kb * 1024)
    };
    Ok(HostMemory { rss: field("VmRSS")?, peak_rss: field("VmHWM")? })
}

/// Resets the host high-water mark to the current RSS by writing `5` to /proc/self/clear_refs.
/// Returns `Ok(false)` when the kernel refuses it (no such file or not permitted): the peak
/// then keeps counting from process start.
pub fn reset_host_peak() -> Result<bool, MemoryError> {
    const CLEAR_REFS: &str = "/proc/self/clear_refs";
    match std::fs::write(CLEAR_REFS, b"5") {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied) => Ok(false),
        Err(e) => Err(MemoryError::Proc { path: CLEAR_REFS, message: e.to_string() }),
    }
}

/// Peak memory since the last [`reset_peaks`]: host always, accelerator when present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeakMemory {
    /// Host RSS high-water mark, bytes.
    pub host_peak: u64,
    /// Accelerator allocator peak, bytes (`None` without an accelerator).
    pub accelerator_peak: Option<u64>,
}

/// Resets both peaks (accelerator `device` and host); returns whether the host reset took effect.
pub fn reset_peaks(device: usize) -> Result<bool, MemoryError> {
    reset_peak_memory_stats(device)?;
    reset_host_peak()
}

/// Reads both peaks for progress reports.
pub fn peaks(device: usize) -> Result<PeakMemory, MemoryError> {
    Ok(PeakMemory { host_peak: host_memory()?.peak_rss, accelerator_peak: max_memory_allocated(device)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines_in_kib() {
        let text = "Name:\tx\nVmPeak:\t  999 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(parse_status(text).unwrap(), HostMemory { rss: 1024 * 1024, peak_rss: 2048 * 1024 });
    }

    #[test]
    fn missing_or_malformed_lines_are_named() {
        let err = parse_status("VmRSS:\t1 kB\n").unwrap_err().to_string();
        assert!(err.contains("VmHWM"), "{err}");
        let err = parse_status("VmRSS:\tlots\nVmHWM:\t1 kB\n").unwrap_err().to_string();
        assert!(err.contains("VmRSS") && err.contains("lots"), "{err}");
    }
}
