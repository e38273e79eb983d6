//! One thread per vCPU, driven by messages: pause, resume, stop.
//!
//! To take a vCPU out of `KVM_RUN` the control thread sends a message and then a signal to the
//! vCPU thread. The signal handler sets `immediate_exit` in the vCPU's `kvm_run`, so a signal
//! that lands just before `KVM_RUN` still makes it return at once: no message is ever missed.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::time::Instant;

use ferry_api::ExitCounters;
use ferry_devices::GuestMemory;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::finish;
use super::state::{save_vcpu, VcpuState};
use crate::bus::Bus;
use crate::event::VmmEvent;

/// The real-time signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal's handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped `kvm_run`, set while its `VcpuFd` is
        // alive and cleared before it is dropped; a signal handler on this thread cannot race
        // with the thread itself, and `immediate_exit` is a plain byte KVM reads on entry.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Messages to a vCPU thread.
#[derive(Debug)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Stop,
    /// Read the vCPU's complete state; only answered while paused.
    SaveState(Sender<Result<VcpuState, String>>),
}

/// A vCPU's answer to [`VcpuCommand::Pause`] and [`VcpuCommand::Resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAck {
    Paused(u8),
    Resumed(u8),
}

/// Exit counters of one vCPU, read by the API while the vCPU runs.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    hlt: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
}

impl VcpuCounters {
    pub fn snapshot(&self) -> ExitCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounters {
            io_in: get(&self.io_in),
            io_out: get(&self.io_out),
            mmio_read: get(&self.mmio_read),
            mmio_write: get(&self.mmio_write),
            hlt: get(&self.hlt),
            interrupted: get(&self.interrupted),
            other: get(&self.other),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything a vCPU thread owns.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub counters: Arc<VcpuCounters>,
    pub events: Sender<VmmEvent>,
    pub commands: Receiver<VcpuCommand>,
    pub acks: Sender<VcpuAck>,
    /// The MSRs this host can save, shared by all vCPUs of the VM.
    pub msrs: Arc<Vec<u32>>,
    /// How much of its time this vCPU rests (auto-converge during a migration).
    pub throttle: Arc<super::throttle::Throttle>,
    /// Guest memory, to finish instructions KVM could not emulate.
    pub mem: GuestMemory,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What the run loop does after handling an exit.
enum Next {
    Continue,
    Fail(String),
}

impl Vcpu {
    /// Runs the vCPU until told to stop. Started running (not paused).
    pub fn run(mut self) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run()));
        self.run_loop();
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    fn run_loop(&mut self) {
        let mut paused = false;
        let mut pending = None;
        let mut pacer = super::throttle::VcpuPacer::new(self.throttle.clone());
        loop {
            if !self.handle_commands(pending.take(), &mut paused) {
                return;
            }
            let next = match self.fd.run() {
                Ok(exit) => handle_exit(
                    exit,
                    &self.io_bus,
                    &self.mmio_bus,
                    &self.counters,
                    &self.events,
                ),
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    bump(&self.counters.interrupted);
                    pending = self.rest_if_throttled(&mut pacer);
                    Next::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => Next::Fail(format!("KVM_RUN failed: {e}")),
            };
            let mut unfinished = None;
            if let Next::Fail(reason) = &next {
                if reason == INTERNAL_ERROR {
                    match finish_failed_emulation(&mut self.fd, &self.mem) {
                        Ok(()) => {
                            bump(&self.counters.other);
                            continue;
                        }
                        Err(why) => unfinished = why,
                    }
                }
            }
            if let Next::Fail(mut reason) = next {
                if reason == INTERNAL_ERROR {
                    reason = describe_internal_error(&mut self.fd);
                }
                if let Some(why) = unfinished {
                    reason = format!("{reason} ({why})");
                }
                if let Ok(regs) = self.fd.get_regs() {
                    reason = format!("{reason} at rip {:#x}", regs.rip);
                }
                let _ = self.events.send(VmmEvent::VcpuFailed {
                    id: self.id,
                    reason,
                });
                // Wait for the control loop to stop us, still answering pause and resume.
                let mut parked = true;
                while self.handle_commands(None, &mut parked) {}
                return;
            }
        }
    }

