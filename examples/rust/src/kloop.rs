//! Hand-written declarations of the part of include/kloop.h this example
//! uses, and a small safe wrapper around a loop handle.
//!
//! The C header is the contract: every fallible call returns >= 0 or a
//! negative errno; structs have fixed-width fields only, so `#[repr(C)]`
//! structs with the same fields have the same layout (checked at compile
//! time below against the sizes the header documents).
#![allow(dead_code)]

use std::ffi::CStr;
use std::fmt;
use std::os::raw::{c_char, c_int, c_void};

/// The major version this binding was written against (KLOOP_VERSION_MAJOR).
pub const VERSION_MAJOR: u32 = 0;

pub const COMPLETION_MORE: u32 = 1 << 0;

pub const EVENT_OP: u32 = 0;
pub const EVENT_DATA: u32 = 1;
pub const EVENT_EOF: u32 = 2;
pub const EVENT_ERROR: u32 = 3;
pub const EVENT_WRITE_LOW: u32 = 4;
pub const EVENT_CLOSED: u32 = 5;
pub const EVENT_WRITE_DONE: u32 = 6;

pub const OP_MULTISHOT: u32 = 1 << 0;

pub const STREAM_SOCKET: u32 = 0;
pub const STREAM_CLOSE_FD: u32 = 1 << 1;

pub const EINTR: i32 = 4;
pub const EPIPE: i32 = 32;
pub const EALREADY: i32 = 114;
pub const ECANCELED: i32 = 125;

/// `kloop_t`: opaque.
#[repr(C)]
pub struct RawLoop {
    _private: [u8; 0],
}

/// `struct kloop_config`.
#[repr(C)]
pub struct Config {
    pub size: u32,
    pub sq_entries: u32,
    pub cq_entries: u32,
    pub flags: u32,
    pub disable: u64,
    pub buf_size: u32,
    pub buf_count: u32,
    pub sqpoll_idle_ms: u32,
    pub reserved0: u32,
    pub reserved: [u64; 6],
}

/// `struct kloop_completion`: one record filled by kloop_poll().
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Completion {
    pub token: u64,
    pub result: i32,
    pub flags: u32,
    pub data: u64,
    pub event: u32,
    pub aux: u32,
}

const _: () = assert!(std::mem::size_of::<Completion>() == 32);
const _: () = assert!(std::mem::size_of::<Config>() == 88);

extern "C" {
    pub fn kloop_version() -> u32;
    pub fn kloop_create(cfg: *const Config, out: *mut *mut RawLoop) -> c_int;
    pub fn kloop_destroy(lp: *mut RawLoop) -> c_int;
    pub fn kloop_poll(lp: *mut RawLoop, out: *mut Completion, max: u32, timeout_ns: i64) -> c_int;
    pub fn kloop_submit_accept(lp: *mut RawLoop, token: u64, fd: c_int, flags: u32) -> c_int;
    pub fn kloop_stream_attach(lp: *mut RawLoop, token: u64, fd: c_int, flags: u32) -> c_int;
    pub fn kloop_stream_write(lp: *mut RawLoop, token: u64, buf: *const c_void, len: usize) -> i64;
    pub fn kloop_stream_set_limits(lp: *mut RawLoop, token: u64, high: u64, low: u64) -> c_int;
    pub fn kloop_stream_pause(lp: *mut RawLoop, token: u64) -> c_int;
    pub fn kloop_stream_resume(lp: *mut RawLoop, token: u64) -> c_int;
    pub fn kloop_stream_shutdown(lp: *mut RawLoop, token: u64) -> c_int;
    pub fn kloop_stream_close(lp: *mut RawLoop, token: u64) -> c_int;
    pub fn kloop_stream_abort(lp: *mut RawLoop, token: u64) -> c_int;
    pub fn kloop_strerror(err: c_int) -> *const c_char;
}

/// A negative errno returned by libkloop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error(pub i32);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // kloop_strerror never returns NULL and its text is static.
        let text = unsafe { CStr::from_ptr(kloop_strerror(self.0)) };
        write!(f, "{} (errno {})", text.to_string_lossy(), -self.0)
    }
}

