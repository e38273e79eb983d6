//! Messages on the wire: round trips, bounds, and hostile bytes.

use std::io::{self, Cursor, Write};

use super::*;
use crate::frame::{write_frame, FrameError, HEADER_LEN};

#[test]
fn every_message_kind_round_trips() {
    for kind in MessageKind::ALL {
        let m = sample(kind);
        assert_eq!(m.kind(), kind);
        let bytes = encode(&m);
        assert_eq!(
            u16::from_le_bytes([bytes[6], bytes[7]]),
            kind as u16,
            "frame kind of {kind}"
        );
        assert_eq!(
            u16::from_le_bytes([bytes[4], bytes[5]]),
            kind.format_version()
        );
        let back = read_message(&mut Cursor::new(&bytes)).expect("read back");
        assert_eq!(back, m, "{kind}");
    }
}

#[test]
fn a_conversation_reads_back_in_order_and_then_the_end_is_closed() {
    let mut bytes = Vec::new();
    for kind in MessageKind::ALL {
        bytes.extend(encode(&sample(kind)));
    }
    let mut r = Cursor::new(bytes);
    for kind in MessageKind::ALL {
        assert_eq!(read_message(&mut r).expect("message"), sample(kind));
    }
    let end = read_message(&mut r).unwrap_err();
    assert!(matches!(end, ProtocolError::Closed), "{end}");
}

#[test]
fn every_truncation_of_every_message_is_an_error() {
    for kind in MessageKind::ALL {
        let bytes = encode(&sample(kind));
        for cut in 0..bytes.len() {
            let err = read_message(&mut Cursor::new(&bytes[..cut])).unwrap_err();
            if cut == 0 {
                assert!(matches!(err, ProtocolError::Closed), "{kind}: {err}");
            } else {
                assert!(
                    matches!(err, ProtocolError::Frame(FrameError::Truncated)),
                    "{kind} cut at {cut}: {err}"
                );
            }
        }
    }
}

/// xorshift64*: deterministic bytes for the garbage tests.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn garbage_streams_are_errors_not_panics() {
    let mut noise = Noise(0x5eed);
    for len in [1, 15, 16, 17, 64, 4096, 20_000] {
        for _ in 0..50 {
            let bytes = noise.bytes(len);
            // Random bytes almost never carry the magic, so this mostly exercises the header.
            assert!(read_message(&mut Cursor::new(&bytes)).is_err());
        }
    }
}

#[test]
fn well_framed_garbage_payloads_are_errors_not_panics() {
    // A correct frame (magic, version, checksum) around random bytes: each message decoder
    // sees hostile payloads.
    let mut noise = Noise(0xfe44);
    let mut states = 0;
    for kind in MessageKind::ALL {
        for len in [1, 8, 9, 13, 100, 4105, 9000] {
            for _ in 0..20 {
                let mut payload = noise.bytes(len);
                if kind == MessageKind::Pages {
                    // Mostly valid tags, so the record rules behind the tag check run too.
                    payload[0] = if noise.next() % 2 == 0 { b'Z' } else { b'D' };
                }
                let mut frame = Vec::new();
                write_frame(&mut frame, kind.format_version(), kind as u16, &payload)
                    .expect("write");
                // Anything but a panic will do; whatever is accepted obeys its rules.
                if let Ok(m) = read_message(&mut Cursor::new(frame)) {
                    assert!(m.validate().is_ok(), "{m:?}");
                    states += usize::from(m.kind() == MessageKind::State);
                }
            }
        }
    }
    assert_eq!(states, 7 * 20, "the opaque State takes any bytes");
}

#[test]
fn unknown_message_kinds_are_refused() {
    for kind in [0u16, 1, 7, 0x0100, 0x0112, 0xffff] {
        for payload in [&b""[..], b"{}"] {
            let mut frame = Vec::new();
            write_frame(&mut frame, MESSAGE_FORMAT_VERSION, kind, payload).expect("write");
            let err = read_message(&mut Cursor::new(frame)).unwrap_err();
            assert!(
                matches!(err, ProtocolError::UnknownMessage(k) if k == kind),
                "kind {kind}: {err}"
            );
        }
    }
}

#[test]
fn other_format_versions_are_refused_with_a_clear_error() {
    for version in [1u16, 3] {
        let mut bytes = encode(&sample(MessageKind::Complete));
        bytes[4..6].copy_from_slice(&version.to_le_bytes());
        let err = read_message(&mut Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::FrameVersion {
                    kind: MessageKind::Complete,
                    version: v,
                    supported: 2
                } if v == version
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains(&format!("Complete message has format version {version}")));
        assert_eq!(err.class(), FailureClass::Incompatible);
    }
    // A version-1 peer's Hello still reads, so the refusal can name both versions.
    let mut old = Hello::new("ferry 0.1", &["zero-pages"]);
    old.protocol_version = 1;
    let mut frame = Vec::new();
    write_frame(
        &mut frame,
        1,
        MessageKind::Hello as u16,
        &serde_json::to_vec(&old).expect("json"),
    )
    .expect("write");
    let hello = read_message(&mut Cursor::new(frame)).expect("a v1 Hello reads");
    let err = ReceiverMachine::new().received(&hello).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the peer speaks migration protocol version 1; this ferry speaks 2"
    );
}

