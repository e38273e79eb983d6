//! Legacy PC devices on port I/O: the 16550 serial console and the i8042 (for its reset line).

use std::io::{self, Write};
use std::sync::mpsc::Sender;

use ferry_devices::bus::BusDevice;
use ferry_devices::persist::Persist;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::event::VmmEvent;

/// COM1: where the guest's console is.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller: data port 0x60, command/status port 0x64.
pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

/// An interrupt line backed by an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The serial console: vm-superio's 16550 model writing to the console sink.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }
}

/// The 16550's registers and its receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The 16550's FIFO is 64 bytes; a longer saved buffer is not one this device made.
const SERIAL_FIFO_MAX: usize = 64;

/// What a restored console needs besides its state: its interrupt line and its sink.
#[allow(missing_debug_implementations)] // the sink is any writer
pub struct SerialArgs {
    pub irq: EventFd,
    pub out: Box<dyn Write + Send>,
}

impl Persist for SerialConsole {
    type State = SerialState;
    type ConstructorArgs = SerialArgs;
    type Error = io::Error;

    /// The device's state; the VM is paused.
    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A console continuing from `state`.
    fn restore(args: SerialArgs, state: &SerialState) -> io::Result<Self> {
        if state.in_buffer.len() > SERIAL_FIFO_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "serial FIFO longer than 64 bytes",
            ));
        }
        let uart_state = UartState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&uart_state, IrqTrigger(args.irq), NoEvents, args.out)
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad serial state: {e:?}"),
                )
            })?;
        Ok(SerialConsole { uart })
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, data[0]) {
                // The console sink went away (closed pipe, full disk): the guest goes on.
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

/// Tells the control loop that the guest pulled the reset line, which ferry treats as power
/// off, the way microVMs do: a guest that wants to reboot is started again by its owner.
#[derive(Debug)]
pub struct ShutdownTrigger(pub Sender<VmmEvent>);

impl Trigger for ShutdownTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0
            .send(VmmEvent::GuestShutdown { how: "i8042 reset" })
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "control loop gone"))
    }
}

/// The i8042 keyboard controller, kept for its CPU reset command.
#[derive(Debug)]
pub struct I8042 {
    dev: I8042Device<ShutdownTrigger>,
}

impl I8042 {
    pub fn new(events: Sender<VmmEvent>) -> Self {
        I8042 {
            dev: I8042Device::new(ShutdownTrigger(events)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.dev.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if let Err(e) = self.dev.write(off, data[0]) {
                tracing::warn!("i8042 reset could not reach the control loop: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_transmits_bytes_to_the_sink() {
        let sink = Sink::default();
        let mut s = SerialConsole::new(EventFd::new(0).expect("evt"), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().expect("sink"), b"hi\n");
        // Line status: transmitter empty, so a polling guest can always send.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn serial_ignores_wide_and_out_of_range_accesses() {
        let sink = Sink::default();
        let mut s = SerialConsole::new(EventFd::new(0).expect("evt"), Box::new(sink.clone()));
        s.write(0, b"ab");
        s.write(1 << 40, b"c");
        let mut wide = [0u8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        assert!(sink.0.lock().expect("sink").is_empty());
    }

    #[test]
    fn serial_state_round_trips_and_bad_fifo_is_refused() {
        let sink = Sink::default();
        let mut s = SerialConsole::new(EventFd::new(0).expect("evt"), Box::new(sink.clone()));
        s.write(7, &[0x42]); // scratch register
        s.write(3, &[0x83]); // line control with DLAB
        let saved = s.save();
        assert_eq!(saved.scratch, 0x42);
        let args = || SerialArgs {
            irq: EventFd::new(0).expect("evt"),
            out: Box::new(sink.clone()),
        };
        let r = SerialConsole::restore(args(), &saved).expect("restore");
        assert_eq!(r.save(), saved);
        let bad = SerialState {
            in_buffer: vec![0; 65],
            ..saved
        };
        assert!(SerialConsole::restore(args(), &bad).is_err());
    }

    #[test]
    fn i8042_reset_command_asks_for_shutdown() {
        let (tx, rx) = mpsc::channel();
        let mut kbd = I8042::new(tx);
        kbd.write(4, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmmEvent::GuestShutdown { .. })));
        // Other commands do not.
        kbd.write(4, &[0x20]);
        assert!(rx.try_recv().is_err());
    }
}
