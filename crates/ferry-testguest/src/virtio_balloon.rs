//! The virtio-balloon device (ID 5) over virtio-mmio version 2 (the transport is `virtio_mmio`):
//! feature negotiation, its queues and its configuration space. What is done with them lives in
//! `balloon` (inflate, deflate, statistics), `balloon_hint` (free page hinting) and
//! `balloon_report` (free page reporting). Polling only, like the other drivers.
//!
//! Accepted features: VIRTIO_F_VERSION_1 (required) and, when offered, STATS_VQ,
//! FREE_PAGE_HINT and REPORTING. Not MUST_TELL_HOST (deflated pages are reused only after the
//! device returned their buffer anyway), DEFLATE_ON_OOM, or PAGE_POISON (freed memory holds
//! garbage, not a poison value). Queues are numbered compactly
//! in this order, only for negotiated features, as Linux does: inflateq, deflateq, [statsq],
//! [free_page_vq], [reporting_vq].

use crate::cmdline::VirtioMmio;
use crate::memory::PhysAlloc;
use crate::virtio_mmio::{self, Error, Mmio, SplitQueue, F_VERSION_1};

const DEVICE_BALLOON: u32 = 5;
pub const DEV: &str = "virtio-balloon";

pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
pub const F_REPORTING: u64 = 1 << 5;

/// Configuration space (little-endian u32s): the device's target in 4 KiB pages, the pages
/// the driver has given, the free page hint command.
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;
const CFG_HINT_CMD_ID: u64 = 8;

/// Entries of the inflate, deflate and stats queues (one buffer in flight on each).
const SMALL_RING: u16 = 8;
/// Entries of the free page hint queue: hints in flight at once.
pub const HINT_RING: u16 = 256;
/// Entries of the reporting queue: the longest report chain (Linux's capacity).
pub const REPORT_RING: u16 = 32;

/// The device and its configuration space.
pub struct BalloonDev {
    mmio: Mmio,
    features: u64,
}

/// The negotiated queues, each set up in RAM of its own.
pub struct Queues {
    pub inflate: SplitQueue,
    pub deflate: SplitQueue,
    pub stats: Option<SplitQueue>,
    pub hint: Option<SplitQueue>,
    pub report: Option<SplitQueue>,
}

/// Finds the first virtio-balloon device among `windows` and sets up its queues (the device is
/// live afterwards: DRIVER_OK). `Ok(None)` if there is none.
pub fn probe(
    windows: &[VirtioMmio],
    alloc: &mut PhysAlloc,
) -> Result<Option<(BalloonDev, Queues)>, Error> {
    let Some((mmio, _)) = virtio_mmio::find(windows, DEVICE_BALLOON)? else {
        return Ok(None);
    };
    let offered = mmio.begin(DEV)?;
    let features = F_VERSION_1 | (offered & (F_STATS_VQ | F_FREE_PAGE_HINT | F_REPORTING));
    mmio.accept(DEV, features)?;

    let mut index = 0;
    let mut queue = |want: u16| {
        let mem = alloc
            .alloc(SplitQueue::bytes(want), 4096)
            .unwrap_or_else(|| crate::fatal!("out of memory for the virtio-balloon queues"));
        let q = SplitQueue::setup(&mmio, DEV, index, want, mem);
        index += 1;
        q
    };
    let inflate = queue(SMALL_RING)?;
    let deflate = queue(SMALL_RING)?;
    let mut optional =
        |feature: u64, want: u16| (features & feature != 0).then(|| queue(want)).transpose();
    let stats = optional(F_STATS_VQ, SMALL_RING)?;
    let hint = optional(F_FREE_PAGE_HINT, HINT_RING)?;
    let report = optional(F_REPORTING, REPORT_RING)?;
    if hint.as_ref().is_some_and(|q| q.size() < 2) {
        // One descriptor always stays free for the STOP that ends a hint run.
        mmio.fail();
        return Err(Error::new(
            DEV,
            "free page hint queue has fewer than 2 entries",
        ));
    }
    mmio.driver_ok();
    let dev = BalloonDev { mmio, features };
    // A driver starts with an empty balloon, whatever an earlier boot left in `actual`.
    dev.set_actual(0);
    Ok(Some((
        dev,
        Queues {
            inflate,
            deflate,
            stats,
            hint,
            report,
        },
    )))
}

impl BalloonDev {
    pub fn mmio(&self) -> &Mmio {
        &self.mmio
    }

    /// The features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device's target: 4 KiB pages it wants in the balloon. A VM exit.
    pub fn target(&self) -> u32 {
        self.mmio.config_field().u32(CFG_NUM_PAGES)
    }

    /// Tells the device how many pages the balloon holds. A VM exit.
    pub fn set_actual(&self, pages: u32) {
        self.mmio.config_field().set_u32(CFG_ACTUAL, pages);
    }

    /// The free page hint command (STOP, DONE or a command ID). A VM exit.
    pub fn hint_cmd_id(&self) -> u32 {
        self.mmio.config_field().u32(CFG_HINT_CMD_ID)
    }
}
