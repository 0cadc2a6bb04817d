"""Run untrusted Python (a model's `python` tool call) in a separate, limited process.

`run_python` starts `python -I -S -B sandbox.py` (this file, as a launcher) in a fresh temporary directory,
sends the code on stdin and collects stdout/stderr. What protects the host, layer by layer:

1. A separate process, never the chatrl process: isolated mode (no PYTHON* variables, no user site), no
   site-packages (only the standard library is importable), an emptied environment (HOME and TMPDIR point at the
   working directory), closed file descriptors, its own session / process group.
2. A wall-clock timeout that SIGKILLs the whole process group; output capped at `output_limit` bytes per stream
   (the group is killed as soon as a stream passes it); the working directory is deleted afterwards.
3. Kernel limits set in the child before user code (setrlimit): RLIMIT_CPU (CPU seconds, SIGXCPU/SIGKILL),
   RLIMIT_AS (address space: a memory bomb gets MemoryError), RLIMIT_FSIZE (file size; SIGXFSZ ignored so the
   write fails with EFBIG), RLIMIT_NOFILE, RLIMIT_NPROC, RLIMIT_CORE=0.
4. No network: the launcher calls unshare(CLONE_NEWNET) (ctypes, libc) so the child sits in an empty network
   namespace (only a downed loopback: even 127.0.0.1 is unreachable). That needs CAP_SYS_ADMIN (root); an
   ordinary user gets it through unshare(CLONE_NEWUSER | CLONE_NEWNET) where the kernel allows unprivileged user
   namespaces (both checked to work in the chatrl container). Where neither works only layer 6 blocks sockets.
5. Fewer rights: as root, the child switches to `nobody` (uid/gid 65534, no groups, no capabilities) after
   unsharing, when `nobody` can read the standard library; file permissions then protect the host's files and
   RLIMIT_NPROC bounds the processes of `nobody`. Where `nobody` cannot read the standard library (python under a
   0700 /root, as in the chatrl container) the child stays uid 0 but drops every capability (capset, securebits
   NOROOT so an exec cannot regain them): no mknod of devices, no mount, no ptrace of others, no DAC override;
   but it still owns root's files, and the kernel never applies RLIMIT_NPROC to uid 0, so forks are stopped only
   by layer 6. Always: PR_SET_NO_NEW_PRIVS (no setuid binaries). Run as an ordinary user, the child keeps that
   user; RLIMIT_NPROC then counts all of that user's processes and threads.
6. An audit hook (`sys.addaudithook`, installed by the launcher before user code) refuses with PermissionError:
   every `socket.*` event; process creation (os.fork/forkpty/system/exec*/spawn*/posix_spawn, subprocess.Popen)
   and signals to other processes; ctypes (which would reach around the hook); sqlite3 (it writes files past the
   hook); gc.get_objects/get_referrers/get_referents; opening a file for writing, and remove/rename/mkdir/rmdir/
   chmod/chown/truncate/utime/link/xattr calls, outside the working directory; opening a directory outside it;
   symlinks; chdir. Before installing it the launcher deletes what acts without an audit event
   (`_posixsubprocess.fork_exec`, `os.mknod`, `os.mkfifo`) and the hook refuses re-importing their modules.
`SandboxResult.layers` names the layers a run actually got (e.g. "netns", "uid 65534" or "no capabilities").

What does NOT protect: the audit hook is a guard against careless or naive code, not a security boundary (the
Python docs say so: code in the same interpreter can defeat it, e.g. by introspecting frames and closures, and C
code raises no audit events) -- layers 1-5 are the boundary. Reads are not limited by the hook, only by file
permissions (so code run as root without `nobody` can read root's files). There is no seccomp filter, no
filesystem namespace or chroot and no pid namespace; run chatrl in a container or VM if the model's code is
hostile.
"""

from __future__ import annotations

import _posixsubprocess
import functools
import json
import linecache
import math
import os
import posix
import pwd
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import types
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000  # <linux/sched.h>
CLONE_NEWUSER = 0x10000000
PR_SET_SECUREBITS, SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 28, 1, 2  # <linux/prctl.h>, <linux/securebits.h>
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522  # <linux/capability.h>
MB = 1024 * 1024
# events refused outright (a prefix match on the event name)
DENIED_PREFIXES = ("socket.", "ctypes.", "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn",
                   "os.posix_spawn", "subprocess.Popen", "pty.spawn", "os.symlink", "os.chdir", "gc.get_objects",
                   "gc.get_referrers", "gc.get_referents", "sys._current_frames", "signal.pthread_kill",
                   "sqlite3.connect")  # sqlite writes files itself (ATTACH DATABASE), past the open hook
