//! The messages and the rules every one of them must satisfy on its own (bounds, layout);
//! rules about order and totals belong to the state machines.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::blocks::{BlockBatch, SECTOR_SIZE};
use super::error::ProtocolError;
use super::pages::PageBatch;
use super::{
    MAX_BATCH_BYTES, MAX_CAPABILITIES, MAX_CAPABILITY_BYTES, MAX_CONNECTIONS, MAX_CONTROL_BYTES,
    MAX_DISKS, MAX_REGIONS, MAX_RESUME_WINDOW_MS, MAX_STATE_BYTES, MAX_STRING_BYTES, PAGE_SIZE,
    PROTOCOL_VERSION,
};

/// The frame version of the migration messages that changed with protocol version 2 (Setup
/// carries a migration id, and the State payload is versioned sections). Hello and Abort keep
/// version 1 ([`MessageKind::format_version`]) so that peers of any protocol version can still
/// read each other's Hello and refusal, and the refusal names both versions.
pub const MESSAGE_FORMAT_VERSION: u16 = 2;

/// The first message each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// Free text for logs and errors, e.g. "ferry 0.1.0".
    pub software: String,
    /// Optional features this side supports; both use the intersection.
    pub capabilities: Vec<String>,
}

impl Hello {
    /// A Hello of this ferry's [`PROTOCOL_VERSION`].
    pub fn new(software: impl Into<String>, capabilities: &[&str]) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            software: software.into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |reason: String| ProtocolError::Invalid {
            what: "Hello",
            reason,
        };
        if self.software.len() > MAX_STRING_BYTES {
            return Err(invalid(format!(
                "software name of {} bytes (at most {MAX_STRING_BYTES})",
                self.software.len()
            )));
        }
        if self.capabilities.len() > MAX_CAPABILITIES {
            return Err(invalid(format!(
                "{} capabilities (at most {MAX_CAPABILITIES})",
                self.capabilities.len()
            )));
        }
        for c in &self.capabilities {
            if c.is_empty() || c.len() > MAX_CAPABILITY_BYTES {
                return Err(invalid(format!(
                    "capability name of {} bytes (1 to {MAX_CAPABILITY_BYTES})",
                    c.len()
                )));
            }
        }
        Ok(())
    }
}

/// One range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub guest_addr: u64,
    pub len: u64,
}

/// What the destination must allocate before pages arrive.
///
/// `regions` are page-aligned, non-empty, sorted by address and disjoint; `memory_bytes` is
/// the sum of their lengths. Every page record must fall inside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Chosen by the source, unique per migration: a later [`Resolve`] names it.
    pub migration_id: u64,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub regions: Vec<Region>,
    /// Disk image paths as the source saved them.
    pub disks: Vec<String>,
    /// The disks whose contents travel in this stream ([`Message::Blocks`]), in ascending
    /// index order; the others stay where they are (storage both hosts see). Absent in a peer
    /// without the `disk-blocks` feature: nothing moves.
    #[serde(default)]
    pub moving_disks: Vec<MovingDisk>,
    /// How many NICs the VM has: the destination needs a tap for each before it takes the
    /// VM. Absent in an older peer, whose VMs have none.
    #[serde(default)]
    pub nics: u32,
}

/// A disk whose contents move with the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovingDisk {
    /// Its index in [`Setup::disks`] (the VM's disk order).
    pub index: u32,
    /// Its size in bytes, a multiple of the sector size.
    pub size: u64,
    /// The guest cannot write it: one pass copies it.
    pub read_only: bool,
}

