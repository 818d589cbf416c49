//! The few raw system calls shardbox makes itself, kept in one place.

use std::ffi::CString;

/// Runs in a freshly forked child before exec: moves the child into each cgroup whose
/// `cgroup.procs` file is listed (writing `0` there moves the writer), and asks the kernel to
/// kill it if the worker dies.
///
/// # Errors
/// The first failing call's OS error.
pub fn join_cgroups_and_die_with_parent(procs: &[CString]) -> std::io::Result<()> {
    for path in procs {
        // SAFETY: `path` is a valid NUL-terminated string owned by the caller; open, write and
        // close are async-signal-safe and touch no memory but the literal below.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
        }
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and is async-signal-safe.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
