//! Why a migration stream was refused.

use std::fmt;

use super::message::MessageKind;
use crate::frame::FrameError;

/// Everything that can go wrong reading, writing or sequencing migration messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("reading the migration stream failed")]
    Frame(#[source] FrameError),
    #[error("the peer closed the migration connection")]
    Closed,
    #[error("unknown migration message kind {0:#06x}")]
    UnknownMessage(u16),
    #[error(
        "the {kind} message has format version {version}; this ferry reads version {supported}"
    )]
    FrameVersion {
        kind: MessageKind,
        version: u16,
        supported: u16,
    },
    #[error("the peer speaks migration protocol version {theirs}; this ferry speaks {ours}")]
    Version { ours: u16, theirs: u16 },
    #[error("the {what} message does not decode")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid {what} message: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("bad page record: {0}")]
    BadRecord(String),
    #[error("the {what} of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{what} do not match: the message says {claimed}, the stream carried {counted}")]
    Totals {
        what: &'static str,
        claimed: u64,
        counted: u64,
    },
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("the peer aborted the migration: {0}")]
    Peer(super::message::Abort),
    #[error("the peer does not speak the required feature {0:?}")]
    MissingFeature(&'static str),
}

/// What a protocol failure means for whoever decides to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The connection broke, timed out or went silent.
    Network,
    /// The two sides cannot work together.
    Incompatible,
    /// The peer said no.
    Refused,
    /// The bytes were wrong: a damaged stream or a peer that breaks the protocol.
    Corrupt,
}

impl ProtocolError {
    /// Classifies the failure: a lost link is worth retrying, an incompatible peer is not.
    pub fn class(&self) -> FailureClass {
        match self {
            ProtocolError::Closed => FailureClass::Network,
            ProtocolError::Frame(FrameError::Io(_) | FrameError::Truncated) => {
                FailureClass::Network
            }
            ProtocolError::Version { .. }
            | ProtocolError::FrameVersion { .. }
            | ProtocolError::MissingFeature(_) => FailureClass::Incompatible,
            ProtocolError::Peer(_) => FailureClass::Refused,
            _ => FailureClass::Corrupt,
        }
    }

    /// True when the error is a read that timed out (a silent peer).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtocolError::Frame(FrameError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }
}

impl From<FrameError> for ProtocolError {
    fn from(e: FrameError) -> Self {
        ProtocolError::Frame(e)
    }
}

/// Which end of the connection a machine models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Whether a message was being sent or had been received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Send,
    Receive,
}

/// A message that is not allowed in the machine's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TransitionError {
    pub side: Side,
    /// The state's name (see `SenderState::name`, `ReceiverState::name`).
    pub state: &'static str,
    pub direction: Direction,
    pub kind: MessageKind,
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.side {
            Side::Source => "source",
            Side::Destination => "destination",
        };
        let verb = match self.direction {
            Direction::Send => "send",
            Direction::Receive => "receive",
        };
        write!(
            f,
            "the migration {side} cannot {verb} {} in state {}",
            self.kind, self.state
        )
    }
}
