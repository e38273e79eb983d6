//! A polling virtio-net driver over virtio-mmio version 2 (virtio 1.x; the transport is
//! `virtio_mmio`), run in ring 3 on the boot CPU, and smoltcp's `phy::Device` over it.
//!
//! Queue 0 receives, queue 1 transmits, queue 2 carries control commands (only with
//! VIRTIO_NET_F_CTRL_VQ). No offloads and no mergeable receive buffers: every frame is preceded
//! by the 12-byte `virtio_net_hdr_v1`, all zero on transmit. The receive queue is kept full of
//! 2 KiB device-writable buffers (descriptor `i` is always buffer `i`), each posted again as
//! soon as its frame is consumed; transmit buffers come back through the used ring. Interrupts
//! are suppressed and never used; a queue is notified only when buffers were added and the
//! device did not say it is already working through the ring. Whatever the device returns is
//! checked: a misbehaving device is fatal.

use crate::clock::RunTime;
use crate::cmdline::VirtioMmio;
use crate::memory::PhysAlloc;
use crate::virtio_mmio::{
    self, Descs, Error, Mmio, SplitQueue, DESC_NEXT, DESC_WRITE, F_VERSION_1,
};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

const DEVICE_NET: u32 = 1;
const DEV: &str = "virtio-net";

pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_GUEST_ANNOUNCE: u64 = 1 << 21;

/// Device configuration: the MAC (6 bytes), then the 16-bit status.
const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const STATUS_LINK_UP: u16 = 1;
const STATUS_ANNOUNCE: u16 = 2;

pub const CTRL_ANNOUNCE: u8 = 3;
pub const CTRL_ANNOUNCE_ACK: u8 = 0;
pub const CTRL_OK: u8 = 0;

const Q_RX: u16 = 0;
const Q_TX: u16 = 1;
const Q_CTRL: u16 = 2;

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
const HDR: usize = 12;
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
/// One receive or transmit buffer: the header and a frame of up to `MAX_FRAME` bytes fit.
const BUF: usize = 2048;
/// The largest frame (without FCS) we send or expect: 1500 bytes of payload.
pub const MAX_FRAME: usize = 1514;
const RING: u16 = 256;
const CTRL_RING: u16 = 8;
/// In the control queue's page, after its rings: the command header and the ack byte.
const OFF_CTRL_HDR: u64 = 0x800;
const OFF_CTRL_ACK: u64 = 0x880;
const _: () = assert!(SplitQueue::bytes(CTRL_RING) <= OFF_CTRL_HDR);
const _: () = assert!(HDR + MAX_FRAME <= BUF);

/// The MAC used when the device offers none: locally administered, unicast.
const FALLBACK_MAC: [u8; 6] = [0x02, 0x66, 0x65, 0x72, 0x72, 0x79];

struct Rx {
    q: SplitQueue,
    bufs: u64,
    /// Which buffers the device holds, to catch one it returns twice or never had.
    posted: [bool; RING as usize],
    kick: bool,
    frames: u64,
}

impl Rx {
    fn buf(&self, id: u16) -> u64 {
        self.bufs + u64::from(id) * BUF as u64
    }

    fn post(&mut self, id: u16) {
        self.posted[usize::from(id)] = true;
        self.q.push(id);
        self.kick = true;
    }

    /// The next received frame: (buffer, frame length), checked.
    fn pop(&mut self) -> Option<(u16, usize)> {
        let (id, len) = self.q.pop_used()?;
        if !self.posted[usize::from(id)] {
            crate::fatal!(
                "virtio-net returned receive buffer {} that it did not hold",
                id
            );
        }
        self.posted[usize::from(id)] = false;
        let len = len as usize;
        if !(HDR..=BUF).contains(&len) {
            crate::fatal!(
                "virtio-net receive buffer {} came back with {} bytes (header {}, buffer {})",
                id,
                len,
                HDR,
                BUF
            );
        }
        // SAFETY: the device is done with the buffer (the used ring said so); it holds at
        // least the header.
        let (flags, gso) = unsafe {
            let h = self.buf(id) as *const u8;
            (h.read_volatile(), h.add(1).read_volatile())
        };
        if flags & HDR_F_NEEDS_CSUM != 0 || gso != GSO_NONE {
            crate::fatal!(
                "virtio-net received a frame with flags {:#x} gso_type {}: offloads we did not \
                 negotiate",
                flags,
                gso
            );
        }
        self.frames += 1;
        Some((id, len - HDR))
    }
}

struct Tx {
    q: SplitQueue,
    bufs: u64,
    /// Which buffers are free and which the device holds (descriptor `i` is buffer `i`).
    descs: Descs<{ RING as usize }>,
    kick: bool,
    frames: u64,
    /// Buffers the device gave back so far.
    returned: u64,
}

impl Tx {
    fn buf(&self, id: u16) -> u64 {
        self.bufs + u64::from(id) * BUF as u64
    }

