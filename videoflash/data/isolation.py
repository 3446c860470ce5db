"""Native decoders in supervised child processes: a crash, an abort or a hang costs one sample.

decord (and the ffmpeg under it) can die inside native code on a damaged file: a segfault or an
abort that no ``try`` catches (dmlc/decord#229, #25). Run in the process that drives training or
``make_shards``, such a file kills the job, and an exact resume dies on it again. Here the decoding
runs in a child process that the caller supervises:

- :class:`Isolated` is one child that runs ``fn(*task)`` for each task sent to it. The child is
  ``os.fork()``-ed from the caller (Linux), as DataLoader workers are: it starts in milliseconds
  with everything already imported, and it can be started from a DataLoader worker, which as a
  daemonic process may not start ``multiprocessing`` children. Right after the fork the child closes
  every inherited file descriptor but its two pipe ends (so it holds none of the caller's sockets,
  queues or other children's pipes), restores the default handlers of the fatal signals (so a
  segfault ends it plainly), ignores SIGINT (Ctrl-C stops the caller, which then ends its children)
  and sets torch to one thread.
- Tasks and results travel over two pipes as pickles (protocol 5: numpy arrays such as the decoded
  frames go out of band, one copy through the kernel each way and none into the pickle; ``bytes``,
  such as a sample's mp4, go inside the pickle). With ``shared_bytes``, a result's out-of-band
  buffers that fit go through an anonymous shared mapping made before each fork instead: the child
  copies them there, the pipe carries only the pickle, and the caller copies them out when the
  message is whole (77 MB of frames: about 31 ms over making them, against about 54 ms through the
  pipe, which costs a system call and a context switch per MB). A task may build its result array
  in the area itself (:func:`result_area`), which saves that copy too; the caller's copy out goes
  where ``alloc`` says. A child that dies half-way through leaves its area unread; its replacement
  gets a new one.
- The caller waits for a result up to a timeout. The child's death shows as the end of its result
  pipe (or a broken request pipe); the caller then reaps it and reads the signal. A crash raises
  :class:`IsolationError` with reason ``decoder_crash`` (naming the signal or exit code), a timeout
  kills the child and raises reason ``decoder_timeout``; either way the next task starts a fresh
  child. A Python exception inside ``fn`` is sent back and raised again in the caller, unchanged,
  and the child lives on.
- :func:`run_ordered` runs a list of tasks on N such children and yields the results (or the
  :class:`IsolationError` of a task) in task order; a dead or hung child is replaced and the run
  goes on. ``data_tools.make_shards`` probes with it.

The loader (``videoflash.data.pipeline``) keeps one :class:`Isolated` per stream for its video
decoding (``LoaderConfig.decode_isolation``/``decode_timeout_s``).

Costs and limits: a child is a copy-on-write view of its parent at the fork, so memory the parent
frees later stays held by the child until it exits (a stream forks its child when it starts, before
its shuffle buffer fills; after a crash the replacement is forked from the stream as it is then).
POSIX only (``os.fork``); Python 3.12+ warns (DeprecationWarning) when a process with threads forks,
as it does for DataLoader workers started by fork.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import signal
import struct
import sys
import time
import weakref

__all__ = ["IsolationError", "Isolated", "run_ordered", "result_area", "CRASH", "TIMEOUT"]

CRASH = "decoder_crash"
TIMEOUT = "decoder_timeout"

_PREFIX = struct.Struct("<QIB")  # pickle length, number of out-of-band buffers, buffers in the shared area
_SIZE = struct.Struct("<Q")
# signals whose handlers the child resets to the default (a crash must end it plainly)
_DEFAULT_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGTERM", "SIGCHLD")
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031  # Linux fcntl


class IsolationError(Exception):
    """A task lost to its child process: ``reason`` is ``decoder_crash`` or ``decoder_timeout``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.reason, str(self))


# --------------------------------------------------------------------------------------------------
# messages over a pipe


def _address(buf) -> int:
    import numpy as np

    return int(np.frombuffer(buf, np.uint8).__array_interface__["data"][0])