impl std::error::Error for Error {}

fn check(rc: i64) -> Result<i64, Error> {
    if rc < 0 {
        Err(Error(rc as i32))
    } else {
        Ok(rc)
    }
}

/// The version of the library that is loaded: (major, minor, patch).
pub fn version() -> (u32, u32, u32) {
    let v = unsafe { kloop_version() };
    (v >> 16, (v >> 8) & 0xff, v & 0xff)
}

/// An owned loop: destroyed (with everything still in flight) on drop.
/// Like the C handle it belongs to one thread, so it is neither Send nor Sync.
pub struct Loop {
    raw: *mut RawLoop,
}

impl Loop {
    pub fn new() -> Result<Loop, Error> {
        let mut raw = std::ptr::null_mut();
        check(unsafe { kloop_create(std::ptr::null(), &mut raw) } as i64)?;
        Ok(Loop { raw })
    }

    /// Submits queued work, waits up to `timeout_ns` (< 0: until something
    /// completes) and returns the records filled at the front of `out`.
    /// DATA records point into engine buffers valid until the next poll,
    /// which the borrow of `self` here does not express: copy before polling.
    pub fn poll<'a>(
        &mut self,
        out: &'a mut [Completion],
        timeout_ns: i64,
    ) -> Result<&'a [Completion], Error> {
        let n =
            check(
                unsafe { kloop_poll(self.raw, out.as_mut_ptr(), out.len() as u32, timeout_ns) }
                    as i64,
            )?;
        Ok(&out[..n as usize])
    }

    pub fn accept_multishot(&mut self, token: u64, fd: c_int) -> Result<(), Error> {
        check(unsafe { kloop_submit_accept(self.raw, token, fd, OP_MULTISHOT) } as i64).map(|_| ())
    }

    /// Hands `fd` to the engine; it closes the fd after the CLOSED event.
    pub fn attach(&mut self, token: u64, fd: c_int) -> Result<(), Error> {
        check(
            unsafe { kloop_stream_attach(self.raw, token, fd, STREAM_SOCKET | STREAM_CLOSE_FD) }
                as i64,
        )
        .map(|_| ())
    }

    /// Copies `buf` into the stream's write queue; returns the bytes queued.
    pub fn write(&mut self, token: u64, buf: &[u8]) -> Result<u64, Error> {
        check(unsafe { kloop_stream_write(self.raw, token, buf.as_ptr().cast(), buf.len()) })
            .map(|n| n as u64)
    }

    pub fn set_limits(&mut self, token: u64, high: u64, low: u64) -> Result<(), Error> {
        check(unsafe { kloop_stream_set_limits(self.raw, token, high, low) } as i64).map(|_| ())
    }

    pub fn pause(&mut self, token: u64) -> Result<(), Error> {
        check(unsafe { kloop_stream_pause(self.raw, token) } as i64).map(|_| ())
    }

    pub fn resume(&mut self, token: u64) -> Result<(), Error> {
        check(unsafe { kloop_stream_resume(self.raw, token) } as i64).map(|_| ())
    }

    pub fn shutdown(&mut self, token: u64) -> Result<(), Error> {
        check(unsafe { kloop_stream_shutdown(self.raw, token) } as i64).map(|_| ())
    }

    pub fn close(&mut self, token: u64) -> Result<(), Error> {
        check(unsafe { kloop_stream_close(self.raw, token) } as i64).map(|_| ())
    }

    pub fn abort(&mut self, token: u64) -> Result<(), Error> {
        check(unsafe { kloop_stream_abort(self.raw, token) } as i64).map(|_| ())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        unsafe {
            kloop_destroy(self.raw);
        }
    }
}

/// The bytes of a DATA record.
///
/// # Safety
/// `c` must be a DATA record returned by the last poll of its loop.
pub unsafe fn data_of(c: &Completion) -> &[u8] {
    std::slice::from_raw_parts(c.data as usize as *const u8, c.result as usize)
}
