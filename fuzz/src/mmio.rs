//! Input of the `mmio_registers` target: guest memory, then what the guest does.
//!
//! ```text
//! offset  size  field
//!      0     2  M: bytes of guest memory image that follow (u16 LE, cut to what is there)
//!      2     M  guest memory from address 0 (queues and requests for activations to find)
//!    2+M     -  operations, each a tag byte (taken modulo 4) and its fields:
//!               0 read   width:u8 offset:u16                       1, 2, 4 or 8 bytes
//!               1 write  width:u8 offset:u16 value:u32             (width: 2 low bits)
//!               2 init   log2_size:u8 desc:u32 driver:u32 device:u32 features_low:u32
//!               3 kick   (QueueNotify 0, then one pass of the device's event loop)
//! ```
//! Offsets are taken modulo the register window, so they cover the registers and the
//! configuration space. `init` writes the whole bring-up sequence of a driver with
//! attacker-chosen queue addresses (see `ferry_devices::fuzzing::driver_init`); raw writes
//! can do the same step by step, or anything else. An operation cut short by the end of the
//! input is dropped.

use ferry_devices::fuzzing::QueueLayout;
use ferry_devices::virtio::mmio::MMIO_WINDOW_SIZE;

use crate::{u16_at, u32_at};

/// One thing the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        width: usize,
    },
    Write {
        offset: u64,
        width: usize,
        value: u32,
    },
    Init {
        layout: QueueLayout,
        features_low: u32,
    },
    Kick,
}

const WIDTHS: [usize; 4] = [1, 2, 4, 8];

impl Op {
    /// Encodes the operation; `offset` must be below the window and `width` one of 1, 2, 4,
    /// 8, the queue size a power of two below 2^16 and the addresses 32-bit.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let width = |w: usize| {
            WIDTHS
                .iter()
                .position(|&x| x == w)
                .expect("width 1, 2, 4 or 8") as u8
        };
        let offset = |o: u64| {
            u16::try_from(o)
                .expect("offset in the window")
                .to_le_bytes()
        };
        let addr = |a: u64| u32::try_from(a).expect("a 32-bit address").to_le_bytes();
        match *self {
            Op::Read {
                offset: o,
                width: w,
            } => {
                out.extend([0, width(w)]);
                out.extend(offset(o));
            }
            Op::Write {
                offset: o,
                width: w,
                value,
            } => {
                out.extend([1, width(w)]);
                out.extend(offset(o));
                out.extend(value.to_le_bytes());
            }
            Op::Init {
                layout,
                features_low,
            } => {
                assert!(layout.size.is_power_of_two() && layout.size < 1 << 16);
                out.extend([2, layout.size.trailing_zeros() as u8]);
                out.extend(addr(layout.desc));
                out.extend(addr(layout.driver));
                out.extend(addr(layout.device));
                out.extend(features_low.to_le_bytes());
            }
            Op::Kick => out.push(3),
        }
    }
}

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioInput<'a> {
    pub memory: &'a [u8],
    pub ops: Vec<Op>,
}

impl<'a> MmioInput<'a> {
    pub fn decode(data: &'a [u8]) -> Self {
        let declared = u16_at(data, 0).map_or(0, usize::from);
        let rest = data.get(2..).unwrap_or_default();
        let (memory, mut ops_data) = rest.split_at(declared.min(rest.len()));
        let mut ops = Vec::new();
        while let Some((op, len)) = decode_op(ops_data) {
            ops.push(op);
            ops_data = &ops_data[len..];
        }
        MmioInput { memory, ops }
    }

    pub fn encode(&self) -> Vec<u8> {
        let len = u16::try_from(self.memory.len()).expect("an image under 64 KiB");
        let mut out = len.to_le_bytes().to_vec();
        out.extend_from_slice(self.memory);
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}

/// One operation and its encoded length, if the input holds a whole one.
fn decode_op(data: &[u8]) -> Option<(Op, usize)> {
    let offset = |at| u16_at(data, at).map(|o| u64::from(o) % MMIO_WINDOW_SIZE);
    let width = |at| data.get(at).map(|w| WIDTHS[usize::from(w & 3)]);
    let addr = |at| u32_at(data, at).map(u64::from);
    Some(match data.first()? % 4 {
        0 => (
            Op::Read {
                width: width(1)?,
                offset: offset(2)?,
            },
            4,
        ),
        1 => (
            Op::Write {
                width: width(1)?,
                offset: offset(2)?,
                value: u32_at(data, 4)?,
            },
            8,
        ),
        2 => (
            Op::Init {
                layout: QueueLayout {
                    size: 1 << (data.get(1)? & 0xf),
                    desc: addr(2)?,
                    driver: addr(6)?,
                    device: addr(10)?,
                },
                features_low: u32_at(data, 14)?,
            },
            18,
        ),
        _ => (Op::Kick, 1),
    })
}
