//! The destination's state machine.
//!
//! ```text
//!  AwaitHello ──recv Hello (same version)──▶ HelloReceived ──send Hello──▶ AwaitSetup
//!    ──recv Setup (valid layout)──▶ SetupReceived ──send SetupOk──▶ ReceivingMemory
//!
//!  ReceivingMemory ──recv Pages──────────▶ ReceivingMemory   (every page in guest memory)
//!  ReceivingMemory ──recv IterationDone──▶ ReceivingMemory   (next number, counts of the pass)
//!  ReceivingMemory ──recv State──────────▶ StateReceived
//!
//!  StateReceived ──recv Complete (totals = what arrived)──▶ Completed
//!    ──send Prepared──▶ Prepared ──recv Commit──▶ Running ──send Running──▶ Done
//!  ════════════════ commit point: Running and Done ═══════════════
//!
//!  ReceivingMemory, StateReceived, Completed ──send Applied──▶ the same state (progress)
//!
//!  AwaitSetup ──recv Resolve──▶ Resolving ──send Resolved (same id)──▶ Resolved
//!                              (a new connection that asks about a handover)
//!
//!  With pipelined-commit agreed, Commit may come right behind Complete:
//!  Completed ──recv Commit──▶ CommitPending ──send Prepared──▶ Running (the VM is built)
//!  CommitPending ──send Abort──▶ Aborted (it cannot be: it never runs)
//!
//!  AwaitSetup ──recv Attach──▶ Attaching ──send Attached──▶ AwaitSetup (once per machine:
//!                              the conversation goes on inside the session)
//!
//!  send Abort:  any state before Running (not Aborted)             ──▶ Aborted
//!  recv Abort:  any state before Running, and Aborted (crossing)   ──▶ Aborted, Err(Peer)
//!  anything else: Err(Transition), and the state does not change
//! ```
//!
//! The destination answers the source's Hello (it never speaks first), and acknowledges Setup
//! once its memory is allocated; hence the two states the source does not have.

use std::fmt;

use super::error::{Direction, ProtocolError, Side, TransitionError};
use super::ledger::{Ledger, PageTotals};
use super::message::{Message, MessageKind, Setup};
use super::negotiation::{feature, Negotiation};

/// Where the destination is in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    AwaitHello,
    /// The source's Hello arrived; ours is next.
    HelloReceived,
    AwaitSetup,
    /// Setup arrived; allocate memory, then send SetupOk.
    SetupReceived,
    ReceivingMemory,
    StateReceived,
    /// Complete arrived and the totals match: build the VM (paused), then send Prepared.
    Completed,
    /// Prepared sent; the VM is built but not running.
    Prepared,
    /// Commit arrived: the destination owns the VM and starts its vCPUs.
    Running,
    /// Running sent.
    Done,
    Aborted,
    /// Resolve arrived on a new connection; its answer is next.
    Resolving {
        migration_id: u64,
    },
    /// The answer to Resolve was sent.
    Resolved,
    /// Attach arrived; its answer is next.
    Attaching,
    /// Commit arrived ahead of Prepared (pipelined): the VM runs once it is built, or
    /// never (Abort).
    CommitPending,
}

impl ReceiverState {
    pub fn name(self) -> &'static str {
        match self {
            ReceiverState::AwaitHello => "AwaitHello",
            ReceiverState::HelloReceived => "HelloReceived",
            ReceiverState::AwaitSetup => "AwaitSetup",
            ReceiverState::SetupReceived => "SetupReceived",
            ReceiverState::ReceivingMemory => "ReceivingMemory",
            ReceiverState::StateReceived => "StateReceived",
            ReceiverState::Completed => "Completed",
            ReceiverState::Prepared => "Prepared",
            ReceiverState::Running => "Running",
            ReceiverState::Done => "Done",
            ReceiverState::Aborted => "Aborted",
            ReceiverState::Resolving { .. } => "Resolving",
            ReceiverState::Resolved => "Resolved",
            ReceiverState::Attaching => "Attaching",
            ReceiverState::CommitPending => "CommitPending",
        }
    }

    fn before_commit(self) -> bool {
        !matches!(
            self,
            ReceiverState::Running
                | ReceiverState::Done
                | ReceiverState::Aborted
                | ReceiverState::Resolving { .. }
                | ReceiverState::Resolved
        )
    }
}

impl fmt::Display for ReceiverState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The destination side: call [`received`](Self::received) after reading each message and
/// [`sent`](Self::sent) before writing each one; stop at the first error and, while
/// [`is_commit_point_passed`](Self::is_commit_point_passed) is false, discard everything.
#[derive(Debug, Clone)]
pub struct ReceiverMachine {
    state: ReceiverState,
    /// Attached was sent: the conversation runs inside a session.
    attached: bool,
    hello: Negotiation,
    setup: Option<Setup>,
    ledger: Ledger,
}

