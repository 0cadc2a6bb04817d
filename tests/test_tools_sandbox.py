"""The sandbox the `python` tool runs model code in: hostile code must fail inside the child and come back as a
result, while this (the test) process goes on. Each run takes ~0.1 s; the timeout tests about 1 s each."""

from __future__ import annotations

import ast
import os
import signal
import socket
import sys
import threading
import time

import pytest

from chatrl.tools.sandbox import run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's limits are Linux's")


def test_normal_code_returns_its_output():
    result = run_python("import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)")
    assert (result.stdout, result.stderr, result.exit_code) == ("45\n", "warn\n", 0)
    assert not result.timed_out and not result.truncated


def test_an_exception_comes_back_as_a_traceback_of_the_code_only():
    result = run_python("x = 1\ny = x / 0")
    assert result.exit_code == 1
    assert 'File "<code>", line 2' in result.stderr and "y = x / 0" in result.stderr  # the line, as python shows
    assert result.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "sandbox.py" not in result.stderr  # the launcher's frames are left out


def test_exit_and_input_behave_like_a_script():
    assert run_python("print('a')\nexit(3)").exit_code == 3  # `exit` exists although -S skips `site`
    assert "EOFError" in run_python("input()").stderr  # stdin carried the code: input() sees end of file


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_a_run_past_the_timeout_is_killed(code):
    start = time.monotonic()
    result = run_python(code, timeout_s=1.0, cpu_s=30)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.exit_code == -signal.SIGKILL
    assert elapsed < 1.0 + 2.0


def test_the_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = run_python("while True:\n    pass", timeout_s=10.0, cpu_s=1)
    assert result.exit_code == -signal.SIGXCPU and not result.timed_out


def test_a_memory_bomb_gets_memory_error():
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024 * 1024))", memory_mb=256)
    assert result.exit_code == 1 and "MemoryError" in result.stderr and not result.timed_out


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import os\nos.execv('/bin/true', ['true'])",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "import _posixsubprocess\n_posixsubprocess.fork_exec",  # forks without an audit event: removed
    "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",  # ... and not re-importable
])
def test_a_fork_bomb_and_every_other_way_to_start_a_process_fail(code):
    result = run_python(code, timeout_s=5.0)
    assert result.exit_code == 1 and not result.timed_out
    assert "sandbox:" in result.stderr or "has no attribute 'fork_exec'" in result.stderr


def test_a_thread_bomb_stops_at_a_limit():
    code = ("import threading, time\nthreads = []\nwhile True:\n"
            "    t = threading.Thread(target=time.sleep, args=(30,), daemon=True)\n    t.start()\n    threads.append(t)")
    result = run_python(code, timeout_s=5.0, memory_mb=256)
    assert not result.timed_out and "can't start new thread" in result.stderr


def test_a_connection_to_a_local_listener_never_arrives():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        result = run_python(code, timeout_s=5.0)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing is waiting to be accepted
            listener.accept()
    assert "connected" not in result.stdout and result.exit_code == 1
    assert "sandbox: socket" in result.stderr


def test_the_network_namespace_has_only_a_loopback_where_the_kernel_grants_one():
    result = run_python("print(open('/proc/self/net/dev').read())")
    if "netns" not in result.layers:
        pytest.skip("the kernel refused unshare(CLONE_NEWNET): only the audit hook blocks sockets here")
    interfaces = {line.split(":")[0].strip() for line in result.stdout.splitlines()[2:] if ":" in line}
    assert interfaces == {"lo"}


@pytest.mark.skipif(os.geteuid() != 0, reason="the root case")
def test_as_root_the_child_keeps_no_capabilities():
    result = run_python("print(open('/proc/self/status').read())")
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert fields["CapEff"].strip() == fields["CapPrm"].strip() == "0" * 16
    assert fields["NoNewPrivs"].strip() == "1"
    assert "no capabilities" in result.layers or "uid 65534" in result.layers


@pytest.mark.parametrize("code", [
    "open(TARGET, 'w').write('x')",
    "import pathlib\npathlib.Path(TARGET).write_text('x')",
    "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
    "open('inside.txt', 'w').write('x')\nimport os\nos.rename('inside.txt', TARGET)",
    "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('x')",
    "import os\nos.mkdir(TARGET)",
    "import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\n"
    "os.close(os.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
    "import os\nos.mknod(TARGET)",
    "import sqlite3\nsqlite3.connect(':memory:').execute(f\"ATTACH DATABASE '{TARGET}' AS x\")",
])
def test_a_write_outside_the_working_directory_fails(tmp_path, code):
    target = tmp_path / "escaped"
    result = run_python(f"TARGET = {str(target)!r}\n{code}")
    assert not target.exists() and not os.path.lexists(target)
    assert result.exit_code == 1


def test_the_working_directory_is_private_writable_and_deleted_afterwards(monkeypatch):
    monkeypatch.setenv("CHATRL_TEST_SECRET", "hunter2")
    code = ("import os, tempfile\nopen('a.txt', 'w').write('kept')\nprint(open('a.txt').read())\n"
            "print(os.getcwd())\nprint(tempfile.gettempdir())\nprint(sorted(os.environ))")
    result = run_python(code)
    kept, cwd, tmp, env = result.stdout.splitlines()
    assert kept == "kept" and tmp == cwd and cwd.startswith(os.path.realpath(os.environ.get("TMPDIR", "/tmp")))
    assert not os.path.exists(cwd)
    assert "CHATRL_TEST_SECRET" not in env and ast.literal_eval(env) == ["HOME", "LC_ALL", "PATH", "TMPDIR"]


def test_a_file_past_the_size_limit_fails_with_efbig():
    result = run_python("open('big', 'wb').write(b'x' * 3 * 1024 * 1024)", file_size_mb=1)
    assert result.exit_code == 1 and "File too large" in result.stderr


@pytest.mark.parametrize("code", ["print('x' * 10_000_000)", "while True:\n    print('y' * 1000)"])
def test_a_huge_print_is_truncated_and_stops_the_run(code):
    start = time.monotonic()
    result = run_python(code, timeout_s=10.0, output_limit=1000)
    assert result.truncated and not result.timed_out and len(result.stdout) == 1000
    assert time.monotonic() - start < 5.0


def test_signals_to_other_processes_and_ctypes_are_refused():
    result = run_python("import os\nos.kill(os.getppid(), 0)")
    assert "sandbox: os.kill of another process is not allowed" in result.stderr
    assert "sandbox: ctypes" in run_python("import ctypes").stderr


def test_runs_in_threads_at_once_keep_their_own_output():
    results = {}

    def run(i):
        results[i] = run_python(f"print({i} * {i})").stdout

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: "0\n", 1: "1\n", 2: "4\n", 3: "9\n"}


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_python("print(1)", timeout_s=0)
