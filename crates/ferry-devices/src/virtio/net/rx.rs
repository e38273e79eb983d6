//! The receive queue: frames from the backend into the buffers the driver made available.

use std::time::Instant;

use vm_memory::Bytes;

use super::device::Net;
use super::flows::Direction;
use super::NET_HDR_LEN;
use crate::ratelimit::log_limited;
use crate::virtio::add_to_counter as add;
use crate::virtio::chain::Chain;
use crate::GuestMemory;

/// Frames handled per pass before the device thread turns to other work.
pub(super) const FRAMES_PER_PASS: usize = 64;

/// Why a receive chain cannot take the frame.
enum Unusable {
    /// The chain is malformed (bad descriptors, device-readable buffers).
    Chain,
    /// Well-formed, but smaller than the frame.
    TooSmall,
}

/// Writes `frame` (header first) across the writable buffers of `chain`.
fn write_frame(mem: &GuestMemory, chain: &Chain, frame: &[u8]) -> Result<u32, Unusable> {
    if chain.error.is_some() || !chain.readable.is_empty() {
        return Err(Unusable::Chain);
    }
    if chain.writable_len() < frame.len() as u64 {
        return Err(Unusable::TooSmall);
    }
    let mut rest = frame;
    for seg in &chain.writable {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(seg.len as usize);
        // The walker checked that every buffer lies in guest memory.
        mem.write_slice(&rest[..n], seg.addr)
            .map_err(|_| Unusable::Chain)?;
        rest = &rest[n..];
    }
    // At most NET_HDR_LEN + MAX_FRAME_LEN.
    Ok(frame.len() as u32)
}

impl Net {
    /// Moves frames from the backend to the guest, at most [`FRAMES_PER_PASS`]. Returns
    /// whether frames may be left that the driver has room for (pass again soon). A frame
    /// without a buffer waits in the device until the driver gives one and kicks the queue.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            self.drain_backend();
            return false;
        };
        let rx = &mut active.rx;
        let mut delivered = false;
        let mut more = false;
        for pass in 0.. {
            if pass == FRAMES_PER_PASS {
                more = true;
                break;
            }
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_frame) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        log_limited!(self.log, warn, "virtio-net: cannot read a frame: {e}");
                        break;
                    }
                },
            };
            if len <= NET_HDR_LEN {
                add(&self.counters.rx_dropped, 1);
                continue;
            }
            let Some(chain) = rx.pop(&self.log) else {
                self.rx_pending = Some(len);
                break;
            };
            // No offloads were negotiated: whatever the host's header says, the guest gets a
            // zeroed one that describes one buffer.
            let frame = &mut self.rx_frame[..len];
            frame[..NET_HDR_LEN].fill(0);
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            match write_frame(&rx.mem, &chain, frame) {
                Ok(written) => {
                    if !rx.push(&self.log, chain.head, written) {
                        break;
                    }
                    delivered = true;
                    add(&self.counters.rx_frames, 1);
                    add(&self.counters.rx_bytes, (len - NET_HDR_LEN) as u64);
                    let frame = &frame[NET_HDR_LEN..];
                    if super::flows::meant_for(frame, &self.mac) {
                        self.flows.record(frame, Direction::ToGuest, Instant::now());
                    }
                }
                Err(Unusable::Chain) => {
                    // Give the bad chain back empty and try the frame on the next one.
                    add(&self.counters.invalid_chains, 1);
                    log_limited!(
                        self.log,
                        warn,
                        head = chain.head,
                        "virtio-net: malformed receive chain"
                    );
                    self.rx_pending = Some(len);
                    if !rx.push(&self.log, chain.head, 0) {
                        break;
                    }
                    delivered = true;
                }
                Err(Unusable::TooSmall) => {
                    add(&self.counters.rx_dropped, 1);
                    log_limited!(
                        self.log,
                        info,
                        frame = len - NET_HDR_LEN,
                        buffer = chain.writable_len(),
                        "virtio-net: frame larger than the receive buffer; dropped"
                    );
                    rx.unpop();
                }
            }
        }
        if delivered {
            rx.notify(&self.log);
        }
        more && !rx.broken
    }

    /// Reads and drops what the backend holds: no driver is there to take it.
    fn drain_backend(&mut self) {
        for _ in 0..FRAMES_PER_PASS * 4 {
            match self.backend.recv(&mut self.rx_frame) {
                Ok(Some(_)) => add(&self.counters.rx_dropped, 1),
                Ok(None) | Err(_) => return,
            }
        }
    }
}
