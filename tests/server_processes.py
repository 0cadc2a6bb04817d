"""Servers the tests start as real subprocesses (`chatrl env serve`, `chatrl serve`, a plain OpenEnv app): start one,
wait for the URL it prints, stop it by its own process group."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from helpers import REPO, cli_env

URL = re.compile(r"http://127\.0\.0\.1:\d+")


@contextmanager
def running(args: list[str], timeout: float = 120) -> Iterator[str]:
    """Run `python ARGS` (its own process group, cwd = the repo); yields the first http://127.0.0.1:PORT it prints
    on stdout; kills the group afterwards. A server that exits first fails with its stderr."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()  # the server prints its URL once listening (and then nothing much)
            if not line and proc.poll() is not None:
                raise AssertionError(f"{args} exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
            found = URL.search(line)
            url = found.group(0) if found else None
        assert url, f"{args} printed no URL within {timeout} s"
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
