//! The send path alone, measured: one full pass of the real scanner and link over guest
//! memory full of data, into a receiver on loopback that answers the handshake and then
//! discards every byte. It tells what the source can push when neither the network nor the
//! destination's memory is the limit, and what a page costs in CPU next to a plain memcpy.
//! With TLS, the receiver decrypts what it discards (it must, to read it), on a core of its
//! own when there is one; the CPU figure is the sender's alone either way.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::migration::{read_message, write_message, Hello, Message, Region, Setup};
use serde::Serialize;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::link::{self, Link, LinkConfig};
use super::scan::{Scanner, ZeroPages};
use super::CAPABILITIES;
use crate::migration::pages::PAGE;
use crate::migration::wire::pki::{self, HostSpec};
use crate::migration::wire::{server_name, TlsConfig, TlsPeer, Wire};

/// What one pass of the send path achieved.
#[derive(Debug, Clone, Serialize)]
pub struct SendPathFigures {
    pub bytes: u64,
    pub seconds: f64,
    pub gigabytes_per_sec: f64,
    /// CPU time of the sending process per page sent (scanner and writer threads), ns; the
    /// discarding receiver's own time is not counted.
    pub cpu_ns_per_page: f64,
    /// A plain memcpy of the same memory, ns per page, on this machine now.
    pub memcpy_ns_per_page: f64,
}

fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable rusage; `who` is RUSAGE_SELF or RUSAGE_THREAD.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let t = |tv: libc::timeval| {
        Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
    };
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// A receiver that answers Hello and Setup, then discards; returns its own CPU time.
fn discard(stream: TcpStream, tls: Option<TlsConfig>) -> std::io::Result<Duration> {
    let started = cpu_time(libc::RUSAGE_THREAD);
    let wire = match &tls {
        Some(config) => Wire::server(stream, config).map_err(std::io::Error::other)?,
        None => Wire::plain(stream),
    };
    let mut reader = BufReader::with_capacity(1 << 20, wire.reader()?);
    let mut writer = wire.writer()?;
    let _ = read_message(&mut reader).map_err(std::io::Error::other)?;
    write_message(
        &mut writer,
        &Message::Hello(Hello::new("discard", CAPABILITIES)),
    )?;
    let _ = read_message(&mut reader).map_err(std::io::Error::other)?;
    write_message(&mut writer, &Message::SetupOk)?;
    let buffered = reader.buffer().len();
    reader.consume(buffered);
    if wire.is_tls() {
        // Every record must be opened to be read.
        let mut sink = vec![0u8; 1 << 20];
        let mut reader = reader.into_inner();
        loop {
            match reader.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The sender closes without close_notify when it is done.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        return Ok(cpu_time(libc::RUSAGE_THREAD).saturating_sub(started));
    }
    // Plain: the rest is dropped in the kernel (MSG_TRUNC on TCP discards without copying),
    // so the receiver costs the sender's cores as little as it can.
    let fd = wire.tcp().as_raw_fd();
    loop {
        // SAFETY: `fd` is this thread's open socket; with MSG_TRUNC and a null buffer the
        // kernel discards up to `len` bytes without writing to user memory.
        let n = unsafe { libc::recv(fd, std::ptr::null_mut(), 1 << 30, libc::MSG_TRUNC) };
        match n {
            0 => break,
            n if n > 0 => {}
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(cpu_time(libc::RUSAGE_THREAD).saturating_sub(started))
}

/// A lab CA with a certificate for 127.0.0.1, for both ends; the folder goes with the
/// returned guard.
fn loopback_tls() -> std::io::Result<(vmm_sys_util::tempdir::TempDir, TlsConfig)> {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ferry-send-path-tls")
        .map_err(std::io::Error::other)?;
    let host = HostSpec {
        name: "loopback".into(),
        addresses: vec!["127.0.0.1".into()],
    };
    let dirs =
        pki::make(dir.as_path(), "ferry send-path CA", &[host]).map_err(std::io::Error::other)?;
    let config = TlsConfig::load(&dirs[0]).map_err(std::io::Error::other)?;
    Ok((dir, config))
}

/// Fills `bytes` of guest memory with data and sends it once through the send path, over
/// mutual TLS if `tls`.
pub fn measure(bytes: u64, tls: bool) -> std::io::Result<SendPathFigures> {
    let memory = crate::memory::create_guest_memory(bytes).map_err(std::io::Error::other)?;
    let mut pages = Vec::new();
    for region in memory.iter() {
        let start = region.start_addr().raw_value();
        for p in 0..region.len() / PAGE {
            let gpa = start + p * PAGE;
            // Data in every page: the worst case for the send path.
            memory
                .write_obj(gpa ^ 0x5a5a_5a5a, GuestAddress(gpa))
                .map_err(std::io::Error::other)?;
            pages.push(gpa);
        }
    }
    let memcpy_ns_per_page = memcpy_cost(&memory, &pages);

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let pki = tls.then(loopback_tls).transpose()?;
    let server_tls = pki.as_ref().map(|(_, c)| c.clone());
    let peer = match &pki {
        Some((_, config)) => Some(TlsPeer {
            config: config.clone(),
            name: server_name("127.0.0.1:1").map_err(std::io::Error::other)?,
        }),
        None => None,
    };
    let receiver = std::thread::spawn(move || discard(listener.accept()?.0, server_tls));
    let stream = link::connect(
        addr,
        Duration::from_secs(5),
        Duration::from_secs(5),
        peer.as_ref(),
    )
    .map_err(|s| std::io::Error::other(s.error().message.clone()))?;
    let to_io = |s: crate::migration::Stop| std::io::Error::other(s.error().message.clone());
    let mut link = Link::start_on_wire(
        stream,
        LinkConfig {
            silence: Duration::from_secs(5),
            cap: Default::default(),
            cancel: Arc::new(AtomicBool::new(false)),
        },
    )
    .map_err(to_io)?;
    link.send(Message::Hello(Hello::new("send-path", CAPABILITIES)))
        .map_err(to_io)?;
    let far = Instant::now() + Duration::from_secs(10);
    link.receive("hello", far).map_err(to_io)?;
    link.send(Message::Setup(Setup {
        migration_id: 1,
        memory_bytes: bytes,
        vcpus: 1,
        regions: memory
            .iter()
            .map(|r| Region {
                guest_addr: r.start_addr().raw_value(),
                len: r.len(),
            })
            .collect(),
        disks: Vec::new(),
        moving_disks: Vec::new(),
        nics: 0,
    }))
    .map_err(to_io)?;
    link.receive("setup", far).map_err(to_io)?;

    let mut scanner = Scanner::new(&memory);
    let cpu_before = cpu_time(libc::RUSAGE_SELF);
    let started = Instant::now();
    let pass = scanner
        .send(&mut link, &pages, ZeroPages::Run, None, |_, _, _| Ok(()))
        .map_err(to_io)?;
    link.drain(Instant::now() + Duration::from_secs(60))
        .map_err(to_io)?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_time(libc::RUSAGE_SELF).saturating_sub(cpu_before);
    link.close();
    let receiver_cpu = receiver
        .join()
        .map_err(|_| std::io::Error::other("the receiver panicked"))??;
    let sent = pass.data_pages * PAGE;
    Ok(SendPathFigures {
        bytes: sent,
        seconds,
        gigabytes_per_sec: sent as f64 / seconds / 1e9,
        cpu_ns_per_page: cpu.saturating_sub(receiver_cpu).as_nanos() as f64
            / pass.data_pages.max(1) as f64,
        memcpy_ns_per_page,
    })
}

/// ns per page of copying the same pages into one reused 4 MiB buffer.
fn memcpy_cost(memory: &ferry_devices::GuestMemory, pages: &[u64]) -> f64 {
    let mut buf = vec![0u8; 4 << 20];
    let per_buf = buf.len() / PAGE as usize;
    let started = Instant::now();
    for (i, &gpa) in pages.iter().enumerate() {
        let at = (i % per_buf) * PAGE as usize;
        let _ = memory.read_slice(&mut buf[at..at + PAGE as usize], GuestAddress(gpa));
    }
    std::hint::black_box(&buf);
    started.elapsed().as_nanos() as f64 / pages.len().max(1) as f64
}
