//! The destination side: `ferry receive` takes one incoming VM. Memory lands in guest RAM as
//! it arrives; the VM is built only from state that arrived complete and checked (frame
//! checksums, page totals), and it runs only after the source's Commit.

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_devices::GuestMemory;
use ferry_proto::migration::{
    read_message, write_message, Hello, Message, PageRecord, ReceiverMachine, Running, PAGE_SIZE,
    PROTOCOL_VERSION,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::source::CAPABILITIES;
use crate::api;
use crate::config::ConsoleConfig;
use crate::memory;
use crate::snapshot::state::VmState;
use crate::vmm::{check_fits, open_kvm, Attachments, Skeleton, Vm, VmExit};
use crate::VmmError;

/// How long the destination waits for the source between messages before it gives up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest VM state accepted (the frame layer bounds it too).
const MAX_STATE: usize = 64 << 20;

/// What `ferry receive` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// `ADDR:PORT` to listen on.
    pub listen: String,
    /// New paths for the VM's disks, in their order; empty keeps the source's paths.
    pub disks: Vec<PathBuf>,
    pub api_socket: Option<PathBuf>,
    pub console: ConsoleConfig,
}

/// Errors of the incoming side.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the migration failed before the handover; nothing was started: {0}")]
    BeforeHandover(String),
}

struct Incoming {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    machine: ReceiverMachine,
}

impl Incoming {
    fn send(&mut self, m: &Message) -> Result<(), String> {
        self.machine.sent(m).map_err(|e| e.to_string())?;
        write_message(&mut self.stream, m).map_err(|e| format!("sending to the source: {e}"))
    }

    fn receive(&mut self) -> Result<Message, String> {
        let m = read_message(&mut self.reader).map_err(|e| e.to_string())?;
        self.machine.received(&m).map_err(|e| e.to_string())?;
        if let Message::Abort(why) = &m {
            return Err(format!("the source aborted: {why}"));
        }
        Ok(m)
    }
}

