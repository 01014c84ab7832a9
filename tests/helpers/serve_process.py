"""A real `gpt-serve` process on loopback for the tests: started on a free port, always stopped."""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time

import httpx

from conftest import BIN


class ServerProcess:
    def __init__(self, model_dir, *args: str, env: dict | None = None, timeout: float = 60):
        import os

        self.log = tempfile.NamedTemporaryFile(prefix="gpt-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(BIN / "gpt-serve"), str(model_dir), "--port", "0", *args],
                                     stdout=self.log, stderr=self.log, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(r"serving \S+ on (http://[\d.]+:\d+)", self.output())
            if found:
                self.url = found.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gpt-serve did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics").text
        found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def wait_for(self, predicate, timeout: float = 10, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
