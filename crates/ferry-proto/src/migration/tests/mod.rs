//! Tests of the migration protocol, with the sample messages they share.

mod codec;
mod conversation;
mod machines;
mod page_codec;
mod pages;

use super::*;

/// Two regions with a gap: [0, 64 KiB) and [1 MiB, 1 MiB + 64 KiB).
fn sample_setup() -> Setup {
    Setup {
        migration_id: 0x5eed,
        memory_bytes: 128 << 10,
        vcpus: 2,
        regions: vec![
            Region {
                guest_addr: 0,
                len: 64 << 10,
            },
            Region {
                guest_addr: 1 << 20,
                len: 64 << 10,
            },
        ],
        disks: vec!["/var/lib/ferry/disk.img".into()],
        moving_disks: vec![MovingDisk {
            index: 0,
            size: 1 << 20,
            read_only: false,
        }],
        nics: 1,
    }
}

/// A hole and 4 KiB of data on the moving disk of [`sample_setup`].
fn sample_blocks() -> BlockBatch {
    let mut w = BlockBatchWriter::new(0, 1 << 20);
    assert!(w.push_hole(0, 64 << 10));
    w.push_data(64 << 10, 4096).expect("room").fill(0xd1);
    w.take()
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE as usize]
}

/// Zero runs and data pages mixed, all inside [`sample_setup`]: 3 data pages, 3 zero pages.
fn mixed_batch() -> PageBatch {
    let mut w = PageBatchWriter::new(MAX_BATCH_BYTES);
    assert!(w.push_zero_run(0, 2));
    assert!(w.push_page(0x2000, &page(0xa1)));
    assert!(w.push_zero_run(0x3000, 1));
    assert!(w.push_page(1 << 20, &page(0xb2)));
    assert!(w.push_page((1 << 20) + 0x1000, &page(0xc3)));
    w.take()
}

/// A valid message of each kind, legal wherever its kind is legal in the machines' probes
/// (its counts match a conversation that sent no pages before it).
fn sample(kind: MessageKind) -> Message {
    match kind {
        MessageKind::Hello => Message::Hello(Hello::new(
            "ferry-test",
            &["zero-pages", "lz4", "state-sections", "disk-blocks"],
        )),
        MessageKind::Setup => Message::Setup(sample_setup()),
        MessageKind::SetupOk => Message::SetupOk,
        MessageKind::Attach => Message::Attach(Attach {
            session_id: 0x5eed,
            index: 0,
            resume_window_ms: 60_000,
            received: 0,
            key: 0x6b6579,
        }),
        MessageKind::Attached => Message::Attached(Attached { received: 0 }),
        MessageKind::Pages => Message::Pages(mixed_batch()),
        MessageKind::IterationDone => Message::IterationDone(IterationDone {
            iteration: 0,
            pages_sent: 0,
            zero_pages: 0,
        }),
        MessageKind::State => Message::State(b"{\"vcpus\":[]}".to_vec()),
        MessageKind::Complete => Message::Complete(Complete {
            iterations: 0,
            data_pages: 0,
            zero_pages: 0,
            disk_data_bytes: 0,
            disk_hole_bytes: 0,
        }),
        MessageKind::Blocks => Message::Blocks(sample_blocks()),
        MessageKind::Prepared => Message::Prepared,
        MessageKind::Commit => Message::Commit,
        MessageKind::Running => Message::Running(Running { resume_ms: 1.25 }),
        MessageKind::Abort => Message::abort("operator cancelled"),
        MessageKind::Applied => Message::Applied(Applied::default()),
        MessageKind::Resolve => Message::Resolve(Resolve {
            migration_id: 0x5eed,
        }),
        MessageKind::Resolved => Message::Resolved(Resolved {
            migration_id: 0x5eed,
            running: true,
        }),
    }
}

fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    write_message(&mut out, m).expect("write to a Vec");
    out
}
