//! The source's state machine.
//!
//! ```text
//!  Start ──send Hello──▶ HelloSent ──recv Hello (same version)──▶ Negotiated
//!    ──send Setup──▶ SetupSent ──recv SetupOk──▶ SendingMemory{0}
//!
//!  SendingMemory{i} ──send Pages──────────────▶ SendingMemory{i}     (pages in guest memory)
//!  SendingMemory{i} ──send IterationDone{i}───▶ SendingMemory{i+1}   (counts of pass i)
//!  SendingMemory{i} ──send State──────────────▶ StateSent
//!
//!  StateSent ──send Complete (totals)──▶ Completed ──recv Prepared──▶ AwaitingCommitDecision
//!    ──send Commit──▶ CommitSent ──recv Running──▶ Done
//!  ════════════════ commit point: CommitSent and Done ═══════════════
//!
//!  SendingMemory, StateSent, Completed ──recv Applied──▶ the same state (the destination's
//!                                                        progress; it may trail the stream)
//!
//!  Negotiated ──send Resolve──▶ Resolving ──recv Resolved (same id)──▶ Resolved
//!                                         (a new connection that asks about a handover)
//!
//!  With pipelined-commit agreed:
//!  Completed ──send Commit──▶ CommitSent (Commit right behind Complete)
//!  CommitSent ──recv Prepared──▶ CommitSent;  CommitSent ──recv Abort──▶ Aborted, Err(Peer)
//!                              (the destination could not take the VM and never runs it)
//!
//!  Negotiated ──send Attach──▶ Attaching ──recv Attached──▶ Negotiated (once per machine:
//!                              the conversation goes on inside the session)
//!
//!  send Abort:  any state before CommitSent (not Done, not Aborted)  ──▶ Aborted
//!  recv Abort:  any state before CommitSent, and Aborted (crossing)  ──▶ Aborted, Err(Peer)
//!  anything else: Err(Transition), and the state does not change
//! ```

use std::fmt;

use super::error::{Direction, ProtocolError, Side, TransitionError};
use super::ledger::{Ledger, PageTotals};
use super::message::{Message, MessageKind};
use super::negotiation::{feature, Negotiation};

/// Where the source is in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderState {
    Start,
    HelloSent,
    /// Both Hellos exchanged, versions equal.
    Negotiated,
    SetupSent,
    /// Pass `iteration` (from 0) is being sent.
    SendingMemory {
        iteration: u32,
    },
    StateSent,
    Completed,
    /// Prepared received: the destination has everything; Commit or Abort is the source's call.
    AwaitingCommitDecision,
    CommitSent,
    /// Running received.
    Done,
    Aborted,
    /// Resolve sent on a new connection; its answer is next.
    Resolving {
        migration_id: u64,
    },
    /// The answer to Resolve arrived.
    Resolved,
    /// Attach sent; its answer is next.
    Attaching,
}

impl SenderState {
    pub fn name(self) -> &'static str {
        match self {
            SenderState::Start => "Start",
            SenderState::HelloSent => "HelloSent",
            SenderState::Negotiated => "Negotiated",
            SenderState::SetupSent => "SetupSent",
            SenderState::SendingMemory { .. } => "SendingMemory",
            SenderState::StateSent => "StateSent",
            SenderState::Completed => "Completed",
            SenderState::AwaitingCommitDecision => "AwaitingCommitDecision",
            SenderState::CommitSent => "CommitSent",
            SenderState::Done => "Done",
            SenderState::Aborted => "Aborted",
            SenderState::Resolving { .. } => "Resolving",
            SenderState::Resolved => "Resolved",
            SenderState::Attaching => "Attaching",
        }
    }

    fn before_commit(self) -> bool {
        !matches!(
            self,
            SenderState::CommitSent
                | SenderState::Done
                | SenderState::Aborted
                | SenderState::Resolving { .. }
                | SenderState::Resolved
        )
    }
}

impl fmt::Display for SenderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SenderState::SendingMemory { iteration } => write!(f, "SendingMemory({iteration})"),
            other => f.write_str(other.name()),
        }
    }
}

/// The source side: call [`sent`](Self::sent) before writing each message and
/// [`received`](Self::received) after reading each one; stop at the first error.
#[derive(Debug, Clone)]
pub struct SenderMachine {
    state: SenderState,
    /// Attach was answered: the conversation runs inside a session.
    attached: bool,
    hello: Negotiation,
    ledger: Ledger,
}

impl Default for SenderMachine {
    fn default() -> Self {
        SenderMachine::new()
    }
}

impl SenderMachine {
    pub fn new() -> SenderMachine {
        SenderMachine {
            state: SenderState::Start,
            attached: false,
            hello: Negotiation::default(),
            ledger: Ledger::default(),
        }
    }

    pub fn state(&self) -> SenderState {
        self.state
    }

    /// The capabilities both sides announced (in the source's order), once both Hellos passed.
    pub fn negotiated(&self) -> Option<&[String]> {
        self.hello.agreed()
    }

    /// The destination's Hello, once received.
    pub fn peer(&self) -> Option<&super::Hello> {
        self.hello.peer()
    }