def _encode(obj, shared: mmap.mmap | None = None) -> list:
    """The parts of one message: prefix, buffer sizes, the pickle, the out-of-band buffers. With a
    ``shared`` area that holds them, the buffers are copied there instead of into the pipe; a
    buffer already in its place there (written through :func:`result_area`) is not copied. A
    buffer that lies in the area anywhere else sends the message through the pipe (copying the
    others into the area could overwrite it)."""
    bufs = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    sizes = b"".join(_SIZE.pack(r.nbytes) for r in raws)
    if shared is not None and raws and sum(r.nbytes for r in raws) <= len(shared):
        base, end = _address(shared), _address(shared) + len(shared)
        places, off = [], 0
        for r in raws:
            at = _address(r) if r.nbytes else -1
            places.append(at == base + off)
            if not places[-1] and base <= at < end:
                break  # in the area, but not where it goes
            off += r.nbytes
        else:
            view, off = memoryview(shared), 0
            for r, in_place in zip(raws, places):
                if not in_place:
                    view[off : off + r.nbytes] = r
                off += r.nbytes
            view.release()
            return [_PREFIX.pack(len(head), len(raws), 1) + sizes, head]
    return [_PREFIX.pack(len(head), len(raws), 0) + sizes, head, *raws]


_AREA: mmap.mmap | None = None  # in a child: its shared area (see result_area)


def result_area(nbytes: int):
    """In the child of an :class:`Isolated` with a shared area of at least ``nbytes``: a writable
    uint8 numpy array over the first ``nbytes`` of that area, else None (the caller's process, an
    inline run, a result too large). A task that builds its result array there (one array, the
    result's first out-of-band buffer) hands it over without the copy into the area: the caller
    copies it out as it does any other result. The area is the child's scratch for one result at a
    time: the next task overwrites it."""
    if _AREA is None or nbytes > len(_AREA):
        return None
    import numpy as np

    return np.frombuffer(_AREA, np.uint8, int(nbytes))


class _Reader:
    """Reads one message from a file descriptor, blocking or not (``feed`` as data arrives); the
    out-of-band buffers come from the pipe or, when the message says so, are copied out of
    ``shared`` (so that the next task can reuse the area)."""

    def __init__(self, shared: mmap.mmap | None = None, alloc=None):
        self._shared = shared
        self._alloc = alloc
        self._in_shared = False
        self._want = [bytearray(_PREFIX.size)]  # buffers still to fill, in order
        self._got: list[bytearray] = []
        self._filled = 0

    def feed(self, fd: int):
        """Read what is available; returns ``(True, obj)`` once the message is whole, else
        ``(False, None)``. Raises ``EOFError`` at the end of the pipe."""
        while self._want:
            buf = self._want[0]
            if self._filled < len(buf):
                try:
                    n = os.readv(fd, [memoryview(buf)[self._filled :]])
                except BlockingIOError:
                    return False, None
                if n == 0:
                    raise EOFError
                self._filled += n
                continue
            self._got.append(self._want.pop(0))
            self._filled = 0
            if len(self._got) == 1:  # the prefix: the table of buffer sizes comes next
                self._head_len, nbufs, self._in_shared = _PREFIX.unpack(buf)
                self._want.append(bytearray(_SIZE.size * nbufs))
            elif len(self._got) == 2:  # the table: then the pickle and the buffers
                self._sizes = [n for (n,) in (_SIZE.unpack_from(buf, k) for k in range(0, len(buf), _SIZE.size))]
                self._want.append(bytearray(self._head_len))
                if not self._in_shared:
                    self._want += [bytearray(n) for n in self._sizes]
        head, *bufs = self._got[2:]
        if self._in_shared:
            if self._shared is None:
                raise EOFError  # a message that refers to an area this reader has not got
            import numpy as np  # copies into fresh memory at twice bytearray's speed (no zero fill)

            off = 0
            for n in self._sizes:
                out = np.empty(n, np.uint8) if self._alloc is None else self._alloc(n)
                out[:] = np.frombuffer(self._shared, np.uint8, n, off)
                bufs.append(out)
                off += n
        return True, pickle.loads(head, buffers=bufs)


def _write_all(fd: int, parts: list, deadline: float | None) -> None:
    """Write ``parts`` to ``fd`` (non-blocking in the parent: wait for room until ``deadline``)."""
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError from None
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll(None if left is None else int(left * 1000) + 1)
                continue
            view = view[n:]


# --------------------------------------------------------------------------------------------------
# the child


