//! The Hello exchange: version check and capability intersection.

use super::error::ProtocolError;
use super::message::{Hello, Setup};
use super::PROTOCOL_VERSION;

/// What each side said in its Hello.
#[derive(Debug, Clone, Default)]
pub(super) struct Negotiation {
    source: Option<Vec<String>>,
    destination: Option<Vec<String>>,
    peer: Option<Hello>,
    agreed: Option<Vec<String>>,
}

impl Negotiation {
    /// Checks a Hello this side is about to send.
    pub(super) fn check_own(hello: &Hello) -> Result<(), ProtocolError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::Invalid {
                what: "Hello",
                reason: format!(
                    "own protocol version {} is not this ferry's {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            });
        }
        Ok(())
    }

    /// Checks the peer's Hello.
    pub(super) fn check_peer(hello: &Hello) -> Result<(), ProtocolError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version {
                ours: PROTOCOL_VERSION,
                theirs: hello.protocol_version,
            });
        }
        Ok(())
    }

    pub(super) fn record(&mut self, hello: &Hello, from_source: bool, is_peer: bool) {
        let caps = Some(hello.capabilities.clone());
        if from_source {
            self.source = caps;
        } else {
            self.destination = caps;
        }
        if is_peer {
            self.peer = Some(hello.clone());
        }
        if let (Some(src), Some(dst)) = (&self.source, &self.destination) {
            // In the source's order, so both sides agree on the list, not only the set.
            let mut agreed: Vec<String> = Vec::new();
            for c in src {
                if dst.contains(c) && !agreed.contains(c) {
                    agreed.push(c.clone());
                }
            }
            self.agreed = Some(agreed);
        }
    }

    /// Disks may move only when both sides announced `disk-blocks`.
    pub(super) fn check_moving_disks(&self, setup: &Setup) -> Result<(), ProtocolError> {
        let agreed = self
            .agreed()
            .is_some_and(|a| a.iter().any(|c| c == feature::DISK_BLOCKS));
        if !setup.moving_disks.is_empty() && !agreed {
            return Err(ProtocolError::MissingFeature(feature::DISK_BLOCKS));
        }
        Ok(())
    }

    pub(super) fn agreed(&self) -> Option<&[String]> {
        self.agreed.as_deref()
    }

    /// The page codecs both sides announced.
    pub(super) fn codecs(&self) -> crate::migration::CodecSet {
        self.agreed().map_or(
            crate::migration::CodecSet::NONE,
            crate::migration::CodecSet::from_features,
        )
    }

    /// Whether both sides announced `feature`.
    pub(super) fn both(&self, feature: &str) -> bool {
        self.agreed()
            .is_some_and(|a| a.iter().any(|c| c == feature))
    }

    pub(super) fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }
}

/// Optional features a Hello may announce. Each side acts only on what both announced.
pub mod feature {
    /// Pages that are all zero travel as run markers, not as data.
    pub const ZERO_PAGES: &str = "zero-pages";
    /// The destination reports its progress ([`Applied`](crate::migration::Applied)); the
    /// source waits for it to catch up before it stops the guest.
    pub const FLOW_CONTROL: &str = "flow-control";
    /// The State payload is the VM state as versioned sections (the snapshot encoding).
    pub const STATE_SECTIONS: &str = "state-sections";
    /// Disk contents travel in the stream ([`Blocks`](crate::migration::Message::Blocks)):
    /// storage migration.
    pub const DISK_BLOCKS: &str = "disk-blocks";
    /// The stream is a session ([`Attach`](crate::migration::Attach)): several connections,
    /// and a lost one is replaced without losing what was sent.
    pub const SESSION: &str = "session";
    /// The source may send Commit right behind Complete, without waiting for Prepared: the
    /// handover costs one round trip less. The destination that cannot run the VM then
    /// answers Abort instead of Prepared, and never runs it.
    pub const PIPELINED_COMMIT: &str = "pipelined-commit";
    /// Page codecs ([`PageCodec`](crate::migration::PageCodec)), one feature each: a page may
    /// travel encoded with a codec both sides announced.
    pub const PAGE_SPARSE: &str = "page-sparse";
    pub const PAGE_DELTA: &str = "page-delta";
    pub const PAGE_LZ4: &str = "page-lz4";
    pub const PAGE_ZSTD: &str = "page-zstd";
    /// Features a peer must announce to work with this ferry at all.
    pub const REQUIRED: &[&str] = &[STATE_SECTIONS];
    /// Every feature this ferry speaks.
    pub const ALL: &[&str] = &[
        ZERO_PAGES,
        FLOW_CONTROL,
        STATE_SECTIONS,
        DISK_BLOCKS,
        SESSION,
        PIPELINED_COMMIT,
        PAGE_SPARSE,
        PAGE_DELTA,
        PAGE_LZ4,
        PAGE_ZSTD,
    ];
}

/// What both sides agreed to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    pub zero_pages: bool,
    pub flow_control: bool,
    pub disk_blocks: bool,
    pub session: bool,
    pub pipelined_commit: bool,
    /// The page codecs both announced.
    pub codecs: crate::migration::CodecSet,
}

impl Features {
    /// The features of an agreed capability list; a missing required one is an
    /// incompatibility.
    pub fn from_agreed(agreed: &[String]) -> Result<Features, ProtocolError> {
        let has = |f: &str| agreed.iter().any(|c| c == f);
        if let Some(missing) = feature::REQUIRED.iter().find(|f| !has(f)) {
            return Err(ProtocolError::MissingFeature(missing));
        }
        Ok(Features {
            zero_pages: has(feature::ZERO_PAGES),
            flow_control: has(feature::FLOW_CONTROL),
            disk_blocks: has(feature::DISK_BLOCKS),
            session: has(feature::SESSION),
            pipelined_commit: has(feature::PIPELINED_COMMIT),
            codecs: crate::migration::CodecSet::from_features(agreed),
        })
    }
}
