//! Input of the `virtio_blk` target: where the driver put the request queue, then guest memory.
//!
//! ```text
//! offset  size  field
//!      0     1  bits 0-3: log2 of the queue size (9 and up are over the device's 256, which
//!               the transport must refuse); bit 4: the disk is read-only
//!      1     4  descriptor table address   (u32 LE; the transport checks alignment,
//!      5     4  available ring address      placement in guest memory and overlaps)
//!      9     4  used ring address
//!     13     -  guest memory from address 0: descriptors, rings, request headers, data
//! ```
//! Guest memory is [`ferry_devices::fuzzing::MEMORY_SIZE`] bytes in two regions; what the
//! input does not cover is zero.

use ferry_devices::fuzzing::QueueLayout;

use crate::u32_at;

/// Bytes before the memory image.
pub const HEADER_LEN: usize = 13;

const READ_ONLY: u8 = 1 << 4;

/// A decoded input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkInput<'a> {
    pub layout: QueueLayout,
    pub read_only: bool,
    pub memory: &'a [u8],
}

impl<'a> BlkInput<'a> {
    /// `None` for an input shorter than the header.
    pub fn decode(data: &'a [u8]) -> Option<Self> {
        let flags = *data.first()?;
        Some(BlkInput {
            layout: QueueLayout {
                size: 1 << (flags & 0xf),
                desc: u64::from(u32_at(data, 1)?),
                driver: u64::from(u32_at(data, 5)?),
                device: u64::from(u32_at(data, 9)?),
            },
            read_only: flags & READ_ONLY != 0,
            memory: &data[HEADER_LEN..],
        })
    }

    /// The input that decodes as `self`. The queue size must be a power of two below 2^16 and
    /// the addresses must fit in 32 bits.
    pub fn encode(&self) -> Vec<u8> {
        let size = self.layout.size;
        assert!(
            size.is_power_of_two() && size < 1 << 16,
            "queue size {size}"
        );
        let addr = |a: u64| u32::try_from(a).expect("a 32-bit address").to_le_bytes();
        let mut out =
            vec![size.trailing_zeros() as u8 | if self.read_only { READ_ONLY } else { 0 }];
        out.extend(addr(self.layout.desc));
        out.extend(addr(self.layout.driver));
        out.extend(addr(self.layout.device));
        out.extend_from_slice(self.memory);
        out
    }
}
