//! `ferry_proto::migration::BlockBatch::from_bytes` over arbitrary bytes: the disk contents a
//! destination takes from the network.
//!
//! Besides never panicking: a batch that is accepted has only records that obey the layout's
//! rules (whole sectors, not empty, at most `MAX_BLOCK_DATA` of data, no overflow, a compressed
//! body shorter than what it opens to), its records cover exactly its bytes, and a writer that
//! pushes the same records builds the same bytes again (for batches without compressed
//! records: a compressor need not reproduce a body byte for byte).

#![no_main]

use ferry_proto::migration::{
    BlockBatch, BlockBatchWriter, BlockRecord, DISK_SECTOR_SIZE, MAX_BATCH_BYTES, MAX_BLOCK_DATA,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = BlockBatch::from_bytes(data.to_vec()) else {
        return;
    };
    let mut again = BlockBatchWriter::new(batch.disk(), MAX_BATCH_BYTES);
    let mut compressed = false;
    for record in batch.records() {
        let record = record.expect("an accepted batch has only valid records");
        assert!(record.len() > 0);
        assert_eq!(record.offset() % DISK_SECTOR_SIZE, 0);
        assert_eq!(record.len() % DISK_SECTOR_SIZE, 0);
        assert!(record.offset().checked_add(record.len()).is_some());
        match record {
            BlockRecord::Hole { offset, len } => assert!(again.push_hole(offset, len)),
            BlockRecord::Compressed { len, body, .. } => {
                assert!((body.len() as u64) < len);
                assert!(len as usize <= MAX_BLOCK_DATA);
                compressed = true;
            }
            BlockRecord::Data { offset, bytes } => {
                assert!(bytes.len() <= MAX_BLOCK_DATA);
                again
                    .push_data(offset, bytes.len())
                    .expect("room")
                    .copy_from_slice(bytes);
            }
        }
    }
    if !compressed {
        assert_eq!(again.take().as_bytes(), batch.as_bytes());
    }
});
