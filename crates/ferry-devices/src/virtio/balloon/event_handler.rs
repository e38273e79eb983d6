//! The balloon on the device thread's event loop: activation, the queue kicks, and a timer
//! that asks the guest for fresh statistics every [`STATS_INTERVAL`].

use std::os::fd::AsRawFd;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Balloon;
use crate::ratelimit::log_limited;
use crate::virtio::{kicked_queue, rearm_queue, watch_queue_events};

/// How often the guest is asked for its statistics: the cluster's view of a host's free
/// memory is this fresh.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// `Events` data of the activation eventfd.
const ACTIVATE_EVENT: u32 = 0;
/// `Events` data of the statistics timer.
const TIMER_EVENT: u32 = 1;
/// `Events` data of queue `i`'s eventfd is `QUEUE_EVENT + i`.
const QUEUE_EVENT: u32 = 2;

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("virtio-balloon: cannot watch the activation eventfd: {e}");
        }
        match self.stats_timer.reset(STATS_INTERVAL, Some(STATS_INTERVAL)) {
            Ok(()) => {
                let fd = self.stats_timer.as_raw_fd();
                if let Err(e) = ops.add(Events::with_data_raw(fd, TIMER_EVENT, EventSet::IN)) {
                    tracing::error!("virtio-balloon: cannot watch the statistics timer: {e}");
                }
            }
            Err(e) => tracing::error!("virtio-balloon: cannot arm the statistics timer: {e}"),
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            log_limited!(self.log, warn, events = ?events.event_set(),
                "virtio-balloon: unexpected event");
            return;
        }
        match events.data() {
            ACTIVATE_EVENT => self.on_activate(ops),
            TIMER_EVENT => {
                // Readable: the read does not block.
                let _ = self.stats_timer.wait();
                self.request_stats();
            }
            data => match kicked_queue(&self.queue_evts, QUEUE_EVENT, data) {
                Some(i) => self.serve(i),
                None => log_limited!(self.log, warn, data, "virtio-balloon: unknown event"),
            },
        }
    }
}

impl Balloon {
    fn on_activate(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        if !self.queue_evts_registered {
            if !watch_queue_events(ops, &self.queue_evts, QUEUE_EVENT, "virtio-balloon") {
                return;
            }
            self.queue_evts_registered = true;
        }
        // The driver may have queued chains and kicked before we watched the eventfds.
        for i in 0..self.queue_evts.len() {
            self.serve(i);
        }
    }

    /// Serves one queue; if work is left, kicks its eventfd so the loop comes back after the
    /// other devices had their turn.
    fn serve(&mut self, queue: usize) {
        if self.process_queue(queue) {
            rearm_queue(&self.queue_evts, queue, "virtio-balloon");
        }
    }
}
