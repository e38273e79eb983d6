//! The controller's decisions over what agents report: a `ClusterView` decoded from
//! arbitrary JSON (host reports come from agents over the network). A view whose reports
//! pass `HostReport::validate` (the controller drops the others) must plan without a panic,
//! for load balancing, power saving and the evacuation of each host, and every move must
//! name a VM of its source and a host of the view.

#![no_main]

use ferry_cluster::policy::{plan, plan_evacuation, ClusterView, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(view) = serde_json::from_slice::<ClusterView>(data) else {
        return;
    };
    if view.hosts.iter().any(|h| h.report.validate().is_err()) || !view.now_secs.is_finite() {
        return;
    }
    let policy = Policy::default();
    let mut plans = vec![plan(&view, &policy, false), plan(&view, &policy, true)];
    for h in &view.hosts {
        plans.push(plan_evacuation(&view, &policy, &h.report.host));
    }
    for p in plans {
        for m in &p.moves {
            let source = view.host(&m.from).expect("a move from a host of the view");
            assert!(source.report.vms.iter().any(|v| v.name == m.vm), "{m:?}");
            assert!(view.host(&m.to).is_some(), "{m:?}");
            assert_ne!(m.from, m.to, "{m:?}");
        }
    }
});
