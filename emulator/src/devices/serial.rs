//! COM1: a 16550 UART (rust-vmm's `vm-superio` model) at 0x3f8, IRQ 4 through an irqfd. Output goes
//! to the serial sink (stdout, a file, or nowhere); with `--serial stdio`, stdin feeds its receiver.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;
use crate::state::{self, StateError, StateKind, Versioned};

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORTS: u16 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt line: an eventfd KVM turns into an edge on IRQ 4 (KVM_IRQFD).
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqTrigger(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }

    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(IrqTrigger(self.0.try_clone()?))
    }
}

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest serial output goes. Lines are flushed as they end, so a reader sees whole lines.
pub enum SerialSink {
    Stdout,
    File(BufWriter<File>),
    Null,
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            // Rust's stdout is line-buffered already.
            SerialSink::Stdout => std::io::stdout().lock().write(buf),
            SerialSink::File(f) => {
                let n = f.write(buf)?;
                if buf[..n].contains(&b'\n') {
                    f.flush()?;
                }
                Ok(n)
            }
            SerialSink::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialSink::Stdout => std::io::stdout().flush(),
            SerialSink::File(f) => f.flush(),
            SerialSink::Null => Ok(()),
        }
    }
}

/// The UART's registers and receive FIFO, as migrated: vm-superio's `SerialState`, serialised field
/// by field (serde's remote derive keeps the field list in one place).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateFields {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct SerialDeviceState(#[serde(with = "SerialStateFields")] SerialState);

impl Versioned for SerialDeviceState {
    const KIND: StateKind = StateKind::Serial;
    const VERSION: u16 = 1;
}

/// vm-superio's receive FIFO; a saved state holding more is refused.
const FIFO_SIZE: usize = 64;

pub struct SerialDevice {
    // Always Some; taken only for the moment a restore rebuilds the model around the same sink.
    uart: Option<Serial<IrqTrigger, NoEvents, SerialSink>>,
}

impl SerialDevice {
    pub fn new(trigger: IrqTrigger, sink: SerialSink) -> Self {
        SerialDevice { uart: Some(Serial::new(trigger, sink)) }
    }

    fn uart(&mut self) -> &mut Serial<IrqTrigger, NoEvents, SerialSink> {
        self.uart.as_mut().expect("serial model present outside restore")
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let uart = self.uart();
        let room = uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n > 0 {
            if let Err(e) = uart.enqueue_raw_bytes(&bytes[..n]) {
                log::warn!("serial input dropped: {e:?}");
            }
        }
        n
    }

    pub fn flush_output(&mut self) {
        let _ = self.uart().writer_mut().flush();
    }
}

impl PioDevice for SerialDevice {
    fn name(&self) -> &'static str {
        "serial0"
    }

    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.uart().read(offset as u8);
        data.fill(0);
        data[0] = v;
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Err(e) = self.uart().write(offset as u8, data[0]) {
            log::warn!("serial: {e:?}");
        }
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        let uart = self.uart.as_ref().expect("serial model present outside restore");
        state::encode(&SerialDeviceState(uart.state()))
    }

    fn check_state(&self, blob: &[u8]) -> Result<(), StateError> {
        decode_checked(blob).map(|_| ())
    }

    fn restore_state(&mut self, blob: &[u8]) -> Result<(), StateError> {
        let SerialDeviceState(state) = decode_checked(blob)?;
        let old = self.uart.take().expect("serial model present outside restore");
        let trigger = match old.interrupt_evt().try_clone() {
            Ok(t) => t,
            Err(e) => {
                self.uart = Some(old);
                return Err(StateError::Invalid(format!("serial: cannot clone its irq eventfd: {e}")));
            }
        };
        // With the FIFO checked, from_state fails only if raising the interrupt line fails.
        let sink = old.into_writer();
        let uart = Serial::from_state(&state, trigger, NoEvents, sink)
            .map_err(|e| StateError::Invalid(format!("serial state refused: {e:?}")))?;
        self.uart = Some(uart);
        Ok(())
    }
}

fn decode_checked(blob: &[u8]) -> Result<SerialDeviceState, StateError> {
    let s: SerialDeviceState = state::decode(blob)?;
    if s.0.in_buffer.len() > FIFO_SIZE {
        return Err(StateError::Invalid(format!("serial FIFO of {} bytes (at most {FIFO_SIZE})", s.0.in_buffer.len())));
    }
    Ok(s)
}

/// Feeds stdin to the UART's receiver until stdin ends. Bytes wait while the guest's FIFO is full.
pub fn spawn_stdin_reader(serial: Arc<Mutex<SerialDevice>>) {
    let spawned = std::thread::Builder::new().name("serial-stdin".into()).spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut sent = 0;
            while sent < n {
                sent += serial.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(&buf[sent..n]);
                if sent < n {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!("no serial input: cannot start the stdin thread: {e}");
    }
}
