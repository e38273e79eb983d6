//! Finishes the few guest instructions KVM's emulator gives up on.
//!
//! Where KVM emulates the guest's ring 0 (hosts without hardware support for some guest mode,
//! or nested set-ups like this project's CI machine), its instruction emulator refuses some
//! instructions and exits with `KVM_INTERNAL_ERROR_EMULATION`. The stock Linux kernel runs two
//! of them while it boots: one `int3` on purpose (the alternatives self-test) and `fwait`
//! when it sets up each CPU's FPU. Both are defined simply by the architecture, so ferry does
//! what the CPU would do, for the cases a 64-bit kernel meets, and refuses every other case so
//! that the VMM reports the original failure. Nothing is written to the guest on a refusal.
//!
//! - `int3` (0xcc): raise #BP as a trap through the IDT, with the address after the
//!   instruction on the stack — 64-bit mode, CPL 0, no CET, a present gate to the same code
//!   segment.
//! - `fwait` (0x9b): #NM if CR0.TS and CR0.MP, #MF if an x87 exception is pending; otherwise
//!   nothing happens and execution goes on with the next instruction.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const INT3: u8 = 0xcc;
const FWAIT: u8 = 0x9b;
/// The breakpoint exception's vector.
const BP_VECTOR: u64 = 3;
/// Size of one IDT gate in 64-bit mode.
const GATE_SIZE: u64 = 16;
/// Offset of IST1 in the 64-bit TSS.
const TSS_IST1: u64 = 0x24;
const EFER_LMA: u64 = 1 << 10;
/// CR4.CET: with control-flow enforcement on, delivering an exception also involves the
/// shadow stack, which ferry does not model.
const CR4_CET: u64 = 1 << 23;
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
/// x87 status word: an unmasked exception is pending.
const FSW_ES: u16 = 1 << 7;
/// Gate types in a 64-bit IDT.
const INTERRUPT_GATE: u8 = 0xe;
const TRAP_GATE: u8 = 0xf;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;

/// Why an instruction was left unfinished: the VMM then reports KVM's failure.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unfinished {
    #[error("ferry does not finish instruction byte {0:#04x}")]
    UnknownInstruction(u8),
    #[error("int3 outside 64-bit mode at CPL 0, or with CET on")]
    UnsupportedMode,
    #[error("single-stepping through a finished instruction")]
    SingleStep,
    #[error("fwait would raise #NM or #MF")]
    FpuException,
    #[error("the IDT has no gate for #BP")]
    NoGate,
    #[error("the #BP gate is not a present 64-bit interrupt or trap gate")]
    BadGate,
    #[error("the #BP gate leads to another code segment")]
    OtherCodeSegment,
    #[error("guest address {0:#x} is not mapped (writable, for the stack)")]
    Unmapped(u64),
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
}

/// Turns guest-virtual addresses into guest-physical ones, saying whether they are writable
/// (KVM_TRANSLATE on a real vCPU).
pub trait Translate {
    fn translate(&self, gva: u64) -> Option<(u64, bool)>;
}

/// What the vCPU looked like when KVM gave up.
#[derive(Debug)]
pub struct Stopped<'a> {
    /// The instruction's first byte, as KVM reported it.
    pub first_byte: u8,
    pub regs: &'a kvm_regs,
    pub sregs: &'a kvm_sregs,
    /// The x87 status word.
    pub fsw: u16,
}

/// Finishes the instruction the vCPU stopped at. Returns the registers to set.
pub fn finish<M: GuestMemory>(
    mem: &M,
    mmu: &impl Translate,
    at: &Stopped<'_>,
) -> Result<kvm_regs, Unfinished> {
    if at.regs.rflags & RFLAGS_TF != 0 {
        return Err(Unfinished::SingleStep);
    }
    match at.first_byte {
        INT3 => deliver_int3(mem, mmu, at),
        FWAIT => {
            let no_device = at.sregs.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS;
            if no_device || at.fsw & FSW_ES != 0 {
                return Err(Unfinished::FpuException);
            }
            let mut regs = *at.regs;
            regs.rip = regs.rip.wrapping_add(1);
            regs.rflags &= !RFLAGS_RF;
            Ok(regs)
        }
        other => Err(Unfinished::UnknownInstruction(other)),
    }
}