UNAUDITED = ("mknod", "mkfifo", "fork_exec", "_fork_exec")  # functions removed before user code
REIMPORT_DENIED = ("posix", "_posixsubprocess")  # modules that would bring them back
# events that change the filesystem: (path argument, its dir_fd argument or None) pairs, by event
PATH_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.truncate": ((0, None),),
    "os.utime": ((0, 3),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclass(frozen=True)
class SandboxResult:
    """What one run gave: the captured (possibly truncated) streams and how it ended."""

    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal (-9 after a timeout, -24 SIGXCPU for the CPU limit)
    timed_out: bool
    truncated: bool
    layers: tuple[str, ...] = ()  # the protections this run got (see the module docstring), as the child reported


def run_python(code: str, *, timeout_s: float = 5.0, cpu_s: int | None = None, memory_mb: int = 512,
               file_size_mb: int = 16, max_procs: int = 64, max_files: int = 64,
               output_limit: int = 4096) -> SandboxResult:
    """Run `code` in a sandboxed child process and return its output; never raises for anything the code does.

    `cpu_s` defaults to the wall-clock timeout rounded up; `output_limit` is in bytes per stream.
    """
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("file_size_mb", file_size_mb),
                        ("max_procs", max_procs), ("max_files", max_files), ("output_limit", output_limit)):
        if value <= 0:
            raise ValueError(f"sandbox: {name} must be > 0, got {value}")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="chatrl-sandbox-"))
    try:
        config = {"workdir": workdir, "cpu_s": cpu_s or math.ceil(timeout_s), "memory_mb": memory_mb,
                  "file_size_mb": file_size_mb, "max_procs": max_procs, "max_files": max_files,
                  "user": _unprivileged_ids(workdir)}
        return _run_child(code, config, timeout_s, output_limit)
    finally:
        _remove_tree(workdir)


def _unprivileged_ids(workdir: str) -> tuple[int, int] | None:
    """As root: the `nobody` uid/gid the child switches to (owning the working directory); else None.

    Also None when `nobody` could not read the standard library (e.g. python installed under a 0700 /root):
    the child could then import nothing new after switching.
    """
    if os.geteuid() != 0 or not _others_can_read(sysconfig.get_paths()["stdlib"]):
        return None
    try:
        entry = pwd.getpwnam("nobody")
        ids = (entry.pw_uid, entry.pw_gid)
    except KeyError:
        ids = (65534, 65534)
    os.chown(workdir, *ids)
    return ids


@functools.cache
def _others_can_read(path: str) -> bool:
    """Whether a user with no rights on `path` (neither owner nor group) can list it and everything above it."""
    path = os.path.realpath(path)
    need = stat.S_IROTH | stat.S_IXOTH
    while True:
        try:
            if os.stat(path).st_mode & need != need:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path, need = parent, stat.S_IXOTH


def _run_child(code: str, config: dict, timeout_s: float, output_limit: int) -> SandboxResult:
    status_read, status_write = os.pipe()  # the launcher reports the layers it got here, before user code
    workdir = config["workdir"]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}
    argv = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config), str(status_write)]
    deadline = time.monotonic() + timeout_s
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=env, start_new_session=True, pass_fds=(status_write,))
    finally:
        os.close(status_write)
    with proc:
        try:
            proc.stdin.write(code.encode("utf-8", "surrogatepass"))
            proc.stdin.close()
        except BrokenPipeError:  # the launcher died before reading: its stderr says why
            pass
        out, err, timed_out, truncated = _collect(proc, deadline, output_limit)
        _kill_group(proc.pid)  # also any process the code managed to leave behind
        proc.wait()
    with os.fdopen(status_read, "rb") as status:
        layers = tuple(json.loads(status.read() or b"[]"))
    return SandboxResult(stdout=_text(out, output_limit), stderr=_text(err, output_limit),
                         exit_code=proc.returncode, timed_out=timed_out, truncated=truncated, layers=layers)


def _collect(proc: subprocess.Popen, deadline: float, limit: int) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes until EOF, the deadline or `limit` bytes on one stream; then wait for the exit."""
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    timed_out = truncated = False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and not truncated:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                buffers[key.fd] += chunk
                truncated = truncated or len(buffers[key.fd]) > limit
    if not (timed_out or truncated):
        try:  # both streams closed: the process is ending (or closed them itself and goes on)
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    return bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]), timed_out, truncated


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def _text(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", "replace")


def _remove_tree(path: str) -> None:
    """Delete the working directory, also when the code made parts of it unreadable (chmod 000)."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            try:
                os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


# ---- the launcher: runs in the child, as `python -I -S -B sandbox.py CONFIG STATUS_FD` ----

