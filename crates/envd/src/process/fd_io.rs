//! Non-blocking reads and writes on pipe and PTY master descriptors through tokio's
//! reactor.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// A pipe end or PTY master registered with the tokio reactor.
pub struct AsyncFdIo {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncFdIo {
    /// Sets `fd` non-blocking and registers it.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: `fd` is an open descriptor that the AsyncFd owns from here on, so it
        // stays open and refers to the same file until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Returns the raw descriptor, for ioctls.
    pub fn raw_fd(&self) -> i32 {
        self.fd.get_ref().as_raw_fd()
    }

    /// Reads into `buffer`, waiting until data is ready. Returns 0 at end of file; a PTY
    /// master whose slave side is closed reports `EIO`, which counts as end of file too.
    pub async fn read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| read_fd(inner.get_ref(), buffer)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads without waiting; returns `WouldBlock` when no data is ready.
    pub fn try_read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.get_ref(), buffer)
    }

    /// Writes all of `data`, waiting while the pipe or terminal buffer is full.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| write_fd(inner.get_ref(), data)) {
                Ok(Ok(written)) => data = &data[written..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor that `fd` owns and keeps open; F_GETFL/F_SETFL only
    // change its status flags.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn read_fd(fd: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of `buffer.len()` bytes and `fd` is open.
    let count = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if count >= 0 {
        return Ok(count as usize);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EIO) {
        return Ok(0);
    }
    Err(err)
}

fn write_fd(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes and `fd` is open.
    let count = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if count >= 0 {
        Ok(count as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}
