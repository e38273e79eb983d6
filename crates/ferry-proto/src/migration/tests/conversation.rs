//! Whole conversations between two threads over a socket pair.

use std::os::unix::net::UnixStream;
use std::thread;

use super::*;

/// Guest memory as the tests model it: one buffer per region.
#[derive(Debug, Clone, PartialEq)]
struct Memory {
    regions: Vec<(Region, Vec<u8>)>,
}

impl Memory {
    fn zeroed(setup: &Setup) -> Memory {
        Memory {
            regions: setup
                .regions
                .iter()
                .map(|r| (*r, vec![0; r.len as usize]))
                .collect(),
        }
    }

    fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.regions.iter().flat_map(|(r, bytes)| {
            bytes
                .chunks_exact(PAGE_SIZE as usize)
                .enumerate()
                .map(move |(i, p)| (r.guest_addr + i as u64 * PAGE_SIZE, p))
        })
    }

    fn page_mut(&mut self, gpa: u64) -> &mut [u8] {
        let (r, bytes) = self
            .regions
            .iter_mut()
            .find(|(r, _)| r.guest_addr <= gpa && gpa < r.guest_addr + r.len)
            .expect("the machine checked the gpa");
        let at = (gpa - r.guest_addr) as usize;
        &mut bytes[at..at + PAGE_SIZE as usize]
    }

    fn apply(&mut self, batch: &PageBatch) {
        for record in batch.records() {
            match record.expect("checked by the machine") {
                PageRecord::Data { gpa, bytes } => self.page_mut(gpa).copy_from_slice(bytes),
                PageRecord::Encoded { gpa, codec, body } => PageDecoder::new()
                    .decode(codec, body, self.page_mut(gpa))
                    .expect("decodes"),
                PageRecord::Zero { gpa, pages } => {
                    for i in 0..u64::from(pages) {
                        self.page_mut(gpa + i * PAGE_SIZE).fill(0);
                    }
                }
            }
        }
    }
}

/// A source memory with a pattern: every third page zero, the rest stamped.
fn source_memory(setup: &Setup) -> Memory {
    let mut m = Memory::zeroed(setup);
    let gpas: Vec<u64> = m.pages().map(|(gpa, _)| gpa).collect();
    for (i, gpa) in gpas.into_iter().enumerate() {
        if i % 3 != 0 {
            let p = m.page_mut(gpa);
            p[..8].copy_from_slice(&gpa.to_le_bytes());
            p[100] = i as u8;
        }
    }
    m
}

fn send(m: &mut SenderMachine, s: &mut UnixStream, msg: &Message) -> Result<(), ProtocolError> {
    m.sent(msg)?;
    write_message(s, msg).expect("write");
    Ok(())
}

fn recv(m: &mut SenderMachine, s: &mut UnixStream) -> Result<Message, ProtocolError> {
    let msg = read_message(s)?;
    m.received(&msg)?;
    Ok(msg)
}

/// One pass over `gpas`: zero pages as runs, the rest as data, in small batches.
fn send_pass(
    m: &mut SenderMachine,
    s: &mut UnixStream,
    mem: &Memory,
    gpas: &[u64],
    iteration: u32,
) -> Result<(), ProtocolError> {
    let mut w = PageBatchWriter::new(3 * (9 + PAGE_SIZE as usize));
    let mut spare = PageBatch::new();
    let (before_data, before_zero) = (m.totals().data_pages, m.totals().zero_pages);
    let all: Vec<(u64, &[u8])> = mem.pages().collect();
    for gpa in gpas {
        let (_, p) = all.iter().find(|(g, _)| g == gpa).expect("a page");
        loop {
            let fits = if is_zero_page(p) {
                w.push_zero_run(*gpa, 1)
            } else {
                w.push_page(*gpa, p)
            };
            if fits {
                break;
            }
            w.swap_into(&mut spare);
            send(m, s, &Message::Pages(std::mem::take(&mut spare)))?;
        }
    }
    if !w.is_empty() {
        send(m, s, &Message::Pages(w.take()))?;
    }
    let t = m.totals();
    let done = IterationDone {
        iteration,
        pages_sent: t.data_pages - before_data,
        zero_pages: t.zero_pages - before_zero,
    };
    send(m, s, &Message::IterationDone(done))
}