def _launch() -> None:
    config, status_fd = json.loads(sys.argv[1]), int(sys.argv[2])
    code = sys.stdin.buffer.read().decode("utf-8", "replace")
    layers = ["process", "timeout", *_isolate(config["user"]), "rlimits"]
    _set_limits(config)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write fails with EFBIG instead of killing
    sys.stdin = open(os.devnull)  # the code was stdin: input() sees end of file
    sys.stdout.reconfigure(errors="backslashreplace")
    _remove_unaudited()
    sys.addaudithook(_make_hook(config["workdir"]))
    os.write(status_fd, json.dumps([*layers, "audit hook"]).encode())
    os.close(status_fd)
    _run_user_code(code)


def _isolate(user: list[int] | None) -> list[str]:
    """The kernel-side layers: an empty network namespace, then `nobody` (or, as root, no capabilities).

    Returns the names of the layers the kernel granted.
    """
    try:
        import ctypes  # only here, before the audit hook (which then refuses every ctypes event)

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        libc = None
    layers = []
    root = os.geteuid() == 0
    if libc is not None and (libc.unshare(CLONE_NEWNET) == 0
                             or (not root and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0)):
        layers.append("netns")
    if user is not None:
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])  # from root: also clears every capability
        layers.append(f"uid {user[0]}")
    elif root and libc is not None and _drop_capabilities(libc, ctypes):
        layers.append("no capabilities")
    if libc is not None and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        layers.append("no new privileges")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]  # a later `import ctypes` re-runs its module code, which the hook stops
    return layers


def _drop_capabilities(libc, ctypes) -> bool:
    """Stay uid 0 but without any capability, and without regaining them on exec (securebits NOROOT)."""
    if libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0) != 0:
        return False
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # {version, pid 0 = this process}
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} sets, all zero
    return libc.capset(header, data) == 0


def _remove_unaudited() -> None:
    """Delete the functions that create processes or files without raising an audit event.

    (`_posixsubprocess.fork_exec` forks without one; `os.mknod`/`mkfifo` create files without one.) The hook
    refuses to import their modules again, which would bring them back.
    """
    for module in (os, posix, _posixsubprocess, subprocess):
        for name in UNAUDITED:
            if hasattr(module, name):
                delattr(module, name)


def _set_limits(config: dict) -> None:
    cpu = config["cpu_s"]
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1), resource.RLIMIT_AS: (config["memory_mb"] * MB,) * 2,
              resource.RLIMIT_FSIZE: (config["file_size_mb"] * MB,) * 2, resource.RLIMIT_CORE: (0, 0),
              resource.RLIMIT_NOFILE: (config["max_files"],) * 2, resource.RLIMIT_NPROC: (config["max_procs"],) * 2}
    for kind, (soft, hard) in limits.items():
        resource.setrlimit(kind, (soft, hard))


def _make_hook(workdir: str):
    inside_prefix = workdir.rstrip(os.sep) + os.sep
    my_pid = os.getpid()

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):  # an already-open descriptor: opened under this hook's checks
            return True
        base = workdir if dir_fd in (None, -1) else os.readlink(f"/proc/self/fd/{dir_fd}")
        real = os.path.realpath(os.path.join(base, os.fsdecode(path)))
        return real == workdir or real.startswith(inside_prefix)

    def hook(event: str, args: tuple) -> None:
        if event.startswith(DENIED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in REIMPORT_DENIED:
            raise PermissionError(f"sandbox: importing {args[0]} again is not allowed")
        if event in ("os.kill", "os.killpg") and args[0] not in (my_pid, 0):
            raise PermissionError(f"sandbox: {event} of another process is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if path is not None and not inside(path) and (writing or os.path.isdir(path)):
                raise PermissionError(f"sandbox: opening {path!r} outside the working directory is not allowed")
        elif event in PATH_EVENTS:
            for index, fd_index in PATH_EVENTS[event]:
                if not inside(args[index], None if fd_index is None else args[fd_index]):
                    raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    return hook


def _run_user_code(code: str) -> None:
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")  # tracebacks show the lines
    main = types.ModuleType("__main__")
    main.exit = main.quit = sys.exit  # `site` (skipped by -S) would define them; models call them
    sys.modules["__main__"] = main
    try:
        exec(compile(code, "<code>", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException:  # noqa: B036 -- the child reports any error the code raised, as python itself would
        sys.stdout.flush()
        report = traceback.TracebackException(*sys.exc_info())
        _drop_launcher_frames(report)
        sys.stderr.write("".join(report.format()))
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()


def _drop_launcher_frames(report: traceback.TracebackException) -> None:
    """Show the code's own frames only (not this file's: its path says nothing useful to the model)."""
    pending, seen = [report], set()
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.stack = traceback.StackSummary.from_list([f for f in item.stack if f.filename != __file__])
        pending += [item.__cause__, item.__context__]


if __name__ == "__main__":
    _launch()
