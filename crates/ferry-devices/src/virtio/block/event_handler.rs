//! The block device on the device thread's event loop.
//!
//! `init` watches the activation eventfd only. Activation happens on a vCPU thread (the driver
//! writes DRIVER_OK), which writes that eventfd; the loop then starts watching the queue
//! eventfd and serves whatever is already queued. The queue eventfd stays watched across
//! resets: a kick while the device is inactive is drained and dropped.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Block;
use crate::ratelimit::log_limited;
use crate::virtio::{kicked_queue, rearm_queue, watch_queue_events};

/// `Events` data of the activation eventfd.
const ACTIVATE_EVENT: u32 = 0;
/// `Events` data of queue `i`'s eventfd is `QUEUE_EVENT + i`.
const QUEUE_EVENT: u32 = 1;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("virtio-blk: cannot watch the activation eventfd: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            log_limited!(self.disk.log, warn, events = ?events.event_set(),
                "virtio-blk: unexpected event");
            return;
        }
        match events.data() {
            ACTIVATE_EVENT => self.on_activate(ops),
            data => match kicked_queue(&self.queue_evts, QUEUE_EVENT, data) {
                Some(_) => self.serve_queue(),
                None => log_limited!(self.disk.log, warn, data, "virtio-blk: unknown event"),
            },
        }
    }
}

impl Block {
    fn on_activate(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        if !self.queue_evts_registered {
            if !watch_queue_events(ops, &self.queue_evts, QUEUE_EVENT, "virtio-blk") {
                return;
            }
            self.queue_evts_registered = true;
        }
        // The driver may have queued requests and kicked before we watched the eventfd; the
        // kick is still pending then, but serving now costs nothing.
        self.serve_queue();
    }

    fn serve_queue(&mut self) {
        if self.process_queue() {
            rearm_queue(&self.queue_evts, 0, "virtio-blk");
        }
    }
}
