//! Serving the balloon's queues. Every chain was written by the guest: a malformed one is
//! counted, logged (rate-limited) and returned unused; it never stops the device.
//!
//! - inflate / deflate: arrays of u32 page frame numbers (4 KiB pages). Inflated pages are
//!   given back to the host; deflated ones need nothing (they read as zero when touched).
//! - stats: one buffer of statistics, held until the device wants fresher ones.
//! - free page: a command ID (readable), or free memory lent as hints (writable).
//! - reporting: free memory the guest hands back for good, as writable buffers; given back
//!   before the chain returns, so the guest reuses it only after.

use super::device::{Balloon, Role};
use super::give_back::give_back;
use super::stats::{parse_stats, MAX_STAT_ENTRIES, STAT_ENTRY};
use crate::ratelimit::log_limited;
use crate::virtio::add_to_counter as add;
use crate::virtio::chain::{Chain, Segment};
use crate::GuestMemory;

/// Chains served per pass before the loop lets other devices run.
const CHAINS_PER_PASS: usize = 64;
/// Page frame numbers read from one inflate or deflate chain at most (the Linux driver sends
/// 256 per chain).
const MAX_PFNS: usize = 4096;

/// The 4 KiB page frame numbers in `bytes`, as runs `(first guest address, pages)` of
/// consecutive frames.
fn pfn_runs(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for c in bytes.chunks_exact(4) {
        let gpa = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) << 12;
        match runs.last_mut() {
            Some((start, n)) if *start + *n * 4096 == gpa => *n += 1,
            _ => runs.push((gpa, 1)),
        }
    }
    runs
}

impl Balloon {
    /// Serves the queue at `index`. Returns whether chains are left.
    pub(crate) fn process_queue(&mut self, index: usize) -> bool {
        let Some(role) = self
            .active
            .as_ref()
            .and_then(|a| a.queues.get(index).map(|(r, _)| *r))
        else {
            return false;
        };
        if role == Role::Stats {
            return self.process_stats();
        }
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some((_, queue)) = active.queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        for _ in 0..CHAINS_PER_PASS {
            let Some(chain) = queue.pop(&self.log) else {
                break;
            };
            if let Some(e) = chain.error {
                add(&self.counters.invalid_chains, 1);
                log_limited!(
                    self.log,
                    warn,
                    head = chain.head,
                    "{}: malformed chain: {e}",
                    role.name()
                );
            } else {
                match role {
                    Role::Inflate | Role::Deflate => {
                        pages_chain(&queue.mem, &chain, role, &self.counters, &self.log)
                    }
                    Role::Hint => hint_chain(&queue.mem, &chain, &self.hints, &self.counters),
                    Role::Report => report_chain(&queue.mem, &chain, &self.counters, &self.log),
                    Role::Stats => {}
                }
            }
            if !queue.push(&self.log, chain.head, 0) {
                break;
            }
            used = true;
        }
        if used {
            queue.notify(&self.log);
        }
        queue.has_available()
    }

    /// Takes the statistics buffer the driver offers, reads it, and holds it.
    fn process_stats(&mut self) -> bool {
        let Some(queue) = self.active.as_mut().and_then(|a| a.queue(Role::Stats)) else {
            return false;
        };
        loop {
            let Some(chain) = queue.pop(&self.log) else {
                return false;
            };
            let read = if chain.error.is_none() {
                chain.read_readable(&queue.mem, MAX_STAT_ENTRIES * STAT_ENTRY)
            } else {
                None
            };
            match read {
                Some(bytes) => {
                    self.stats = Some((parse_stats(&bytes), std::time::Instant::now()));
                    add(&self.counters.stats_updates, 1);
                    // A driver that offers a second buffer while we hold one: the old one goes
                    // back, the newest is held.
                    if let Some(old) = self.stats_head.replace(chain.head) {
                        if !queue.push(&self.log, old, 0) {
                            return false;
                        }
                        queue.notify(&self.log);
                    }
                }
                None => {
                    add(&self.counters.invalid_chains, 1);
                    log_limited!(
                        self.log,
                        warn,
                        head = chain.head,
                        "virtio-balloon stats: malformed chain"
                    );
                    if !queue.push(&self.log, chain.head, 0) {
                        return false;
                    }
                    queue.notify(&self.log);
                }
            }
        }
    }

    /// Asks for fresh statistics: the held buffer goes back, and the driver refills it.
    pub fn request_stats(&mut self) {
        let Some(head) = self.stats_head else {
            return;
        };
        let Some(queue) = self.active.as_mut().and_then(|a| a.queue(Role::Stats)) else {
            return;
        };
        self.stats_head = None;
        if queue.push(&self.log, head, 0) {
            queue.notify(&self.log);
        }
    }
}

/// An inflate or deflate chain: frame numbers in its readable part.
fn pages_chain(
    mem: &GuestMemory,
    chain: &Chain,
    role: Role,
    counters: &super::BalloonCounters,
    log: &crate::ratelimit::LogLimiter,
) {
    let Some(bytes) = chain.read_readable(mem, MAX_PFNS * 4) else {
        add(&counters.invalid_chains, 1);
        return;
    };
    let pages = (bytes.len() / 4) as u64;
    if role == Role::Deflate {
        add(&counters.deflated_pages, pages);
        return;
    }
    add(&counters.inflated_pages, pages);
    for (gpa, n) in pfn_runs(&bytes) {
        if let Err(e) = give_back(mem, gpa, n * 4096) {
            add(&counters.give_back_failures, 1);
            log_limited!(
                log,
                warn,
                "virtio-balloon: inflated pages not given back: {e}"
            );
        }
    }
}

/// A free page chain: a command ID, hints, or both (ID first).
fn hint_chain(
    mem: &GuestMemory,
    chain: &Chain,
    hints: &super::FreePageHints,
    counters: &super::BalloonCounters,
) {
    if !chain.readable.is_empty() {
        match chain.read_readable(mem, 4) {
            Some(b) if b.len() == 4 => {
                hints.on_command(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => add(&counters.invalid_chains, 1),
        }
    }
    for &Segment { addr, len } in &chain.writable {
        hints.on_hint(addr.0, u64::from(len));
    }
}

/// A reporting chain: every writable buffer is given back.
fn report_chain(
    mem: &GuestMemory,
    chain: &Chain,
    counters: &super::BalloonCounters,
    log: &crate::ratelimit::LogLimiter,
) {
    for &Segment { addr, len } in &chain.writable {
        match give_back(mem, addr.0, u64::from(len)) {
            Ok(pages) => add(&counters.reported_pages, pages),
            Err(e) => {
                add(&counters.give_back_failures, 1);
                log_limited!(
                    log,
                    warn,
                    "virtio-balloon: reported pages not given back: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_numbers_group_into_runs() {
        let pfns: Vec<u8> = [5u32, 6, 7, 9, 8, 0xffff_ffff]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .chain([1, 2]) // a partial number is ignored
            .collect();
        assert_eq!(
            pfn_runs(&pfns),
            vec![
                (0x5000, 3),
                (0x9000, 1),
                (0x8000, 1),
                (0xffff_ffffu64 << 12, 1)
            ]
        );
        assert!(pfn_runs(&[]).is_empty());
    }
}
