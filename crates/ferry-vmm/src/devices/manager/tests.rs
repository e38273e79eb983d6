use std::io::Write;
use std::path::PathBuf;

use ferry_devices::virtio::block::VirtioBlockState;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::cpu::state::test_vm::{kvm_or_skip, TestVm};
use crate::devices::slots::MAX_SLOTS;
use crate::snapshot::state::{DevicesState, DevicesStateV1};

fn disk(path: PathBuf) -> DiskConfig {
    DiskConfig {
        path,
        read_only: false,
    }
}

fn block_at(slot: MmioSlot) -> DeviceState {
    DeviceState::Block {
        slot,
        state: VirtioBlockState::default(),
    }
}

fn check(states: &[DeviceState], n: usize) -> Result<(), DeviceError> {
    DeviceManager::check_saved(states, n, 0)
}

#[test]
fn saved_devices_at_any_free_slots_are_accepted() {
    let states = [
        block_at(MmioSlot {
            base: MmioSlot::nth(9).base,
            irq: MmioSlot::nth(0).irq,
        }),
        block_at(MmioSlot::nth(3)),
    ];
    check(&states, 2).expect("two devices at slots of their own");
    check(&[], 0).expect("no devices");
}

#[test]
fn overlapping_saved_slots_are_refused_with_the_device_named() {
    let a = MmioSlot::nth(2);
    let same_window = MmioSlot {
        irq: MmioSlot::nth(5).irq,
        ..a
    };
    let err = check(&[block_at(a), block_at(same_window)], 2).unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::SavedSlot {
                index: 1,
                source: SlotError::SharedWindow { .. }
            }
        ),
        "{err}"
    );
    let same_irq = MmioSlot {
        base: MmioSlot::nth(5).base,
        ..a
    };
    let err = check(&[block_at(a), block_at(same_irq)], 2).unwrap_err();
    let text = crate::error_chain(&err);
    assert!(text.contains("saved device 1"), "{text}");
    assert!(text.contains("IRQ 7"), "{text}");
}

#[test]
fn out_of_range_saved_slots_are_refused() {
    for slot in [
        MmioSlot { base: 0, irq: 5 },
        MmioSlot {
            base: crate::memory::VIRTIO_MMIO_BASE + 1,
            irq: 5,
        },
        MmioSlot::nth(MAX_SLOTS),
        MmioSlot {
            base: crate::memory::VIRTIO_MMIO_BASE,
            irq: 0,
        },
    ] {
        let err = check(&[block_at(slot)], 1).unwrap_err();
        assert!(
            matches!(err, DeviceError::SavedSlot { index: 0, .. }),
            "{slot:?}: {err}"
        );
    }
}

#[test]
fn a_disk_state_without_a_disk_is_refused() {
    let states = [block_at(MmioSlot::nth(0)), block_at(MmioSlot::nth(1))];
    let err = check(&states, 1).unwrap_err();
    assert!(
        matches!(err, DeviceError::DiskCount { saved: 2, given: 1 }),
        "{err}"
    );
    assert!(check(&states, 3).is_err());
}

#[test]
fn a_version_1_state_with_more_disks_than_slots_is_refused_not_wrapped() {
    let v1 = DevicesStateV1 {
        serial: serde_json::from_value(serde_json::json!({
            "baud_divisor_low": 12, "baud_divisor_high": 0, "interrupt_enable": 0,
            "interrupt_identification": 1, "line_control": 3, "line_status": 0x60,
            "modem_control": 8, "modem_status": 0xb0, "scratch": 0, "in_buffer": [],
        }))
        .expect("a serial state"),
        i8042: (),
        disks: vec![VirtioBlockState::default(); MAX_SLOTS + 1],
    };
    let devices = DevicesState::from(v1);
    check(&devices.virtio[..MAX_SLOTS], MAX_SLOTS).expect("every slot once");
    let err = check(&devices.virtio, MAX_SLOTS + 1).unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::SavedSlot {
                source: SlotError::Window { .. },
                ..
            }
        ),
        "{err}"
    );
}

fn image() -> TempFile {
    let f = TempFile::new().expect("tempfile");
    f.as_file().write_all(&[0u8; 64 << 10]).expect("write");
    f
}

/// The virtio-mmio magic at `base` on `bus`, as a guest reads it.
fn magic_at(bus: &Bus, base: u64) -> u32 {
    let mut data = [0u8; 4];
    bus.read(base, &mut data);
    u32::from_le_bytes(data)
}

const VIRT: u32 = u32::from_le_bytes(*b"virt");

#[test]
fn restored_devices_sit_at_their_saved_slots() {
    if !kvm_or_skip("restored_devices_sit_at_their_saved_slots") {
        return;
    }
    let mem = crate::memory::create_guest_memory(2 << 20).expect("memory");
    let images = [image(), image()];
    let configs: Vec<DiskConfig> = images.iter().map(|f| disk(f.as_path().into())).collect();

    let source = TestVm::new(1);
    let mut bus = Bus::new("mmio");
    let mut devices = DeviceManager::new();
    for config in &configs {
        devices
            .attach_disk(&source.vm, &mem, &mut bus, config)
            .expect("attach");
    }
    assert_eq!(devices.slots(), [MmioSlot::nth(0), MmioSlot::nth(1)]);

    // Move the second disk, as a ferry with another layout might have saved it.
    let mut states = devices.save();
    let moved = MmioSlot {
        base: MmioSlot::nth(6).base,
        irq: MmioSlot::nth(4).irq,
    };
    let DeviceState::Block { slot, .. } = &mut states[1] else {
        panic!("a disk state");
    };
    *slot = moved;

    let dest = TestVm::new(1);
    let mut bus = Bus::new("mmio");
    let restored = DeviceManager::restore(
        &dest.vm,
        &mem,
        &mut bus,
        &states,
        Backends {
            disks: &configs,
            nics: &[],
        },
    )
    .expect("restore");
    assert_eq!(restored.slots(), [MmioSlot::nth(0), moved]);
    assert_eq!(restored.save(), states);
    assert_eq!(magic_at(&bus, moved.base), VIRT);
    assert_eq!(magic_at(&bus, MmioSlot::nth(0).base), VIRT);
    assert_eq!(
        magic_at(&bus, MmioSlot::nth(1).base),
        u32::MAX,
        "nothing left behind"
    );
    let info = restored.info();
    assert!(info[1].location.contains("irq 9"), "{:?}", info[1]);
    restored.flush().expect("flush");

    // A device attached after a restore takes what the restored ones left free.
    let mut restored = restored;
    let third = image();
    let slot = restored
        .attach_disk(&dest.vm, &mem, &mut bus, &disk(third.as_path().into()))
        .expect("attach a third");
    assert_eq!(slot, MmioSlot::nth(1));
}

#[test]
fn a_saved_nic_needs_a_tap_and_a_tap_needs_a_saved_nic() {
    let nic = DeviceState::Net {
        slot: MmioSlot::nth(1),
        state: Default::default(),
    };
    let states = [block_at(MmioSlot::nth(0)), nic];
    assert!(DeviceManager::check_saved(&states, 1, 1).is_ok());
    assert!(matches!(
        DeviceManager::check_saved(&states, 1, 0),
        Err(DeviceError::NicCount { saved: 1, given: 0 })
    ));
    assert!(matches!(
        DeviceManager::check_saved(&states[..1], 1, 2),
        Err(DeviceError::NicCount { saved: 0, given: 2 })
    ));
}