struct SourceOutcome {
    machine: SenderMachine,
    result: Result<Running, ProtocolError>,
    memory: Memory,
}

/// The source's side of a migration: two passes, the second re-sending dirtied pages.
fn run_source(mut s: UnixStream, setup: Setup, state: Vec<u8>) -> SourceOutcome {
    let mut m = SenderMachine::new();
    let mut mem = source_memory(&setup);
    let result = (|| {
        let hello = Hello::new("ferry-source", &["zero-pages", "lz4"]);
        send(&mut m, &mut s, &Message::Hello(hello))?;
        recv(&mut m, &mut s)?;
        send(&mut m, &mut s, &Message::Setup(setup.clone()))?;
        recv(&mut m, &mut s)?;
        let all: Vec<u64> = mem.pages().map(|(g, _)| g).collect();
        send_pass(&mut m, &mut s, &mem, &all, 0)?;
        // The guest dirtied three pages meanwhile: one becomes zero, one stops being zero.
        let dirty = [all[1], all[3], all[all.len() - 1]];
        mem.page_mut(dirty[0]).fill(0);
        mem.page_mut(dirty[1]).fill(0x77);
        mem.page_mut(dirty[2])[4095] ^= 0xff;
        send_pass(&mut m, &mut s, &mem, &dirty, 1)?;
        send(&mut m, &mut s, &Message::State(state))?;
        let t = m.totals();
        let complete = Complete {
            iterations: t.iterations,
            data_pages: t.data_pages,
            zero_pages: t.zero_pages,
            disk_data_bytes: t.disk_data_bytes,
            disk_hole_bytes: t.disk_hole_bytes,
        };
        send(&mut m, &mut s, &Message::Complete(complete))?;
        recv(&mut m, &mut s)?; // Prepared
        send(&mut m, &mut s, &Message::Commit)?;
        match recv(&mut m, &mut s)? {
            Message::Running(r) => Ok(r),
            other => panic!("the machine let {other:?} through"),
        }
    })();
    SourceOutcome {
        machine: m,
        result,
        memory: mem,
    }
}

struct DestinationOutcome {
    machine: ReceiverMachine,
    result: Result<(Memory, Vec<u8>), ProtocolError>,
}

/// The destination's side; `refuse_after_complete` makes it abort instead of preparing.
fn run_destination(mut s: UnixStream, refuse_after_complete: bool) -> DestinationOutcome {
    let mut m = ReceiverMachine::new();
    let result = (|| {
        let mut memory = None;
        let mut state = None;
        loop {
            let msg = read_message(&mut s)?;
            m.received(&msg)?;
            let reply = match msg {
                Message::Hello(_) => Some(Message::Hello(Hello::new(
                    "ferry-destination",
                    &["lz4", "zero-pages", "tls"],
                ))),
                Message::Setup(setup) => {
                    memory = Some(Memory::zeroed(&setup));
                    Some(Message::SetupOk)
                }
                Message::Pages(batch) => {
                    memory.as_mut().expect("after Setup").apply(&batch);
                    None
                }
                Message::State(bytes) => {
                    state = Some(bytes);
                    None
                }
                Message::Complete(_) if refuse_after_complete => {
                    Some(Message::abort("cannot build the VM"))
                }
                Message::Complete(_) => Some(Message::Prepared),
                Message::Commit => Some(Message::Running(Running { resume_ms: 0.5 })),
                _ => None,
            };
            if let Some(reply) = reply {
                m.sent(&reply)?;
                write_message(&mut s, &reply).expect("write");
            }
            if matches!(m.state(), ReceiverState::Done | ReceiverState::Aborted) {
                return Ok((memory.expect("memory"), state.expect("state")));
            }
        }
    })();
    DestinationOutcome { machine: m, result }
}

