//! Page batches: the writer, the layout and every hostile-record rule.

use std::io::{self, Cursor};

use super::*;
use crate::frame::write_frame;

const DATA_RECORD: usize = 9 + PAGE_SIZE as usize;
const ZERO_RECORD: usize = 13;

fn records(batch: &PageBatch) -> Vec<PageRecord<'_>> {
    batch
        .records()
        .collect::<Result<_, _>>()
        .expect("valid records")
}

#[test]
fn a_mixed_batch_decodes_to_the_records_written() {
    let batch = mixed_batch();
    let (a, b, c) = (page(0xa1), page(0xb2), page(0xc3));
    let expected = [
        PageRecord::Zero { gpa: 0, pages: 2 },
        PageRecord::Data {
            gpa: 0x2000,
            bytes: &a,
        },
        PageRecord::Zero {
            gpa: 0x3000,
            pages: 1,
        },
        PageRecord::Data {
            gpa: 1 << 20,
            bytes: &b,
        },
        PageRecord::Data {
            gpa: (1 << 20) + 0x1000,
            bytes: &c,
        },
    ];
    assert_eq!(records(&batch), expected);
    assert_eq!((batch.data_pages(), batch.zero_pages()), (3, 3));
    assert_eq!(batch.len_bytes(), 3 * DATA_RECORD + 2 * ZERO_RECORD);

    // Through the wire, and through the checking constructor.
    let Message::Pages(read) =
        read_message(&mut Cursor::new(encode(&Message::Pages(batch.clone())))).expect("read")
    else {
        panic!("not Pages");
    };
    assert_eq!(records(&read), expected);
    assert_eq!((read.data_pages(), read.zero_pages()), (3, 3));
    let again = PageBatch::from_bytes(batch.as_bytes().to_vec()).expect("valid");
    assert_eq!(again, batch);
}

#[test]
fn data_records_borrow_their_page_from_the_batch() {
    let batch = mixed_batch();
    let range = batch.as_bytes().as_ptr_range();
    for r in batch.records() {
        if let PageRecord::Data { bytes, .. } = r.expect("valid") {
            assert!(range.contains(&bytes.as_ptr()), "a data page was copied");
            assert_eq!(bytes.len(), PAGE_SIZE as usize);
        }
    }
}

#[test]
fn contiguous_zero_runs_grow_in_place() {
    let mut w = PageBatchWriter::new(MAX_BATCH_BYTES);
    assert!(w.push_zero_run(0, 1));
    assert!(w.push_zero_run(0x1000, 2));
    assert_eq!(w.len_bytes(), ZERO_RECORD, "grown, not appended");
    assert!(w.push_zero_run(0x5000, 1)); // a gap: a new run
    assert!(w.push_page(0x6000, &page(1)));
    assert!(w.push_zero_run(0x7000, 1)); // after a data page: a new run
    assert!(w.push_zero_run(0x8000, 0)); // nothing
    let big = 0x10_0000_0000;
    assert!(w.push_zero_run(big, u32::MAX));
    // Would overflow the run's u32 count: a new run.
    assert!(w.push_zero_run(big + u64::from(u32::MAX) * PAGE_SIZE, 1));
    assert_eq!(w.zero_pages(), 3 + 1 + 1 + u64::from(u32::MAX) + 1);
    assert_eq!(w.page_count(), w.zero_pages() + 1);
    let batch = w.take();
    assert_eq!(
        records(&batch)
            .iter()
            .map(|r| (r.gpa(), r.page_count()))
            .collect::<Vec<_>>(),
        [
            (0, 3),
            (0x5000, 1),
            (0x6000, 1),
            (0x7000, 1),
            (big, u64::from(u32::MAX)),
            (big + u64::from(u32::MAX) * PAGE_SIZE, 1)
        ]
    );
}

#[test]
fn the_writer_fills_up_to_max_bytes_and_no_further() {
    let max = 3 * DATA_RECORD + ZERO_RECORD;
    let mut w = PageBatchWriter::new(max);
    assert!(w.is_empty());
    for i in 0..3 {
        assert!(w.push_page(i * PAGE_SIZE, &page(9)));
    }
    assert!(
        !w.push_page(0x10_0000, &page(9)),
        "a fourth page does not fit"
    );
    assert!(w.push_zero_run(0x20_0000, 1), "a zero run still fits");
    assert!(!w.push_zero_run(0x30_0000, 1), "full");
    assert!(w.push_zero_run(0x20_1000, 5), "growing a run needs no room");
    assert_eq!(w.len_bytes(), max);
    assert_eq!((w.data_pages(), w.zero_pages(), w.page_count()), (3, 6, 9));
    w.clear();
    assert!(w.is_empty() && w.page_count() == 0);
    assert!(w.push_page(0, &page(1)));
}

#[test]
fn max_bytes_is_clamped_between_one_page_and_the_batch_limit() {
    let mut tiny = PageBatchWriter::new(0);
    // An encoded page's record may be two bytes longer than a raw one.
    assert_eq!(tiny.max_bytes(), 12 + MAX_ENCODED_BODY);
    assert!(tiny.has_room_for_page());
    assert!(tiny.push_page(0, &page(1)), "one page always fits");
    assert!(!tiny.has_room_for_page());
    assert_eq!(
        PageBatchWriter::new(usize::MAX).max_bytes(),
        MAX_BATCH_BYTES
    );
}

