//! Serial console: the COM1 16550 UART and the `kprint!`/`kprintln!` macros.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

/// I/O port base of COM1.
const COM1: u16 = 0x3F8;

static PORT: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

/// Initialises COM1 (8-N-1, FIFO on). Called once by the bootstrap CPU
/// before anything is printed; printing before it is silently dropped.
pub fn init() {
    // SAFETY: COM1's eight registers at 0x3F8 belong to this driver alone.
    let mut uart = unsafe { Uart16550::new_port(COM1) }.expect("0x3F8 is a valid port base");
    // A missing UART leaves the console mute rather than stopping the boot.
    if uart.init(Config::DEFAULT).is_ok() {
        *PORT.lock() = Some(uart);
    }
}

struct Writer<'a>(&'a mut Uart16550<PioBackend>);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for line in s.split_inclusive('\n') {
            match line.strip_suffix('\n') {
                Some(body) => {
                    self.0.send_bytes_exact(body.as_bytes());
                    self.0.send_bytes_exact(b"\r\n");
                }
                None => self.0.send_bytes_exact(line.as_bytes()),
            }
        }
        Ok(())
    }
}

/// Writes formatted text to the console (used by the macros).
pub fn print(args: fmt::Arguments) {
    if let Some(uart) = PORT.lock().as_mut() {
        let _ = Writer(uart).write_fmt(args);
    }
}

/// Writes formatted text even when another CPU (or this one, interrupted)
/// holds the console lock: for exception and panic reports only. Waits a
/// bounded time for the lock, then writes through a second handle.
pub fn print_emergency(args: fmt::Arguments) {
    for _ in 0..1_000_000 {
        if let Some(mut guard) = PORT.try_lock() {
            if let Some(uart) = guard.as_mut() {
                let _ = Writer(uart).write_fmt(args);
            }
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY: the UART is already initialised; a second handle only writes
    // bytes to the transmit register, at worst interleaving with the holder.
    if let Ok(mut uart) = unsafe { Uart16550::new_port(COM1) } {
        let _ = Writer(&mut uart).write_fmt(args);
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => { $crate::serial::print(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::kprint!("\n") };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}
