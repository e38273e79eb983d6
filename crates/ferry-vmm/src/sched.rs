//! How a migration's threads are scheduled: through its bulk copy, then promptly for the
//! handover.
//!
//! **The bulk copy.** A live migration's copy (a disk's bulk copy, memory's first pass) is the
//! heaviest work it does, and it runs beside the guest it moves. A migration's threads form a
//! [`Crew`], which runs the bulk copy with the default slice: with the short slices below, its
//! half-dozen busy threads preempted the guest's vCPU at every wakeup, and on two cores a
//! guest writing its disk kept 45 % of its rate against 60 % without, while the copy itself
//! took longer (2.5 s against 1.9 s). With [`CopyPriority::Background`] the crew also runs
//! at a nice value [`BACKGROUND_NICE`] above the process's until the bulk copy is done, so the
//! guest (and, on the destination, the host's other VMs) comes first: that guest kept 95 %
//! of its rate (bench median), and the copy took 1.6× as long; a host with idle cores loses
//! nothing. Giving the nice value back needs `CAP_SYS_NICE` or a permissive `RLIMIT_NICE`; a
//! process without either copies at normal priority.
//!
//! **Prompt wakeups.** While the guest is paused, every message of the handover (the last
//! pages, the state, Prepared, Commit, Running) passes through a chain of threads on both
//! hosts, and each one must get a core as soon as it is woken. Linux's fair scheduler (EEVDF,
//! 6.6 on) lets a running thread finish its slice (about 3 ms) before a woken thread of the
//! same weight may take its core. Measured here on two cores: when the destination's vCPU
//! started on the core a woken migration thread was queued on, that thread waited 2.8–3.9 ms
//! for it, while the other core stood idle, and the handover's downtime doubled.
//!
//! Since Linux 6.12 a fair thread may ask for a shorter slice (`sched_attr.sched_runtime`),
//! and a woken thread with a shorter slice preempts the running one. The handover's threads
//! run for microseconds at a time, so a short slice costs them nothing, and they keep their
//! normal policy and weight: no real-time priority and no privilege is needed. Older kernels
//! accept the call and ignore the slice. Once the bulk copy is done
//! ([`Crew::bulk_done`]), the crew's threads on the handover's path take it.
//!
//! The device event loop asks for the short slice too: the guest waits on each disk request
//! it queues, and a device thread woken behind a migration's busy thread stalled the guest's
//! I/O for a slice.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

pub use ferry_api::CopyPriority;

/// The slice asked for: the least Linux grants (0.1 ms).
const SLICE_NS: u64 = 100_000;
/// How much nicer than the process a crew in the background runs: at nice 10 a busy thread
/// weighs a tenth of a nice-0 one.
pub const BACKGROUND_NICE: i32 = 10;
/// The highest nice value Linux has.
const MAX_NICE: i32 = 19;
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

/// The calling thread's id, as the scheduler calls it.
fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The calling thread's nice value.
fn own_nice() -> i32 {
    // SAFETY: getpriority only reads the calling thread's nice value. It cannot fail for the
    // calling thread, so -1 is a nice of -1.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Sets thread `tid`'s nice value and slice (`runtime_ns`, 0: the default), keeping its
/// policy; a thread whose policy is not the normal one (batch, idle, real-time: the operator
/// chose) is left alone.
fn set_fair(tid: libc::pid_t, nice: i32, runtime_ns: u64, flags: u64) -> std::io::Result<()> {
    // SAFETY: sched_getscheduler only reads thread `tid`'s policy (-1 if it is gone).
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A thread that asked for reset-on-fork (a short slice did) reports it in the policy.
    let policy = policy & !libc::SCHED_RESET_ON_FORK;
    if policy != libc::SCHED_OTHER {
        tracing::debug!("scheduling policy {policy}: thread {tid} keeps it");
        return Ok(());
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice,
        runtime: runtime_ns,
        flags,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `size` bytes of `attr`, a live value of that size laid out
    // as the kernel's struct sched_attr; `tid` is a thread id (an unknown one fails with
    // ESRCH); the call's flags are 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid,
            &attr as *const SchedAttr,
            0u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for a short scheduler slice for the calling thread, keeping its policy (normal) and
/// its nice value; the threads it starts later get the default slice. A thread with another
/// policy (batch, real-time), or with a negative nice, is left alone: the kernel's reset for
/// its children would also reset their nice to 0, and an operator who raised ferry's
/// priority keeps it for every thread.
/// Failure is harmless (the thread just waits its turn as before): it is logged, not
/// returned.
pub fn latency_critical() {
    let nice = own_nice();
    if nice < 0 {
        tracing::debug!("nice {nice}: this thread keeps its scheduler slice");
        return;
    }
    if let Err(e) = set_fair(0, nice, SLICE_NS, SCHED_FLAG_RESET_ON_FORK) {
        tracing::debug!("no short scheduler slice for this thread: {e}");
    }
}

/// Whether this process may give a thread its nice value back after raising it: tried on a
/// thread of its own, so capabilities, `RLIMIT_NICE` and security modules all have their say.
fn can_restore_nice(base: i32) -> bool {
    if base + 1 > MAX_NICE {
        return false;
    }
    let probe = std::thread::Builder::new()
        .name("ferry-nice-probe".into())
        .spawn(move || {
            // SAFETY: setpriority changes only the calling thread's nice value.
            let raised = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, base + 1) } == 0;
            // SAFETY: as above.
            raised && unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, base) } == 0
        });
    probe.is_ok_and(|t| t.join().unwrap_or(false))
}

