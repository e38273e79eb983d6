//! Page codecs: each round-trips, declines what does not pay, and refuses hostile bodies;
//! encoded records in batches and the ledger's check of the agreed codecs.

use super::*;
use crate::migration::page_codec::{apply_runs, encode_runs};

const PAGE: usize = PAGE_SIZE as usize;

/// A page of English-like text: compresses well.
fn text_page(seed: u32) -> Vec<u8> {
    let words = [
        "ferry ", "moves ", "the ", "guest ", "pages ", "over ", "a ", "link. ",
    ];
    let mut page = Vec::with_capacity(PAGE);
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    while page.len() < PAGE {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        page.extend_from_slice(words[(x % 8) as usize].as_bytes());
    }
    page.truncate(PAGE);
    page
}

/// A page of noise: compresses not at all.
fn random_page(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..PAGE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn round_trip(codec: PageCodec, page: &[u8], base: Option<&[u8]>) -> usize {
    let mut enc = PageEncoder::new();
    let mut body = Vec::new();
    assert!(
        enc.encode(codec, page, base, MAX_ENCODED_BODY, &mut body),
        "{codec} declined"
    );
    assert!(body.len() <= MAX_ENCODED_BODY);
    let mut out = base.map_or_else(|| vec![0xee; PAGE], <[u8]>::to_vec);
    PageDecoder::new()
        .decode(codec, &body, &mut out)
        .expect("decodes");
    assert_eq!(out, page, "{codec} round trip");
    body.len()
}

#[test]
fn every_codec_round_trips_what_it_accepts() {
    let text = text_page(7);
    for codec in [PageCodec::Lz4, PageCodec::Zstd] {
        let len = round_trip(codec, &text, None);
        assert!(len < PAGE / 2, "{codec}: text in {len} bytes");
    }

    // A sparse page: a few words set in zeros.
    let mut sparse = vec![0u8; PAGE];
    sparse[8..16].copy_from_slice(b"abcdefgh");
    sparse[1000] = 1;
    sparse[PAGE - 1] = 0xff;
    let len = round_trip(PageCodec::Sparse, &sparse, None);
    assert!(len < 40, "sparse in {len} bytes");

    // Delta: a few bytes changed in a page of noise, which nothing else shrinks.
    let old = random_page(3);
    let mut new = old.clone();
    new[0] ^= 1;
    new[17] ^= 0x80;
    new[2048..2056].copy_from_slice(&[9; 8]);
    new[PAGE - 2] ^= 0x55;
    let len = round_trip(PageCodec::Delta, &new, Some(&old));
    assert!(len < 60, "delta in {len} bytes");
    // An unchanged page: an empty body.
    assert_eq!(round_trip(PageCodec::Delta, &old, Some(&old)), 0);
    // A page of zeros in sparse: empty as well.
    assert_eq!(round_trip(PageCodec::Sparse, &[0; PAGE], None), 0);
}

#[test]
fn a_codec_that_does_not_pay_declines_and_leaves_the_buffer_as_it_was() {
    let noise = random_page(11);
    let mut enc = PageEncoder::new();
    let mut out = b"keep".to_vec();
    for codec in PageCodec::ALL {
        assert!(
            !enc.encode(
                codec,
                &noise,
                Some(&random_page(12)),
                MAX_ENCODED_BODY,
                &mut out
            ),
            "{codec} took noise"
        );
        assert_eq!(out, b"keep", "{codec} left bytes behind");
    }
    // Delta without a base copy cannot be used.
    assert!(!enc.encode(PageCodec::Delta, &noise, None, MAX_ENCODED_BODY, &mut out));
    // A tight bound declines text too.
    assert!(!enc.encode(PageCodec::Lz4, &text_page(1), None, 16, &mut out));
    assert!(!enc.encode(PageCodec::Zstd, &text_page(1), None, 16, &mut out));
    assert_eq!(out, b"keep");
}

#[test]
fn runs_split_at_an_equal_word() {
    let mut page = vec![0u8; PAGE];
    // Words 0 and 2 set, word 1 zero: two runs of 8 bytes (20 bytes) beat one of 24 (26).
    page[0] = 1;
    page[16] = 1;
    let mut body = Vec::new();
    assert!(encode_runs(&page, None, PAGE, &mut body));
    assert_eq!(&body[..2], &[0, 8], "skip 0, write 8");
    assert_eq!(&body[10..12], &[8, 8], "skip 8, write 8");
    assert_eq!(body.len(), 2 * (2 + 8));
}

#[test]
fn hostile_run_bodies_are_refused() {
    let mut page = vec![0u8; PAGE];
    let cases: &[(&[u8], &str)] = &[
        (&[0], "cut short"),
        (&[0, 4], "a run of 4 bytes has 0"),
        (&[0, 0], "writes no bytes"),
        // Skip 4095, then 2 bytes: past the page.
        (&[0xff, 0x1f, 2, 1, 2], "reaches byte 4097"),
        // A three-byte varint.
        (&[0x80, 0x80, 0x01, 1, 0], "does not fit a page"),
        // Two runs, the second past the end.
        (&[0, 1, 7, 0x80, 0x20, 1, 0], "reaches byte"),
    ];
    for (body, why) in cases {
        let err = apply_runs(body, &mut page).expect_err("refused");
        assert!(err.contains(why), "{body:?}: {err}");
    }
}

#[test]
fn hostile_compressed_bodies_are_refused() {
    let mut dec = PageDecoder::new();
    let mut page = vec![0u8; PAGE];
    for codec in [PageCodec::Lz4, PageCodec::Zstd] {
        for body in [
            &b""[..],
            b"\x00",
            b"garbage that is not a frame at all",
            &[0xff; 64],
        ] {
            assert!(
                dec.decode(codec, body, &mut page).is_err(),
                "{codec} took {body:?}"
            );
        }
    }
    // Bodies that open to more or fewer bytes than a page.
    let two_pages = [text_page(1), text_page(2)].concat();
    let big = zstd::bulk::compress(&two_pages, 1).expect("compress");
    assert!(dec.decode(PageCodec::Zstd, &big, &mut page).is_err());
    let small = zstd::bulk::compress(&text_page(1)[..100], 1).expect("compress");
    assert!(dec.decode(PageCodec::Zstd, &small, &mut page).is_err());
    let big = lz4_flex::block::compress(&two_pages);
    assert!(dec.decode(PageCodec::Lz4, &big, &mut page).is_err());
    let small = lz4_flex::block::compress(&text_page(1)[..100]);
    assert!(dec.decode(PageCodec::Lz4, &small, &mut page).is_err());
    // A buffer that is not a page.
    assert!(dec
        .decode(PageCodec::Sparse, &[], &mut page[..100])
        .is_err());
}

#[test]
fn encoded_pages_travel_in_batches_and_count_as_data() {
    let text = text_page(5);
    let mut enc = PageEncoder::new();
    let mut w = PageBatchWriter::new(1 << 20);
    assert!(w.push_zero_run(0, 1));
    let pushed = w.push_encoded(0x1000, PageCodec::Lz4, |out| {
        enc.encode(PageCodec::Lz4, &text, None, MAX_ENCODED_BODY, out)
    });
    assert_eq!(pushed, Pushed::Added);
    // A declined encoding adds nothing.
    let noise = random_page(1);
    let pushed = w.push_encoded(0x2000, PageCodec::Zstd, |out| {
        enc.encode(PageCodec::Zstd, &noise, None, MAX_ENCODED_BODY, out)
    });
    assert_eq!(pushed, Pushed::NotEncoded);
    assert!(w.push_page(0x2000, &noise));
    assert_eq!(
        (w.data_pages(), w.encoded_pages(), w.zero_pages()),
        (2, 1, 1)
    );
    let batch = w.take();
    let again = PageBatch::from_bytes(batch.as_bytes().to_vec()).expect("valid");
    assert_eq!((again.data_pages(), again.zero_pages()), (2, 1));
    let records: Vec<_> = again.records().collect::<Result<_, _>>().expect("valid");
    let PageRecord::Encoded { gpa, codec, body } = records[1] else {
        panic!("not encoded: {:?}", records[1]);
    };
    assert_eq!((gpa, codec), (0x1000, PageCodec::Lz4));
    let mut out = vec![0u8; PAGE];
    PageDecoder::new()
        .decode(codec, body, &mut out)
        .expect("decodes");
    assert_eq!(out, text);

    // A full batch says so before the encoder runs.
    let mut w = PageBatchWriter::new(0);
    assert!(w.push_page(0, &noise));
    let pushed = w.push_encoded(0x1000, PageCodec::Lz4, |_| panic!("called"));
    assert_eq!(pushed, Pushed::Full);
}

fn encoded_record(codec: u8, len: u16, body: &[u8]) -> Vec<u8> {
    let mut r = vec![b'E'];
    r.extend_from_slice(&0x1000u64.to_le_bytes());
    r.push(codec);
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(body);
    r
}

#[test]
fn hostile_encoded_records_are_refused() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (encoded_record(9, 1, &[0]), "unknown codec 9"),
        (encoded_record(0, 1, &[0]), "unknown codec 0"),
        (
            encoded_record(1, 4096, &[0; 4096]),
            "not shorter than a page",
        ),
        (encoded_record(1, 10, &[0; 9]), "has 9 of its 10 bytes"),
        (encoded_record(1, 0, &[])[..11].to_vec(), "cut short"),
        (
            {
                let mut r = encoded_record(1, 0, &[]);
                r[1..9].copy_from_slice(&0x1001u64.to_le_bytes());
                r
            },
            "not page-aligned",
        ),
    ];
    for (bytes, why) in cases {
        let err = PageBatch::from_bytes(bytes.clone()).expect_err("refused");
        assert!(err.to_string().contains(why), "{bytes:?}: {err}");
    }
    // A well-formed empty sparse body is a valid record (an all-zero page).
    assert!(PageBatch::from_bytes(encoded_record(1, 0, &[])).is_ok());
}