impl Setup {
    fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |reason: String| ProtocolError::Invalid {
            what: "Setup",
            reason,
        };
        if self.vcpus == 0 {
            return Err(invalid("no vCPUs".into()));
        }
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS {
            return Err(invalid(format!(
                "{} memory regions (1 to {MAX_REGIONS})",
                self.regions.len()
            )));
        }
        let mut sum = 0u64;
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.len == 0 || r.guest_addr % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
                return Err(invalid(format!(
                    "region {i} at {:#x} of {:#x} bytes is empty or not page-aligned",
                    r.guest_addr, r.len
                )));
            }
            let end = r.guest_addr.checked_add(r.len).ok_or_else(|| {
                invalid(format!(
                    "region {i} at {:#x} runs past the address space",
                    r.guest_addr
                ))
            })?;
            if i > 0 && r.guest_addr < prev_end {
                return Err(invalid(format!(
                    "region {i} at {:#x} overlaps or precedes the one before",
                    r.guest_addr
                )));
            }
            prev_end = end;
            // Cannot overflow: the regions are disjoint ranges of a 64-bit space.
            sum += r.len;
        }
        if sum != self.memory_bytes {
            return Err(invalid(format!(
                "regions add up to {sum:#x} bytes, memory_bytes says {:#x}",
                self.memory_bytes
            )));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(invalid(format!(
                "{} disks (at most {MAX_DISKS})",
                self.disks.len()
            )));
        }
        if let Some(d) = self
            .disks
            .iter()
            .find(|d| d.is_empty() || d.len() > MAX_STRING_BYTES)
        {
            return Err(invalid(format!(
                "disk path of {} bytes (1 to {MAX_STRING_BYTES})",
                d.len()
            )));
        }
        let mut previous = None;
        for m in &self.moving_disks {
            if m.index as usize >= self.disks.len() || previous.is_some_and(|p| p >= m.index) {
                return Err(invalid(format!(
                    "moving disk {} is not one of the {} disks, or out of order",
                    m.index,
                    self.disks.len()
                )));
            }
            if m.size % SECTOR_SIZE != 0 {
                return Err(invalid(format!(
                    "moving disk {} has {} bytes, not whole sectors",
                    m.index, m.size
                )));
            }
            previous = Some(m.index);
        }
        Ok(())
    }
}

/// The end of one pass over memory: what this pass sent (informational, but checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IterationDone {
    /// Counts from 0.
    pub iteration: u32,
    /// Data pages sent in this pass.
    pub pages_sent: u64,
    /// Pages sent as zero runs in this pass.
    pub zero_pages: u64,
}

/// The end of the data, with totals the receiver must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    /// The number of [`IterationDone`] messages sent.
    pub iterations: u32,
    /// Data pages sent in all passes.
    pub data_pages: u64,
    /// Pages sent as zero runs in all passes.
    pub zero_pages: u64,
    /// Disk bytes sent as data, all disks and passes.
    #[serde(default)]
    pub disk_data_bytes: u64,
    /// Disk bytes sent as zero ranges, all disks and passes.
    #[serde(default)]
    pub disk_hole_bytes: u64,
}

/// The destination's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Running {
    /// From Commit received to vCPUs running, as the destination measured it.
    pub resume_ms: f64,
}

/// The destination's progress: what it has written into guest memory so far. Sent while pages
/// arrive, so the source knows the destination's backlog and never stops the guest while the
/// destination is behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Data bytes written, in all passes: the data pages' bytes and the disk blocks' data.
    pub bytes: u64,
    /// Page records (data and zero pages) applied, in all passes.
    pub pages: u64,
    /// Of `bytes`, those of disk block data: how far the destination is behind on disks (a
    /// mirrored disk's lag).
    #[serde(default)]
    pub disk_bytes: u64,
}

/// On a new connection, instead of Setup: "do you run the VM of this migration?" A source
/// whose handover outcome is unknown asks it. A destination that has not started that VM
/// answers no and from then on refuses to start it (so the answer stays true).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolve {
    pub migration_id: u64,
}

/// The answer to [`Resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub migration_id: u64,
    /// The destination runs that VM (it was committed); false: it never will.
    pub running: bool,
}

/// On a new connection, after Hello: "carry session `session_id`". The first connection of a
/// session creates it (the id is the migration's); later ones add a stream to it or replace
/// one that was lost. From the answer on, the connection carries the session's framing, not
/// messages: the messages travel inside the session's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    pub session_id: u64,
    /// Which of the session's connections this is (from 0).
    pub index: u32,
    /// How long the destination keeps the session without any connection before it gives
    /// the migration up.
    pub resume_window_ms: u64,
    /// Bytes of the destination's stream the source has consumed: what need not be sent
    /// again.
    pub received: u64,
    /// A secret the source chose for the session: a later connection must present the
    /// first one's, so knowing the migration id is not enough to join or take one over.
    #[serde(default)]
    pub key: u64,
}

/// The answer to [`Attach`]: bytes of the source's stream the destination has consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub received: u64,
}

/// Why a side gives up, so the other can tell a busy peer from an incompatible one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortKind {
    /// The receiver takes one VM and has one.
    Busy,
    /// The two sides cannot work together (version, features, memory layout).
    Incompatible,
    /// The destination lacks memory, vCPUs, disks or other resources.
    Resources,
    /// The operator cancelled.
    Cancelled,
    /// Anything else; also what an unknown kind from a newer peer reads as.
    #[default]
    #[serde(other)]
    Failed,
}

