//! The destination side: `ferry receive` takes one incoming VM. Memory lands in guest RAM as
//! it arrives; the VM is built only from state that arrived complete and checked (frame
//! checksums, page totals, versioned state sections), and it runs only after the source's
//! Commit, unless a Resolve fenced it first.
//!
//! ```text
//!  listener thread ── Hello, Setup ──▶ main thread: allocate, SetupOk
//!        │                              reader thread ─▶ apply pages ─▶ Applied ─▶ source
//!        │ (Resolve: answer, fence)     State, Complete ─▶ build the VM ─▶ Prepared
//!        ▼                              Commit (not fenced) ─▶ run ─▶ Running
//!  serves bad connections, Resolve and refusals until the process ends
//! ```

mod apply;
mod direct_io;
mod disks;
mod listener;
mod prefault;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::migration::{
    write_message, AbortKind, Applied, Message, ReceiverMachine, Running,
};
use vm_memory::Address;

use crate::api;
use crate::config::ConsoleConfig;
use crate::memory;
use crate::migration::session::PatientWriter;
use crate::migration::wire::{TlsConfig, TlsError};
use crate::snapshot::state::VmState;
use crate::vmm::{check_fits, open_kvm, open_taps, Attachments, Skeleton, Vm, VmExit};
use crate::VmmError;
use apply::{AppliedTotals, Reader};
use ferry_devices::virtio::net::TapConfig;
use listener::{Conn, Handover, Incoming};

/// How long the destination waits for the source between messages before it gives up.
const SILENCE: Duration = Duration::from_secs(10);
/// Applied goes out after a batch, at most this often.
const REPORT_EVERY: Duration = Duration::from_millis(2);

/// What `ferry receive` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// `ADDR:PORT` to listen on.
    pub listen: String,
    /// Where the VM's disks go, in their order: a moving disk is written there, a shared
    /// one opened there; a shared disk without one keeps the source's path.
    pub disks: Vec<PathBuf>,
    /// A moving disk may replace an existing file.
    pub overwrite: bool,
    /// Test aid: moving disks are written no faster than this many bytes per second.
    pub disk_write_limit: Option<u64>,
    /// The taps the VM's NICs go on, in their order. They are opened before the receiver
    /// listens, so a missing tap fails at once, not after the VM's memory has crossed.
    pub nics: Vec<TapConfig>,
    /// Mutual TLS: the folder with `ca.pem`, `cert.pem` and `key.pem`. Sources must then
    /// use TLS with a certificate of the same CA.
    pub tls_dir: Option<PathBuf>,
    /// What backs the arriving VM's memory.
    pub memory_backing: memory::MemoryBacking,
    pub api_socket: Option<PathBuf>,
    pub console: ConsoleConfig,
    /// How receiving shares the CPU with the host's running VMs until the bulk copy is in.
    pub copy_priority: crate::sched::CopyPriority,
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
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The migration connection on the main thread.
struct Link {
    /// What the migration arrived on, for its timeouts and for ending it.
    conn: Conn,
    writer: Box<dyn std::io::Write + Send>,
    machine: Arc<Mutex<ReceiverMachine>>,
    /// The connection's reading side until the reader thread takes it (once guest memory
    /// exists, so it can fault memory in ahead of the pages).
    unread: Option<std::io::BufReader<Box<dyn std::io::Read + Send>>>,
    reader: Option<Reader>,
    /// The migration's threads on this side.
    crew: crate::sched::Crew,
}

impl Drop for Link {
    /// A session ends with what was written delivered (an Abort, Running) and a Close, so
    /// the source hears of the end at once and does not try to resume.
    fn drop(&mut self) {
        self.conn.end();
    }
}

impl Link {
    fn send(&mut self, m: &Message) -> Result<(), String> {
        self.machine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sent(m)
            .map_err(|e| e.to_string())?;
        write_message(&mut self.writer, m).map_err(|e| format!("sending to the source: {e}"))
    }

    /// Starts the reader thread; `memory` is faulted in ahead of the pages that fill it.
    fn start_reading(&mut self, memory: &ferry_devices::GuestMemory) -> Result<(), String> {
        let unread = self.unread.take().ok_or("the reader runs already")?;
        let reader = Reader::start(
            unread,
            self.machine.clone(),
            Some(prefault::Prefaulter::new(memory)),
        )
        .map_err(|e| format!("cannot start the reader thread: {e}"))?;
        self.reader = Some(reader);
        Ok(())
    }

