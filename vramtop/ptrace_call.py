"""Call a function inside another process's thread with ptrace (Linux x86-64), then put the thread back.

Why not gdb's `call`: gdb (13 and earlier) saves and restores the whole
register file around an inferior call, and on CPUs with AMX (Sapphire Rapids
and later, the hosts of most H100 nodes) its XSAVE buffer is shorter than the
kernel's, so the restore fails ("Couldn't write extended state status: Bad
address") and leaves the thread with a broken syscall restart: the job then
dies with `OSError: [Errno 514]`. Done here, the XSAVE area is read and
written back at the size the kernel reports.

What happens to the target:
- one thread is stopped (PTRACE_SEIZE + PTRACE_INTERRUPT; the others keep
  running): preferably a thread that is not the main one and sleeps in futex
  (torch's intra-op pool, a CUDA helper), so the training thread is never
  stopped (`pick_thread`);
- its registers and XSAVE area are saved, the function is entered with the
  return address 0, and the fault at 0 marks its return;
- the saved state is written back and the thread detached, with the signal
  suppressed; a system call it slept in restarts (the kernel does that after
  the stop, from the restored registers).
Every path, errors and timeouts included, restores and detaches. If this
process dies while the thread is stopped, the kernel detaches it; this runs
in its own session (`python -m vramtop.ptrace_call`) so that killing the
viewer does not kill it in those few milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import time

PTRACE_CONT, PTRACE_DETACH = 7, 17
PTRACE_GETREGS, PTRACE_SETREGS = 12, 13
PTRACE_GETREGSET, PTRACE_SETREGSET = 0x4204, 0x4205
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
NT_X86_XSTATE = 0x202
WALL = 0x40000000
XSTATE_MAX = 64 * 1024


class PtraceError(Exception):
    """The call could not be made; the target was left as it was."""


class PtraceDenied(PtraceError):
    """The kernel refused to let us trace the process (yama, capabilities, another user)."""


class _Regs(ctypes.Structure):  # struct user_regs_struct, x86-64
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = None


def _ptrace(request: int, tid: int, addr=0, data=0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.ptrace.restype = ctypes.c_long
        _libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    ctypes.set_errno(0)
    res = _libc.ptrace(request, tid, addr, data)
    if res == -1 and ctypes.get_errno():
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def _wait_stop(tid: int, deadline: float) -> int:
    """Wait for `tid` to stop; returns the wait status. Raises TimeoutError at the deadline."""
    while True:
        got, status = os.waitpid(tid, os.WNOHANG | WALL)
        if got == tid:
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                raise PtraceError(f"thread {tid} ended during the call")
            return status
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.0005)


SYS_FUTEX = 202  # x86-64


def pick_thread(pid: int) -> int:
    """A thread to borrow, the training thread last.

    First a non-main thread asleep in futex (a thread pool or a lock: the wait restarts unnoticed after a
    ptrace stop); then any sleeping non-main thread (some calls, epoll_wait among them, return EINTR after
    a stop, which their callers retry); then the main thread.
    """
    futex: list[int] = []
    sleeping: list[int] = []
    for name in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        tid = int(name)
        if tid == pid:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{tid}/syscall") as fh:
                nr = fh.read().split()[0]
        except (OSError, IndexError):
            continue
        if state in ("S", "D"):
            (futex if nr == str(SYS_FUTEX) else sleeping).append(tid)
    return (futex or sleeping or [pid])[0]


class Tracee:
    """One seized, stopped thread. Use as a context manager: leaving always restores and detaches."""

    def __init__(self, tid: int, timeout_s: float = 5.0):
        self.tid = tid
        self.timeout_s = timeout_s
        self._seized = False
        self._saved: _Regs | None = None
        self._xstate: ctypes.Array[ctypes.c_char] | None = None
        self._xlen = 0

    def __enter__(self) -> Tracee:
        try:
            _ptrace(PTRACE_SEIZE, self.tid, 0, 0)
        except OSError as exc:
            if exc.errno in (1, 13):  # EPERM, EACCES
                raise PtraceDenied(str(exc)) from None
            raise PtraceError(f"cannot trace thread {self.tid}: {exc}") from None
        self._seized = True
        try:
            _ptrace(PTRACE_INTERRUPT, self.tid, 0, 0)
            _wait_stop(self.tid, time.monotonic() + self.timeout_s)
            self._saved = self.get_regs()
            buf = ctypes.create_string_buffer(XSTATE_MAX)
            iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), XSTATE_MAX)
            _ptrace(PTRACE_GETREGSET, self.tid, NT_X86_XSTATE, ctypes.addressof(iov))
            self._xstate, self._xlen = buf, iov.len
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if not self._seized:
            return
        try:
            if self._saved is not None:
                _ptrace(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(self._saved))
            if self._xstate is not None:
                iov = _Iovec(ctypes.cast(self._xstate, ctypes.c_void_p), self._xlen)
                _ptrace(PTRACE_SETREGSET, self.tid, NT_X86_XSTATE, ctypes.addressof(iov))
        finally:
            self._seized = False
            try:
                _ptrace(PTRACE_DETACH, self.tid, 0, 0)  # signal 0: the SIGSEGV of our return is not delivered
            except OSError:
                pass

    def get_regs(self) -> _Regs:
        regs = _Regs()
        _ptrace(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(regs))
        return regs

    def call(self, func: int, *args: int) -> int:
        """func(*args) in the stopped thread (at most 6 integer arguments); returns rax."""
        assert self._saved is not None and len(args) <= 6
        regs = _Regs.from_buffer_copy(self._saved)
        for name, value in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
        # Below the red zone, 16-byte aligned, then the return address 0 as if `call` had pushed it.
        sp = ((self._saved.rsp - 1024) & ~0xF) - 8
        write_memory(self.tid, sp, b"\0" * 8)
        regs.rsp, regs.rip, regs.rax = sp, func, 0
        regs.orig_rax = 0xFFFFFFFFFFFFFFFF  # -1: no system call restart on the way into func
        _ptrace(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(regs))
        _ptrace(PTRACE_CONT, self.tid, 0, 0)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                status = _wait_stop(self.tid, deadline)
            except TimeoutError:
                _ptrace(PTRACE_INTERRUPT, self.tid, 0, 0)
                _wait_stop(self.tid, time.monotonic() + self.timeout_s)
                raise PtraceError(f"the call did not return within {self.timeout_s:g}s (abandoned)") from None
            done = self.get_regs()
            if done.rip == 0:
                return done.rax
            sig = os.WSTOPSIG(status)
            if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE):
                raise PtraceError(f"the call faulted at {done.rip:#x} (signal {sig})")
            # Another signal for this thread arrived meanwhile (or an event stop): pass it on, keep waiting.
            _ptrace(PTRACE_CONT, self.tid, 0, 0 if status >> 16 else sig)


def write_memory(pid: int, address: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        if os.pwrite(fd, data, address) != len(data):
            raise PtraceError("short write to the target's memory")
    finally:
        os.close(fd)


def read_memory(pid: int, address: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


def add_pending_call(pid: int, symbols: dict[str, int], source: bytes, timeout_s: float = 5.0) -> int:
    """Queue `PyRun_SimpleString(source)` as a pending call of the target's main interpreter.

    The main thread runs it at its next eval-breaker check: between two
    bytecodes, holding the GIL, like a signal handler; never in the middle of
    a C call. Py_AddPendingCall needs neither the GIL nor a thread state.
    `source` lives in a fresh anonymous page (mmap, a plain system call:
    no lock that the borrowed thread could hold). Returns the thread used.
    """
    if len(source) >= 4095:
        raise PtraceError("injected source too long")
    tid = pick_thread(pid)
    with Tracee(tid, timeout_s) as t:
        page = t.call(symbols["mmap"], 0, 4096, 0x3, 0x22, 0xFFFFFFFFFFFFFFFF, 0)  # RW, PRIVATE|ANON, fd -1
        if page >= 0xFFFFFFFFFFFFF000 or page == 0:
            raise PtraceError(f"mmap in the target failed (errno {-(page - (1 << 64))})")
        write_memory(pid, page, source + b"\0")
        res = t.call(symbols["Py_AddPendingCall"], symbols["PyRun_SimpleString"], page) & 0xFFFFFFFF
        if res != 0:
            raise PtraceError("Py_AddPendingCall refused (its queue is full); try again")
    return tid


def main(argv: list[str] | None = None) -> int:
    """`python -m vramtop.ptrace_call PID MMAP ADDPENDING RUNSIMPLE SOURCE_FILE`: the injector subprocess."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    pid = int(argv[0])
    symbols = {"mmap": int(argv[1], 0), "Py_AddPendingCall": int(argv[2], 0), "PyRun_SimpleString": int(argv[3], 0)}
    with open(argv[4], "rb") as fh:
        source = fh.read()
    try:
        tid = add_pending_call(pid, symbols, source)
    except PtraceDenied as exc:
        print(f"denied: {exc}", flush=True)
        return 3
    except (PtraceError, OSError) as exc:
        print(f"failed: {exc}", flush=True)
        return 1
    print(f"ok: thread {tid}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
