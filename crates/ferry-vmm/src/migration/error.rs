//! Why a migration stopped, typed so the control loop and a controller can act on it.

use ferry_api::{MigrationError, MigrationErrorKind as Kind};
use ferry_proto::migration::{AbortKind, FailureClass, ProtocolError};

/// Why the source's worker stopped early.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// Before the commit point: the source may resume.
    Failed(MigrationError),
    /// After it: the outcome is unknown until resolved.
    Unknown(MigrationError),
}

impl Stop {
    pub fn failed(kind: Kind, message: impl Into<String>) -> Stop {
        Stop::Failed(MigrationError::new(kind, message))
    }

    pub fn error(&self) -> &MigrationError {
        match self {
            Stop::Failed(e) | Stop::Unknown(e) => e,
        }
    }
}

/// The error kind of a protocol failure, with its message and causes on one line.
pub fn classify(context: &str, e: &ProtocolError) -> MigrationError {
    let kind = if e.is_timeout() {
        Kind::NetworkLost
    } else {
        match e.class() {
            FailureClass::Network => Kind::NetworkLost,
            FailureClass::Incompatible => Kind::Incompatible,
            FailureClass::Refused => Kind::PeerRefused,
            FailureClass::Corrupt => Kind::NetworkLost,
        }
    };
    MigrationError::new(kind, format!("{context}: {}", crate::error_chain(e)))
}

/// The kind of a refusal the destination gave in its Abort.
pub fn refusal_kind(kind: AbortKind) -> Kind {
    match kind {
        AbortKind::Incompatible => Kind::Incompatible,
        AbortKind::Resources => Kind::DestinationResources,
        AbortKind::Busy | AbortKind::Cancelled | AbortKind::Failed => Kind::PeerRefused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_link_is_retryable_and_an_incompatible_peer_is_not() {
        let closed = classify("waiting for the destination", &ProtocolError::Closed);
        assert_eq!(closed.kind, Kind::NetworkLost);
        assert!(closed.retryable);
        assert!(closed.message.contains("closed"), "{}", closed.message);
        let version = classify("hello", &ProtocolError::Version { ours: 2, theirs: 1 });
        assert_eq!(version.kind, Kind::Incompatible);
        assert!(!version.retryable);
        assert!(version.message.contains("version 1") && version.message.contains("speaks 2"));
    }

    #[test]
    fn refusals_are_told_apart_by_their_kind() {
        assert_eq!(
            refusal_kind(AbortKind::Resources),
            Kind::DestinationResources
        );
        assert_eq!(refusal_kind(AbortKind::Incompatible), Kind::Incompatible);
        assert_eq!(refusal_kind(AbortKind::Busy), Kind::PeerRefused);
        assert!(!Kind::Incompatible.retryable() && Kind::PeerRefused.retryable());
    }
}