impl Default for ReceiverMachine {
    fn default() -> Self {
        ReceiverMachine::new()
    }
}

impl ReceiverMachine {
    pub fn new() -> ReceiverMachine {
        ReceiverMachine {
            state: ReceiverState::AwaitHello,
            attached: false,
            hello: Negotiation::default(),
            setup: None,
            ledger: Ledger::default(),
        }
    }

    pub fn state(&self) -> ReceiverState {
        self.state
    }

    /// The capabilities both sides announced (in the source's order), once both Hellos passed.
    pub fn negotiated(&self) -> Option<&[String]> {
        self.hello.agreed()
    }

    /// The source's Hello, once received.
    pub fn peer(&self) -> Option<&super::Hello> {
        self.hello.peer()
    }

    /// The accepted Setup: the memory layout every page was checked against.
    pub fn setup(&self) -> Option<&Setup> {
        self.setup.as_ref()
    }

    /// Pages received so far.
    pub fn totals(&self) -> PageTotals {
        self.ledger.totals()
    }

    /// True once Commit has arrived: the destination owns the VM and must run it; an Abort is
    /// no longer possible.
    pub fn is_commit_point_passed(&self) -> bool {
        matches!(self.state, ReceiverState::Running | ReceiverState::Done)
    }

    fn illegal(&self, direction: Direction, kind: MessageKind) -> ProtocolError {
        ProtocolError::Transition(TransitionError {
            side: Side::Destination,
            state: self.state.name(),
            direction,
            kind,
        })
    }

    /// Checks that `m` may be sent now, and records it. Call it before writing `m`.
    pub fn sent(&mut self, m: &Message) -> Result<(), ProtocolError> {
        use ReceiverState as S;
        let next = match (self.state, m) {
            (S::HelloReceived, Message::Hello(h)) => {
                m.validate()?;
                Negotiation::check_own(h)?;
                self.hello.record(h, false, false);
                S::AwaitSetup
            }
            (S::SetupReceived, Message::SetupOk) => S::ReceivingMemory,
            (S::Attaching, Message::Attached(_)) => {
                self.attached = true;
                S::AwaitSetup
            }
            (S::Completed, Message::Prepared) => S::Prepared,
            (S::CommitPending, Message::Prepared) => S::Running,
            (
                S::ReceivingMemory | S::StateReceived | S::Completed | S::CommitPending,
                Message::Applied(_),
            ) => self.state,
            (S::Resolving { migration_id }, Message::Resolved(r))
                if r.migration_id == migration_id =>
            {
                S::Resolved
            }
            (S::Running, Message::Running(_)) => {
                m.validate()?;
                S::Done
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

    /// Checks that `m` may arrive now and is consistent with what came before, and records it.
    /// An Abort that may arrive moves to Aborted and returns [`ProtocolError::Peer`].
    pub fn received(&mut self, m: &Message) -> Result<(), ProtocolError> {
        use ReceiverState as S;
        let next = match (self.state, m) {
            (S::AwaitHello, Message::Hello(h)) => {
                m.validate()?;
                Negotiation::check_peer(h)?;
                self.hello.record(h, true, true);
                S::HelloReceived
            }
            (S::AwaitSetup, Message::Setup(s)) => {
                m.validate()?;
                self.hello.check_moving_disks(s)?;
                self.ledger = Ledger::for_setup(s, self.hello.codecs());
                self.setup = Some(s.clone());
                S::SetupReceived
            }
            (S::AwaitSetup, Message::Attach(_)) if !self.attached => {
                m.validate()?;
                S::Attaching
            }
            (S::AwaitSetup, Message::Resolve(q)) => S::Resolving {
                migration_id: q.migration_id,
            },
            (S::ReceivingMemory, Message::Pages(batch)) => {
                let count = self.ledger.check_batch(batch)?;
                self.ledger.add_batch(count);
                S::ReceivingMemory
            }
            (S::ReceivingMemory, Message::Blocks(batch)) => {
                let count = self.ledger.check_blocks(batch)?;
                self.ledger.add_blocks(count);
                S::ReceivingMemory
            }
            (S::ReceivingMemory, Message::IterationDone(d)) => {
                self.ledger.check_iteration(d)?;
                self.ledger.close_iteration();
                S::ReceivingMemory
            }
            (S::ReceivingMemory, Message::State(_)) => {
                m.validate()?;
                S::StateReceived
            }
            (S::StateReceived, Message::Complete(c)) => {
                self.ledger.check_complete(c)?;
                S::Completed
            }
            (S::Prepared, Message::Commit) => S::Running,
            (S::Completed, Message::Commit) if self.hello.both(feature::PIPELINED_COMMIT) => {
                S::CommitPending
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