/// Waits for one VM on `config.listen`, receives it, and runs it after the source commits.
/// Prints `listening on ADDR` on stderr once ready for the source.
pub fn receive_and_run(config: ReceiveConfig) -> Result<VmExit, VmmError> {
    let (kvm, host_memory) = open_kvm()?;
    let api_socket = config.api_socket.as_deref().map(api::bind).transpose()?;
    let listener = TcpListener::bind(&config.listen).map_err(|source| ReceiveError::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(config.listen.clone());
    eprintln!("ferry: listening on {local}");
    let (stream, peer) = listener.accept().map_err(|source| ReceiveError::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    drop(listener);
    tracing::info!("incoming migration from {peer}");
    let before = |e: String| VmmError::Receive(ReceiveError::BeforeHandover(e));
    stream
        .set_nodelay(true)
        .map_err(|e| before(e.to_string()))?;
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(|e| before(e.to_string()))?;
    let reader = BufReader::with_capacity(
        1 << 20,
        stream.try_clone().map_err(|e| before(e.to_string()))?,
    );
    let mut link = Incoming {
        stream,
        reader,
        machine: ReceiverMachine::new(),
    };

    let attach = Attachments {
        disks: config.disks,
        api_socket: None,
        console: config.console,
    };
    let (state, skeleton) = match receive_state(&mut link, host_memory, &kvm) {
        Ok(v) => v,
        Err(e) => {
            let _ = link.send(&Message::Abort(e.clone()));
            return Err(before(e));
        }
    };
    let vm = match check_fits(&kvm, host_memory, &state, &attach)
        .and_then(|disks| Vm::from_parts(skeleton, state, disks, api_socket, &attach.console))
    {
        Ok(vm) => vm,
        Err(e) => {
            let why = crate::error_chain(&e);
            let _ = link.send(&Message::Abort(why.clone()));
            return Err(before(why));
        }
    };
    link.send(&Message::Prepared).map_err(before)?;
    // Without Commit the VM is discarded: the source resumes it.
    match link.receive() {
        Ok(Message::Commit) => {}
        Ok(other) => return Err(before(format!("expected commit, got {other:?}"))),
        Err(e) => return Err(before(e)),
    }
    let committed = Instant::now();
    vm.run_with(Some(Box::new(move || {
        let resume_ms = committed.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = link.send(&Message::Running(Running { resume_ms })) {
            // The VM is ours now whatever happens to the source's connection.
            tracing::warn!("cannot confirm to the source that the VM runs: {e}");
        }
    })))
}

/// Runs the conversation up to Complete: handshake, setup, memory, state.
fn receive_state(
    link: &mut Incoming,
    host_memory: u64,
    kvm: &kvm_ioctls::Kvm,
) -> Result<(VmState, Skeleton), String> {
    match link.receive()? {
        Message::Hello(_) => {}
        other => return Err(format!("expected hello, got {other:?}")),
    }
    link.send(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        software: format!("ferry {}", env!("CARGO_PKG_VERSION")),
        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
    }))?;
    let setup = match link.receive()? {
        Message::Setup(s) => s,
        other => return Err(format!("expected setup, got {other:?}")),
    };
    if setup.memory_bytes > host_memory {
        return Err(format!(
            "the VM has {} MiB of memory; this host has {} MiB",
            setup.memory_bytes >> 20,
            host_memory >> 20
        ));
    }
    if setup.vcpus == 0 || usize::from(setup.vcpus) > kvm.get_max_vcpus() {
        return Err(format!("{} vCPUs do not fit this host", setup.vcpus));
    }
    let expected: Vec<(u64, u64)> = memory::ram_ranges(setup.memory_bytes)
        .iter()
        .map(|(a, l)| (a.raw_value(), *l as u64))
        .collect();
    let given: Vec<(u64, u64)> = setup
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.len))
        .collect();
    if expected != given {
        return Err("the memory layout is not one this ferry builds".into());
    }
    let mem =
        memory::create_guest_memory(setup.memory_bytes).map_err(|e| crate::error_chain(&e))?;
    // The VM, its memory slots and its vCPUs are built now, while pages stream in, not in the
    // downtime.
    let skeleton = Skeleton::new(kvm, mem, setup.vcpus).map_err(|e| crate::error_chain(&e))?;
    let mem = skeleton.memory().clone();
    link.send(&Message::SetupOk)?;

    let mut state = None;
    loop {
        match link.receive()? {
            Message::Pages(batch) => {
                for record in batch.records() {
                    apply(&mem, record.map_err(|e| e.to_string())?)?;
                }
            }
            Message::IterationDone(_) => {}
            Message::State(bytes) => {
                if bytes.len() > MAX_STATE {
                    return Err("the VM state is too large".into());
                }
                state = Some(
                    serde_json::from_slice::<VmState>(&bytes)
                        .map_err(|e| format!("the VM state does not decode: {e}"))?,
                );
            }
            // The protocol machine checked the page totals against what arrived.
            Message::Complete(_) => break,
            other => return Err(format!("unexpected {other:?} during the transfer")),
        }
    }
    let state = state.ok_or("the source completed without sending the VM state")?;
    if state.machine.memory_bytes != setup.memory_bytes || state.machine.vcpus != setup.vcpus {
        return Err("the VM state does not match the setup".into());
    }
    Ok((state, skeleton))
}

/// Writes one page record into guest memory; records outside RAM are refused.
fn apply(mem: &GuestMemory, record: PageRecord<'_>) -> Result<(), String> {
    match record {
        PageRecord::Data { gpa, bytes } => mem
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| format!("page {gpa:#x} is not in guest memory: {e}")),
        PageRecord::Zero { gpa, pages } => {
            let len = u64::from(pages) * PAGE_SIZE;
            let region = mem
                .find_region(GuestAddress(gpa))
                .filter(|r| gpa + len <= r.start_addr().raw_value() + r.len())
                .ok_or_else(|| format!("zero pages {gpa:#x}+{len:#x} are not in guest memory"))?;
            let _ = region;
            let host = mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|e| e.to_string())?;
            // SAFETY: the range lies inside one anonymous private mapping of guest memory
            // (checked above) and is page aligned (the protocol checks it); MADV_DONTNEED
            // makes those pages read as zero again, which is exactly the record's meaning.
            let rc = unsafe {
                libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED)
            };
            if rc != 0 {
                return Err(format!(
                    "cannot zero pages at {gpa:#x}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        }
    }
}