/// What a member of a [`Crew`] does, which decides its slice in the foreground.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// On the handover's path (a link or session thread, the worker, the receiver): a short
    /// slice in the foreground.
    Handover,
    /// Busy for long stretches (an encoder, a prefault worker): the default slice, so it does
    /// not preempt the guest at every wakeup.
    Bulk,
}

#[derive(Debug)]
struct CrewState {
    /// In the bulk phase: the default slice, at `bulk_nice`.
    bulk: bool,
    /// The nice value of the thread that made the crew: the foreground's.
    base_nice: i32,
    /// The bulk phase's nice value: `base_nice`, or higher for a background copy.
    bulk_nice: i32,
    /// Live members by membership number: their thread ids and roles.
    members: BTreeMap<u64, (libc::pid_t, Role)>,
    next: u64,
}

impl CrewState {
    /// Schedules member `tid` for the crew's phase (failures are harmless, and logged).
    fn apply(&self, tid: libc::pid_t, role: Role) {
        let result = if self.bulk {
            set_fair(tid, self.bulk_nice, 0, 0)
        } else {
            foreground(tid, role, self.base_nice)
        };
        if let Err(e) = result {
            tracing::debug!("cannot schedule thread {tid} for its migration: {e}");
        }
    }
}

/// The foreground for a thread in `role` at nice `base`: a short slice on the handover's
/// path, unless the nice value is negative (as in [`latency_critical`]).
fn foreground(tid: libc::pid_t, role: Role, base: i32) -> std::io::Result<()> {
    if base >= 0 && role == Role::Handover {
        set_fair(tid, base, SLICE_NS, SCHED_FLAG_RESET_ON_FORK)
    } else {
        set_fair(tid, base, 0, 0)
    }
}

/// The threads of one migration (on either host), scheduled together through two phases:
/// the bulk copy (the default slice; a higher nice value for a background copy, if the
/// process may lower it again), then the rest (short slices for the handover's path).
/// Cloning gives another handle on the same crew.
#[derive(Debug, Clone)]
pub struct Crew {
    state: Arc<Mutex<CrewState>>,
}

impl Default for Crew {
    /// A crew past its bulk phase from the start.
    fn default() -> Self {
        let crew = Crew::new(CopyPriority::Normal);
        crew.lock().bulk = false;
        crew
    }
}

thread_local! {
    /// The crew the calling thread belongs to, if any.
    static CURRENT: RefCell<Option<Crew>> = const { RefCell::new(None) };
}