def _child_main(fn, req_fd: int, res_fd: int, shared: mmap.mmap | None = None) -> None:
    """The child's loop: a task in, ``fn(*task)`` out; ends at the end of the request pipe."""
    global _AREA
    _AREA = shared
    os.set_blocking(req_fd, True)
    os.set_blocking(res_fd, True)
    while True:
        try:
            task = _read_blocking(req_fd)
        except EOFError:
            return
        try:
            reply = ("ok", fn(*task))
        except Exception as exn:  # sent back and raised again in the caller
            reply = ("raise", exn)
        try:
            parts = _encode(reply, shared)
        except Exception as exn:  # an exception (or result) that does not pickle
            parts = _encode(("raise", RuntimeError(f"{type(exn).__name__} in the child: {exn}")))
        _write_all(res_fd, parts, None)


def _read_blocking(fd: int):
    reader = _Reader()
    while True:
        done, obj = reader.feed(fd)
        if done:
            return obj


def _close_fds_except(keep: set[int]) -> None:
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1 << 16)
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _in_child(fn, req_r: int, res_w: int, shared: mmap.mmap | None = None) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        _close_fds_except({req_r, res_w})
        for name in _DEFAULT_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        import faulthandler

        faulthandler.disable()
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)
        _child_main(fn, req_r, res_w, shared)
    except BaseException:
        code = 70
    finally:
        os._exit(code)


# --------------------------------------------------------------------------------------------------
# the supervised worker


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


_UNREAPED: list[int] = []  # killed children stuck in the kernel (uninterruptible I/O): reaped later


def _reap(pid: int, kill: bool) -> int | None:
    """Wait for ``pid`` and return its wait status (None if unknown). ``kill``: SIGKILL it first;
    otherwise it is expected to be dying, and is killed if it outlives a grace of 5 s. Never blocks
    for long: a child that SIGKILL does not end within 5 s is left to :func:`_reap_stragglers`."""
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    give_up = time.monotonic() + 5.0
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() > give_up:
            if kill:
                _UNREAPED.append(pid)
                return None
            kill, give_up = True, time.monotonic() + 5.0
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)


def _reap_stragglers() -> None:
    for pid in list(_UNREAPED):
        try:
            done = os.waitpid(pid, os.WNOHANG)[0]
        except ChildProcessError:
            done = True
        if done:
            _UNREAPED.remove(pid)


def _shutdown(owner: int, pid: int, fds: list[int]) -> None:
    """Close the pipes and kill the child; only in the process that started it (a forked copy of
    the owner, such as a DataLoader worker, must not end its parent's children)."""
    if os.getpid() != owner:
        return
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _reap(pid, kill=True)


def _wait_readable(fds: list[int], timeout: float | None) -> None:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))