    /// Finishes an instruction whose I/O the VMM just handled: KVM completes it (writes the
    /// value read into the register, advances RIP) only on the next `KVM_RUN`, so state read
    /// before that would replay the access on restore. With `immediate_exit` set, KVM_RUN does
    /// that completion and returns EINTR without running guest code.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => tracing::warn!("vCPU {}: completing I/O before pause: {e}", self.id),
            Ok(exit) => {
                tracing::warn!("vCPU {}: unexpected exit completing I/O: {exit:?}", self.id)
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Rests the vCPU if its run window is over, waking at once for a command (which it
    /// returns, to be handled next). Kicks that came during the rest are dropped: they must
    /// not end the next run window before it began. A command sent after this returns still
    /// interrupts the next KVM_RUN, since its kick comes after the drop.
    fn rest_if_throttled(&mut self, pacer: &mut super::throttle::VcpuPacer) -> Option<VcpuCommand> {
        let rest = pacer.due_rest()?;
        let started = Instant::now();
        let command = self.commands.recv_timeout(rest).ok();
        self.fd.set_kvm_immediate_exit(0);
        pacer.rested(started.elapsed());
        command
    }

    /// Applies `first` and any pending commands; blocks while paused. Returns false when the
    /// vCPU must stop.
    fn handle_commands(&mut self, mut first: Option<VcpuCommand>, paused: &mut bool) -> bool {
        loop {
            let command = if let Some(c) = first.take() {
                c
            } else if *paused {
                match self.commands.recv() {
                    Ok(c) => c,
                    Err(_) => return false,
                }
            } else {
                match self.commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return false,
                }
            };
            match command {
                VcpuCommand::Pause => {
                    if !*paused {
                        self.complete_pending_io();
                    }
                    *paused = true;
                    let _ = self.acks.send(VcpuAck::Paused(self.id));
                }
                VcpuCommand::Resume => {
                    *paused = false;
                    let _ = self.acks.send(VcpuAck::Resumed(self.id));
                }
                VcpuCommand::Stop => return false,
                VcpuCommand::SaveState(reply) => {
                    let state = if *paused {
                        save_vcpu(&self.fd, &self.msrs)
                            .map_err(|e| format!("vCPU {}: {e}", self.id))
                    } else {
                        Err(format!("vCPU {} is running; pause it first", self.id))
                    };
                    let _ = reply.send(state);
                }
            }
        }
    }
}

const TRIPLE_FAULT: &str = "guest triple fault (KVM_EXIT_SHUTDOWN)";
const INTERNAL_ERROR: &str = "KVM internal error";

/// Says what a `KVM_EXIT_INTERNAL_ERROR` means. Where KVM emulates the guest's ring 0 (as on
/// hosts without unrestricted-guest support), a triple fault arrives here as "simultaneous
/// exceptions" rather than as `KVM_EXIT_SHUTDOWN`.
fn describe_internal_error(fd: &mut VcpuFd) -> String {
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member
    // of the exit union; reading plain integers from it cannot be invalid.
    let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
    let what = match internal.suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => {
            "guest triple fault (an exception while delivering an exception)"
        }
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "interrupt or exception delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit",
        _ => "unknown failure",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    format!(
        "{INTERNAL_ERROR} {}: {what} (data {:x?})",
        internal.suberror,
        &internal.data[..n]
    )
}

/// After KVM failed to emulate an instruction, finishes it where ferry can: today only
/// `int3` and `fwait` in a 64-bit kernel (see [`finish`]). Ok when the guest can go on;
/// otherwise why not, where there is something to say.
fn finish_failed_emulation(fd: &mut VcpuFd, mem: &GuestMemory) -> Result<(), Option<String>> {
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `emulation_failure` is the active
    // member of the exit union when the suberror says so; it holds plain integers only.
    let failure = unsafe { fd.get_kvm_run().__bindgen_anon_1.emulation_failure };
    if failure.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
        || failure.flags
            & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            == 0
    {
        return Err(None);
    }
    // SAFETY: the flag above says KVM filled the instruction bytes; they are plain bytes.
    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    if insn.insn_size == 0 {
        return Err(None);
    }
    let state = (fd.get_regs(), fd.get_sregs(), fd.get_fpu());
    let (Ok(regs), Ok(sregs), Ok(fpu)) = state else {
        return Err(Some("cannot read the vCPU's registers".into()));
    };
    let stopped = finish::Stopped {
        first_byte: insn.insn_bytes[0],
        regs: &regs,
        sregs: &sregs,
        fsw: fpu.fsw,
    };
    let regs = finish::finish(mem, &VcpuMmu(fd), &stopped).map_err(|e| Some(e.to_string()))?;
    fd.set_regs(&regs)
        .map_err(|e| Some(format!("cannot set the registers after finishing it: {e}")))
}

/// Guest page-table walks through KVM_TRANSLATE.
struct VcpuMmu<'a>(&'a VcpuFd);

impl finish::Translate for VcpuMmu<'_> {
    fn translate(&self, gva: u64) -> Option<(u64, bool)> {
        let t = self.0.translate_gva(gva).ok()?;
        (t.valid != 0).then_some((t.physical_address, t.writeable != 0))
    }
}

fn handle_exit(
    exit: VcpuExit<'_>,
    io_bus: &Bus,
    mmio_bus: &Bus,
    counters: &VcpuCounters,
    events: &Sender<VmmEvent>,
) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            bump(&counters.io_in);
            io_bus.read(u64::from(port), data);
        }
        VcpuExit::IoOut(port, data) => {
            bump(&counters.io_out);
            io_bus.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            bump(&counters.mmio_read);
            mmio_bus.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            bump(&counters.mmio_write);
            mmio_bus.write(addr, data);
        }
        VcpuExit::Hlt => bump(&counters.hlt),
        VcpuExit::Shutdown => return Next::Fail(TRIPLE_FAULT.to_string()),
        VcpuExit::SystemEvent(kind, _) => {
            bump(&counters.other);
            match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    let _ = events.send(VmmEvent::GuestShutdown {
                        how: "KVM system event",
                    });
                }
                other => return Next::Fail(format!("unexpected KVM system event {other}")),
            }
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Next::Fail(format!(
                "VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
            ))
        }
        VcpuExit::InternalError => return Next::Fail(INTERNAL_ERROR.into()),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => bump(&counters.other),
        other => return Next::Fail(format!("unhandled vCPU exit: {other:?}")),
    }
    Next::Continue
}