    fn receive(&mut self) -> Result<Message, String> {
        let reader = self.reader.as_ref().ok_or("nothing reads the connection")?;
        match reader.next()? {
            Message::Abort(why) => Err(format!("the source aborted: {why}")),
            m => Ok(m),
        }
    }

    fn recycle(&self, buffer: Vec<u8>) {
        if let Some(r) = &self.reader {
            r.recycle(buffer);
        }
    }
}

/// Waits for one VM on `config.listen`, receives it, and runs it after the source commits.
/// Prints `listening on ADDR` on stderr once ready for the source. Connections that fail
/// before a migration starts (garbage, silence, a wrong version) are refused and the receiver
/// waits for the next; the API socket answers meanwhile.
pub fn receive_and_run(config: ReceiveConfig) -> Result<VmExit, VmmError> {
    // This thread applies the pages and answers the handover; it joins the migration's crew
    // once one arrives.
    crate::sched::latency_critical();
    let (kvm, host_memory) = open_kvm()?;
    let taps = open_taps(&config.nics)?;
    let tls = config
        .tls_dir
        .as_deref()
        .map(TlsConfig::load)
        .transpose()
        .map_err(ReceiveError::Tls)?;
    let mut api_socket = config.api_socket.as_deref().map(api::bind).transpose()?;
    let waiting_api = match api_socket.as_mut() {
        Some(socket) => Some(serve_waiting_api(socket)?),
        None => None,
    };
    let listener = TcpListener::bind(&config.listen).map_err(|source| ReceiveError::Listen {
        addr: config.listen.clone(),
        source,
    })?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(config.listen.clone());
    let handover = Arc::new(Handover::new(config.copy_priority));
    let (migrations_tx, migrations) = std::sync::mpsc::channel();
    listener::spawn(listener, tls, handover.clone(), migrations_tx).map_err(VmmError::Thread)?;
    eprintln!("ferry: listening on {local}");
    let incoming = migrations
        .recv()
        .map_err(|_| VmmError::Internal("the migration listener ended"))?;
    tracing::info!("incoming migration from {}", incoming.peer);
    let before = |e: String| VmmError::Receive(ReceiveError::BeforeHandover(e));
    let Incoming {
        conn,
        writer,
        reader,
        machine,
        setup,
        features,
        crew,
        ..
    } = incoming;
    conn.set_timeouts(SILENCE)
        .map_err(|e| before(e.to_string()))?;
    let writer: Box<dyn std::io::Write + Send> = match &conn {
        // A session's writes wait out a lost link for as long as reads do.
        Conn::Session(session) => Box::new(PatientWriter {
            inner: session.writer(),
            patience: SILENCE + session.config().resume_window,
        }),
        Conn::Tcp(_) => writer,
    };
    let machine = Arc::new(Mutex::new(machine));
    let mut link = Link {
        conn,
        writer,
        machine,
        unread: Some(reader),
        reader: None,
        crew,
    };
    let attach = Attachments {
        disks: config.disks,
        nics: config.nics,
        api_socket: None,
        console: config.console,
    };
    let landing_paths = attach.disks.clone();
    let received = receive_state(
        &mut link,
        &setup,
        features.flow_control,
        (host_memory, config.memory_backing),
        &kvm,
        taps.len(),
        |setup| {
            disks::Landing::prepare(
                setup,
                &landing_paths,
                config.overwrite,
                config.disk_write_limit,
            )
        },
    );
    let t_complete = Instant::now();
    let (state, skeleton, landing) = match received {
        Ok(v) => v,
        Err(Refusal(kind, e)) => {
            let _ = link.send(&Message::abort_as(kind, e.clone()));
            return Err(before(e));
        }
    };
    // Every write the guest saw flushed must be durable here before it runs here: the last
    // sync runs while the VM is built, and Prepared waits for it.
    let synced = landing.sync_in_background();
    // The API socket passes from the waiting answerer to the VM.
    if let Some(server) = waiting_api {
        server.stop(Duration::from_millis(200));
    }
    let api_socket = match api_socket.take() {
        Some(old) => {
            let path = old.path().to_path_buf();
            drop(old);
            Some(api::bind(&path)?)
        }
        None => None,
    };
    let vm = match check_fits(&kvm, host_memory, &state, &attach)
        .and_then(|fit| Vm::from_parts(skeleton, state, fit, taps, api_socket, &attach.console))
    {
        Ok(vm) => vm,
        Err(e) => {
            // The VM does not fit: its state, its disks or this host's limits.
            let why = crate::error_chain(&e);
            let _ = link.send(&Message::abort_as(AbortKind::Resources, why.clone()));
            return Err(before(why));
        }
    };
    if let Err(Refusal(kind, why)) = synced.wait() {
        let _ = link.send(&Message::abort_as(kind, why.clone()));
        return Err(before(why));
    }
    if crate::migration::fault("stall-prepare") {
        tracing::warn!("FERRY_TEST_FAULT: Prepared is held back for 5 s");
        std::thread::sleep(Duration::from_secs(5));
    }
    if crate::migration::fault("slow-prepare") {
        tracing::warn!("FERRY_TEST_FAULT: Prepared is held back for 300 ms");
        std::thread::sleep(Duration::from_millis(300));
    }
    link.send(&Message::Prepared).map_err(before)?;
    tracing::info!(
        "prepared {:.2} ms after Complete",
        t_complete.elapsed().as_secs_f64() * 1e3
    );
    // Without Commit the VM is discarded: the source resumes it.
    match link.receive() {
        Ok(Message::Commit) => tracing::info!("commit received"),
        Ok(other) => return Err(before(format!("expected commit, got {}", other.kind()))),
        Err(e) => return Err(before(e)),
    }
    if !handover.commit() {
        drop(vm);
        drop(landing);
        return Err(before(
            "the source asked whether this VM runs before its Commit arrived, and was told \
             it does not; so it never will"
                .into(),
        ));
    }
    let committed = Instant::now();
    // The VM is ours: its disks stay.
    landing.keep();
    vm.run_with(Some(Box::new(move || {
        let resume_ms = committed.elapsed().as_secs_f64() * 1e3;
        if crate::migration::fault("lose-running") {
            tracing::warn!("FERRY_TEST_FAULT: Running is not sent");
            link.conn.cut();
            return;
        }
        if let Err(e) = link.send(&Message::Running(Running { resume_ms })) {
            // The VM is ours now whatever happens to the source's connection.
            tracing::warn!("cannot confirm to the source that the VM runs: {e}");
        }
        // Running is delivered (or the source resolves), then the session ends; off the
        // VM's path.
        let _ = crate::sched::spawn("ferry-sess-end".into(), move || link.conn.end());
    })))
}