impl Crew {
    /// A crew at the calling thread's nice value, in its bulk phase until
    /// [`Crew::bulk_done`].
    pub fn new(priority: CopyPriority) -> Crew {
        let base_nice = own_nice();
        let background = priority == CopyPriority::Background && {
            let allowed = can_restore_nice(base_nice);
            if !allowed {
                tracing::info!(
                    "the migration's copy runs at normal priority: this process could not \
                     give its threads their nice value back (it needs CAP_SYS_NICE or \
                     RLIMIT_NICE)"
                );
            }
            allowed
        };
        let bulk_nice = if background {
            (base_nice + BACKGROUND_NICE).min(MAX_NICE)
        } else {
            base_nice
        };
        Crew {
            state: Arc::new(Mutex::new(CrewState {
                bulk: true,
                base_nice,
                bulk_nice,
                members: BTreeMap::new(),
                next: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CrewState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The crew of the calling thread, if it belongs to one.
    pub fn current() -> Option<Crew> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Whether the crew is in its bulk phase, in the background.
    #[cfg(test)]
    pub fn is_background(&self) -> bool {
        let s = self.lock();
        s.bulk && s.bulk_nice != s.base_nice
    }

    /// Whether the crew is in its bulk phase.
    #[cfg(test)]
    pub fn in_bulk(&self) -> bool {
        self.lock().bulk
    }

    /// Makes the calling thread a member in `role` until the returned guard is dropped: it
    /// takes the crew's current scheduling, follows its changes, and threads it starts with
    /// [`spawn`] join too. Leaving puts the thread in the foreground.
    pub fn enter(&self, role: Role) -> Membership {
        let tid = gettid();
        let id = {
            let mut s = self.lock();
            let id = s.next;
            s.next += 1;
            s.members.insert(id, (tid, role));
            s.apply(tid, role);
            id
        };
        let outer = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        Membership {
            crew: self.clone(),
            id,
            outer,
        }
    }

    /// Ends the bulk phase for every member, and every later one: the crew's nice value,
    /// short slices on the handover's path. Called once the bulk copy is done; again is
    /// harmless.
    pub fn bulk_done(&self) {
        let mut s = self.lock();
        if !s.bulk {
            return;
        }
        s.bulk = false;
        for &(tid, role) in s.members.values() {
            s.apply(tid, role);
        }
        tracing::debug!("the migration's bulk copy is done: its threads are in the foreground");
    }
}

/// A thread's place in a [`Crew`]; dropping it takes the thread out (before its id can be
/// reused) and restores the crew it was in before.
#[derive(Debug)]
pub struct Membership {
    crew: Crew,
    id: u64,
    outer: Option<Crew>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        {
            let mut s = self.crew.lock();
            if let Some((tid, role)) = s.members.remove(&self.id) {
                if s.bulk {
                    // A thread that goes on (a receiver's main thread after a failed
                    // migration) must not stay in the bulk phase.
                    if let Err(e) = foreground(tid, role, s.base_nice) {
                        tracing::debug!("cannot schedule thread {tid} after its migration: {e}");
                    }
                }
            }
        }
        let outer = self.outer.take();
        CURRENT.with(|c| *c.borrow_mut() = outer);
    }
}

/// Starts a thread named `name` that joins `crew` in `role`, or the calling thread's crew
/// when `crew` is `None`. A thread of no crew asks for a short slice ([`latency_critical`])
/// if its role is on the handover's path.
pub fn spawn_in<F, T>(
    crew: Option<&Crew>,
    role: Role,
    name: String,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let crew = crew.cloned().or_else(Crew::current);
    std::thread::Builder::new().name(name).spawn(move || {
        let _member = crew.as_ref().map(|c| c.enter(role));
        if crew.is_none() && role == Role::Handover {
            latency_critical();
        }
        f()
    })
}

/// [`spawn_in`] the calling thread's crew, on the handover's path.
pub fn spawn<F, T>(name: String, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_in(None, Role::Handover, name, f)
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

    /// Runs `f` on a fresh thread (its scheduling changes die with it) and returns its result.
    fn on_a_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("the thread ran")
    }

    /// Runs `f` on a fresh thread where this process may lower a nice value again (a crew in
    /// the background needs it); says SKIPPED elsewhere.
    fn where_renice_is_allowed(f: impl FnOnce() + Send + 'static) {
        if !on_a_thread(|| can_restore_nice(own_nice())) {
            eprintln!("SKIPPED (this process may not lower a nice value again)");
            return;
        }
        on_a_thread(f);
    }

    #[test]
    fn a_background_crew_runs_nicer_until_its_bulk_copy_is_done() {
        where_renice_is_allowed(|| {
            let base = own_nice();
            let crew = Crew::new(CopyPriority::Background);
            assert!(crew.is_background());
            let member = crew.enter(Role::Handover);
            let background = (base + BACKGROUND_NICE).min(MAX_NICE);
            assert_eq!(own_nice(), background);
            assert_ne!(
                slice_ns().expect("sched_getattr"),
                SLICE_NS,
                "no short slice meanwhile"
            );
            // A thread it starts joins, and follows the crew.
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let child = spawn("crew-child".into(), move || {
                let before = own_nice();
                let _ = wait.recv();
                (before, own_nice(), Crew::current().is_some())
            })
            .expect("spawn");
            std::thread::sleep(std::time::Duration::from_millis(20));
            crew.bulk_done();
            assert!(!crew.is_background());
            assert!(!crew.in_bulk());
            assert_eq!(own_nice(), base);
            if kernel_at_least(6, 12) && base >= 0 {
                assert_eq!(slice_ns().expect("sched_getattr"), SLICE_NS);
            }
            go.send(()).expect("the child waits");
            let (child_before, child_after, in_crew) = child.join().expect("the child ran");
            assert_eq!((child_before, child_after), (background, base));
            assert!(in_crew);
            // A thread joining later starts in the foreground.
            let late = spawn("crew-late".into(), own_nice).expect("spawn");
            assert_eq!(late.join().expect("ran"), base);
            drop(member);
            assert!(Crew::current().is_none());
        });
    }

    /// Regression: a thread that asked for a short slice reports reset-on-fork in its policy,
    /// which was taken for an operator's policy, and the thread never went to the background.
    #[test]
    fn a_thread_with_a_short_slice_still_goes_to_the_background() {
        where_renice_is_allowed(|| {
            let base = own_nice();
            latency_critical();
            let crew = Crew::new(CopyPriority::Background);
            let _member = crew.enter(Role::Handover);
            assert_eq!(own_nice(), (base + BACKGROUND_NICE).min(MAX_NICE));
        });
    }

    #[test]
    fn leaving_a_crew_in_the_background_brings_the_thread_back() {
        where_renice_is_allowed(|| {
            let base = own_nice();
            let crew = Crew::new(CopyPriority::Background);
            let member = crew.enter(Role::Bulk);
            assert_ne!(own_nice(), base);
            drop(member);
            assert_eq!(own_nice(), base);
            assert!(crew.is_background(), "the others stay where they are");
        });
    }

    /// A normal crew keeps its nice value; its handover threads take the short slice only
    /// once the bulk copy is done, and bulk workers never.
    #[test]
    fn a_normal_crew_keeps_its_nice_and_takes_short_slices_after_the_bulk_copy() {
        on_a_thread(|| {
            let base = own_nice();
            let crew = Crew::new(CopyPriority::Normal);
            assert!(!crew.is_background());
            assert!(crew.in_bulk());
            let sample = |role| {
                spawn_in(Some(&crew), role, "member".into(), || {
                    (own_nice(), slice_ns().expect("sched_getattr"))
                })
                .expect("spawn")
                .join()
                .expect("ran")
            };
            let (nice, slice) = sample(Role::Handover);
            assert_eq!(nice, base);
            assert_ne!(slice, SLICE_NS, "the default slice in the bulk phase");
            crew.bulk_done();
            let (nice, slice) = sample(Role::Handover);
            assert_eq!(nice, base);
            if kernel_at_least(6, 12) && base >= 0 {
                assert_eq!(slice, SLICE_NS);
            }
            let (nice, slice) = sample(Role::Bulk);
            assert_eq!(nice, base);
            assert_ne!(slice, SLICE_NS, "bulk workers keep the default slice");
            // A crew made outside a migration is past its bulk phase.
            assert!(!Crew::default().in_bulk());
        });
    }

    #[test]
    fn a_crew_cannot_go_to_the_background_from_the_highest_nice() {
        assert!(!can_restore_nice(MAX_NICE));
        on_a_thread(|| {
            // SAFETY: setpriority changes only the calling thread's nice value.
            let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, MAX_NICE) };
            assert_eq!(rc, 0);
            let crew = Crew::new(CopyPriority::Background);
            assert!(!crew.is_background());
        });
    }
}
