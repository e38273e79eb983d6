//! Port-I/O and MMIO buses: every exit that reaches the VMM is routed here by address.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_devices::bus::BusDevice;

/// A device shared between the bus (vCPU threads) and whoever else drives it.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors while building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{bus} range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap {
        bus: &'static str,
        base: u64,
        len: u64,
    },
    #[error("{bus} range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        bus: &'static str,
        base: u64,
        len: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// At most this many unhandled accesses are logged per second; a guest must not flood the log.
const UNHANDLED_LOGS_PER_SEC: u64 = 10;

/// Address-keyed devices. Built before the vCPUs start, then shared read-only.
pub struct Bus {
    name: &'static str,
    devices: BTreeMap<u64, Entry>,
    unhandled: AtomicU64,
    started: Instant,
    /// (second since start << 32) | logs in that second, to limit logging without a lock.
    log_window: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("devices", &self.devices.len())
            .field("unhandled", &self.unhandled())
            .finish()
    }
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            devices: BTreeMap::new(),
            unhandled: AtomicU64::new(0),
            started: Instant::now(),
            log_window: AtomicU64::new(0),
        }
    }

    /// Claims `[base, base + len)` for `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedBusDevice) -> Result<(), BusError> {
        let bus = self.name;
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { bus, base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((&b, e)) = before {
            if b + e.len > base {
                return Err(BusError::Overlap { bus, base, len });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= entry.len).then_some((offset, entry))
    }

    /// Routes a guest read. Unclaimed addresses read as all-ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => lock(&entry.device).read(offset, data),
            None => {
                data.fill(0xff);
                self.note_unhandled("read", addr, data.len());
            }
        }
    }

    /// Routes a guest write. Writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => lock(&entry.device).write(offset, data),
            None => self.note_unhandled("write", addr, data.len()),
        }
    }

    /// How many accesses hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn note_unhandled(&self, what: &str, addr: u64, len: usize) {
        self.unhandled.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_secs();
        let window = self.log_window.load(Ordering::Relaxed);
        let next = if window >> 32 == now {
            window + 1
        } else {
            now << 32 | 1
        };
        if self
            .log_window
            .compare_exchange(window, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && next & 0xffff_ffff <= UNHANDLED_LOGS_PER_SEC
        {
            tracing::debug!(
                bus = self.name,
                addr = format_args!("{addr:#x}"),
                len,
                "unhandled {what}"
            );
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panic elsewhere keeps serving, since
/// its registers are plain data and the VM is better off running than wedged.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn bus_with(base: u64, len: u64) -> (Bus, Arc<Mutex<Recorder>>) {
        let mut bus = Bus::new("test");
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(base, len, dev.clone()).expect("insert");
        (bus, dev)
    }

    #[test]
    fn routes_by_offset_within_the_range() {
        let (bus, dev) = bus_with(0x100, 8);
        let mut b = [0u8; 1];
        bus.read(0x103, &mut b);
        assert_eq!(b, [3]);
        bus.write(0x107, &[9]);
        assert_eq!(lock(&dev).writes, vec![(7, vec![9])]);
        assert_eq!(bus.unhandled(), 0);
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_counted() {
        let (bus, dev) = bus_with(0x100, 8);
        let mut b = [0u8; 4];
        bus.read(0x50, &mut b);
        assert_eq!(b, [0xff; 4]);
        // An access straddling the end of a device's range belongs to nobody.
        bus.read(0x106, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.write(0x108, &[1]);
        assert_eq!(bus.unhandled(), 3);
        assert!(lock(&dev).writes.is_empty());
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let (mut bus, _) = bus_with(0x100, 8);
        let other = Arc::new(Mutex::new(Recorder::default()));
        assert!(matches!(
            bus.insert(0x104, 8, other.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xfc, 8, other.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x200, 0, other.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, other.clone()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x108, 8, other).expect("adjacent range is fine");
    }

    #[test]
    fn a_flood_of_unhandled_accesses_is_counted_in_full() {
        let bus = Bus::new("flood");
        let mut b = [0u8; 1];
        for _ in 0..10_000 {
            bus.read(0xdead, &mut b);
        }
        assert_eq!(bus.unhandled(), 10_000);
    }
}
