//! Register accesses of a hostile driver to a virtio-mmio transport with a virtio-blk device
//! behind it: reads and writes of any width at any offset of the window, driver bring-ups with
//! attacker-chosen queue sizes and addresses (so DRIVER_OK activates the device on whatever
//! the transport lets through), and kicks that make the device serve the queue from guest
//! memory the input provides. The input layout is in `ferry_fuzz::mmio`.
//!
//! Besides never panicking: the device is never active while the transport's status lacks
//! DRIVER_OK, an active device whose queue is not broken has returned every chain it took, and
//! whatever state the driver left the pair in (quiesced, as the VMM saves it) restores: a
//! snapshot or migration of any guest must not be refused on the far side, and the restored
//! pair saves the same state again.

#![no_main]

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ferry_devices::bus::BusDevice;
use ferry_devices::fuzzing::{driver_init, guest_memory, serve_block_queue, NullInterrupt};
use ferry_devices::virtio::block::{save_block, Block, VirtioBlock, VirtioBlockArgs};
use ferry_devices::virtio::mmio::{MmioTransport, MMIO_NOTIFY_OFFSET};
use ferry_devices::virtio::VirtioDevice;
use ferry_devices::Persist;
use ferry_fuzz::disk::ScratchDisk;
use ferry_fuzz::mmio::{MmioInput, Op};
use libfuzzer_sys::fuzz_target;

/// DRIVER_OK in the status register (`VIRTIO_CONFIG_S_DRIVER_OK`).
const DRIVER_OK: u32 = 4;

fn lock(block: &Mutex<Block>) -> MutexGuard<'_, Block> {
    block.lock().unwrap_or_else(PoisonError::into_inner)
}

fn check(transport: &MmioTransport, block: &Mutex<Block>) {
    let block = lock(block);
    if !block.is_activated() {
        return;
    }
    assert!(
        transport.status() & DRIVER_OK != 0,
        "active device, status {:#x}",
        transport.status()
    );
    if let Some(queue) = block.save().queue {
        assert!(
            queue.broken || queue.queue.next_avail == queue.queue.next_used,
            "a chain never returned: {queue:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let input = MmioInput::decode(data);
    let disk = ScratchDisk::get();
    let mem = guest_memory(input.memory);
    let block = Arc::new(Mutex::new(disk.block(false)));
    let mut transport = MmioTransport::new(mem.clone(), block.clone(), Arc::new(NullInterrupt));
    for op in input.ops {
        match op {
            Op::Read { offset, width } => {
                let mut buf = [0u8; 8];
                transport.read(offset, &mut buf[..width]);
            }
            Op::Write {
                offset,
                width,
                value,
            } => {
                transport.write(offset, &u64::from(value).to_le_bytes()[..width]);
            }
            Op::Init {
                layout,
                features_low,
            } => driver_init(&mut transport, layout, features_low),
            Op::Kick => {
                transport.write(MMIO_NOTIFY_OFFSET, &0u32.to_le_bytes());
                serve_block_queue(&mut lock(&block));
            }
        }
        check(&transport, &block);
    }

    let saved = save_block(&transport, &lock(&block));
    let args = VirtioBlockArgs {
        mem,
        path: disk.path().to_owned(),
        interrupt: Arc::new(NullInterrupt),
    };
    let restored = VirtioBlock::restore(args, &saved)
        .unwrap_or_else(|e| panic!("a saved live device does not restore: {e:?}\n{saved:#?}"));
    let again = save_block(&restored.transport, &lock(&restored.block));
    assert_eq!(again, saved, "the restored device saves another state");
});
