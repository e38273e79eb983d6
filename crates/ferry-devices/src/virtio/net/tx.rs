//! The transmit queue: frames the guest sends, out through the backend.

use std::time::Instant;

use vm_memory::Bytes;

use super::device::Net;
use super::flows::Direction;
use super::rx::FRAMES_PER_PASS;
use super::{MAX_FRAME_LEN, NET_HDR_LEN};
use crate::ratelimit::log_limited;
use crate::virtio::add_to_counter as add;
use crate::virtio::chain::Chain;
use crate::GuestMemory;

/// An Ethernet header: anything shorter is not a frame.
const MIN_FRAME_LEN: usize = 14;

/// Why a transmit chain was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum BadFrame {
    #[error("malformed chain: {0}")]
    Chain(#[from] crate::virtio::chain::ChainError),
    #[error("device-writable buffer in a transmit chain")]
    Writable,
    #[error("frame of {0} bytes (header included) is not between a header and the largest frame")]
    Length(u64),
    #[error("buffer not in guest memory")]
    Memory,
}

/// Gathers the frame (header first) of `chain` into `out`.
pub(super) fn gather(mem: &GuestMemory, chain: &Chain, out: &mut Vec<u8>) -> Result<(), BadFrame> {
    if let Some(e) = chain.error {
        return Err(e.into());
    }
    if !chain.writable.is_empty() {
        return Err(BadFrame::Writable);
    }
    let len = chain.readable_len();
    if len < (NET_HDR_LEN + MIN_FRAME_LEN) as u64 || len > (NET_HDR_LEN + MAX_FRAME_LEN) as u64 {
        return Err(BadFrame::Length(len));
    }
    out.clear();
    out.resize(len as usize, 0);
    let mut at = 0;
    for seg in &chain.readable {
        let end = at + seg.len as usize;
        mem.read_slice(&mut out[at..end], seg.addr)
            .map_err(|_| BadFrame::Memory)?;
        at = end;
    }
    Ok(())
}

impl Net {
    /// Sends what the driver queued, at most [`FRAMES_PER_PASS`] frames. Returns whether
    /// chains are left (pass again soon).
    pub(crate) fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let tx = &mut active.tx;
        let mut used = false;
        for _ in 0..FRAMES_PER_PASS {
            let Some(chain) = tx.pop(&self.log) else {
                break;
            };
            match gather(&tx.mem, &chain, &mut self.tx_frame) {
                Ok(()) => {
                    // We offered no offloads: the guest's header asks for nothing, whatever
                    // it says, and the host gets a zeroed one.
                    self.tx_frame[..NET_HDR_LEN].fill(0);
                    let frame = &self.tx_frame[NET_HDR_LEN..];
                    match self.backend.send(&self.tx_frame) {
                        Ok(()) => {
                            add(&self.counters.tx_frames, 1);
                            add(&self.counters.tx_bytes, frame.len() as u64);
                        }
                        Err(e) => {
                            add(&self.counters.tx_errors, 1);
                            log_limited!(self.log, warn, "virtio-net: cannot send a frame: {e}");
                        }
                    }
                    self.flows
                        .record(frame, Direction::FromGuest, Instant::now());
                }
                Err(e) => {
                    add(&self.counters.invalid_chains, 1);
                    log_limited!(
                        self.log,
                        warn,
                        head = chain.head,
                        "virtio-net: bad transmit chain: {e}"
                    );
                }
            }
            if !tx.push(&self.log, chain.head, 0) {
                break;
            }
            used = true;
        }
        if used {
            tx.notify(&self.log);
        }
        tx.has_available()
    }
}