/// Abort: why this side gives up. On the wire an object (`kind` absent reads as `failed`, so
/// a version-1 peer's Abort still reads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    #[serde(default)]
    pub kind: AbortKind,
    pub reason: String,
}

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// One migration message. See the [module](super) for the conversation.
#[derive(Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Setup(Setup),
    SetupOk,
    Pages(PageBatch),
    /// Disk contents of one moving disk.
    Blocks(BlockBatch),
    IterationDone(IterationDone),
    /// The VM's device and CPU state: the VMM's bytes, opaque here.
    State(Vec<u8>),
    Complete(Complete),
    Prepared,
    Commit,
    Running(Running),
    Abort(Abort),
    Applied(Applied),
    Resolve(Resolve),
    Resolved(Resolved),
    Attach(Attach),
    Attached(Attached),
}

/// The type of a message, which is its frame kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageKind {
    Hello = 0x0101,
    Setup = 0x0102,
    SetupOk = 0x0103,
    Pages = 0x0104,
    IterationDone = 0x0105,
    State = 0x0106,
    Complete = 0x0107,
    Prepared = 0x0108,
    Commit = 0x0109,
    Running = 0x010a,
    Abort = 0x010b,
    Applied = 0x010c,
    Resolve = 0x010d,
    Resolved = 0x010e,
    Blocks = 0x010f,
    Attach = 0x0110,
    Attached = 0x0111,
}

impl MessageKind {
    /// Every kind, in protocol order.
    pub const ALL: [MessageKind; 17] = [
        MessageKind::Hello,
        MessageKind::Setup,
        MessageKind::SetupOk,
        MessageKind::Pages,
        MessageKind::IterationDone,
        MessageKind::State,
        MessageKind::Complete,
        MessageKind::Prepared,
        MessageKind::Commit,
        MessageKind::Running,
        MessageKind::Abort,
        MessageKind::Applied,
        MessageKind::Resolve,
        MessageKind::Resolved,
        MessageKind::Blocks,
        MessageKind::Attach,
        MessageKind::Attached,
    ];

