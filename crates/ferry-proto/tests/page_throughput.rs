//! 256 MiB of pages through the batch codec, counting every heap allocation.
//!
//! Its own test binary, so the counting allocator sees this test alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ferry_proto::migration::{
    read_message_reusing, write_message, Message, PageBatch, PageBatchWriter, PageRecord,
    MAX_BATCH_BYTES, PAGE_SIZE,
};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments, so
// `System`'s guarantees hold unchanged; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TOTAL_BYTES: u64 = 256 << 20;
const PAGES: u64 = TOTAL_BYTES / PAGE_SIZE;

/// Every fourth page is zero; the others carry their gpa, so a misplaced page is caught.
fn is_zero(index: u64) -> bool {
    index % 4 == 3
}

#[test]
fn encoding_and_decoding_256_mib_of_pages_does_not_allocate_per_page() {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut writer = PageBatchWriter::new(MAX_BATCH_BYTES);
    let mut spare = PageBatch::new();
    let mut wire: Vec<u8> = Vec::with_capacity(MAX_BATCH_BYTES + 64);
    let mut receive_buffer: Vec<u8> = Vec::new();
    let (mut data_seen, mut zero_seen, mut batches) = (0u64, 0u64, 0u64);

    // Writes the writer's batch to the "wire" and decodes it back, checking every record.
    let mut round_trip = |writer: &mut PageBatchWriter, spare: &mut PageBatch| {
        writer.swap_into(spare);
        let message = Message::Pages(std::mem::take(spare));
        wire.clear();
        write_message(&mut wire, &message).expect("write");
        // Give the buffer back for the next swap: the ping-pong that avoids allocation.
        let Message::Pages(sent) = message else {
            unreachable!()
        };
        *spare = sent;
        let buffer = std::mem::take(&mut receive_buffer);
        let Message::Pages(received) =
            read_message_reusing(&mut Cursor::new(&wire), buffer).expect("read")
        else {
            panic!("not a page batch");
        };
        for record in received.records() {
            match record.expect("valid record") {
                PageRecord::Data { gpa, bytes } => {
                    assert_eq!(bytes[..8], gpa.to_le_bytes(), "page at {gpa:#x}");
                    data_seen += 1;
                }
                PageRecord::Zero { gpa, pages } => {
                    assert!(is_zero(gpa / PAGE_SIZE));
                    zero_seen += u64::from(pages);
                }
                PageRecord::Encoded { gpa, .. } => panic!("page {gpa:#x} encoded: none was"),
            }
        }
        // The receiver hands its buffer back too.
        receive_buffer = received.into_bytes();
        batches += 1;
    };

    let start = Instant::now();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for index in 0..PAGES {
        let gpa = index * PAGE_SIZE;
        page[..8].copy_from_slice(&gpa.to_le_bytes());
        let push = |w: &mut PageBatchWriter| {
            if is_zero(index) {
                w.push_zero_run(gpa, 1)
            } else {
                w.push_page(gpa, &page)
            }
        };
        if !push(&mut writer) {
            round_trip(&mut writer, &mut spare);
            assert!(push(&mut writer), "an empty batch takes a page");
        }
    }
    if !writer.is_empty() {
        round_trip(&mut writer, &mut spare);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let elapsed = start.elapsed();

    assert_eq!(data_seen + zero_seen, PAGES);
    assert_eq!(zero_seen, PAGES / 4);
    // Buffers go round on both sides: the writer's second buffer and the receive buffer are
    // allocated once, the first time. Per batch and per page there is nothing.
    assert!(
        allocations <= 8,
        "{allocations} allocations for {batches} batches of {PAGES} pages"
    );
    eprintln!(
        "256 MiB in {batches} batches: {allocations} allocations, {:.0} MiB/s (not asserted)",
        256.0 / elapsed.as_secs_f64()
    );
}