    /// Pages sent so far.
    pub fn totals(&self) -> PageTotals {
        self.ledger.totals()
    }

    /// True from the moment Commit is about to be sent. From then on a failure leaves the
    /// outcome unknown: the source VM must stay paused, never resume (docs/architecture.md, invariant 2).
    /// Before it, a failure may resume the source.
    pub fn is_commit_point_passed(&self) -> bool {
        matches!(self.state, SenderState::CommitSent | SenderState::Done)
    }

    fn illegal(&self, direction: Direction, kind: MessageKind) -> ProtocolError {
        ProtocolError::Transition(TransitionError {
            side: Side::Source,
            state: self.state.name(),
            direction,
            kind,
        })
    }

    /// Checks that `m` may be sent now, and records it. Call it before writing `m`; on error,
    /// do not write it (the state is unchanged, so an Abort may still follow if legal).
    pub fn sent(&mut self, m: &Message) -> Result<(), ProtocolError> {
        use SenderState as S;
        let next = match (self.state, m) {
            (S::Start, Message::Hello(h)) => {
                m.validate()?;
                Negotiation::check_own(h)?;
                self.hello.record(h, true, false);
                S::HelloSent
            }
            (S::Negotiated, Message::Setup(s)) => {
                m.validate()?;
                self.hello.check_moving_disks(s)?;
                self.ledger = Ledger::for_setup(s, self.hello.codecs());
                S::SetupSent
            }
            (S::SendingMemory { .. }, Message::Pages(batch)) => {
                let count = self.ledger.check_batch(batch)?;
                self.ledger.add_batch(count);
                self.state
            }
            (S::SendingMemory { .. }, Message::Blocks(batch)) => {
                let count = self.ledger.check_blocks(batch)?;
                self.ledger.add_blocks(count);
                self.state
            }
            (S::SendingMemory { .. }, Message::IterationDone(d)) => {
                self.ledger.check_iteration(d)?;
                self.ledger.close_iteration();
                S::SendingMemory {
                    iteration: self.ledger.totals().iterations,
                }
            }
            (S::SendingMemory { .. }, Message::State(_)) => {
                m.validate()?;
                S::StateSent
            }
            (S::StateSent, Message::Complete(c)) => {
                self.ledger.check_complete(c)?;
                S::Completed
            }
            (S::AwaitingCommitDecision, Message::Commit) => S::CommitSent,
            (S::Completed, Message::Commit) if self.hello.both(feature::PIPELINED_COMMIT) => {
                S::CommitSent
            }
            (S::Negotiated, Message::Resolve(r)) => S::Resolving {
                migration_id: r.migration_id,
            },
            (S::Negotiated, Message::Attach(_)) if !self.attached => {
                m.validate()?;
                S::Attaching
            }
            (state, Message::Abort(_)) if state.before_commit() => {
                m.validate()?;
                S::Aborted
            }
            _ => return Err(self.illegal(Direction::Send, m.kind())),
        };
        self.state = next;
        Ok(())
    }

    /// Checks that `m` may arrive now, and records it. An Abort that may arrive moves to
    /// Aborted and returns [`ProtocolError::Peer`] with its reason.
    pub fn received(&mut self, m: &Message) -> Result<(), ProtocolError> {
        use SenderState as S;
        let next = match (self.state, m) {
            (S::HelloSent, Message::Hello(h)) => {
                m.validate()?;
                Negotiation::check_peer(h)?;
                self.hello.record(h, false, true);
                S::Negotiated
            }
            (S::SetupSent, Message::SetupOk) => S::SendingMemory { iteration: 0 },
            (S::Attaching, Message::Attached(_)) => {
                self.attached = true;
                S::Negotiated
            }
            (S::Completed, Message::Prepared) => S::AwaitingCommitDecision,
            (S::CommitSent, Message::Prepared) if self.hello.both(feature::PIPELINED_COMMIT) => {
                S::CommitSent
            }
            (S::CommitSent, Message::Applied(a)) if self.hello.both(feature::PIPELINED_COMMIT) => {
                self.ledger.check_applied(a)?;
                S::CommitSent
            }
            (S::CommitSent, Message::Abort(reason))
                if self.hello.both(feature::PIPELINED_COMMIT) =>
            {
                self.state = S::Aborted;
                return Err(ProtocolError::Peer(reason.clone()));
            }
            (S::SendingMemory { .. } | S::StateSent | S::Completed, Message::Applied(a)) => {
                // The destination cannot have applied more than it was sent.
                self.ledger.check_applied(a)?;
                self.state
            }
            (S::Resolving { migration_id }, Message::Resolved(r))
                if r.migration_id == migration_id =>
            {
                S::Resolved
            }
            (S::CommitSent, Message::Running(_)) => {
                m.validate()?;
                S::Done
            }
            (state, Message::Abort(reason)) if state.before_commit() || state == S::Aborted => {
                self.state = S::Aborted;
                return Err(ProtocolError::Peer(reason.clone()));
            }
            _ => return Err(self.illegal(Direction::Receive, m.kind())),
        };
        self.state = next;
        Ok(())
    }
}