/// Why the destination gives up, and what kind of refusal that is for the source.
#[derive(Debug)]
struct Refusal(AbortKind, String);

impl From<String> for Refusal {
    fn from(why: String) -> Refusal {
        Refusal(AbortKind::Failed, why)
    }
}

impl From<&str> for Refusal {
    fn from(why: &str) -> Refusal {
        Refusal(AbortKind::Failed, why.into())
    }
}

/// Runs the conversation from SetupOk up to Complete: memory, then state.
fn receive_state(
    link: &mut Link,
    setup: &ferry_proto::migration::Setup,
    flow_control: bool,
    (host_memory, backing): (u64, memory::MemoryBacking),
    kvm: &kvm_ioctls::Kvm,
    taps: usize,
    prepare_disks: impl FnOnce(&ferry_proto::migration::Setup) -> Result<disks::Landing, Refusal>,
) -> Result<(VmState, Skeleton, disks::Landing), Refusal> {
    let lacking = |why: String| Refusal(AbortKind::Resources, why);
    if setup.memory_bytes > host_memory {
        return Err(lacking(format!(
            "the VM has {} MiB of memory; this host has {} MiB",
            setup.memory_bytes >> 20,
            host_memory >> 20
        )));
    }
    if setup.nics as usize != taps {
        return Err(lacking(format!(
            "the VM has {} NIC(s); this receiver was given {taps} tap(s) (--net tap=NAME, one \
             per NIC)",
            setup.nics
        )));
    }
    if setup.vcpus == 0 || usize::from(setup.vcpus) > kvm.get_max_vcpus() {
        return Err(lacking(format!(
            "{} vCPUs do not fit this host",
            setup.vcpus
        )));
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
        return Err(Refusal(
            AbortKind::Incompatible,
            "the memory layout is not one this ferry builds".into(),
        ));
    }
    let mem = memory::create_backed_guest_memory(setup.memory_bytes, backing)
        .map_err(|e| lacking(crate::error_chain(&e)))?;
    // The VM, its memory slots and its vCPUs are built now, while pages stream in, not in the
    // downtime.
    let skeleton =
        Skeleton::new(kvm, mem, setup.vcpus).map_err(|e| lacking(crate::error_chain(&e)))?;
    let mem = skeleton.memory().clone();
    let mut landing = prepare_disks(setup)?;
    // This thread, the reader and the prefault workers join the migration's crew: in the
    // background (if asked) until the bulk copy is in, so the host's running VMs come first.
    let crew = link.crew.clone();
    let _member = crew.enter(crate::sched::Role::Handover);
    link.start_reading(&mem)?;
    link.send(&Message::SetupOk)?;

    let mut totals = AppliedTotals::default();
    let mut pages = apply::PageApplier::default();
    let mut state = None;
    loop {
        match link.receive()? {
            Message::Pages(batch) => {
                for record in batch.records() {
                    let record = record.map_err(|e| e.to_string())?;
                    totals.pages += record.page_count();
                    totals.bytes += pages.apply(&mem, record)?;
                }
                link.recycle(batch.into_bytes());
                if flow_control && totals.due(REPORT_EVERY) {
                    report(link, &mut totals)?;
                }
            }
            Message::Blocks(batch) => {
                let written = landing.apply(&batch)?;
                // The reader fills the buffer again: no fresh memory per batch.
                link.recycle(batch.into_bytes());
                totals.bytes += written;
                totals.disk_bytes += written;
                if flow_control && totals.due(REPORT_EVERY) {
                    report(link, &mut totals)?;
                }
            }
            Message::IterationDone(d) => {
                // The bulk copy is in: the rest is the guest's convergence and downtime.
                crew.bulk_done();
                tracing::info!(
                    "pass {} done: {} data and {} zero pages",
                    d.iteration,
                    d.pages_sent,
                    d.zero_pages
                );
                // What the disks got so far becomes durable off the downtime, and a slow
                // disk holds the pass's Applied back: the source sees the backlog.
                landing.sync()?;
                // The end of a pass: say where we are even if a report was skipped.
                if flow_control {
                    report(link, &mut totals)?;
                }
            }
            Message::State(bytes) => {
                crew.bulk_done();
                tracing::info!("state: {} bytes", bytes.len());
                state = Some(
                    crate::snapshot::format::read_state(&mut std::io::Cursor::new(&bytes))
                        .map_err(|e| {
                            Refusal(
                                AbortKind::Incompatible,
                                format!("the VM state does not decode: {}", crate::error_chain(&e)),
                            )
                        })?,
                );
            }
            // The protocol machine checked the page totals against what arrived.
            Message::Complete(_) => {
                tracing::info!("complete: {} pages applied", totals.pages);
                break;
            }
            other => return Err(format!("unexpected {} during the transfer", other.kind()).into()),
        }
    }
    let state: VmState = state.ok_or("the source completed without sending the VM state")?;
    if state.machine.memory_bytes != setup.memory_bytes || state.machine.vcpus != setup.vcpus {
        return Err("the VM state does not match the setup".into());
    }
    Ok((state, skeleton, landing))
}

fn report(link: &mut Link, totals: &mut AppliedTotals) -> Result<(), String> {
    totals.reported_at = Some(Instant::now());
    link.send(&Message::Applied(Applied {
        bytes: totals.bytes,
        pages: totals.pages,
        disk_bytes: totals.disk_bytes,
    }))
}

/// Answers the API while no VM exists yet: every request learns that this process is
/// waiting for (or receiving) a migration.
fn serve_waiting_api(socket: &mut api::ApiSocket) -> Result<api::ApiServer, VmmError> {
    let (events, requests) = std::sync::mpsc::channel::<crate::event::VmmEvent>();
    let server = api::serve(
        socket,
        api::ApiState {
            events,
            progress: Arc::default(),
        },
    )?;
    std::thread::Builder::new()
        .name("ferry-api-wait".into())
        .spawn(move || {
            while let Ok(event) = requests.recv() {
                if let crate::event::VmmEvent::Api(request) = event {
                    let _ = request.reply.send(Err(crate::event::ApiFailure {
                        status: 503,
                        message: "no VM here yet: this ferry is waiting for an incoming \
                                  migration"
                            .into(),
                    }));
                }
            }
        })
        .map_err(VmmError::Thread)?;
    Ok(server)
}