#[test]
fn corrupted_payloads_fail_the_checksum() {
    let mut bytes = encode(&sample(MessageKind::Pages));
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let err = read_message(&mut Cursor::new(bytes)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::Frame(FrameError::BadChecksum { .. })),
        "{err}"
    );
}

fn header_claiming(kind: MessageKind, len: u32) -> Vec<u8> {
    let mut bytes = encode(&sample(MessageKind::Commit));
    bytes[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    bytes
}

#[test]
fn each_kind_is_bounded_before_anything_is_allocated() {
    let cases = [
        (MessageKind::State, MAX_STATE_BYTES + 1),
        (MessageKind::Pages, MAX_BATCH_BYTES + 1),
        (MessageKind::Hello, MAX_CONTROL_BYTES + 1),
        (MessageKind::Setup, MAX_CONTROL_BYTES + 1),
        (MessageKind::Abort, MAX_CONTROL_BYTES + 1),
        (MessageKind::SetupOk, 1),
        (MessageKind::Prepared, 1),
        (MessageKind::Commit, 1),
    ];
    for (kind, len) in cases {
        let len = u32::try_from(len).expect("fits");
        // Only the header: a reader that allocated and read first would report truncation.
        let err = read_message(&mut Cursor::new(header_claiming(kind, len))).unwrap_err();
        match err {
            ProtocolError::TooLarge {
                what,
                len: got,
                limit,
            } => {
                assert_eq!(what, kind.name());
                assert_eq!(got, u64::from(len));
                assert_eq!(limit, kind.max_payload() as u64);
            }
            other => panic!("{kind}: {other}"),
        }
    }
    let err = read_message(&mut Cursor::new(header_claiming(
        MessageKind::State,
        u32::MAX,
    )))
    .unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
}

#[test]
fn json_that_does_not_decode_is_a_decode_error() {
    let cases: [(MessageKind, &[u8]); 6] = [
        (MessageKind::Hello, b"{\"protocol_version\":1}"),
        (MessageKind::Setup, b"[1,2,3]"),
        (
            MessageKind::Complete,
            b"{\"iterations\":-1,\"data_pages\":0,\"zero_pages\":0}",
        ),
        (MessageKind::Running, b"{\"resume_ms\":\"fast\"}"),
        (MessageKind::Abort, b"\"bare string\""),
        (
            MessageKind::IterationDone,
            b"{\"iteration\":0,\"pages_sent\":0,\"zero_pages\":0}x",
        ),
    ];
    for (kind, payload) in cases {
        let mut frame = Vec::new();
        write_frame(&mut frame, kind.format_version(), kind as u16, payload).expect("write");
        let err = read_message(&mut Cursor::new(frame)).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Decode { what, .. } if what == kind.name()),
            "{kind}: {err}"
        );
    }
}

/// Encodes a message bypassing `write_message`'s checks, as a hostile peer would.
fn raw_json<T: serde::Serialize>(kind: MessageKind, value: &T) -> Vec<u8> {
    let mut frame = Vec::new();
    let payload = serde_json::to_vec(value).expect("json");
    write_frame(&mut frame, kind.format_version(), kind as u16, &payload).expect("write");
    frame
}

/// Messages that break their own rules: refused on read, and refused by `write_message`.
fn invalid_messages() -> Vec<(Message, Vec<u8>)> {
    let long = "x".repeat(MAX_STRING_BYTES + 1);
    let hello = |software: &str, caps: Vec<String>| Hello {
        protocol_version: PROTOCOL_VERSION,
        software: software.into(),
        capabilities: caps,
    };
    let hellos = [
        hello(&long, vec![]),
        hello("f", vec!["c".into(); MAX_CAPABILITIES + 1]),
        hello("f", vec![String::new()]),
        hello("f", vec!["c".repeat(MAX_CAPABILITY_BYTES + 1)]),
    ];
    let mut out: Vec<(Message, Vec<u8>)> = hellos
        .into_iter()
        .map(|h| {
            let raw = raw_json(MessageKind::Hello, &h);
            (Message::Hello(h), raw)
        })
        .collect();
    for s in invalid_setups() {
        let raw = raw_json(MessageKind::Setup, &s);
        out.push((Message::Setup(s), raw));
    }
    let abort = Message::Abort(Abort {
        kind: AbortKind::Failed,
        reason: long.clone(),
    });
    out.push((
        abort,
        raw_json(MessageKind::Abort, &serde_json::json!({ "reason": long })),
    ));
    for ms in [-1.0, f64::INFINITY] {
        let r = Running { resume_ms: ms };
        out.push((Message::Running(r), raw_json(MessageKind::Running, &r)));
    }
    out
}