    pub fn from_u16(kind: u16) -> Option<MessageKind> {
        MessageKind::ALL.into_iter().find(|k| *k as u16 == kind)
    }

    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Hello => "Hello",
            MessageKind::Setup => "Setup",
            MessageKind::SetupOk => "SetupOk",
            MessageKind::Pages => "Pages",
            MessageKind::IterationDone => "IterationDone",
            MessageKind::State => "State",
            MessageKind::Complete => "Complete",
            MessageKind::Prepared => "Prepared",
            MessageKind::Commit => "Commit",
            MessageKind::Running => "Running",
            MessageKind::Abort => "Abort",
            MessageKind::Applied => "Applied",
            MessageKind::Resolve => "Resolve",
            MessageKind::Resolved => "Resolved",
            MessageKind::Blocks => "Blocks",
            MessageKind::Attach => "Attach",
            MessageKind::Attached => "Attached",
        }
    }

    /// The frame version this ferry writes and reads for this kind.
    pub fn format_version(self) -> u16 {
        match self {
            MessageKind::Hello | MessageKind::Abort => 1,
            _ => MESSAGE_FORMAT_VERSION,
        }
    }

    /// The largest payload a frame of this kind may have.
    pub fn max_payload(self) -> usize {
        match self {
            MessageKind::SetupOk | MessageKind::Prepared | MessageKind::Commit => 0,
            MessageKind::Pages | MessageKind::Blocks => MAX_BATCH_BYTES,
            MessageKind::State => MAX_STATE_BYTES,
            MessageKind::Hello
            | MessageKind::Setup
            | MessageKind::IterationDone
            | MessageKind::Complete
            | MessageKind::Running
            | MessageKind::Abort
            | MessageKind::Applied
            | MessageKind::Resolve
            | MessageKind::Resolved
            | MessageKind::Attach
            | MessageKind::Attached => MAX_CONTROL_BYTES,
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::Setup(_) => MessageKind::Setup,
            Message::SetupOk => MessageKind::SetupOk,
            Message::Pages(_) => MessageKind::Pages,
            Message::IterationDone(_) => MessageKind::IterationDone,
            Message::State(_) => MessageKind::State,
            Message::Complete(_) => MessageKind::Complete,
            Message::Prepared => MessageKind::Prepared,
            Message::Commit => MessageKind::Commit,
            Message::Running(_) => MessageKind::Running,
            Message::Abort(_) => MessageKind::Abort,
            Message::Applied(_) => MessageKind::Applied,
            Message::Resolve(_) => MessageKind::Resolve,
            Message::Resolved(_) => MessageKind::Resolved,
            Message::Blocks(_) => MessageKind::Blocks,
            Message::Attach(_) => MessageKind::Attach,
            Message::Attached(_) => MessageKind::Attached,
        }
    }

    /// An Abort of kind [`AbortKind::Failed`]; see [`Message::abort_as`].
    pub fn abort(reason: impl Into<String>) -> Message {
        Message::abort_as(AbortKind::Failed, reason)
    }

    /// An Abort whose reason is cut (at a character boundary) to [`MAX_STRING_BYTES`], so
    /// giving up never fails because the reason is long.
    pub fn abort_as(kind: AbortKind, reason: impl Into<String>) -> Message {
        let mut reason = reason.into();
        if reason.len() > MAX_STRING_BYTES {
            let mut end = MAX_STRING_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Message::Abort(Abort { kind, reason })
    }

    /// Checks the rules a message must satisfy on its own: bounds and layout. [`read_message`]
    /// applies them to what arrives, [`write_message`] and the machines to what is sent.
    ///
    /// [`read_message`]: super::read_message
    /// [`write_message`]: super::write_message
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            Message::Hello(h) => h.validate(),
            Message::Setup(s) => s.validate(),
            Message::Pages(b) => b.check_sendable(),
            Message::Blocks(b) => b.check_sendable(),
            Message::State(s) if s.len() > MAX_STATE_BYTES => Err(ProtocolError::TooLarge {
                what: "State",
                len: s.len() as u64,
                limit: MAX_STATE_BYTES as u64,
            }),
            Message::Running(r) if !(r.resume_ms.is_finite() && r.resume_ms >= 0.0) => {
                Err(ProtocolError::Invalid {
                    what: "Running",
                    reason: format!("resume time {} ms", r.resume_ms),
                })
            }
            Message::Attach(a) if a.index >= MAX_CONNECTIONS => Err(ProtocolError::Invalid {
                what: "Attach",
                reason: format!(
                    "connection {} (a session has at most {MAX_CONNECTIONS})",
                    a.index
                ),
            }),
            Message::Attach(a) if a.resume_window_ms > MAX_RESUME_WINDOW_MS => {
                Err(ProtocolError::Invalid {
                    what: "Attach",
                    reason: format!(
                        "resume window of {} ms (at most {MAX_RESUME_WINDOW_MS})",
                        a.resume_window_ms
                    ),
                })
            }
            Message::Abort(a) if a.reason.len() > MAX_STRING_BYTES => {
                Err(ProtocolError::TooLarge {
                    what: "Abort reason",
                    len: a.reason.len() as u64,
                    limit: MAX_STRING_BYTES as u64,
                })
            }
            _ => Ok(()),
        }
    }
}

// By hand: the derived form would print megabytes of state and pages.
impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Hello(h) => f.debug_tuple("Hello").field(h).finish(),
            Message::Setup(s) => f.debug_tuple("Setup").field(s).finish(),
            Message::Pages(b) => f.debug_tuple("Pages").field(b).finish(),
            Message::Blocks(b) => f.debug_tuple("Blocks").field(b).finish(),
            Message::IterationDone(d) => f.debug_tuple("IterationDone").field(d).finish(),
            Message::State(s) => write!(f, "State(<{} bytes>)", s.len()),
            Message::Complete(c) => f.debug_tuple("Complete").field(c).finish(),
            Message::Running(r) => f.debug_tuple("Running").field(r).finish(),
            Message::Abort(r) => f.debug_tuple("Abort").field(r).finish(),
            Message::Applied(a) => f.debug_tuple("Applied").field(a).finish(),
            Message::Resolve(r) => f.debug_tuple("Resolve").field(r).finish(),
            Message::Resolved(r) => f.debug_tuple("Resolved").field(r).finish(),
            Message::Attach(a) => f.debug_tuple("Attach").field(a).finish(),
            Message::Attached(a) => f.debug_tuple("Attached").field(a).finish(),
            Message::SetupOk | Message::Prepared | Message::Commit => {
                f.write_str(self.kind().name())
            }
        }
    }
}