#[test]
fn a_full_migration_moves_every_page_over_a_socket_pair() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let setup = Setup {
        moving_disks: Vec::new(),
        nics: 0,
        ..sample_setup()
    };
    let state = b"{\"vcpus\":[{\"rip\":4096}],\"devices\":[]}".to_vec();
    let src = {
        let (setup, state) = (setup.clone(), state.clone());
        thread::spawn(move || run_source(a, setup, state))
    };
    let dst = thread::spawn(move || run_destination(b, false));
    let src = src.join().expect("source thread");
    let dst = dst.join().expect("destination thread");

    let running = src.result.expect("source succeeded");
    assert_eq!(running.resume_ms, 0.5);
    let (memory, got_state) = dst.result.expect("destination succeeded");
    assert_eq!(
        memory, src.memory,
        "the destination's memory is the source's"
    );
    assert_eq!(got_state, state);

    assert_eq!(src.machine.state(), SenderState::Done);
    assert_eq!(dst.machine.state(), ReceiverState::Done);
    assert!(src.machine.is_commit_point_passed() && dst.machine.is_commit_point_passed());
    let agreed = ["zero-pages".to_string(), "lz4".to_string()];
    assert_eq!(src.machine.negotiated(), Some(&agreed[..]));
    assert_eq!(dst.machine.negotiated(), Some(&agreed[..]));
    // 32 pages: 11 zero, 21 data; then 3 dirtied: 1 zero, 2 data.
    let expected = PageTotals {
        iterations: 2,
        data_pages: 23,
        zero_pages: 12,
        ..PageTotals::default()
    };
    assert_eq!(src.machine.totals(), expected);
    assert_eq!(dst.machine.totals(), expected);
}

#[test]
fn a_destination_abort_before_commit_leaves_the_source_free_to_resume() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let src = thread::spawn(move || {
        run_source(
            a,
            Setup {
                moving_disks: Vec::new(),
                nics: 0,
                ..sample_setup()
            },
            b"{}".to_vec(),
        )
    });
    let dst = thread::spawn(move || run_destination(b, true));
    let src = src.join().expect("source thread");
    let dst = dst.join().expect("destination thread");

    let err = src.result.expect_err("the source must see the abort");
    assert!(
        matches!(&err, ProtocolError::Peer(r) if r.reason == "cannot build the VM"),
        "{err}"
    );
    assert_eq!(src.machine.state(), SenderState::Aborted);
    assert!(
        !src.machine.is_commit_point_passed(),
        "the source may resume"
    );
    assert_eq!(dst.machine.state(), ReceiverState::Aborted);
    assert!(
        !dst.machine.is_commit_point_passed(),
        "the destination discards"
    );
}

#[test]
fn a_source_that_hangs_up_mid_stream_is_closed_not_finished() {
    let (mut a, b) = UnixStream::pair().expect("socketpair");
    let src = thread::spawn(move || {
        let mut m = SenderMachine::new();
        let hello = Message::Hello(Hello::new("ferry-source", &[]));
        m.sent(&hello).expect("hello");
        write_message(&mut a, &hello).expect("write");
        let reply = read_message(&mut a).expect("hello back");
        m.received(&reply).expect("negotiated");
        // Drops the connection before Setup.
    });
    let dst = thread::spawn(move || run_destination(b, false));
    src.join().expect("source thread");
    let dst = dst.join().expect("destination thread");
    let err = dst.result.expect_err("a hang-up is a failure");
    assert!(matches!(err, ProtocolError::Closed), "{err}");
    assert_eq!(dst.machine.state(), ReceiverState::AwaitSetup);
    assert!(!dst.machine.is_commit_point_passed());
}