    /// Takes back the buffers the device has sent.
    fn reclaim(&mut self) {
        while let Some((id, len)) = self.q.pop_used() {
            if len as usize > BUF || !self.descs.give_back(id) {
                crate::fatal!(
                    "virtio-net returned transmit buffer {} (length {}) that it did not hold",
                    id,
                    len
                );
            }
            self.returned += 1;
        }
    }

    fn has_room(&mut self) -> bool {
        if self.descs.available() == 0 {
            self.reclaim();
        }
        self.descs.available() > 0
    }

    /// Queues one frame of `len` bytes that `f` writes. There must be room.
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(len <= MAX_FRAME, "virtio-net: frame of {len} bytes");
        let id = self.descs.take().expect("virtio-net: send without room");
        let b = self.buf(id);
        // SAFETY: buffer `id` (BUF bytes of RAM this driver owns) was free, so the device does
        // not hold it; it is handed over only after `f` is done.
        let frame = unsafe {
            core::ptr::write_bytes(b as *mut u8, 0, HDR);
            core::slice::from_raw_parts_mut((b + HDR as u64) as *mut u8, len)
        };
        let r = f(frame);
        self.q.desc(id, b, (HDR + len) as u32, 0, 0);
        self.q.push(id);
        self.kick = true;
        self.frames += 1;
        r
    }
}

struct Ctrl {
    q: SplitQueue,
    page: u64,
    busy: bool,
}

pub struct NetDev {
    mmio: Mmio,
    rx: Rx,
    tx: Tx,
    ctrl: Option<Ctrl>,
    features: u64,
    mac: [u8; 6],
    /// While frames wait to be sent: what `tx.returned` was when the device last made
    /// progress, and how long the CPU has run since.
    tx_wait: Option<(u64, RunTime)>,
}

/// How long (running time) queued frames may wait for the device before it counts as broken.
const TX_TIMEOUT_S: u64 = 30;

/// Finds the first virtio-net device among `windows` and brings it up (receive queue full).
/// `Ok(None)` if there is none; errors name why a device cannot be used.
pub fn probe(windows: &[VirtioMmio], alloc: &mut PhysAlloc) -> Result<Option<NetDev>, Error> {
    let Some((mmio, _)) = virtio_mmio::find(windows, DEVICE_NET)? else {
        return Ok(None);
    };
    let offered = mmio.begin(DEV)?;
    let mut ours = F_VERSION_1 | (offered & (F_MAC | F_STATUS | F_CTRL_VQ));
    // Announcing needs the control queue (to acknowledge) and the status field (to be asked).
    if offered & F_GUEST_ANNOUNCE != 0 && ours & (F_CTRL_VQ | F_STATUS) == F_CTRL_VQ | F_STATUS {
        ours |= F_GUEST_ANNOUNCE;
    }
    mmio.accept(DEV, ours)?;

    let mut take = |bytes: u64| {
        alloc
            .alloc(bytes, 4096)
            .unwrap_or_else(|| crate::fatal!("out of memory for the virtio-net queues"))
    };
    let rxq = SplitQueue::setup(&mmio, DEV, Q_RX, RING, take(SplitQueue::bytes(RING)))?;
    let txq = SplitQueue::setup(&mmio, DEV, Q_TX, RING, take(SplitQueue::bytes(RING)))?;
    let ctrl = if ours & F_CTRL_VQ != 0 {
        let page = take(4096);
        let q = SplitQueue::setup(&mmio, DEV, Q_CTRL, CTRL_RING, page)?;
        Some(Ctrl {
            q,
            page,
            busy: false,
        })
    } else {
        None
    };
    let mut rx = Rx {
        bufs: take(u64::from(rxq.size()) * BUF as u64),
        q: rxq,
        posted: [false; RING as usize],
        kick: false,
        frames: 0,
    };
    let mut tx = Tx {
        bufs: take(u64::from(txq.size()) * BUF as u64),
        descs: Descs::new(txq.size()),
        q: txq,
        kick: false,
        frames: 0,
        returned: 0,
    };
    for id in 0..rx.q.size() {
        rx.q.desc(id, rx.buf(id), BUF as u32, DESC_WRITE, 0);
        rx.post(id);
    }
    tx.kick = false;
    let mac = if ours & F_MAC != 0 {
        mmio.config(|c| core::array::from_fn(|i| c.u8(CFG_MAC + i as u64)))
    } else {
        FALLBACK_MAC
    };
    mmio.driver_ok();
    rx.q.notify(&mmio);
    rx.kick = false;
    Ok(Some(NetDev {
        mmio,
        rx,
        tx,
        ctrl,
        features: ours,
        mac,
        tx_wait: None,
    }))
}

impl NetDev {
    /// The features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the MAC is the device's (else it is our fixed fallback).
    pub fn mac_from_device(&self) -> bool {
        self.features & F_MAC != 0
    }

    /// Frames received and sent so far.
    pub fn frames(&self) -> (u64, u64) {
        (self.rx.frames, self.tx.frames)
    }

    /// Whether a received frame is waiting (a read of RAM, no VM exit).
    #[inline]
    pub fn rx_ready(&self) -> bool {
        self.rx.q.has_used()
    }