class Isolated:
    """A supervised child process running ``fn(*task)``; see the module doc.

    ``call(task)`` runs one task and returns its result; ``submit`` / ``poll`` / ``fileno`` do the same
    in steps for callers that wait on several children at once. ``timeout`` (seconds, None: no limit)
    bounds each task. The child starts at the first task (or ``start()``) and again after a failure;
    ``close()`` (also at garbage collection) ends it. ``shared_bytes``: the size of the shared area
    that results' arrays travel through (0: the pipe only; a larger result takes the pipe).
    ``alloc(nbytes)``: where the caller copies a result's arrays out of the shared area (a writable
    uint8 numpy array of ``nbytes``; default ``numpy.empty``), e.g. memory it will hand on without
    another copy.
    """

    def __init__(self, fn, timeout: float | None = None, name: str = "worker", shared_bytes: int = 0,
                 alloc=None):  # fmt: skip
        self.fn = fn
        self.timeout = timeout
        self.name = name
        self.shared_bytes = int(shared_bytes)
        self.alloc = alloc
        self._shared: mmap.mmap | None = None
        self.pid: int | None = None
        self.starts = 0
        self._req = self._res = -1
        self._reader: _Reader | None = None
        self._deadline: float | None = None
        self._finalizer = None

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.pid is not None:
            return
        _reap_stragglers()
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        for fd in (req_w, res_w):
            try:
                import fcntl

                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            except (ImportError, OSError):
                pass
        # a fresh area per child: whatever a dying child left in the old one is never read
        shared = mmap.mmap(-1, self.shared_bytes) if self.shared_bytes > 0 else None
        pid = os.fork()
        if pid == 0:
            _in_child(self.fn, req_r, res_w, shared)
        os.close(req_r)
        os.close(res_w)
        os.set_blocking(req_w, False)
        os.set_blocking(res_r, False)
        self.pid, self._req, self._res, self._shared = pid, req_w, res_r, shared
        self.starts += 1
        self._finalizer = weakref.finalize(self, _shutdown, os.getpid(), pid, [req_w, res_r])

    def close(self) -> None:
        """End the child (killed: it holds no state worth keeping)."""
        if self.pid is not None:
            self._end(kill=True)

    def _end(self, kill: bool) -> int | None:
        """Close the pipes and reap the child; returns its wait status."""
        self._finalizer.detach()
        for fd in (self._req, self._res):
            try:
                os.close(fd)
            except OSError:
                pass
        status = _reap(self.pid, kill)
        if self._shared is not None:
            self._shared.close()
        self.pid, self._req, self._res, self._reader, self._deadline = None, -1, -1, None, None
        self._shared = None
        return status

    def _lost(self, reason: str, what: str) -> IsolationError:
        if reason == TIMEOUT:
            self._end(kill=True)
            return IsolationError(TIMEOUT, f"{self.name}: no result after {self.timeout:g}s while {what}; killed it")
        status = self._end(kill=False)  # the child is gone or going: read how it ended
        how = "died" if status is None else _describe(status)
        return IsolationError(CRASH, f"{self.name} {how} while {what}")

    # -- one task in steps ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._reader is not None

    def fileno(self) -> int:
        return self._res

    def submit(self, task: tuple) -> None:
        """Send ``task`` (the arguments of ``fn``); raises :class:`IsolationError` if the child dies."""
        if self.busy:
            raise RuntimeError(f"{self.name} is busy")
        if self.pid is not None and os.waitpid(self.pid, os.WNOHANG)[0]:
            self._end(kill=False)  # died while idle (killed from outside): not this task's fault
        self.start()
        self._deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            _write_all(self._req, _encode(tuple(task)), self._deadline)
        except TimeoutError:
            raise self._lost(TIMEOUT, "receiving the task") from None
        except (BrokenPipeError, ConnectionResetError):
            raise self._lost(CRASH, "receiving the task") from None
        self._reader = _Reader(self._shared, self.alloc)

    def poll(self):
        """Read what has arrived: ``(True, result)`` when the task is done, else ``(False, None)``.
        Raises :class:`IsolationError` (crash, or the deadline passed) or the task's own exception."""
        try:
            done, reply = self._reader.feed(self._res)
        except EOFError:
            raise self._lost(CRASH, "running the task") from None
        if not done:
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise self._lost(TIMEOUT, "running the task")
            return False, None
        self._reader = self._deadline = None
        kind, value = reply
        if kind == "raise":
            raise value
        return True, value

    def wait_time(self) -> float | None:
        """Seconds until this task's deadline (None: no deadline)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def call(self, *task):
        """Run ``fn(*task)`` in the child and return its result."""
        self.submit(task)
        while True:
            done, value = self.poll()
            if done:
                return value
            _wait_readable([self._res], self.wait_time())


def run_ordered(fn, tasks, workers: int, timeout: float | None = None, name: str = "worker"):
    """Yield ``fn(*task)`` for each of ``tasks`` in order, computed by ``workers`` :class:`Isolated`
    children; a task whose child crashed or timed out yields its :class:`IsolationError` (a task's
    own exception is yielded too), and the child is replaced."""
    tasks = list(tasks)
    pool = [Isolated(fn, timeout, name=f"{name} {k}") for k in range(max(1, min(workers, len(tasks))))]
    running: dict[Isolated, int] = {}
    results: dict[int, object] = {}
    ahead = 4 * len(pool)  # results held out of order at most (bounded memory)
    nxt = out = 0
    try:
        while out < len(tasks):
            for w in pool:
                if w.busy or nxt >= len(tasks) or nxt - out >= ahead:
                    continue
                try:
                    w.submit(tasks[nxt])
                    running[w] = nxt
                except IsolationError as exn:
                    results[nxt] = exn
                nxt += 1
            if running:
                waits = [w.wait_time() for w in running]
                limit = None if any(t is None for t in waits) else min(waits)
                _wait_readable([w.fileno() for w in running], limit)
            for w in list(running):
                try:
                    done, value = w.poll()
                except Exception as exn:  # IsolationError or the task's own error
                    done, value = True, exn
                if done:
                    results[running.pop(w)] = value
            while out in results:
                yield results.pop(out)
                out += 1
    finally:
        for w in pool:
            w.close()