/// A 64-bit IDT gate, decoded.
struct Gate {
    offset: u64,
    selector: u16,
    ist: u8,
    kind: u8,
    present: bool,
}

impl Gate {
    fn decode(b: [u8; 16]) -> Gate {
        let lo = u64::from(u16::from_le_bytes([b[0], b[1]]));
        let mid = u64::from(u16::from_le_bytes([b[6], b[7]]));
        let hi = u64::from(u32::from_le_bytes([b[8], b[9], b[10], b[11]]));
        Gate {
            offset: lo | (mid << 16) | (hi << 32),
            selector: u16::from_le_bytes([b[2], b[3]]),
            ist: b[4] & 7,
            kind: b[5] & 0xf,
            present: b[5] & 0x80 != 0,
        }
    }
}

/// Delivers #BP for the `int3` at RIP, writing the exception frame into guest memory.
fn deliver_int3<M: GuestMemory>(
    mem: &M,
    mmu: &impl Translate,
    at: &Stopped<'_>,
) -> Result<kvm_regs, Unfinished> {
    let (regs, sregs) = (at.regs, at.sregs);
    if sregs.efer & EFER_LMA == 0
        || sregs.cs.l == 0
        || sregs.cs.dpl != 0
        || sregs.cr4 & CR4_CET != 0
    {
        return Err(Unfinished::UnsupportedMode);
    }
    if u64::from(sregs.idt.limit) < BP_VECTOR * GATE_SIZE + GATE_SIZE - 1 {
        return Err(Unfinished::NoGate);
    }
    let mut raw = [0u8; 16];
    let gate_at = sregs.idt.base.wrapping_add(BP_VECTOR * GATE_SIZE);
    read_virt(mem, mmu, gate_at, &mut raw)?;
    let gate = Gate::decode(raw);
    if !gate.present || !matches!(gate.kind, INTERRUPT_GATE | TRAP_GATE) {
        return Err(Unfinished::BadGate);
    }
    if gate.selector & !3 != sregs.cs.selector & !3 {
        return Err(Unfinished::OtherCodeSegment);
    }
    // Same privilege: the current stack, unless the gate names an interrupt stack.
    let stack = if gate.ist == 0 {
        regs.rsp
    } else {
        let mut slot = [0u8; 8];
        let at = sregs
            .tr
            .base
            .wrapping_add(TSS_IST1 + 8 * u64::from(gate.ist - 1));
        read_virt(mem, mmu, at, &mut slot)?;
        u64::from_le_bytes(slot)
    };
    // From the lowest address up: RIP, CS, RFLAGS, RSP, SS (pushed in the reverse order).
    let frame = [
        regs.rip.wrapping_add(1),
        u64::from(sregs.cs.selector),
        regs.rflags,
        regs.rsp,
        u64::from(sregs.ss.selector),
    ];
    let base = (stack & !0xf).wrapping_sub(8 * frame.len() as u64);
    // Translate every slot before writing any, so a refusal leaves memory untouched.
    let mut slots = Vec::with_capacity(frame.len());
    for i in 0..frame.len() as u64 {
        let gva = base.wrapping_add(8 * i);
        match mmu.translate(gva) {
            Some((gpa, true)) => slots.push(gpa),
            _ => return Err(Unfinished::Unmapped(gva)),
        }
    }
    for (gpa, value) in slots.into_iter().zip(frame) {
        mem.write_obj(value, GuestAddress(gpa))
            .map_err(|_| Unfinished::Memory(gpa))?;
    }
    let mut out = *regs;
    out.rip = gate.offset;
    out.rsp = base;
    out.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF);
    if gate.kind == INTERRUPT_GATE {
        out.rflags &= !RFLAGS_IF;
    }
    Ok(out)
}