#[test]
fn the_ledger_refuses_a_codec_that_was_not_agreed() {
    let setup = sample_setup();
    let batch =
        PageBatch::from_bytes(encoded_record(PageCodec::Zstd as u8, 0, &[])).expect("well-formed");
    let only_sparse = CodecSet::NONE.with(PageCodec::Sparse);
    let err = ledger::Ledger::for_setup(&setup, only_sparse)
        .check_batch(&batch)
        .expect_err("zstd not agreed");
    assert!(
        err.to_string().contains("zstd, which was not agreed"),
        "{err}"
    );
    assert!(ledger::Ledger::for_setup(&setup, CodecSet::all())
        .check_batch(&batch)
        .is_ok());
}

#[test]
fn codec_sets_follow_the_agreed_features() {
    let agreed = ["zero-pages", "page-delta", "page-zstd"];
    let set = CodecSet::from_features(&agreed);
    assert_eq!(
        set.iter().collect::<Vec<_>>(),
        vec![PageCodec::Delta, PageCodec::Zstd]
    );
    assert!(CodecSet::from_features::<&str>(&[]).is_empty());
    for codec in PageCodec::ALL {
        assert_eq!(PageCodec::from_u8(codec as u8), Some(codec));
        assert_eq!(PageCodec::from_name(codec.name()), Some(codec));
        assert!(feature::ALL.contains(&codec.feature()));
    }
}

