//! Just enough 64-bit little-endian ELF reading for the Linux guest kit: a kernel module's
//! `.modinfo` section, whether a program is statically linked, and whether a `vmlinux` has a
//! PVH entry note. Every read is bounds-checked; a malformed file is an error, never a panic.

/// Why an ELF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    #[error("truncated ELF {0}")]
    Truncated(&'static str),
    #[error("bad ELF section string table")]
    BadStringTable,
    #[error("ELF {0} lies outside the file")]
    Outside(String),
}

type Result<T> = std::result::Result<T, Error>;

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_NOBITS: u32 = 8;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point, in a note named "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// A parsed ELF64 little-endian image, borrowing its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Elf<'a> {
    data: &'a [u8],
}

fn read<const N: usize>(data: &[u8], at: u64) -> Option<[u8; N]> {
    let at = usize::try_from(at).ok()?;
    data.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(data: &[u8], at: u64) -> Option<u16> {
    read::<2>(data, at).map(u16::from_le_bytes)
}

fn u32_at(data: &[u8], at: u64) -> Option<u32> {
    read::<4>(data, at).map(u32::from_le_bytes)
}

fn u64_at(data: &[u8], at: u64) -> Option<u64> {
    read::<8>(data, at).map(u64::from_le_bytes)
}

fn slice(data: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    data.get(start..start.checked_add(len)?)
}

impl<'a> Elf<'a> {
    /// Checks the identification bytes: ELF, 64-bit, little-endian.
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        if data.len() < 64 || &data[..4] != b"\x7fELF" {
            return Err(Error::NotElf);
        }
        if data[4] != 2 || data[5] != 1 {
            return Err(Error::NotElf64);
        }
        Ok(Self { data })
    }

    fn header_u16(&self, at: u64) -> Result<u16> {
        u16_at(self.data, at).ok_or(Error::Truncated("header"))
    }

    fn header_u64(&self, at: u64) -> Result<u64> {
        u64_at(self.data, at).ok_or(Error::Truncated("header"))
    }

    /// (p_type, p_offset, p_filesz) of every program header.
    fn program_headers(&self) -> Result<Vec<(u32, u64, u64)>> {
        let phoff = self.header_u64(0x20)?;
        let entsize = u64::from(self.header_u16(0x36)?);
        let count = u64::from(self.header_u16(0x38)?);
        (0..count)
            .map(|i| {
                let at = phoff + i * entsize;
                Some((
                    u32_at(self.data, at)?,
                    u64_at(self.data, at + 0x08)?,
                    u64_at(self.data, at + 0x20)?,
                ))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(Error::Truncated("program headers"))
    }

    /// Whether the file asks for a program interpreter (is dynamically linked).
    pub fn has_interpreter(&self) -> Result<bool> {
        Ok(self
            .program_headers()?
            .iter()
            .any(|&(kind, _, _)| kind == PT_INTERP))
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>> {
        let shoff = self.header_u64(0x28)?;
        let entsize = u64::from(self.header_u16(0x3a)?);
        let count = u64::from(self.header_u16(0x3c)?);
        let strndx = u64::from(self.header_u16(0x3e)?);
        if count == 0 {
            return Ok(None);
        }
        let header = |i: u64| -> Option<(u32, u32, u64, u64)> {
            let at = shoff.checked_add(i.checked_mul(entsize)?)?;
            Some((
                u32_at(self.data, at)?,
                u32_at(self.data, at + 0x04)?,
                u64_at(self.data, at + 0x18)?,
                u64_at(self.data, at + 0x20)?,
            ))
        };
        let (_, _, str_off, str_size) = header(strndx).ok_or(Error::BadStringTable)?;
        let names = slice(self.data, str_off, str_size).ok_or(Error::BadStringTable)?;
        for i in 0..count {
            let (name_off, kind, offset, size) =
                header(i).ok_or(Error::Truncated("section headers"))?;
            let Some(rest) = names.get(name_off as usize..) else {
                continue;
            };
            let this = rest.split(|&b| b == 0).next().unwrap_or_default();
            if this == name.as_bytes() {
                if kind == SHT_NOBITS {
                    return Ok(Some(&[]));
                }
                return slice(self.data, offset, size)
                    .map(Some)
                    .ok_or_else(|| Error::Outside(format!("section {name}")));
            }
        }
        Ok(None)
    }

    /// Whether a `PT_NOTE` segment carries Xen's PVH entry note, which ferry boots through.
    pub fn has_pvh_note(&self) -> Result<bool> {
        for (kind, offset, size) in self.program_headers()? {
            if kind != PT_NOTE {
                continue;
            }
            let notes =
                slice(self.data, offset, size).ok_or_else(|| Error::Outside("note".into()))?;
            let mut at = 0u64;
            while at + 12 <= notes.len() as u64 {
                let (Some(namesz), Some(descsz), Some(note_type)) = (
                    u32_at(notes, at),
                    u32_at(notes, at + 4),
                    u32_at(notes, at + 8),
                ) else {
                    break;
                };
                let name_at = at + 12;
                let name = slice(notes, name_at, u64::from(namesz)).unwrap_or_default();
                if note_type == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                    return Ok(true);
                }
                at = name_at
                    + u64::from(namesz).next_multiple_of(4)
                    + u64::from(descsz).next_multiple_of(4);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 relocatable file with the given sections (name, contents), the way a
    /// kernel module looks to [`Elf::section`].
    pub(crate) fn tiny_elf(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_offsets = Vec::new();
        for (name, _) in sections {
            name_offsets.push(names.len() as u32);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let shstrtab_name = names.len() as u32;
        names.extend_from_slice(b".shstrtab\0");

        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        let mut placed = Vec::new();
        for (_, data) in sections {
            placed.push((out.len() as u64, data.len() as u64));
            out.extend_from_slice(data);
        }
        let names_at = out.len() as u64;
        out.extend_from_slice(&names);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        let shoff = out.len() as u64;
        // Null section, the given ones, then .shstrtab.
        out.extend_from_slice(&[0u8; 64]);
        let mut push = |name: u32, kind: u32, offset: u64, size: u64| {
            let mut sh = [0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&kind.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&sh);
        };
        for (i, &(offset, size)) in placed.iter().enumerate() {
            push(name_offsets[i], 1, offset, size);
        }
        push(shstrtab_name, 3, names_at, names.len() as u64);
        let count = (sections.len() + 2) as u16;
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&count.to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&(count - 1).to_le_bytes());
        out
    }

    #[test]
    fn finds_a_section_by_name() {
        let file = tiny_elf(&[(".text", b"\x90\x90"), (".modinfo", b"name=x\0depends=y\0")]);
        let elf = Elf::parse(&file).expect("parse");
        assert_eq!(
            elf.section(".modinfo").expect("read"),
            Some(&b"name=x\0depends=y\0"[..])
        );
        assert_eq!(elf.section(".text").expect("read"), Some(&b"\x90\x90"[..]));
        assert_eq!(elf.section(".data").expect("read"), None);
        assert!(!elf.has_interpreter().expect("phdrs"));
        assert!(!elf.has_pvh_note().expect("notes"));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Elf::parse(b"nope").is_err());
        let mut file = tiny_elf(&[(".modinfo", b"a=b\0")]);
        // Point the section headers past the end of the file.
        file[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        let elf = Elf::parse(&file).expect("identification is fine");
        assert!(elf.section(".modinfo").is_err());
    }

    #[test]
    fn the_hosts_shell_is_an_elf() {
        // Smoke test against a real binary when there is one.
        if let Ok(bytes) = std::fs::read("/bin/sh") {
            if let Ok(elf) = Elf::parse(&bytes) {
                elf.has_interpreter().expect("program headers of /bin/sh");
            }
        }
    }
}
