"""A real `chatrl serve --db` subprocess on the tiny model, for the feedback API tests."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, cli_env

URL = re.compile(r"chat page at (http://\S+)/ ")


class ServeProcess:
    """`python -m chatrl serve --model tiny-random --db DB --port 0 EXTRA...`; its output goes to files (a pipe
    nobody reads would fill up and stall the server)."""

    def __init__(self, db: Path, logs: Path, *extra: str, timeout: float = 180.0):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = logs / "serve.out", logs / "serve.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatrl", "serve", "--model", "tiny-random", "--dtype", "fp32", "--port", "0",
             "--db", str(db), *extra],
            cwd=REPO, env=cli_env(), stdout=self.stdout.open("w"), stderr=self.stderr.open("w"))
        self.url = self._wait_for_url(timeout)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = URL.search(self.stdout.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatrl serve exited with {self.proc.returncode}: {self.log()[-3000:]}")
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"chatrl serve did not start in {timeout:.0f} s: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.stderr.read_text()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
