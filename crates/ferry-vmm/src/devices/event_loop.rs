//! The device thread: an event-manager loop serving virtio queue kicks, paused and resumed by
//! messages so that a paused VM's devices do not touch guest memory.

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::event::VmmEvent;

/// The subscriber type every device registers as.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Messages to the device thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopCommand {
    Pause,
    Resume,
    Stop,
}

/// Wakes the event loop so it looks at its command channel.
struct Waker(EventFd);

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("cannot watch the device loop's waker: {e}");
        }
    }
}

/// The control side of the device thread.
#[derive(Debug)]
pub struct DeviceLoopHandle {
    commands: Sender<LoopCommand>,
    acks: Receiver<LoopCommand>,
    waker: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl DeviceLoopHandle {
    /// Sends `command` and waits until the loop has applied it.
    pub fn request(&self, command: LoopCommand) -> Result<(), String> {
        self.commands
            .send(command)
            .map_err(|_| "the device thread is gone".to_string())?;
        self.waker
            .write(1)
            .map_err(|e| format!("cannot wake the device thread: {e}"))?;
        if command == LoopCommand::Stop {
            return Ok(());
        }
        match self.acks.recv() {
            Ok(ack) if ack == command => Ok(()),
            Ok(other) => Err(format!("device thread answered {other:?} to {command:?}")),
            Err(_) => Err("the device thread is gone".into()),
        }
    }

    /// Stops the loop and waits for the thread.
    pub fn stop(mut self) {
        let _ = self.request(LoopCommand::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the device thread with `subscribers` registered.
pub fn spawn(
    subscribers: Vec<Subscriber>,
    events: Sender<VmmEvent>,
) -> std::io::Result<DeviceLoopHandle> {
    let mut manager = EventManager::<Subscriber>::new()
        .map_err(|e| std::io::Error::other(format!("cannot create the device event loop: {e}")))?;
    let waker = EventFd::new(libc::EFD_NONBLOCK)?;
    manager.add_subscriber(Arc::new(Mutex::new(Waker(waker.try_clone()?))));
    for s in subscribers {
        manager.add_subscriber(s);
    }
    let (commands_tx, commands) = std::sync::mpsc::channel();
    let (acks, acks_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("ferry-devices".into())
        .spawn(move || {
            // The guest waits on each request it queues: a device woken behind a busy
            // thread's whole slice (a migration's, another VM's) stalls the guest's I/O.
            crate::sched::latency_critical();
            run(manager, commands, acks, events)
        })?;
    Ok(DeviceLoopHandle {
        commands: commands_tx,
        acks: acks_rx,
        waker,
        thread: Some(thread),
    })
}

fn run(
    mut manager: EventManager<Subscriber>,
    commands: Receiver<LoopCommand>,
    acks: Sender<LoopCommand>,
    events: Sender<VmmEvent>,
) {
    loop {
        if let Err(e) = manager.run() {
            let _ = events.send(VmmEvent::DevicesFailed {
                reason: format!("device event loop failed: {e}"),
            });
            return;
        }
        let mut paused = false;
        loop {
            let command = if paused {
                commands.recv().unwrap_or(LoopCommand::Stop)
            } else {
                match commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => LoopCommand::Stop,
                }
            };
            match command {
                LoopCommand::Pause => paused = true,
                LoopCommand::Resume => paused = false,
                LoopCommand::Stop => return,
            }
            let _ = acks.send(command);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts how often its eventfd fired.
    struct Counter {
        evt: EventFd,
        hits: Arc<AtomicU32>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            self.hits.fetch_add(1, Ordering::SeqCst);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN))
                .expect("watch");
        }
    }

    #[test]
    fn a_paused_loop_serves_no_events_until_resumed() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("evt");
        let hits = Arc::new(AtomicU32::new(0));
        let counter = Counter {
            evt: evt.try_clone().expect("clone"),
            hits: hits.clone(),
        };
        let (tx, _rx) = std::sync::mpsc::channel();
        let handle = spawn(vec![Arc::new(Mutex::new(counter))], tx).expect("spawn");

        handle.request(LoopCommand::Pause).expect("pause");
        evt.write(1).expect("kick");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(hits.load(Ordering::SeqCst), 0, "served while paused");

        handle.request(LoopCommand::Resume).expect("resume");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while hits.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "kick from the pause served after resume"
        );
        handle.stop();
    }
}