#[test]
fn swapping_moves_buffers_without_copying_or_allocating() {
    let mut w = PageBatchWriter::new(4 * DATA_RECORD);
    let first = w.as_bytes().as_ptr();
    assert!(w.push_page(0, &page(1)));
    let mut spare = PageBatch::new();
    w.swap_into(&mut spare);
    assert_eq!(
        spare.as_bytes().as_ptr(),
        first,
        "the batch took the buffer"
    );
    assert_eq!(spare.data_pages(), 1);
    assert!(w.is_empty() && w.page_count() == 0);
    let second = w.as_bytes().as_ptr();
    assert!(w.push_page(PAGE_SIZE, &page(2)));
    w.swap_into(&mut spare);
    assert_eq!(spare.as_bytes().as_ptr(), second);
    assert_eq!(
        w.as_bytes().as_ptr(),
        first,
        "the writer got the first back"
    );
    assert_eq!(records(&spare).len(), 1);
    assert_eq!(records(&spare)[0].gpa(), PAGE_SIZE);
}

#[test]
fn invalid_pushes_poison_the_batch_instead_of_panicking() {
    type Push = fn(&mut PageBatchWriter) -> bool;
    let pushes: [(&str, Push); 5] = [
        ("short page", |w| w.push_page(0, &[0u8; 100])),
        ("long page", |w| w.push_page(0, &[0u8; 4097])),
        ("unaligned page", |w| w.push_page(0x800, &page(1))),
        ("unaligned run", |w| w.push_zero_run(0x10, 1)),
        ("run past the end", |w| w.push_zero_run(u64::MAX - 0xfff, 2)),
    ];
    for (what, push) in pushes {
        let mut w = PageBatchWriter::new(MAX_BATCH_BYTES);
        assert!(w.push_page(0x1000, &page(3)));
        let len = w.len_bytes();
        assert!(push(&mut w), "{what}: must not look full");
        assert_eq!(w.len_bytes(), len, "{what}: nothing written");
        let batch = w.take();
        let err = Message::Pages(batch.clone()).validate().unwrap_err();
        assert!(matches!(err, ProtocolError::BadRecord(_)), "{what}: {err}");
        let werr = write_message(&mut Vec::new(), &Message::Pages(batch)).unwrap_err();
        assert_eq!(werr.kind(), io::ErrorKind::InvalidInput, "{what}");
        // The poison goes with the batch; the writer starts clean.
        assert!(w.push_page(0, &page(1)));
        assert!(Message::Pages(w.take()).validate().is_ok(), "{what}");
    }
}

fn zero_record(gpa: u64, pages: u32) -> Vec<u8> {
    let mut v = vec![b'Z'];
    v.extend(gpa.to_le_bytes());
    v.extend(pages.to_le_bytes());
    v
}

fn data_record(gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![b'D'];
    v.extend(gpa.to_le_bytes());
    v.extend(std::iter::repeat_n(0x5a, len));
    v
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn every_hostile_record_rule_is_enforced() {
    let top = u64::MAX - 0xfff;
    let mut unknown = zero_record(0, 1);
    unknown[0] = 0;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown tag", unknown),
        ("unknown tag after a good record", {
            let mut t = zero_record(0, 1);
            t[0] = b'X';
            cat(&[data_record(0, 4096), t])
        }),
        ("zero run not page-aligned", zero_record(0x800, 1)),
        ("data page not page-aligned", data_record(0x1001, 4096)),
        ("zero run of no pages", zero_record(0x1000, 0)),
        ("zero run past the address space", zero_record(top, 2)),
        ("data page past the address space", data_record(top, 4096)),
        ("data page cut short", data_record(0, 4095)),
        ("data page without data", data_record(0, 0)),
        ("zero run cut short", zero_record(0, 1)[..12].to_vec()),
        ("a stray byte", cat(&[zero_record(0, 1), vec![b'Z']])),
        (
            "eight stray bytes",
            cat(&[data_record(0, 4096), vec![0; 8]]),
        ),
        (
            "a bad record after good ones",
            cat(&[
                zero_record(0, 1),
                data_record(0x1000, 4096),
                zero_record(3, 1),
            ]),
        ),
    ];
    for (what, bytes) in cases {
        let err = PageBatch::from_bytes(bytes.clone()).unwrap_err();
        assert!(matches!(err, ProtocolError::BadRecord(_)), "{what}: {err}");
        let mut frame = Vec::new();
        write_frame(
            &mut frame,
            MessageKind::Pages.format_version(),
            MessageKind::Pages as u16,
            &bytes,
        )
        .expect("write");
        let err = read_message(&mut Cursor::new(frame)).unwrap_err();
        assert!(matches!(err, ProtocolError::BadRecord(_)), "{what}: {err}");
    }
}

#[test]
fn records_at_the_edges_of_the_rules_are_accepted() {
    let top = u64::MAX - 0xfff;
    let bytes = cat(&[
        zero_record(0, u32::MAX),
        data_record(top - PAGE_SIZE, 4096),
        zero_record(top - 2 * PAGE_SIZE, 1),
    ]);
    let batch = PageBatch::from_bytes(bytes).expect("valid");
    assert_eq!(
        (batch.data_pages(), batch.zero_pages()),
        (1, u64::from(u32::MAX) + 1)
    );
    assert!(PageBatch::from_bytes(Vec::new()).expect("empty").is_empty());
}

#[test]
fn oversized_batches_are_refused() {
    let err = PageBatch::from_bytes(vec![0; MAX_BATCH_BYTES + 1]).unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
}

#[test]
fn is_zero_page_sees_every_byte() {
    assert!(is_zero_page(&page(0)));
    for at in [0, 1, 15, 16, 2048, 4095] {
        let mut p = page(0);
        p[at] = 0x80;
        assert!(!is_zero_page(&p), "byte {at}");
    }
}
