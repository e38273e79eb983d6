//! Writes seed inputs for every target into `corpus/<target>/` beside this crate's manifest:
//! well-formed frames, snapshot state files, block requests and driver bring-ups, so the fuzzer
//! starts from inputs that reach deep into each parser instead of rediscovering their layout.
//! Each seed is checked before it is written (it must do what it is meant to).
//!
//! `cargo run --example seeds` (from `fuzz/`; stable is enough).

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ferry_devices::fuzzing::{
    driver_init, guest_memory, run_block_queue, NullInterrupt, QueueLayout,
};
use ferry_devices::virtio::block::save_block;
use ferry_devices::virtio::mmio::MmioTransport;
use ferry_fuzz::blk::BlkInput;
use ferry_fuzz::disk::ScratchDisk;
use ferry_fuzz::mmio::{MmioInput, Op};
use ferry_fuzz::snapshot::{input_from_sections, stream_from_input, DEVICES_V1};
use ferry_proto::write_frame;
use ferry_vmm::snapshot::format::{read_state, write_state};
use ferry_vmm::snapshot::VmState;
use serde_json::{json, Value};

const QSIZE: u16 = 16;
const DESC: u64 = 0x100;
const AVAIL: u64 = 0x200;
const USED: u64 = 0x300;
const HEADERS: u64 = 0x400;
const DATA: u64 = 0x600;
const STATUS: u64 = 0x900;
/// Guest memory bytes the seeds carry; the rest of guest memory is zero.
const IMAGE: usize = 0xa00;
/// Where the two regions of the fuzzing guest memory meet.
const BOUNDARY: u64 = ferry_devices::fuzzing::MEMORY_SIZE / 2;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Guest memory with a split virtqueue at DESC/AVAIL/USED, filled the way a driver does.
struct Driver {
    mem: Vec<u8>,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        Driver {
            mem: vec![0; IMAGE],
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let at = addr as usize;
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn layout() -> QueueLayout {
        QueueLayout {
            size: u32::from(QSIZE),
            desc: DESC,
            driver: AVAIL,
            device: USED,
        }
    }

    /// Makes the chain of `(addr, len, device-writable)` buffers available.
    fn chain(&mut self, bufs: &[(u64, u32, bool)]) {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc += 1;
            let last = i + 1 == bufs.len();
            let flags = u16::from(!last) | if writable { 2 } else { 0 };
            let next = if last { 0 } else { index + 1 };
            let mut desc = addr.to_le_bytes().to_vec();
            desc.extend(len.to_le_bytes());
            desc.extend(flags.to_le_bytes());
            desc.extend(next.to_le_bytes());
            self.put(DESC + 16 * u64::from(index), &desc);
        }
        let slot = self.avail_idx % QSIZE;
        self.put(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        self.avail_idx += 1;
        self.put(AVAIL + 2, &self.avail_idx.to_le_bytes());
    }

    /// A request: header `n` of `request_type` at `sector`, `data` buffers, status byte `n`.
    fn request(&mut self, n: u64, request_type: u32, sector: u64, data: &[(u64, u32, bool)]) {
        let header = HEADERS + 16 * n;
        let mut bytes = request_type.to_le_bytes().to_vec();
        bytes.extend([0; 4]);
        bytes.extend(sector.to_le_bytes());
        self.put(header, &bytes);
        let mut bufs = vec![(header, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS + n, 1, true));
        self.chain(&bufs);
    }
}

fn write_seed(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus folder");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
}

fn block_seeds() -> Vec<(&'static str, bool, Driver, u16)> {
    let sector = (DATA, 512, true);
    let mut seeds = Vec::new();
    for (name, read_only, request_type, data) in [
        ("in", false, T_IN, vec![sector]),
        ("out", false, T_OUT, vec![(DATA, 512, false)]),
        ("out-read-only", true, T_OUT, vec![(DATA, 512, false)]),
        ("flush", false, T_FLUSH, vec![]),
        ("get-id", false, T_GET_ID, vec![(DATA, 20, true)]),
        ("unsupported", false, 0x99, vec![]),
        // Across the boundary between the two memory regions.
        (
            "in-straddling",
            false,
            T_IN,
            vec![(BOUNDARY - 0x100, 1024, true)],
        ),
    ] {
        let mut d = Driver::new();
        d.request(0, request_type, 1, &data);
        seeds.push((name, read_only, d, 1));
    }
    // Several requests, one of them with its header in two descriptors and its data in two.
    let mut d = Driver::new();
    d.request(0, T_OUT, 3, &[(DATA, 512, false)]);
    d.request(1, T_IN, 0, &[(DATA, 256, true), (DATA + 256, 256, true)]);
    d.put(HEADERS + 32, &[0; 16]); // header 2: IN, sector 7 (the last)
    d.put(HEADERS + 40, &7u64.to_le_bytes());
    d.chain(&[
        (HEADERS + 32, 8, false),
        (HEADERS + 40, 8, false),
        sector,
        (STATUS + 2, 1, true),
    ]);
    d.request(3, T_FLUSH, 0, &[]);
    d.request(4, T_GET_ID, 0, &[(DATA, 20, true)]);
    seeds.push(("mixed", false, d, 5));
    seeds
}

fn blk(dir: &Path) {
    for (name, read_only, driver, requests) in block_seeds() {
        let input = BlkInput {
            layout: Driver::layout(),
            read_only,
            memory: &driver.mem,
        };
        let bytes = input.encode();
        assert_eq!(BlkInput::decode(&bytes), Some(input));
        let block = ScratchDisk::get().block(read_only);
        let run =
            run_block_queue(block, &driver.mem, input.layout).expect("the seed's queue is sound");
        assert!(
            !run.broken && run.returned == requests && run.requests == u64::from(requests),
            "seed {name}: {run:?}"
        );
        write_seed(dir, "virtio_blk", name, &bytes);
    }
}

fn mmio(dir: &Path) {
    let mut d = Driver::new();
    d.request(0, T_IN, 1, &[(DATA, 512, true)]);
    d.request(1, T_GET_ID, 0, &[(DATA, 20, true)]);
    let read = |offset| Op::Read { offset, width: 4 };
    let write = |offset, value| Op::Write {
        offset,
        width: 4,
        value,
    };
    let layout = Driver::layout();
    let seeds: Vec<(&str, Vec<Op>)> = vec![
        (
            "bring-up",
            vec![
                read(0x0),
                read(0x4),
                read(0x8),
                Op::Read {
                    offset: 0x100,
                    width: 8,
                },
                Op::Read {
                    offset: 0x114,
                    width: 4,
                },
                Op::Init {
                    layout,
                    features_low: 1 << 9,
                },
                Op::Kick,
                read(0x60),
                write(0x64, 1),
                read(0x70),
                write(0x70, 0),
                Op::Init {
                    layout: QueueLayout {
                        desc: 0x108,
                        ..layout
                    },
                    features_low: 0,
                },
                read(0x70),
            ],
        ),
        (
            "step-by-step",
            vec![
                write(0x70, 1),
                write(0x70, 3),
                write(0x14, 1),
                read(0x10),
                write(0x24, 1),
                write(0x20, 1),
                write(0x70, 11),
                write(0x30, 0),
                read(0x34),
                write(0x38, 16),
                write(0x80, DESC as u32),
                write(0x84, 0),
                write(0x90, AVAIL as u32),
                write(0x94, 0),
                write(0xa0, USED as u32),
                write(0xa4, 0),
                write(0x44, 1),
                write(0x70, 15),
                write(0x50, 0),
                Op::Kick,
                write(0x70, 0x8f),
                Op::Kick,
            ],
        ),
    ];
    for (name, ops) in seeds {
        let input = MmioInput {
            memory: &d.mem,
            ops,
        };
        let bytes = input.encode();
        assert_eq!(MmioInput::decode(&bytes), input, "seed {name}");
        write_seed(dir, "mmio_registers", name, &bytes);
    }
}

fn frame(dir: &Path) {
    let mut stream = vec![3]; // read 4 bytes at a time
    write_frame(
        &mut stream,
        1,
        1,
        br#"{"format":"ferry-snapshot","vcpus":1}"#,
    )
    .expect("frame");
    write_frame(&mut stream, 1, 7, b"").expect("frame");
    write_frame(&mut stream, 2, 9, &[0xa5; 100]).expect("frame");
    write_seed(dir, "frame", "three-frames", &stream);
    write_seed(dir, "frame", "cut-short", &stream[..stream.len() - 10]);
}

/// The devices section: the serial port and one disk, saved from a real device.
fn devices_json() -> Value {
    let mut d = Driver::new();
    d.request(0, T_IN, 1, &[(DATA, 512, true)]);
    let block = Arc::new(Mutex::new(ScratchDisk::get().block(false)));
    let mut transport =
        MmioTransport::new(guest_memory(&d.mem), block.clone(), Arc::new(NullInterrupt));
    driver_init(&mut transport, Driver::layout(), 0);
    let disk = save_block(&transport, &block.lock().expect("not poisoned"));
    assert!(disk.block.queue.is_some(), "the disk is active");
    json!({
        "serial": {
            "baud_divisor_low": 12, "baud_divisor_high": 0, "interrupt_enable": 1,
            "interrupt_identification": 1, "line_control": 3, "line_status": 0x60,
            "modem_control": 8, "modem_status": 0xb0, "scratch": 0, "in_buffer": [104, 105],
        },
        "i8042": null,
        "virtio": [{ "Block": { "slot": { "base": 0xd000_0000u32, "irq": 5 }, "state": disk } }],
    })
}

fn snapshot(dir: &Path) {
    // Every KVM struct saves as its bytes; an empty array reads as all zero.
    let machine = json!({
        "memory_bytes": 256 << 20, "vcpus": 2, "kernel": "/images/vmlinux",
        "cmdline": "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5",
        "disks": [{ "path": "/images/root.raw", "read_only": false }],
    });
    let memory = json!({
        "regions": [{ "guest_addr": 0, "len": 256 << 20, "file_offset": 0 }],
        "extents": [{ "offset": 0, "len": 8192, "crc": 0x1234_5678u32 }],
    });
    let kvm =
        json!({ "pic_master": [], "pic_slave": [], "ioapic": [], "pit": [], "clock": [1, 2, 3] });
    let (fpr, xmm) = ([[0u8; 16]; 8], [[0u8; 16]; 16]);
    let vcpu = |legacy: bool| {
        json!({
            "cpuid": [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xd, 0, 0, 0, 0x47, 0x65, 0x6e, 0x75]], "tsc_khz": 2_000_000, "mp_state": [0],
            "regs": [], "sregs": if legacy { json!({ "Sregs": [] }) } else { json!({ "Sregs2": {
                "cs": [], "ds": [], "es": [], "fs": [], "gs": [], "ss": [], "tr": [], "ldt": [],
                "gdt": [], "idt": [], "cr0": 0x8000_0011u32, "cr2": 0, "cr3": 0x1000, "cr4": 0x20,
                "cr8": 0, "efer": 0x500, "apic_base": 0xfee0_0900u32, "flags": 0, "pdptrs": [0, 0, 0, 0],
            } }) },
            "fpu": if legacy { json!({ "Legacy": {
                "fpr": fpr, "fcw": 0x37f, "fsw": 0, "ftwx": 0, "last_opcode": 0,
                "last_ip": 0, "last_dp": 0, "xmm": xmm, "mxcsr": 0x1f80,
            } }) } else { json!({ "Xsave": [0x37f, 0, 0, 0, 0, 0, 0x1f80] }) },
            "xcrs": null, "debug_regs": null, "lapic": [],
            "msrs": [[0x10, 0, 0, 0, 0, 0, 0, 0, 0x39, 0x30]], "vcpu_events": null,
        })
    };
    let devices = devices_json();
    let sections = [machine, memory, kvm, vcpu(false), vcpu(true), devices];
    let state: VmState = serde_json::from_value(json!({
        "machine": sections[0], "memory": sections[1], "kvm": sections[2],
        "vcpus": [sections[3], sections[4]], "devices": sections[5],
    }))
    .expect("the seed's sections are a valid state");

