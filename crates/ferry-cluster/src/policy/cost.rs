//! What moving a VM costs: the bytes it puts on the link.

use crate::model::{MoveProtocol, VmLoad, VmReport};

/// Bytes a move of a VM with `load` is expected to send at `link_bytes_per_sec`.
///
/// Memory is what the guest uses (its working set when it says, else all of it) plus its
/// disk images. Pre-copy also resends what the guest dirties while that first copy runs
/// (at most its whole memory again); pause-and-copy sends each page once.
pub fn estimated_bytes(load: &VmLoad, protocol: MoveProtocol, link_bytes_per_sec: f64) -> u64 {
    let memory = load
        .working_set_bytes
        .map_or(load.memory_bytes, |ws| ws.min(load.memory_bytes));
    let first_copy = memory.saturating_add(load.disk_bytes);
    let resent = match protocol {
        MoveProtocol::PauseAndCopy => 0,
        MoveProtocol::PreCopy => {
            let copy_secs = first_copy as f64 / link_bytes_per_sec.max(1.0);
            let dirtied = load.dirty_bytes_per_sec.unwrap_or(0.0).max(0.0) * copy_secs;
            // `as` saturates, and a page can only be resent once per pass.
            (dirtied as u64).min(load.memory_bytes)
        }
    };
    first_copy.saturating_add(resent)
}

/// Guest memory a VM holds on its host: its load's figure, or its spec when the load has
/// none yet (a VM just started).
pub(crate) fn vm_memory_bytes(vm: &VmReport) -> u64 {
    if vm.load.memory_bytes > 0 {
        vm.load.memory_bytes
    } else {
        vm.spec.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;
    /// 1 Gbit/s.
    const LINK: f64 = 125e6;

    #[test]
    fn estimates() {
        // (memory, working set, dirty bytes/s, disk, protocol, expected bytes)
        let cases = [
            (1000 * MB, None, None, 0, MoveProtocol::PreCopy, 1000 * MB),
            (
                1000 * MB,
                Some(300 * MB),
                None,
                0,
                MoveProtocol::PreCopy,
                300 * MB,
            ),
            // Working set above memory (stale balloon stats): memory bounds it.
            (
                100 * MB,
                Some(300 * MB),
                None,
                0,
                MoveProtocol::PreCopy,
                100 * MB,
            ),
            // 250 MB at 125 MB/s take 2 s, while the guest dirties 50 MB/s.
            (
                1000 * MB,
                Some(200 * MB),
                Some(50e6),
                50 * MB,
                MoveProtocol::PreCopy,
                350 * MB,
            ),
            (
                1000 * MB,
                Some(200 * MB),
                Some(50e6),
                50 * MB,
                MoveProtocol::PauseAndCopy,
                250 * MB,
            ),
            // Dirtying faster than the link: at most the memory again.
            (
                100 * MB,
                None,
                Some(1e12),
                0,
                MoveProtocol::PreCopy,
                200 * MB,
            ),
        ];
        for (memory, ws, dirty, disk, protocol, want) in cases {
            let load = VmLoad {
                memory_bytes: memory,
                working_set_bytes: ws,
                dirty_bytes_per_sec: dirty,
                disk_bytes: disk,
                ..VmLoad::default()
            };
            assert_eq!(
                estimated_bytes(&load, protocol, LINK),
                want,
                "{memory} {ws:?} {dirty:?} {disk} {protocol:?}"
            );
        }
    }
}
