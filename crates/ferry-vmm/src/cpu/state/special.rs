//! The parts of vCPU state with more than one KVM interface: special registers (`SREGS2` or
//! `SREGS`) and the FPU (`XSAVE2`, `XSAVE` or the legacy `FPU`), and their saved forms.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_segment, kvm_sregs, kvm_sregs2, kvm_xsave, Xsave};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use super::{ioctl, require, Caps, VcpuStateError};

// kvm-ioctls has no wrapper for these (Linux 5.14+, KVM_CAP_SREGS2).
ioctl_ior_nr!(KVM_GET_SREGS2, kvm_bindings::KVMIO, 0xcc, kvm_sregs2);
ioctl_iow_nr!(KVM_SET_SREGS2, kvm_bindings::KVMIO, 0xcd, kvm_sregs2);

/// Bytes in the fixed part of `kvm_xsave`, the legacy `KVM_GET_XSAVE` area.
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();
const XSAVE_LEGACY_WORDS: usize = XSAVE_LEGACY_BYTES / 4;
/// The largest XSAVE area accepted from a saved state: 64 KiB, well above every x86 CPU's
/// (AMX included, about 11 KiB).
pub(super) const MAX_XSAVE_WORDS: usize = 16 * 1024;

/// Control registers, segments and descriptor tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SpecialRegisters {
    /// `KVM_GET_SREGS`, where `KVM_CAP_SREGS2` is missing. Its interrupt bitmap repeats the
    /// injected interrupt that the vCPU events also carry.
    Sregs(kvm_sregs),
    /// `KVM_GET_SREGS2`: adds the PAE PDPTRs, which KVM would otherwise reload from guest
    /// memory, and leaves pending interrupts to the vCPU events.
    Sregs2(Sregs2),
}

/// `kvm_sregs2` in a form serde can save.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sregs2 {
    pub cs: kvm_segment,
    pub ds: kvm_segment,
    pub es: kvm_segment,
    pub fs: kvm_segment,
    pub gs: kvm_segment,
    pub ss: kvm_segment,
    pub tr: kvm_segment,
    pub ldt: kvm_segment,
    pub gdt: kvm_dtable,
    pub idt: kvm_dtable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// `KVM_SREGS2_FLAGS_PDPTRS_VALID` when `pdptrs` hold the PAE page directory pointers.
    pub flags: u64,
    pub pdptrs: [u64; 4],
}

impl From<kvm_sregs2> for Sregs2 {
    fn from(s: kvm_sregs2) -> Sregs2 {
        let kvm_sregs2 {
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            gdt,
            idt,
            cr0,
            cr2,
            cr3,
            cr4,
            cr8,
            efer,
            apic_base,
            flags,
            pdptrs,
        } = s;
        Sregs2 {
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            gdt,
            idt,
            cr0,
            cr2,
            cr3,
            cr4,
            cr8,
            efer,
            apic_base,
            flags,
            pdptrs,
        }
    }
}

impl From<Sregs2> for kvm_sregs2 {
    fn from(s: Sregs2) -> kvm_sregs2 {
        let Sregs2 {
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            gdt,
            idt,
            cr0,
            cr2,
            cr3,
            cr4,
            cr8,
            efer,
            apic_base,
            flags,
            pdptrs,
        } = s;
        kvm_sregs2 {
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            gdt,
            idt,
            cr0,
            cr2,
            cr3,
            cr4,
            cr8,
            efer,
            apic_base,
            flags,
            pdptrs,
        }
    }
}

impl Sregs2 {
    /// The same registers for `KVM_SET_SREGS`, on a host without `SREGS2`. The PDPTRs are
    /// dropped (KVM reloads them from guest memory) and no interrupt is re-queued (the vCPU
    /// events carry it).
    fn to_sregs(self) -> kvm_sregs {
        kvm_sregs {
            cs: self.cs,
            ds: self.ds,
            es: self.es,
            fs: self.fs,
            gs: self.gs,
            ss: self.ss,
            tr: self.tr,
            ldt: self.ldt,
            gdt: self.gdt,
            idt: self.idt,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
            interrupt_bitmap: [0; 4],
        }
    }
}

