//! The source of a live migration reading a hostile destination: after a legal start (Hello,
//! Setup sent, a batch of pages on its way), arbitrary bytes are read as the destination's
//! messages and fed to the `SenderMachine`. Nothing may panic; an Applied claiming more than
//! was sent, or an answer out of turn, must be refused; the commit point is never passed by
//! what the destination says.
//!
//! Input: the byte stream the destination would send after its Hello.

#![no_main]

use ferry_proto::migration::{
    read_message, Hello, Message, PageBatchWriter, Region, SenderMachine, Setup, MAX_BATCH_BYTES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut machine = SenderMachine::new();
    let caps = ["zero-pages", "flow-control", "state-sections"];
    let hello = Message::Hello(Hello::new("source", &caps));
    machine.sent(&hello).expect("own hello");
    machine
        .received(&Message::Hello(Hello::new("destination", &caps)))
        .expect("peer hello");
    let setup = Message::Setup(Setup {
        migration_id: 7,
        memory_bytes: 1 << 20,
        vcpus: 1,
        regions: vec![Region {
            guest_addr: 0,
            len: 1 << 20,
        }],
        disks: vec![],
        moving_disks: vec![],
        nics: 0,
    });
    machine.sent(&setup).expect("setup");
    machine.received(&Message::SetupOk).expect("setup ok");
    let mut writer = PageBatchWriter::new(MAX_BATCH_BYTES);
    writer.push_page(0, &[1u8; 4096]);
    writer.push_zero_run(4096, 3);
    machine
        .sent(&Message::Pages(writer.take()))
        .expect("one batch");
    let mut stream = data;
    while let Ok(message) = read_message(&mut stream) {
        if let Message::Applied(a) = &message {
            let accepted = machine.received(&message).is_ok();
            assert_eq!(accepted, a.bytes <= 4096 && a.pages <= 4);
            continue;
        }
        if machine.received(&message).is_err() {
            break;
        }
    }
    assert!(!machine.is_commit_point_passed());
});
