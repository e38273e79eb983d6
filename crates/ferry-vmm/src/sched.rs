//! Prompt wakeups for the threads a migration's handover waits on.
//!
//! While the guest is paused, every message of the handover (the last pages, the state,
//! Prepared, Commit, Running) passes through a chain of threads on both hosts, and each one
//! must get a core as soon as it is woken. Linux's fair scheduler (EEVDF, 6.6 on) lets a
//! running thread finish its slice (about 3 ms) before a woken thread of the same weight may
//! take its core. Measured here on two cores: when the destination's vCPU started on the core
//! a woken migration thread was queued on, that thread waited 2.8–3.9 ms for it, while the
//! other core stood idle, and the handover's downtime doubled.
//!
//! Since Linux 6.12 a fair thread may ask for a shorter slice (`sched_attr.sched_runtime`),
//! and a woken thread with a shorter slice preempts the running one. The handover's threads
//! run for microseconds at a time, so a short slice costs them nothing, and they keep their
//! normal policy and weight: no real-time priority and no privilege is needed. Older kernels
//! accept the call and ignore the slice.
//!
//! The device event loop asks for it too: the guest waits on each disk request it queues, and
//! a device thread woken behind a migration's busy thread stalled the guest's I/O for a slice.

/// The slice asked for: the least Linux grants (0.1 ms).
const SLICE_NS: u64 = 100_000;
/// Threads this one starts get the default slice back: a control loop that asks for a short
/// slice must not pass it on to the vCPUs or workers it spawns. (The reset also raises a
/// negative nice to 0, hence the check in [`latency_critical`].)
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// `struct sched_attr` as of Linux 3.14 (SCHED_ATTR_SIZE_VER0); later fields stay zero.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks for a short scheduler slice for the calling thread, keeping its policy (normal) and
/// its nice value; the threads it starts later get the default slice. A thread with another
/// policy (batch, real-time), or with a negative nice, is left alone: the kernel's reset for its children would also reset their
/// nice to 0, and an operator who raised ferry's priority keeps it for every thread.
/// Failure is harmless (the thread just waits its turn as before): it is logged, not
/// returned.
pub fn latency_critical() {
    // SAFETY: getpriority only reads the calling thread's nice value. It cannot fail for the
    // calling thread, so -1 is a nice of -1.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice < 0 {
        tracing::debug!("nice {nice}: this thread keeps its scheduler slice");
        return;
    }
    // SAFETY: sched_getscheduler only reads the calling thread's policy.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy != libc::SCHED_OTHER {
        // Batch, idle or real-time: the operator chose; leave it.
        tracing::debug!("scheduling policy {policy}: this thread keeps it");
        return;
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice,
        runtime: SLICE_NS,
        flags: SCHED_FLAG_RESET_ON_FORK,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `size` bytes of `attr`, a live value of that size laid out
    // as the kernel's struct sched_attr; pid 0 is the calling thread; the call's flags are 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if rc != 0 {
        tracing::debug!(
            "no short scheduler slice for this thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The calling thread's slice in ns, as the kernel reports it (0 before Linux 6.12).
#[cfg(test)]
fn slice_ns() -> std::io::Result<u64> {
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a live, writable value
    // of that size; pid 0 is the calling thread; flags are 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.trim().split(['.', '-']);
        let mut next = || {
            parts
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .unwrap_or(0)
        };
        (next(), next()) >= (major, minor)
    }

    #[test]
    fn a_latency_critical_thread_keeps_its_nice_and_gets_a_short_slice_where_linux_has_them() {
        std::thread::spawn(|| {
            // SAFETY: setpriority changes only the calling thread's nice value (raising it
            // needs no privilege).
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            latency_critical();
            // SAFETY: as in latency_critical.
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, 3);
            let slice = slice_ns().expect("sched_getattr");
            let child = std::thread::spawn(slice_ns)
                .join()
                .expect("the child ran")
                .expect("sched_getattr");
            if kernel_at_least(6, 12) {
                assert_eq!(slice, SLICE_NS);
                assert_ne!(child, SLICE_NS, "a thread it starts has the default slice");
            }
        })
        .join()
        .expect("the thread ran");
    }
}