/// Reads `buf.len()` bytes at a guest-virtual address, a page at a time.
fn read_virt<M: GuestMemory>(
    mem: &M,
    mmu: &impl Translate,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), Unfinished> {
    let mut done = 0;
    while done < buf.len() {
        let at = gva.wrapping_add(done as u64);
        let in_page = (4096 - (at & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        let (gpa, _) = mmu.translate(at).ok_or(Unfinished::Unmapped(at))?;
        mem.read_slice(&mut buf[done..done + n], GuestAddress(gpa))
            .map_err(|_| Unfinished::Memory(gpa))?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use kvm_bindings::{kvm_dtable, kvm_segment};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const IDT: u64 = 0x1000;
    const TSS: u64 = 0x2000;
    const STACK_PAGE: u64 = 0x8000;
    const IST_STACK: u64 = 0x9ff8;
    const HANDLER: u64 = 0xffff_ffff_8100_1234;
    const KERNEL_CS: u16 = 0x10;
    const KERNEL_DS: u16 = 0x18;

    /// Identity-mapped guest memory, with pages that can be made unmapped or read-only.
    struct Mmu {
        unmapped: RefCell<Vec<u64>>,
        read_only: Vec<u64>,
    }

    impl Mmu {
        fn flat() -> Mmu {
            Mmu {
                unmapped: RefCell::new(Vec::new()),
                read_only: Vec::new(),
            }
        }
    }

    impl Translate for Mmu {
        fn translate(&self, gva: u64) -> Option<(u64, bool)> {
            let page = gva & !0xfff;
            if gva >= 0x10_0000 || self.unmapped.borrow().contains(&page) {
                return None;
            }
            Some((gva, !self.read_only.contains(&page)))
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn write_gate(mem: &GuestMemoryMmap, selector: u16, ist: u8, type_attr: u8) {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
        g[2..4].copy_from_slice(&selector.to_le_bytes());
        g[4] = ist;
        g[5] = type_attr;
        g[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((HANDLER >> 32) as u32).to_le_bytes());
        mem.write_slice(&g, GuestAddress(IDT + 3 * 16))
            .expect("gate");
    }

    fn kernel() -> (kvm_regs, kvm_sregs) {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8200_0000,
            rsp: STACK_PAGE + 0x800 + 8,
            rflags: 0x246 | RFLAGS_RF,
            rdi: 77,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cs: kvm_segment {
                selector: KERNEL_CS,
                l: 1,
                dpl: 0,
                ..Default::default()
            },
            ss: kvm_segment {
                selector: KERNEL_DS,
                ..Default::default()
            },
            tr: kvm_segment {
                base: TSS,
                ..Default::default()
            },
            idt: kvm_dtable {
                base: IDT,
                limit: 256 * 16 - 1,
                ..Default::default()
            },
            efer: EFER_LMA | (1 << 8),
            cr0: 0x8005_0033,
            ..Default::default()
        };
        (regs, sregs)
    }

    fn stopped<'a>(byte: u8, regs: &'a kvm_regs, sregs: &'a kvm_sregs) -> Stopped<'a> {
        Stopped {
            first_byte: byte,
            regs,
            sregs,
            fsw: 0,
        }
    }

    fn frame(mem: &GuestMemoryMmap, rsp: u64) -> [u64; 5] {
        let mut f = [0u64; 5];
        for (i, slot) in f.iter_mut().enumerate() {
            *slot = mem
                .read_obj(GuestAddress(rsp + 8 * i as u64))
                .expect("frame");
        }
        f
    }

    #[test]
    fn int3_through_an_interrupt_gate_pushes_a_trap_frame() {
        let mem = memory();
        write_gate(&mem, KERNEL_CS, 0, 0x8e);
        let (regs, sregs) = kernel();
        let out = finish(&mem, &Mmu::flat(), &stopped(INT3, &regs, &sregs)).expect("delivered");
        assert_eq!(out.rip, HANDLER);
        // Aligned down to 16 bytes, then five slots.
        assert_eq!(out.rsp, STACK_PAGE + 0x800 - 40);
        assert_eq!(out.rflags & (RFLAGS_IF | RFLAGS_RF | RFLAGS_TF), 0);
        assert_eq!(out.rdi, 77, "other registers untouched");
        assert_eq!(
            frame(&mem, out.rsp),
            [
                regs.rip + 1,
                u64::from(KERNEL_CS),
                regs.rflags,
                regs.rsp,
                u64::from(KERNEL_DS)
            ]
        );
    }

    #[test]
    fn int3_through_a_trap_gate_keeps_interrupts_enabled() {
        let mem = memory();
        write_gate(&mem, KERNEL_CS, 0, 0x8f);
        let (regs, sregs) = kernel();
        let out = finish(&mem, &Mmu::flat(), &stopped(INT3, &regs, &sregs)).expect("delivered");
        assert_ne!(out.rflags & RFLAGS_IF, 0);
    }

    #[test]
    fn int3_through_an_ist_gate_switches_to_the_interrupt_stack() {
        let mem = memory();
        write_gate(&mem, KERNEL_CS, 2, 0x8e);
        mem.write_obj(IST_STACK, GuestAddress(TSS + TSS_IST1 + 8))
            .expect("IST2");
        let (regs, sregs) = kernel();
        let out = finish(&mem, &Mmu::flat(), &stopped(INT3, &regs, &sregs)).expect("delivered");
        assert_eq!(out.rsp, (IST_STACK & !0xf) - 40);
        assert_eq!(frame(&mem, out.rsp)[3], regs.rsp, "the old stack is saved");
    }

    #[test]
    fn fwait_without_pending_exceptions_is_skipped() {
        let mem = memory();
        let (regs, mut sregs) = kernel();
        let out = finish(&mem, &Mmu::flat(), &stopped(FWAIT, &regs, &sregs)).expect("done");
        assert_eq!(out.rip, regs.rip + 1);
        assert_eq!(out.rsp, regs.rsp);
        assert_eq!(out.rflags & RFLAGS_RF, 0);
        // TS alone (without MP) does not trap fwait.
        sregs.cr0 |= CR0_TS;
        sregs.cr0 &= !CR0_MP;
        assert!(finish(&mem, &Mmu::flat(), &stopped(FWAIT, &regs, &sregs)).is_ok());
    }

    #[test]
    fn fwait_that_would_fault_is_left_to_fail() {
        let mem = memory();
        let (regs, mut sregs) = kernel();
        let mut pending = stopped(FWAIT, &regs, &sregs);
        pending.fsw = FSW_ES;
        assert_eq!(
            finish(&mem, &Mmu::flat(), &pending),
            Err(Unfinished::FpuException)
        );
        sregs.cr0 |= CR0_TS | CR0_MP;
        assert_eq!(
            finish(&mem, &Mmu::flat(), &stopped(FWAIT, &regs, &sregs)),
            Err(Unfinished::FpuException)
        );
    }

    #[test]
    fn other_instructions_and_modes_are_refused() {
        let mem = memory();
        write_gate(&mem, KERNEL_CS, 0, 0x8e);
        let (mut regs, sregs) = kernel();
        let mmu = Mmu::flat();
        // xrstor's first byte (REX.W), cmpxchg16b's (REX.W too), and a plain hlt.
        for byte in [0x48, 0x0f, 0xf4] {
            assert_eq!(
                finish(&mem, &mmu, &stopped(byte, &regs, &sregs)),
                Err(Unfinished::UnknownInstruction(byte))
            );
        }
        let mut compat = sregs;
        compat.cs.l = 0;
        assert_eq!(
            finish(&mem, &mmu, &stopped(INT3, &regs, &compat)),
            Err(Unfinished::UnsupportedMode)
        );
        let mut legacy = sregs;
        legacy.efer = 0;
        assert_eq!(
            finish(&mem, &mmu, &stopped(INT3, &regs, &legacy)),
            Err(Unfinished::UnsupportedMode)
        );
        let mut user = sregs;
        user.cs.dpl = 3;
        assert_eq!(
            finish(&mem, &mmu, &stopped(INT3, &regs, &user)),
            Err(Unfinished::UnsupportedMode)
        );
        let mut cet = sregs;
        cet.cr4 |= CR4_CET;
        assert_eq!(
            finish(&mem, &mmu, &stopped(INT3, &regs, &cet)),
            Err(Unfinished::UnsupportedMode)
        );
        regs.rflags |= RFLAGS_TF;
        assert_eq!(
            finish(&mem, &mmu, &stopped(FWAIT, &regs, &sregs)),
            Err(Unfinished::SingleStep)
        );
    }

    #[test]
    fn hostile_idts_are_refused() {
        let mem = memory();
        let (regs, sregs) = kernel();
        let mmu = Mmu::flat();
        let refused = |s: &kvm_sregs| finish(&mem, &mmu, &stopped(INT3, &regs, s));
        // No gate 3 within the limit.
        let mut short = sregs;
        short.idt.limit = 3 * 16 + 14;
        assert_eq!(refused(&short), Err(Unfinished::NoGate));
        // An IDT at the very top of the address space: unmapped, and wrapping never panics.
        let mut top = sregs;
        top.idt.base = 0xffff_ffff_ffff_f000;
        assert!(matches!(refused(&top), Err(Unfinished::Unmapped(_))));
        top.idt.base = u64::MAX - 8;
        let _ = refused(&top);
        // Not present, a 32-bit or task gate, and a gate to another segment.
        for (selector, attr, err) in [
            (KERNEL_CS, 0x0e, Unfinished::BadGate),
            (KERNEL_CS, 0x85, Unfinished::BadGate),
            (KERNEL_CS, 0x8c, Unfinished::BadGate),
            (0x33, 0x8e, Unfinished::OtherCodeSegment),
        ] {
            write_gate(&mem, selector, 0, attr);
            assert_eq!(refused(&sregs), Err(err), "gate {selector:#x}/{attr:#x}");
        }
        // An IST slot pointing nowhere.
        write_gate(&mem, KERNEL_CS, 7, 0x8e);
        mem.write_obj(u64::MAX - 3, GuestAddress(TSS + TSS_IST1 + 48))
            .expect("IST7");
        assert!(matches!(refused(&sregs), Err(Unfinished::Unmapped(_))));
        // Random bytes for a gate never panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut g = [0u8; 16];
            for (i, b) in g.iter_mut().enumerate() {
                *b = (seed.rotate_left(i as u32 * 4) & 0xff) as u8;
            }
            mem.write_slice(&g, GuestAddress(IDT + 48)).expect("gate");
            let _ = refused(&sregs);
        }
    }

    #[test]
    fn a_stack_that_cannot_take_the_frame_leaves_memory_untouched() {
        let mem = memory();
        write_gate(&mem, KERNEL_CS, 0, 0x8e);
        let (mut regs, sregs) = kernel();
        // The frame straddles two pages; the lower one is read-only.
        regs.rsp = STACK_PAGE + 0x10;
        let mmu = Mmu {
            unmapped: RefCell::new(Vec::new()),
            read_only: vec![STACK_PAGE - 0x1000],
        };
        let before = frame(&mem, STACK_PAGE - 0x18);
        assert_eq!(
            finish(&mem, &mmu, &stopped(INT3, &regs, &sregs)),
            Err(Unfinished::Unmapped(STACK_PAGE - 0x18))
        );
        assert_eq!(frame(&mem, STACK_PAGE - 0x18), before);
        mmu.unmapped.borrow_mut().push(STACK_PAGE - 0x1000);
        assert!(matches!(
            finish(&mem, &mmu, &stopped(INT3, &regs, &sregs)),
            Err(Unfinished::Unmapped(_))
        ));
    }
}