    /// Whether the device set DEVICE_NEEDS_RESET (a VM exit).
    pub fn needs_reset(&self) -> bool {
        self.mmio.needs_reset()
    }

    /// Whether the device may ask us to announce ourselves (GUEST_ANNOUNCE negotiated).
    pub fn can_announce(&self) -> bool {
        self.features & F_GUEST_ANNOUNCE != 0
    }

    /// The link state, if the device reports it (VIRTIO_NET_F_STATUS). A VM exit.
    pub fn link_up(&self) -> Option<bool> {
        (self.features & F_STATUS != 0)
            .then(|| self.mmio.config_field().u16(CFG_STATUS) & STATUS_LINK_UP != 0)
    }

    /// Whether the device asks for an announcement (the config status ANNOUNCE bit). A VM
    /// exit: callers rate-limit it.
    pub fn announce_requested(&self) -> bool {
        self.can_announce() && self.mmio.config_field().u16(CFG_STATUS) & STATUS_ANNOUNCE != 0
    }

    /// Fatal if frames have waited [`TX_TIMEOUT_S`] seconds of running time without the
    /// device sending any. Called now and then (it looks at RAM only).
    pub fn check_tx(&mut self, now: u64) {
        self.tx.reclaim();
        if self.tx.q.in_flight() == 0 {
            self.tx_wait = None;
            return;
        }
        let returned = self.tx.returned;
        match &mut self.tx_wait {
            Some((seen, run)) if *seen == returned => {
                if run.tick(now) > TX_TIMEOUT_S * crate::clock::tsc_hz() {
                    crate::fatal!(
                        "virtio-net has not sent any of {} queued frames in {} s",
                        self.tx.q.in_flight(),
                        TX_TIMEOUT_S
                    );
                }
            }
            _ => self.tx_wait = Some((returned, RunTime::new(now))),
        }
    }

    /// Sends one frame of `len` bytes written by `f`, if a transmit buffer is free.
    pub fn send_frame(&mut self, len: usize, f: impl FnOnce(&mut [u8])) -> bool {
        if !self.tx.has_room() {
            return false;
        }
        self.tx.send(len, f);
        true
    }

    /// Notifies the queues that got buffers since the last call (unless the device is
    /// polling them anyway).
    pub fn flush(&mut self) {
        if self.rx.kick {
            self.rx.kick = false;
            self.rx.q.kick(&self.mmio);
        }
        if self.tx.kick {
            self.tx.kick = false;
            self.tx.q.kick(&self.mmio);
        }
    }

    /// Sends control command `class`/`cmd` without data. One at a time; needs CTRL_VQ.
    pub fn ctrl_submit(&mut self, class: u8, cmd: u8) {
        let c = self
            .ctrl
            .as_mut()
            .expect("virtio-net control command without a control queue");
        assert!(!c.busy, "virtio-net: one control command at a time");
        let (hdr, ack) = (c.page + OFF_CTRL_HDR, c.page + OFF_CTRL_ACK);
        // SAFETY: header and ack bytes lie in the control queue's page, which this driver owns;
        // the device holds no control buffer now.
        unsafe {
            (hdr as *mut u8).write_volatile(class);
            ((hdr + 1) as *mut u8).write_volatile(cmd);
            (ack as *mut u8).write_volatile(0xff);
        }
        c.q.desc(0, hdr, 2, DESC_NEXT, 1);
        c.q.desc(1, ack, 1, DESC_WRITE, 0);
        c.q.push(0);
        c.q.notify(&self.mmio);
        c.busy = true;
    }

    /// The ack byte of the control command in flight, once the device answered.
    pub fn ctrl_poll(&mut self) -> Option<u8> {
        let c = self.ctrl.as_mut().filter(|c| c.busy)?;
        let (id, len) = c.q.pop_used()?;
        if id != 0 || len > 1 {
            crate::fatal!(
                "virtio-net completed control descriptor {} with length {} (submitted 0, \
                 one ack byte)",
                id,
                len
            );
        }
        c.busy = false;
        // SAFETY: the ack byte lies in the control queue's page; the device is done with it.
        Some(unsafe { ((c.page + OFF_CTRL_ACK) as *const u8).read_volatile() })
    }
}

/// A received frame, lent to smoltcp; its buffer goes back to the device when dropped.
pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let p = (self.rx.buf(self.id) + HDR as u64) as *const u8;
        // SAFETY: the device returned this buffer and does not get it back before this token
        // is dropped; `len` was checked against the buffer size.
        f(unsafe { core::slice::from_raw_parts(p, self.len) })
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.rx.post(self.id);
    }
}

/// Room for one frame to send (a free transmit buffer is guaranteed while it lives).
pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx.send(len, f)
    }
}

impl phy::Device for NetDev {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // A frame may need an answer (ARP, ICMP, a TCP ACK): leave it queued while every
        // transmit buffer is busy.
        if !self.rx.q.has_used() || !self.tx.has_room() {
            return None;
        }
        let (id, len) = self.rx.pop()?;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        self.tx.has_room().then_some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}
