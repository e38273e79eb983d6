//! The NIC on the device thread's event loop.
//!
//! `init` watches the activation eventfd and the backend (edge-triggered: each pass reads
//! until the backend is empty, or kicks the receive queue's eventfd to come back for the
//! rest). Activation happens on a vCPU thread, which writes the activation eventfd; the loop
//! then starts watching the queue eventfds and serves whatever is already queued. While the
//! device is not active, frames from the backend are read and dropped, as a NIC without a
//! driver does.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Net;
use super::{CTRL_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::ratelimit::log_limited;
use crate::virtio::{kicked_queue, rearm_queue, watch_queue_events};

/// `Events` data of the activation eventfd.
const ACTIVATE_EVENT: u32 = 0;
/// `Events` data of the backend's descriptor.
const BACKEND_EVENT: u32 = 1;
/// `Events` data of queue `i`'s eventfd is `QUEUE_EVENT + i`.
const QUEUE_EVENT: u32 = 2;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("virtio-net: cannot watch the activation eventfd: {e}");
        }
        let fd = self.backend.as_raw_fd();
        let events =
            Events::with_data_raw(fd, BACKEND_EVENT, EventSet::IN | EventSet::EDGE_TRIGGERED);
        if let Err(e) = ops.add(events) {
            tracing::error!("virtio-net: cannot watch the tap: {e}");
        }
        // Frames may already wait (a restored device, a tap that lived before us): the edge
        // that announced them is gone, so look once.
        self.serve(RX_QUEUE);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            log_limited!(self.log, warn, events = ?events.event_set(),
                "virtio-net: unexpected event");
            return;
        }
        match events.data() {
            ACTIVATE_EVENT => self.on_activate(ops),
            BACKEND_EVENT => self.serve(RX_QUEUE),
            data => match kicked_queue(&self.queue_evts, QUEUE_EVENT, data) {
                Some(i) => self.serve(i),
                None => log_limited!(self.log, warn, data, "virtio-net: unknown event"),
            },
        }
    }
}

impl Net {
    fn on_activate(&mut self, ops: &mut EventOps) {
        let _ = self.activate_evt.read();
        if !self.queue_evts_registered {
            if !watch_queue_events(ops, &self.queue_evts, QUEUE_EVENT, "virtio-net") {
                return;
            }
            self.queue_evts_registered = true;
        }
        // The driver may have queued frames and kicked before we watched the eventfds.
        for queue in [TX_QUEUE, CTRL_QUEUE, RX_QUEUE] {
            self.serve(queue);
        }
    }

    /// Serves one queue; if work is left, kicks that queue's eventfd so the loop comes back
    /// after the other devices had their turn.
    fn serve(&mut self, queue: usize) {
        let more = match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => self.process_ctrl(),
        };
        if more {
            rearm_queue(&self.queue_evts, queue, "virtio-net");
        }
    }
}
