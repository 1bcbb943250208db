//! CPU priority of the calling thread: training yields the CPU to a control loop that shares the
//! machine, as on a robot computer.

/// Adds `nice` to the calling thread's nice value (Linux: per thread; threads it starts later,
/// libtorch's workers among them, inherit it). Failure only costs priority: logged, not fatal.
pub fn lower_this_thread(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: setpriority on the calling thread (Linux: PRIO_PROCESS with who = 0) has no
    // memory-safety preconditions.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::warn!("could not lower the training thread's priority by {nice}: {}", std::io::Error::last_os_error());
    }
}