fn invalid_setups() -> Vec<Setup> {
    let with = |f: &dyn Fn(&mut Setup)| {
        let mut s = sample_setup();
        f(&mut s);
        s
    };
    let region = |guest_addr, len| Region { guest_addr, len };
    vec![
        with(&|s| s.vcpus = 0),
        with(&|s| s.regions.clear()),
        with(&|s| s.regions = vec![region(0, 4096); MAX_REGIONS + 1]),
        with(&|s| s.regions[1].guest_addr += 1),
        with(&|s| s.regions[1].len += 1),
        with(&|s| {
            s.regions[1].len = 0;
            s.memory_bytes = 64 << 10;
        }),
        with(&|s| s.regions[1] = region(u64::MAX - 0xfff, 0x10000)),
        // Overlapping, then out of order.
        with(&|s| s.regions[1].guest_addr = 0x8000),
        with(&|s| s.regions.swap(0, 1)),
        with(&|s| s.memory_bytes += 4096),
        with(&|s| s.disks = vec!["/d".into(); MAX_DISKS + 1]),
        with(&|s| s.disks = vec![String::new()]),
        with(&|s| s.disks = vec!["d".repeat(MAX_STRING_BYTES + 1)]),
    ]
}

#[test]
fn messages_that_break_their_rules_are_refused_both_ways() {
    for (m, raw) in invalid_messages() {
        let err = read_message(&mut Cursor::new(raw)).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Invalid { .. } | ProtocolError::TooLarge { .. }
                // JSON has no infinity: serde_json writes null, which does not decode.
                | ProtocolError::Decode { what: "Running", .. }
            ),
            "{m:?}: {err}"
        );
        let mut out = Vec::new();
        let werr = write_message(&mut out, &m).unwrap_err();
        assert_eq!(werr.kind(), io::ErrorKind::InvalidInput, "{m:?}");
        assert!(out.is_empty(), "{m:?}: nothing may be written");
    }
}

#[test]
fn adjacent_regions_and_the_sample_setup_are_valid() {
    let mut s = sample_setup();
    s.regions[1].guest_addr = 64 << 10;
    assert!(Message::Setup(s).validate().is_ok());
    assert!(Message::Setup(sample_setup()).validate().is_ok());
}

#[test]
fn long_abort_reasons_are_cut_at_a_character_boundary() {
    let reason = "é".repeat(MAX_STRING_BYTES); // 2 bytes each
    let Message::Abort(cut) = Message::abort(reason) else {
        panic!("not an Abort");
    };
    assert!(cut.reason.len() <= MAX_STRING_BYTES && cut.reason.len() >= MAX_STRING_BYTES - 1);
    assert!(cut.reason.chars().all(|c| c == 'é'));
    assert!(write_message(&mut Vec::new(), &Message::Abort(cut)).is_ok());
}

/// Counts write calls, to see how a message leaves.
#[derive(Default)]
struct Writes {
    calls: usize,
    flushes: usize,
    bytes: Vec<u8>,
}

impl Write for Writes {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

#[test]
fn control_messages_leave_in_one_write_and_are_flushed() {
    // Header and payload in separate small writes would let Nagle's algorithm hold the
    // payload back (the ~40 ms Nagle stalls measured on a peer without TCP_NODELAY).
    for kind in MessageKind::ALL {
        if kind == MessageKind::Pages {
            continue;
        }
        let mut w = Writes::default();
        write_message(&mut w, &sample(kind)).expect("write");
        assert_eq!((w.calls, w.flushes), (1, 1), "{kind}");
    }
}

#[test]
fn a_full_batch_is_written_from_its_buffer() {
    let mut writer = PageBatchWriter::new(MAX_BATCH_BYTES);
    let mut gpa = 0;
    while writer.push_page(gpa, &page(7)) {
        gpa += PAGE_SIZE;
    }
    let batch = writer.take();
    let mut w = Writes::default();
    write_message(&mut w, &Message::Pages(batch.clone())).expect("write");
    // The header, then the payload as it is.
    assert_eq!(w.calls, 2);
    assert_eq!(&w.bytes[HEADER_LEN..], batch.as_bytes());
}

#[test]
fn an_abort_says_what_kind_of_refusal_it_is_and_old_or_newer_ones_still_read() {
    let busy = Message::abort_as(AbortKind::Busy, "busy");
    let back = read_message(&mut Cursor::new(encode(&busy))).expect("read");
    assert_eq!(back, busy);
    // A version-1 peer's Abort has no kind; a newer peer's may have one we do not know.
    for payload in [
        &br#"{"reason":"old"}"#[..],
        br#"{"reason":"new","kind":"quantum_flux"}"#,
    ] {
        let mut frame = Vec::new();
        write_frame(&mut frame, 1, MessageKind::Abort as u16, payload).expect("write");
        let Message::Abort(a) = read_message(&mut Cursor::new(frame)).expect("read") else {
            panic!("not an abort");
        };
        assert_eq!(a.kind, AbortKind::Failed);
    }
}