pub(super) fn get_sregs(fd: &VcpuFd, sregs2: bool) -> Result<SpecialRegisters, VcpuStateError> {
    if !sregs2 {
        let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        return Ok(SpecialRegisters::Sregs(sregs));
    }
    let mut sregs = kvm_sregs2::default();
    // SAFETY: KVM_GET_SREGS2 writes exactly one `kvm_sregs2` into the buffer we own, and
    // the caller checked KVM_CAP_SREGS2, so the kernel knows this ioctl and its size.
    let ret = unsafe { ioctl_with_mut_ref(fd, KVM_GET_SREGS2(), &mut sregs) };
    if ret != 0 {
        return Err(VcpuStateError::Ioctl {
            ioctl: "KVM_GET_SREGS2",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(SpecialRegisters::Sregs2(sregs.into()))
}

pub(super) fn set_sregs(
    fd: &VcpuFd,
    sregs: &SpecialRegisters,
    sregs2: bool,
) -> Result<(), VcpuStateError> {
    let saved = match sregs {
        SpecialRegisters::Sregs(s) => return fd.set_sregs(s).map_err(ioctl("KVM_SET_SREGS")),
        SpecialRegisters::Sregs2(s) if !sregs2 => {
            return fd.set_sregs(&s.to_sregs()).map_err(ioctl("KVM_SET_SREGS"))
        }
        SpecialRegisters::Sregs2(s) => kvm_sregs2::from(*s),
    };
    // SAFETY: KVM_SET_SREGS2 reads exactly one `kvm_sregs2` from a live reference, and the
    // caller checked KVM_CAP_SREGS2. KVM validates the values.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_SREGS2(), &saved) };
    if ret != 0 {
        return Err(VcpuStateError::Ioctl {
            ioctl: "KVM_SET_SREGS2",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// x87, SSE, AVX and every other XSAVE component.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area as KVM lays it out (`KVM_GET_XSAVE2`, or `KVM_GET_XSAVE` for the first
    /// 4 KiB), in 32-bit words.
    Xsave(Vec<u32>),
    /// `KVM_GET_FPU`, on a host without `KVM_CAP_XSAVE`: x87 and SSE only (and not MXCSR,
    /// which KVM's FPU ioctls leave out).
    Legacy(Box<LegacyFpu>),
}

/// `kvm_fpu` in a form serde can save.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LegacyFpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<kvm_fpu> for LegacyFpu {
    fn from(f: kvm_fpu) -> LegacyFpu {
        LegacyFpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<LegacyFpu> for kvm_fpu {
    fn from(f: LegacyFpu) -> kvm_fpu {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// How many 32-bit words of the flexible array follow the legacy area for a `kvm_xsave`
/// buffer of `bytes` bytes.
fn extra_words(bytes: usize) -> usize {
    bytes.saturating_sub(XSAVE_LEGACY_BYTES).div_ceil(4)
}

pub(super) fn get_fpu(fd: &VcpuFd, caps: &Caps) -> Result<FpuState, VcpuStateError> {
    if caps.xsave2_bytes > 0 {
        let mut xsave =
            Xsave::new(extra_words(caps.xsave2_bytes)).map_err(|source| VcpuStateError::Fam {
                what: "XSAVE",
                source,
            })?;
        // SAFETY: the buffer holds KVM_CAP_XSAVE2 bytes, asked just now. KVM writes the
        // vCPU's own XSAVE size, fixed when the vCPU was created from this process's XSTATE
        // permissions, which only grow: it is never more than the size asked later.
        unsafe { fd.get_xsave2(&mut xsave) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
        let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        return Ok(FpuState::Xsave(words));
    }
    if caps.xsave {
        let xsave = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        return Ok(FpuState::Xsave(xsave.region.to_vec()));
    }
    let fpu = fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?;
    Ok(FpuState::Legacy(Box::new(fpu.into())))
}

pub(super) fn set_fpu(fd: &VcpuFd, fpu: &FpuState, caps: &Caps) -> Result<(), VcpuStateError> {
    let legacy_as_xsave;
    let words = match fpu {
        FpuState::Legacy(f) if !caps.xsave => {
            return fd.set_fpu(&(**f).into()).map_err(ioctl("KVM_SET_FPU"))
        }
        // Where KVM keeps XSAVE state, KVM_SET_FPU writes the legacy area but leaves the
        // XSAVE header saying "initial state", so the guest would never see it.
        FpuState::Legacy(f) => {
            legacy_as_xsave = f.as_xsave();
            &legacy_as_xsave
        }
        FpuState::Xsave(words) => words,
    };
    require(caps.xsave, "an XSAVE area")?;
    // KVM reads as many bytes as the vCPU's XSAVE area holds, whatever we pass: the buffer
    // must be at least that large, and the saved area must fit in it.
    let host_bytes = caps.xsave2_bytes.max(XSAVE_LEGACY_BYTES);
    let saved_bytes = words.len() * 4;
    if saved_bytes < XSAVE_LEGACY_BYTES || saved_bytes > host_bytes {
        return Err(VcpuStateError::XsaveSize {
            saved: saved_bytes,
            min: XSAVE_LEGACY_BYTES,
            max: host_bytes,
        });
    }
    let mut xsave = Xsave::new(extra_words(host_bytes)).map_err(|source| VcpuStateError::Fam {
        what: "XSAVE",
        source,
    })?;
    let (legacy, extra) = words.split_at(XSAVE_LEGACY_WORDS);
    // SAFETY: only the fixed `region` array is written; the length the wrapper's safety
    // rests on stays as `Xsave::new` set it.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(legacy);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: the buffer holds max(KVM_CAP_XSAVE2, 4096) bytes, asked just now, which is at
    // least the vCPU's XSAVE size (see `get_fpu`): KVM reads no further. KVM validates the
    // contents against the vCPU's CPUID.
    unsafe { fd.set_xsave2(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"))
}

/// Where the FXSAVE image and the XSAVE header's component bitmap sit in an XSAVE area.
const FXSAVE_ST0: usize = 32;
const FXSAVE_XMM0: usize = 160;
const XSAVE_XSTATE_BV: usize = 512;
/// XSTATE_BV bits for x87 and SSE: the components the legacy FPU state fills.
const XFEATURES_X87_SSE: u64 = 0b11;
/// MXCSR at power-on: every SIMD exception masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

impl LegacyFpu {
    /// The same registers as an XSAVE area (FXSAVE layout plus a header marking x87 and SSE
    /// as present), in 32-bit words.
    fn as_xsave(&self) -> Vec<u32> {
        let mut bytes = vec![0u8; XSAVE_LEGACY_BYTES];
        let mut put = |offset: usize, data: &[u8]| {
            bytes[offset..offset + data.len()].copy_from_slice(data);
        };
        put(0, &self.fcw.to_le_bytes());
        put(2, &self.fsw.to_le_bytes());
        put(4, &[self.ftwx]);
        put(6, &self.last_opcode.to_le_bytes());
        put(8, &self.last_ip.to_le_bytes());
        put(16, &self.last_dp.to_le_bytes());
        // KVM_GET_FPU never reports MXCSR (it reads as 0, and KVM_SET_FPU ignores it): a 0
        // here means "unknown", and becomes the power-on value rather than unmasking every
        // SIMD exception.
        let mxcsr = if self.mxcsr == 0 {
            MXCSR_DEFAULT
        } else {
            self.mxcsr
        };
        put(24, &mxcsr.to_le_bytes());
        for (i, st) in self.fpr.iter().enumerate() {
            put(FXSAVE_ST0 + 16 * i, st);
        }
        for (i, xmm) in self.xmm.iter().enumerate() {
            put(FXSAVE_XMM0 + 16 * i, xmm);
        }
        put(XSAVE_XSTATE_BV, &XFEATURES_X87_SSE.to_le_bytes());
        bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs2_converts_both_ways_and_to_sregs() {
        let raw = kvm_sregs2 {
            cr0: 0x8000_0011,
            cr3: 0x1000,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            flags: 1,
            pdptrs: [1, 2, 3, 4],
            ..Default::default()
        };
        let saved = Sregs2::from(raw);
        assert_eq!(kvm_sregs2::from(saved), raw);
        let old = saved.to_sregs();
        assert_eq!((old.cr0, old.cr3, old.efer), (0x8000_0011, 0x1000, 0x500));
        assert_eq!(old.interrupt_bitmap, [0; 4]);
    }

    #[test]
    fn legacy_fpu_converts_both_ways() {
        let raw = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            xmm: [[7; 16]; 16],
            ..Default::default()
        };
        assert_eq!(kvm_fpu::from(LegacyFpu::from(raw)), raw);
    }

    #[test]
    fn legacy_fpu_becomes_an_xsave_area_with_x87_and_sse_present() {
        let mut fpu = LegacyFpu::from(kvm_fpu {
            fcw: 0x27f,
            fsw: 0x1234,
            mxcsr: 0x9f80,
            ..Default::default()
        });
        fpu.fpr[0] = [1; 16];
        fpu.xmm[15] = [0xab; 16];
        let words = fpu.as_xsave();
        assert_eq!(words.len(), XSAVE_LEGACY_WORDS);
        assert_eq!(words[0], 0x1234_027f);
        assert_eq!(words[6], 0x9f80);
        assert_eq!(words[FXSAVE_ST0 / 4], 0x0101_0101);
        assert_eq!(words[(FXSAVE_XMM0 + 15 * 16) / 4 + 3], 0xabab_abab);
        assert_eq!(
            (words[XSAVE_XSTATE_BV / 4], words[XSAVE_XSTATE_BV / 4 + 1]),
            (3, 0)
        );
        fpu.mxcsr = 0;
        assert_eq!(fpu.as_xsave()[6], MXCSR_DEFAULT, "unknown MXCSR is not 0");
    }

    #[test]
    fn xsave_extra_words_round_up() {
        assert_eq!(extra_words(4096), 0);
        assert_eq!(extra_words(4097), 1);
        assert_eq!(extra_words(4096 + 8192), 2048);
        assert_eq!(extra_words(0), 0);
    }
}
