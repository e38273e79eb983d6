//! The state machines: every transition of both, legal and illegal, and the value checks.

use super::*;
use Direction::{Receive as R, Send as S};
use MessageKind as K;

type SenderRule = (Direction, MessageKind, SenderState);
type ReceiverRule = (Direction, MessageKind, ReceiverState);

/// The source's protocol, written out independently of the code: in each state, the only
/// (direction, kind) pairs allowed and where each leads. Everything not listed must fail.
const SENDER_RULES: &[(SenderState, &[SenderRule])] = {
    use SenderState::*;
    &[
        (
            Start,
            &[
                (S, K::Hello, HelloSent),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            HelloSent,
            &[
                (R, K::Hello, Negotiated),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            Negotiated,
            &[
                (S, K::Setup, SetupSent),
                (S, K::Attach, Attaching),
                (
                    S,
                    K::Resolve,
                    Resolving {
                        migration_id: 0x5eed,
                    },
                ),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            SetupSent,
            &[
                (R, K::SetupOk, SendingMemory { iteration: 0 }),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            SendingMemory { iteration: 0 },
            &[
                (S, K::Pages, SendingMemory { iteration: 0 }),
                (S, K::Blocks, SendingMemory { iteration: 0 }),
                (S, K::IterationDone, SendingMemory { iteration: 1 }),
                (S, K::State, StateSent),
                (R, K::Applied, SendingMemory { iteration: 0 }),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            StateSent,
            &[
                (S, K::Complete, Completed),
                (R, K::Applied, StateSent),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            Completed,
            &[
                (R, K::Prepared, AwaitingCommitDecision),
                (R, K::Applied, Completed),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            AwaitingCommitDecision,
            &[
                (S, K::Commit, CommitSent),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (CommitSent, &[(R, K::Running, Done)]),
        (Done, &[]),
        // Aborts may cross: the peer's Abort may still arrive.
        (Aborted, &[(R, K::Abort, Aborted)]),
        (
            Resolving {
                migration_id: 0x5eed,
            },
            &[(R, K::Resolved, Resolved)],
        ),
        (Resolved, &[]),
        (
            Attaching,
            &[
                (R, K::Attached, Negotiated),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
    ]
};

const RECEIVER_RULES: &[(ReceiverState, &[ReceiverRule])] = {
    use ReceiverState::*;
    &[
        (
            AwaitHello,
            &[
                (R, K::Hello, HelloReceived),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            HelloReceived,
            &[
                (S, K::Hello, AwaitSetup),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            AwaitSetup,
            &[
                (R, K::Setup, SetupReceived),
                (R, K::Attach, Attaching),
                (
                    R,
                    K::Resolve,
                    Resolving {
                        migration_id: 0x5eed,
                    },
                ),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            SetupReceived,
            &[
                (S, K::SetupOk, ReceivingMemory),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            ReceivingMemory,
            &[
                (R, K::Pages, ReceivingMemory),
                (R, K::Blocks, ReceivingMemory),
                (R, K::IterationDone, ReceivingMemory),
                (R, K::State, StateReceived),
                (S, K::Applied, ReceivingMemory),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            StateReceived,
            &[
                (R, K::Complete, Completed),
                (S, K::Applied, StateReceived),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            Completed,
            &[
                (S, K::Prepared, Prepared),
                (S, K::Applied, Completed),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (
            Prepared,
            &[
                (R, K::Commit, Running),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
        (Running, &[(S, K::Running, Done)]),
        (Done, &[]),
        (Aborted, &[(R, K::Abort, Aborted)]),
        (
            Resolving {
                migration_id: 0x5eed,
            },
            &[(S, K::Resolved, Resolved)],
        ),
        (Resolved, &[]),
        (
            Attaching,
            &[
                (S, K::Attached, AwaitSetup),
                (S, K::Abort, Aborted),
                (R, K::Abort, Aborted),
            ],
        ),
    ]
};

/// The legal path through every sender state.
const SENDER_PATH: [(Direction, MessageKind); 9] = [
    (S, K::Hello),
    (R, K::Hello),
    (S, K::Setup),
    (R, K::SetupOk),
    (S, K::State),
    (S, K::Complete),
    (R, K::Prepared),
    (S, K::Commit),
    (R, K::Running),
];

const RECEIVER_PATH: [(Direction, MessageKind); 9] = [
    (R, K::Hello),
    (S, K::Hello),
    (R, K::Setup),
    (S, K::SetupOk),
    (R, K::State),
    (R, K::Complete),
    (S, K::Prepared),
    (R, K::Commit),
    (S, K::Running),
];

fn sender_apply(m: &mut SenderMachine, d: Direction, msg: &Message) -> Result<(), ProtocolError> {
    match d {
        S => m.sent(msg),
        R => m.received(msg),
    }
}

fn receiver_apply(
    m: &mut ReceiverMachine,
    d: Direction,
    msg: &Message,
) -> Result<(), ProtocolError> {
    match d {
        S => m.sent(msg),
        R => m.received(msg),
    }
}

fn sender_in(target: SenderState) -> SenderMachine {
    let mut m = SenderMachine::new();
    if target == SenderState::Aborted {
        m.sent(&sample(K::Abort)).expect("abort");
        return m;
    }
    if target == SenderState::Attaching {
        let mut m = sender_in(SenderState::Negotiated);
        m.sent(&sample(K::Attach)).expect("attach");
        return m;
    }
    if matches!(
        target,
        SenderState::Resolving { .. } | SenderState::Resolved
    ) {
        let mut m = sender_in(SenderState::Negotiated);
        m.sent(&sample(K::Resolve)).expect("resolve");
        if target == SenderState::Resolved {
            m.received(&sample(K::Resolved)).expect("resolved");
        }
        return m;
    }
    for (d, kind) in SENDER_PATH {
        if m.state() == target {
            break;
        }
        sender_apply(&mut m, d, &sample(kind)).expect("legal path");
    }
    assert_eq!(m.state(), target, "path reaches {target}");
    m
}

fn receiver_in(target: ReceiverState) -> ReceiverMachine {
    let mut m = ReceiverMachine::new();
    if target == ReceiverState::Aborted {
        m.sent(&sample(K::Abort)).expect("abort");
        return m;
    }
    if target == ReceiverState::Attaching {
        let mut m = receiver_in(ReceiverState::AwaitSetup);
        m.received(&sample(K::Attach)).expect("attach");
        return m;
    }
    if matches!(
        target,
        ReceiverState::Resolving { .. } | ReceiverState::Resolved
    ) {
        let mut m = receiver_in(ReceiverState::AwaitSetup);
        m.received(&sample(K::Resolve)).expect("resolve");
        if target == ReceiverState::Resolved {
            m.sent(&sample(K::Resolved)).expect("resolved");
        }
        return m;
    }
    for (d, kind) in RECEIVER_PATH {
        if m.state() == target {
            break;
        }
        receiver_apply(&mut m, d, &sample(kind)).expect("legal path");
    }
    assert_eq!(m.state(), target, "path reaches {target}");
    m
}

#[test]
fn every_sender_transition_follows_the_table() {
    assert_eq!(SENDER_RULES.len(), 14, "every sender state has a row");
    let mut illegal = 0;
    for &(state, rules) in SENDER_RULES {
        let start = sender_in(state);
        for d in [S, R] {
            for kind in MessageKind::ALL {
                let mut m = start.clone();
                let res = sender_apply(&mut m, d, &sample(kind));
                match rules.iter().find(|r| r.0 == d && r.1 == kind) {
                    Some(&(_, _, next)) => {
                        match (&res, d, kind) {
                            (Err(ProtocolError::Peer(reason)), R, K::Abort) => {
                                assert_eq!(reason.reason, "operator cancelled")
                            }
                            (Ok(()), _, _) => {}
                            _ => panic!("{state}: {d:?} {kind} is legal, got {res:?}"),
                        }
                        assert_eq!(m.state(), next, "{state}: {d:?} {kind}");
                    }
                    None => {
                        illegal += 1;
                        let Err(ProtocolError::Transition(e)) = &res else {
                            panic!("{state}: {d:?} {kind} must be refused, got {res:?}");
                        };
                        let expected = TransitionError {
                            side: Side::Source,
                            state: state.name(),
                            direction: d,
                            kind,
                        };
                        assert_eq!(e, &expected);
                        let text = e.to_string();
                        assert!(text.contains(state.name()) && text.contains(kind.name()));
                        assert_eq!(m.state(), state, "a refusal changes nothing");
                    }
                }
            }
        }
    }
    assert!(illegal > 200, "{illegal} illegal transitions probed");
}

#[test]
fn every_receiver_transition_follows_the_table() {
    assert_eq!(RECEIVER_RULES.len(), 14, "every receiver state has a row");
    let mut illegal = 0;
    for &(state, rules) in RECEIVER_RULES {
        let start = receiver_in(state);
        for d in [S, R] {
            for kind in MessageKind::ALL {
                let mut m = start.clone();
                let res = receiver_apply(&mut m, d, &sample(kind));
                match rules.iter().find(|r| r.0 == d && r.1 == kind) {
                    Some(&(_, _, next)) => {
                        match (&res, d, kind) {
                            (Err(ProtocolError::Peer(reason)), R, K::Abort) => {
                                assert_eq!(reason.reason, "operator cancelled")
                            }
                            (Ok(()), _, _) => {}
                            _ => panic!("{state}: {d:?} {kind} is legal, got {res:?}"),
                        }
                        assert_eq!(m.state(), next, "{state}: {d:?} {kind}");
                    }
                    None => {
                        illegal += 1;
                        let Err(ProtocolError::Transition(e)) = &res else {
                            panic!("{state}: {d:?} {kind} must be refused, got {res:?}");
                        };
                        let expected = TransitionError {
                            side: Side::Destination,
                            state: state.name(),
                            direction: d,
                            kind,
                        };
                        assert_eq!(e, &expected);
                        assert_eq!(m.state(), state, "a refusal changes nothing");
                    }
                }
            }
        }
    }
    assert!(illegal > 200, "{illegal} illegal transitions probed");
}

#[test]
fn the_commit_point_is_passed_exactly_from_commit_on() {
    for &(state, _) in SENDER_RULES {
        let passed = matches!(state, SenderState::CommitSent | SenderState::Done);
        assert_eq!(sender_in(state).is_commit_point_passed(), passed, "{state}");
    }
    for &(state, _) in RECEIVER_RULES {
        let passed = matches!(state, ReceiverState::Running | ReceiverState::Done);
        assert_eq!(
            receiver_in(state).is_commit_point_passed(),
            passed,
            "{state}"
        );
    }
}

#[test]
fn abort_before_commit_is_accepted_and_leaves_the_source_free_to_resume() {
    // The last state before the commit point, on each side.
    let mut src = sender_in(SenderState::AwaitingCommitDecision);
    let err = src.received(&Message::abort("disk full")).unwrap_err();
    assert!(
        matches!(&err, ProtocolError::Peer(r) if r.reason == "disk full"),
        "{err}"
    );
    assert_eq!(err.to_string(), "the peer aborted the migration: disk full");
    assert_eq!(src.state(), SenderState::Aborted);
    assert!(!src.is_commit_point_passed());

    let mut dst = receiver_in(ReceiverState::Prepared);
    dst.received(&Message::abort("operator cancelled"))
        .unwrap_err();
    assert_eq!(dst.state(), ReceiverState::Aborted);
    assert!(!dst.is_commit_point_passed());

    let mut src = sender_in(SenderState::AwaitingCommitDecision);
    src.sent(&Message::abort("changed my mind")).expect("legal");
    assert!(!src.is_commit_point_passed());
}

#[test]
fn abort_after_commit_is_refused_both_ways() {
    for state in [SenderState::CommitSent, SenderState::Done] {
        let mut m = sender_in(state);
        for d in [S, R] {
            let err = sender_apply(&mut m, d, &Message::abort("too late")).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Transition(_)),
                "{state}: {err}"
            );
            assert_eq!(m.state(), state);
            assert!(m.is_commit_point_passed());
        }
    }
    for state in [ReceiverState::Running, ReceiverState::Done] {
        let mut m = receiver_in(state);
        for d in [S, R] {
            let err = receiver_apply(&mut m, d, &Message::abort("too late")).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Transition(_)),
                "{state}: {err}"
            );
            assert_eq!(m.state(), state);
            assert!(m.is_commit_point_passed());
        }
    }
}

/// Both machines driven in step up to the memory phase.
fn pair_receiving_memory() -> (SenderMachine, ReceiverMachine) {
    let (mut src, mut dst) = (SenderMachine::new(), ReceiverMachine::new());
    let hello = sample(K::Hello);
    src.sent(&hello).expect("src hello");
    dst.received(&hello).expect("dst hello in");
    dst.sent(&hello).expect("dst hello");
    src.received(&hello).expect("src hello in");
    let setup = sample(K::Setup);
    src.sent(&setup).expect("setup");
    dst.received(&setup).expect("setup in");
    dst.sent(&Message::SetupOk).expect("ok");
    src.received(&Message::SetupOk).expect("ok in");
    (src, dst)
}

fn both(
    src: &mut SenderMachine,
    dst: &mut ReceiverMachine,
    m: &Message,
) -> (Result<(), ProtocolError>, Result<(), ProtocolError>) {
    (src.sent(m), dst.received(m))
}

#[test]
fn totals_that_do_not_match_what_arrived_are_refused_before_prepared() {
    let (mut src0, mut dst0) = pair_receiving_memory();
    for m in [
        sample(K::Pages),
        Message::IterationDone(IterationDone {
            iteration: 0,
            pages_sent: 3,
            zero_pages: 3,
        }),
        sample(K::Pages),
        sample(K::State),
    ] {
        let (a, b) = both(&mut src0, &mut dst0, &m);
        a.expect("source");
        b.expect("destination");
    }
    let expected = PageTotals {
        iterations: 1,
        data_pages: 6,
        zero_pages: 6,
        ..PageTotals::default()
    };
    assert_eq!((src0.totals(), dst0.totals()), (expected, expected));
    let good = Complete {
        iterations: 1,
        data_pages: 6,
        zero_pages: 6,
        disk_data_bytes: 0,
        disk_hole_bytes: 0,
    };
    let bad = [
        (
            "iterations",
            Complete {
                iterations: 2,
                ..good
            },
        ),
        (
            "data pages",
            Complete {
                data_pages: 5,
                ..good
            },
        ),
        (
            "zero pages",
            Complete {
                zero_pages: 7,
                ..good
            },
        ),
    ];
    for (what, c) in bad {
        let (mut src, mut dst) = (src0.clone(), dst0.clone());
        let (a, b) = both(&mut src, &mut dst, &Message::Complete(c));
        for err in [a.unwrap_err(), b.unwrap_err()] {
            assert!(
                matches!(err, ProtocolError::Totals { what: w, .. } if w == what),
                "{what}: {err}"
            );
        }
        assert_eq!(dst.state(), ReceiverState::StateReceived);
        assert_eq!(src.state(), SenderState::StateSent);
        let err = dst.sent(&Message::Prepared).unwrap_err();
        assert!(matches!(err, ProtocolError::Transition(_)), "{err}");
        // The destination may still give up cleanly.
        dst.sent(&Message::abort("totals do not match"))
            .expect("abort");
    }
    let (a, b) = both(&mut src0, &mut dst0, &Message::Complete(good));
    a.expect("source");
    b.expect("destination");
    assert_eq!(dst0.state(), ReceiverState::Completed);
}

#[test]
fn an_iteration_must_report_its_own_number_and_pages() {
    let (src0, dst0) = pair_receiving_memory();
    let mut src = src0.clone();
    let mut dst = dst0.clone();
    let (a, b) = both(&mut src, &mut dst, &sample(K::Pages));
    a.expect("pages");
    b.expect("pages");
    let good = IterationDone {
        iteration: 0,
        pages_sent: 3,
        zero_pages: 3,
    };
    for bad in [
        IterationDone {
            iteration: 1,
            ..good
        },
        IterationDone {
            pages_sent: 4,
            ..good
        },
        IterationDone {
            zero_pages: 0,
            ..good
        },
    ] {
        let (mut s, mut d) = (src.clone(), dst.clone());
        let (a, b) = both(&mut s, &mut d, &Message::IterationDone(bad));
        assert!(matches!(a, Err(ProtocolError::Totals { .. })), "{a:?}");
        assert!(matches!(b, Err(ProtocolError::Totals { .. })), "{b:?}");
    }
    let (a, b) = both(&mut src, &mut dst, &Message::IterationDone(good));
    a.expect("good");
    b.expect("good");
    assert_eq!(src.state(), SenderState::SendingMemory { iteration: 1 });
    // The next pass counts afresh and has the next number.
    let next = IterationDone {
        iteration: 1,
        pages_sent: 0,
        zero_pages: 0,
    };
    let (a, b) = both(&mut src, &mut dst, &Message::IterationDone(next));
    a.expect("empty pass");
    b.expect("empty pass");
}

#[test]
fn pages_outside_guest_memory_are_refused() {
    let (src0, dst0) = pair_receiving_memory();
    let end1 = (1 << 20) + (64 << 10);
    type Push = fn(&mut PageBatchWriter) -> bool;
    let outside: [(&str, Push); 5] = [
        ("in the gap", |w| w.push_page(0x10000, &page(1))),
        ("past the end", |w| {
            w.push_page((1 << 20) + (64 << 10), &page(1))
        }),
        ("a run into the gap", |w| w.push_zero_run(0xf000, 2)),
        ("a run across the gap", |w| w.push_zero_run(0, 0x200)),
        ("far away", |w| w.push_zero_run(1 << 40, 1)),
    ];
    for (what, push) in outside {
        let mut w = PageBatchWriter::new(MAX_BATCH_BYTES);
        assert!(w.push_page(0, &page(1)), "{what}");
        assert!(push(&mut w), "{what}");
        let m = Message::Pages(w.take());
        let (mut src, mut dst) = (src0.clone(), dst0.clone());
        let (a, b) = both(&mut src, &mut dst, &m);
        assert!(
            matches!(a, Err(ProtocolError::BadRecord(_))),
            "{what}: {a:?}"
        );
        assert!(
            matches!(b, Err(ProtocolError::BadRecord(_))),
            "{what}: {b:?}"
        );
        assert_eq!(
            dst.totals(),
            PageTotals::default(),
            "{what}: nothing counted"
        );
    }
    // The last page of each region is inside.
    let mut w = PageBatchWriter::new(MAX_BATCH_BYTES);
    assert!(w.push_page(0xf000, &page(1)));
    assert!(w.push_zero_run(end1 - PAGE_SIZE, 1));
    let (mut src, mut dst) = (src0, dst0);
    let (a, b) = both(&mut src, &mut dst, &Message::Pages(w.take()));
    a.expect("inside");
    b.expect("inside");
}

#[test]
fn a_zero_run_may_cross_between_adjacent_regions() {
    let mut setup = sample_setup();
    setup.regions[1].guest_addr = 64 << 10; // adjacent to region 0
    let mut dst = ReceiverMachine::new();
    let hello = sample(K::Hello);
    dst.received(&hello).expect("hello");
    dst.sent(&hello).expect("hello");
    dst.received(&Message::Setup(setup)).expect("setup");
    dst.sent(&Message::SetupOk).expect("ok");
    let mut w = PageBatchWriter::new(MAX_BATCH_BYTES);
    assert!(w.push_zero_run(0, 32));
    dst.received(&Message::Pages(w.take())).expect("inside");
    let mut w = PageBatchWriter::new(MAX_BATCH_BYTES);
    assert!(w.push_zero_run(0, 33));
    let err = dst.received(&Message::Pages(w.take())).unwrap_err();
    assert!(matches!(err, ProtocolError::BadRecord(_)), "{err}");
}

#[test]
fn a_protocol_version_mismatch_is_a_clear_error_on_either_side() {
    let mut newer = Hello::new("ferry 9", &[]);
    newer.protocol_version = 3;
    let mut dst = ReceiverMachine::new();
    let err = dst.received(&Message::Hello(newer.clone())).unwrap_err();
    assert!(
        matches!(err, ProtocolError::Version { ours: 2, theirs: 3 }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the peer speaks migration protocol version 3; this ferry speaks 2"
    );
    assert_eq!(err.class(), FailureClass::Incompatible);
    assert_eq!(dst.state(), ReceiverState::AwaitHello);
    assert!(dst.negotiated().is_none());
    dst.sent(&Message::abort(err.to_string()))
        .expect("the destination can say why");

    let mut src = sender_in(SenderState::HelloSent);
    let err = src.received(&Message::Hello(newer.clone())).unwrap_err();
    assert!(
        matches!(err, ProtocolError::Version { theirs: 3, .. }),
        "{err}"
    );
    assert_eq!(src.state(), SenderState::HelloSent);

    // Our own Hello must carry our version.
    let err = SenderMachine::new()
        .sent(&Message::Hello(newer))
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Invalid { .. }), "{err}");
}

#[test]
fn negotiated_capabilities_are_the_intersection_in_the_source_order() {
    let src_hello = Hello::new("src", &["zero-pages", "lz4", "xbzrle", "lz4"]);
    let dst_hello = Hello::new("dst", &["tls", "lz4", "zero-pages"]);
    let (mut src, mut dst) = (SenderMachine::new(), ReceiverMachine::new());
    assert!(src.negotiated().is_none() && dst.negotiated().is_none());
    src.sent(&Message::Hello(src_hello.clone())).expect("1");
    dst.received(&Message::Hello(src_hello.clone())).expect("2");
    assert!(src.negotiated().is_none() && dst.negotiated().is_none());
    dst.sent(&Message::Hello(dst_hello.clone())).expect("3");
    src.received(&Message::Hello(dst_hello.clone())).expect("4");
    let agreed = ["zero-pages".to_string(), "lz4".to_string()];
    assert_eq!(src.negotiated(), Some(&agreed[..]));
    assert_eq!(dst.negotiated(), Some(&agreed[..]));
    assert_eq!(src.peer(), Some(&dst_hello));
    assert_eq!(dst.peer(), Some(&src_hello));

    let mut lonely = SenderMachine::new();
    lonely
        .sent(&Message::Hello(Hello::new("a", &["x"])))
        .expect("1");
    lonely
        .received(&Message::Hello(Hello::new("b", &["y"])))
        .expect("2");
    assert_eq!(lonely.negotiated(), Some(&[][..]));
}

#[test]
fn the_machines_check_what_is_sent_too() {
    let mut src = sender_in(SenderState::Negotiated);
    let mut bad = sample_setup();
    bad.memory_bytes += PAGE_SIZE;
    let err = src.sent(&Message::Setup(bad)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::Invalid { what: "Setup", .. }),
        "{err}"
    );
    assert_eq!(src.state(), SenderState::Negotiated);

    let mut src = sender_in(SenderState::SendingMemory { iteration: 0 });
    let err = src
        .sent(&Message::State(vec![0; MAX_STATE_BYTES + 1]))
        .unwrap_err();
    assert!(
        matches!(err, ProtocolError::TooLarge { what: "State", .. }),
        "{err}"
    );

    let mut dst = receiver_in(ReceiverState::Running);
    let err = dst
        .sent(&Message::Running(Running {
            resume_ms: f64::NAN,
        }))
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Invalid { .. }), "{err}");
    assert_eq!(dst.state(), ReceiverState::Running);
}

#[test]
fn the_accepted_setup_is_kept_for_the_vmm() {
    let dst = receiver_in(ReceiverState::SetupReceived);
    assert_eq!(dst.setup(), Some(&sample_setup()));
}

#[test]
fn a_resolve_must_be_answered_for_its_own_migration() {
    let mut src = sender_in(SenderState::Resolving {
        migration_id: 0x5eed,
    });
    let other = Message::Resolved(Resolved {
        migration_id: 0x5eee,
        running: true,
    });
    assert!(matches!(
        src.received(&other),
        Err(ProtocolError::Transition(_))
    ));
    let mut dst = receiver_in(ReceiverState::Resolving {
        migration_id: 0x5eed,
    });
    assert!(matches!(
        dst.sent(&other),
        Err(ProtocolError::Transition(_))
    ));
    // A resolve never passes a commit point, so it cannot be mistaken for a handover.
    assert!(!src.is_commit_point_passed() && !dst.is_commit_point_passed());
}

#[test]
fn features_are_acted_on_only_when_both_sides_announce_them() {
    let agreed = |caps: &[&str]| caps.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let f = Features::from_agreed(&agreed(&["state-sections", "zero-pages"])).expect("ok");
    assert!(f.zero_pages && !f.flow_control);
    let f = Features::from_agreed(&agreed(feature::ALL)).expect("ok");
    assert!(f.zero_pages && f.flow_control);
    let err = Features::from_agreed(&agreed(&["zero-pages", "flow-control"])).unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::MissingFeature("state-sections")
    ));
    assert_eq!(err.class(), FailureClass::Incompatible);
}

#[test]
fn a_destination_cannot_claim_to_have_applied_more_than_it_was_sent() {
    let (mut src, _) = pair_receiving_memory();
    src.sent(&Message::Pages(mixed_batch()))
        .expect("3 data, 3 zero pages");
    let ok = Message::Applied(Applied {
        bytes: 3 * PAGE_SIZE,
        pages: 6,
        disk_bytes: 0,
    });
    src.received(&ok).expect("all of it applied");
    for lie in [
        Applied {
            bytes: 4 * PAGE_SIZE,
            pages: 6,
            disk_bytes: 0,
        },
        Applied {
            bytes: 0,
            pages: 7,
            disk_bytes: 0,
        },
        Applied {
            bytes: 3 * PAGE_SIZE,
            pages: 6,
            disk_bytes: 1,
        },
    ] {
        let err = src.received(&Message::Applied(lie)).unwrap_err();
        assert!(matches!(err, ProtocolError::Totals { .. }), "{err}");
    }
}

#[test]
fn blocks_must_belong_to_a_moving_disk_and_lie_on_it() {
    let (src0, dst0) = pair_receiving_memory();
    type Push = fn(&mut BlockBatchWriter) -> bool;
    let bad: [(&str, u32, Push); 3] = [
        ("a disk that does not move", 1, |w| w.push_hole(0, 512)),
        ("past the end of the disk", 0, |w| w.push_hole(1 << 20, 512)),
        ("across the end of the disk", 0, |w| {
            w.push_data((1 << 20) - 512, 1024).is_some()
        }),
    ];
    for (what, disk, push) in bad {
        let mut w = BlockBatchWriter::new(disk, 1 << 20);
        assert!(push(&mut w), "{what}");
        let m = Message::Blocks(w.take());
        let (mut src, mut dst) = (src0.clone(), dst0.clone());
        let (a, b) = both(&mut src, &mut dst, &m);
        assert!(
            matches!(a, Err(ProtocolError::BadRecord(_))),
            "{what}: {a:?}"
        );
        assert!(
            matches!(b, Err(ProtocolError::BadRecord(_))),
            "{what}: {b:?}"
        );
        assert_eq!(
            dst.totals(),
            PageTotals::default(),
            "{what}: nothing counted"
        );
    }
    // The last sector is on the disk; the counts reach Complete and Applied.
    let mut w = BlockBatchWriter::new(0, 1 << 20);
    w.push_data((1 << 20) - 512, 512).expect("room").fill(1);
    assert!(w.push_hole(0, 4096));
    let (mut src, mut dst) = (src0, dst0);
    let (a, b) = both(&mut src, &mut dst, &Message::Blocks(w.take()));
    a.expect("inside");
    b.expect("inside");
    assert_eq!(dst.totals().disk_data_bytes, 512);
    assert_eq!(dst.totals().disk_hole_bytes, 4096);
    src.received(&Message::Applied(Applied {
        bytes: 512,
        pages: 0,
        disk_bytes: 512,
    }))
    .expect("512 data bytes were sent");
    for lie in [(513, 0), (512, 513), (256, 512)] {
        let err = src
            .received(&Message::Applied(Applied {
                bytes: lie.0,
                pages: 0,
                disk_bytes: lie.1,
            }))
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::Totals { .. }),
            "{lie:?}: {err}"
        );
    }
    let (a, b) = both(&mut src, &mut dst, &sample(K::State));
    a.expect("state");
    b.expect("state");
    let wrong = Message::Complete(Complete {
        iterations: 0,
        data_pages: 0,
        zero_pages: 0,
        disk_data_bytes: 0,
        disk_hole_bytes: 4096,
    });
    let err = dst.received(&wrong).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Totals {
                what: "disk data bytes",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn disks_move_only_when_both_sides_speak_disk_blocks() {
    let mut dst = ReceiverMachine::new();
    let hello = Message::Hello(Hello::new("old", &["zero-pages", "state-sections"]));
    dst.received(&hello).expect("hello");
    dst.sent(&hello).expect("hello");
    let err = dst.received(&sample(K::Setup)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::MissingFeature("disk-blocks")),
        "{err}"
    );
    // Without moving disks, the same Setup is fine.
    let setup = Setup {
        moving_disks: Vec::new(),
        nics: 0,
        ..sample_setup()
    };
    dst.received(&Message::Setup(setup)).expect("no disks move");
}

/// A session is attached once: the first Attach's answer puts the conversation back where
/// Setup is next, inside the session, and a second Attach is refused by both sides. Attach's
/// own bounds are checked.
#[test]
fn attach_happens_once_and_its_bounds_are_checked() {
    let mut src = sender_in(SenderState::Negotiated);
    let mut dst = receiver_in(ReceiverState::AwaitSetup);
    let attach = sample(K::Attach);
    src.sent(&attach).expect("attach");
    dst.received(&attach).expect("attach");
    dst.sent(&sample(K::Attached)).expect("attached");
    src.received(&sample(K::Attached)).expect("attached");
    assert_eq!(src.state(), SenderState::Negotiated);
    assert_eq!(dst.state(), ReceiverState::AwaitSetup);
    assert!(src.clone().sent(&attach).is_err(), "attached already");
    assert!(dst.clone().received(&attach).is_err(), "attached already");
    src.sent(&sample(K::Setup))
        .expect("setup inside the session");
    dst.received(&sample(K::Setup))
        .expect("setup inside the session");

    for bad in [
        Attach {
            session_id: 1,
            index: MAX_CONNECTIONS,
            resume_window_ms: 0,
            received: 0,
            key: 0,
        },
        Attach {
            session_id: 1,
            index: 0,
            resume_window_ms: MAX_RESUME_WINDOW_MS + 1,
            received: 0,
            key: 0,
        },
    ] {
        let m = Message::Attach(bad);
        assert!(m.validate().is_err(), "{m:?}");
        assert!(receiver_in(ReceiverState::AwaitSetup).received(&m).is_err());
        assert!(sender_in(SenderState::Negotiated).sent(&m).is_err());
        let mut bytes = Vec::new();
        // Written anyway (as a hostile peer would) and read back: refused on reading.
        crate::frame::write_frame(
            &mut bytes,
            K::Attach.format_version(),
            K::Attach as u16,
            &serde_json::to_vec(&bad).expect("json"),
        )
        .expect("frame");
        assert!(read_message(&mut &bytes[..]).is_err());
    }
}

/// Two machines through Hello (with `capabilities`), Setup, State and Complete.
fn completed_pair(capabilities: &[&str]) -> (SenderMachine, ReceiverMachine) {
    let hello = Message::Hello(Hello::new("t", capabilities));
    let (mut src, mut dst) = (SenderMachine::new(), ReceiverMachine::new());
    src.sent(&hello).expect("hello");
    dst.received(&hello).expect("hello");
    dst.sent(&hello).expect("hello");
    src.received(&hello).expect("hello");
    for (d, kind) in [
        (S, K::Setup),
        (R, K::SetupOk),
        (S, K::State),
        (S, K::Complete),
    ] {
        let m = sample(kind);
        match d {
            S => {
                src.sent(&m).expect("source sends");
                dst.received(&m).expect("destination receives");
            }
            R => {
                dst.sent(&m).expect("destination sends");
                src.received(&m).expect("source receives");
            }
        }
    }
    (src, dst)
}

/// With pipelined-commit, Commit follows Complete at once: the source passes its commit point
/// there; the destination runs the VM once built (Prepared, then Running) or, if it cannot,
/// answers Abort and the source is free again. Without the feature, Commit waits for Prepared.
#[test]
fn a_pipelined_commit_skips_the_prepared_round_trip_and_an_abort_frees_the_source() {
    let features = ["state-sections", "disk-blocks", "pipelined-commit"];
    let (mut src, mut dst) = completed_pair(&features);
    src.sent(&Message::Commit).expect("commit behind complete");
    assert!(src.is_commit_point_passed());
    dst.received(&Message::Commit)
        .expect("commit ahead of prepared");
    assert_eq!(dst.state(), ReceiverState::CommitPending);
    assert!(!dst.is_commit_point_passed(), "not run yet");
    dst.sent(&Message::Prepared).expect("built");
    assert!(dst.is_commit_point_passed());
    src.received(&Message::Prepared)
        .expect("prepared after commit");
    assert_eq!(src.state(), SenderState::CommitSent);
    dst.sent(&sample(K::Running)).expect("running");
    src.received(&sample(K::Running)).expect("running");
    assert_eq!(
        (src.state(), dst.state()),
        (SenderState::Done, ReceiverState::Done)
    );

    let (mut src, mut dst) = completed_pair(&features);
    src.sent(&Message::Commit).expect("commit");
    dst.received(&Message::Commit).expect("commit");
    let abort = sample(K::Abort);
    dst.sent(&abort).expect("the VM cannot be built: abort");
    assert!(matches!(src.received(&abort), Err(ProtocolError::Peer(_))));
    assert_eq!(src.state(), SenderState::Aborted);
    assert!(!src.is_commit_point_passed(), "the source may resume");
    assert!(dst.sent(&sample(K::Running)).is_err(), "and it never runs");

    let (mut src, mut dst) = completed_pair(&["state-sections", "disk-blocks"]);
    assert!(
        src.sent(&Message::Commit).is_err(),
        "not agreed: Prepared first"
    );
    assert!(dst.received(&Message::Commit).is_err());
    let (mut src, _) = completed_pair(&["state-sections", "disk-blocks"]);
    src.received(&Message::Prepared).expect("prepared");
    src.sent(&Message::Commit).expect("commit");
    assert!(
        src.received(&abort).is_err() && src.state() == SenderState::CommitSent,
        "a two-phase commit passed cannot be taken back"
    );
}