    let mut file = Vec::new();
    write_state(&mut file, &state).expect("write");
    assert_eq!(read_state(&mut &file[..]).expect("read"), state);
    write_seed(dir, "snapshot_state", "two-vcpus", &file);

    let payloads: Vec<Vec<u8>> = sections
        .iter()
        .map(|s| serde_json::to_vec(s).expect("json"))
        .collect();
    let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let input = input_from_sections(2, &payloads);
    let read = read_state(&mut &stream_from_input(&input)[..]).expect("the structured seed reads");
    assert_eq!(read, state);
    write_seed(dir, "snapshot_state_structured", "two-vcpus", &input);
    // One vCPU, and data after the end.
    let one = [
        payloads[0],
        payloads[1],
        payloads[2],
        payloads[4],
        payloads[5],
        b"{}",
    ];
    write_seed(
        dir,
        "snapshot_state_structured",
        "one-vcpu-trailing",
        &input_from_sections(1, &one),
    );
    // The devices section as ferry wrote it before slots were saved: the disk at the first
    // slot, where the current seed has it.
    let mut v1 = sections[5].clone();
    let disk = v1["virtio"][0]["Block"]["state"].take();
    let v1 = json!({ "serial": v1["serial"].take(), "i8042": null, "disks": [disk] });
    let v1 = serde_json::to_vec(&v1).expect("json");
    let mut with_v1 = payloads.clone();
    with_v1[5] = &v1;
    let mut input = input_from_sections(2, &with_v1);
    input[0] |= DEVICES_V1;
    let read = read_state(&mut &stream_from_input(&input)[..]).expect("the v1 seed reads");
    assert_eq!(read, state, "a version 1 disk sits at the first slot");
    write_seed(dir, "snapshot_state_structured", "devices-v1", &input);
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    frame(dir);
    snapshot(dir);
    blk(dir);
    mmio(dir);
    println!("seeds written to {}", dir.join("corpus").display());
}