#[test]
fn a_data_block_compresses_in_place_and_opens_to_the_same_bytes() {
    let data: Vec<u8> = (0..16).flat_map(text_page).collect();
    let mut enc = PageEncoder::new();
    let mut w = BlockBatchWriter::new(3, 1 << 20);
    w.push_data(4096, data.len())
        .expect("room")
        .copy_from_slice(&data);
    assert!(w.compress_last(PageCodec::Zstd, &mut enc));
    assert!(!w.compress_last(PageCodec::Zstd, &mut enc), "only once");
    // Noise stays data.
    let noise = random_page(9);
    w.push_data(1 << 20, PAGE)
        .expect("room")
        .copy_from_slice(&noise);
    assert!(!w.compress_last(PageCodec::Lz4, &mut enc));
    assert!(w.push_hole(2 << 20, 512));
    let batch = w.take();
    assert!(batch.as_bytes().len() < data.len() / 2 + PAGE + 64);
    let again = BlockBatch::from_bytes(batch.as_bytes().to_vec()).expect("valid");
    assert_eq!(again.counts(), ((data.len() + PAGE) as u64, 512));
    let records: Vec<_> = again.records().collect::<Result<_, _>>().expect("valid");
    let BlockRecord::Compressed {
        offset,
        len,
        codec,
        body,
    } = records[0]
    else {
        panic!("not compressed: {:?}", records[0]);
    };
    assert_eq!(
        (offset, len, codec),
        (4096, data.len() as u64, PageCodec::Zstd)
    );
    let mut out = vec![0u8; len as usize];
    PageDecoder::new()
        .decompress(codec, body, &mut out)
        .expect("opens");
    assert_eq!(out, data);
    // The wrong length is refused.
    let mut short = vec![0u8; len as usize - 512];
    assert!(PageDecoder::new()
        .decompress(codec, body, &mut short)
        .is_err());
    assert!(matches!(records[1], BlockRecord::Data { .. }));
}

fn compressed_record(len: u32, codec: u8, n: u32, body: &[u8]) -> Vec<u8> {
    let mut r = 0u32.to_le_bytes().to_vec(); // disk 0
    r.push(b'C');
    r.extend_from_slice(&0u64.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    r.push(codec);
    r.extend_from_slice(&n.to_le_bytes());
    r.extend_from_slice(body);
    r
}

#[test]
fn hostile_compressed_blocks_are_refused() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (compressed_record(512, 1, 1, &[0]), "not a compressor"),
        (compressed_record(512, 9, 1, &[0]), "not a compressor"),
        (compressed_record(512, 3, 512, &[0; 512]), "no compression"),
        (compressed_record(512, 3, 10, &[0; 9]), "has 9 of 10 bytes"),
        (compressed_record(100, 3, 1, &[0]), "whole sectors"),
        (compressed_record((2 << 20) as u32, 3, 1, &[0]), "at most"),
        (
            compressed_record(512, 3, 1, &[])[..20].to_vec(),
            "cut short",
        ),
    ];
    for (bytes, why) in cases {
        let err = BlockBatch::from_bytes(bytes.clone()).expect_err("refused");
        assert!(err.to_string().contains(why), "{bytes:?}: {err}");
    }
    // Well-formed, and its codec must have been agreed.
    let batch = BlockBatch::from_bytes(compressed_record(512, 4, 1, &[0])).expect("well-formed");
    let setup = sample_setup();
    let err = ledger::Ledger::for_setup(&setup, CodecSet::NONE.with(PageCodec::Lz4))
        .check_blocks(&batch)
        .expect_err("zstd not agreed");
    assert!(err.to_string().contains("not agreed"), "{err}");
    assert!(ledger::Ledger::for_setup(&setup, CodecSet::all())
        .check_blocks(&batch)
        .is_ok());
}
