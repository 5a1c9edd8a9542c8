"""Debian's ``chromium`` driven headless over the DevTools protocol, for tests of HTML pages: open a local
page, read back its rendered DOM, the requests it made and a screenshot.

The protocol runs on a pipe (``--remote-debugging-pipe``: the browser reads commands on its fd 3 and writes
replies and events on its fd 4, each message JSON ended by a NUL byte). The requests come from the page's
own ``Network.requestWillBeSent`` events, so the browser's background traffic (time, sign-in and search
services, which flags do not reliably silence) never counts as the page's. The browser's proxy is a closed
loopback port, so nothing a test opens leaves the machine.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Port 1 on loopback: nothing listens, so every request fails on this machine, the page's included.
    "--proxy-server=127.0.0.1:1",
    "--proxy-bypass-list=<-loopback>",
)
INSTALL_HINT = "no `chromium` on PATH: `make setup` installs Debian's chromium package"


class BrowserError(RuntimeError):
    pass


class HeadlessChromium:
    """One browser with one tab; use as a context manager."""

    def __init__(self, profile: Path, *, window: tuple[int, int] = (1400, 1000), timeout: float = 60.0):
        browser = shutil.which("chromium")
        if browser is None:
            raise BrowserError(INSTALL_HINT)
        self.timeout = timeout
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # The child's ends moved above fd 9, so that putting them at fds 3 and 4 cannot overwrite each other.
        child_ends = [fcntl.fcntl(end, fcntl.F_DUPFD, 10) for end in (commands_read, replies_write)]
        for end in (commands_read, replies_write):
            os.close(end)
        width, height = window
        arguments = [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        profile.mkdir(parents=True, exist_ok=True)
        self._log = profile / "chromium.log"
        # bash (dash reads one-digit fds only) puts the pipe ends at fds 3 and 4, then execs chromium.
        with open(self._log, "wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{child_ends[0]} 4>&{child_ends[1]}', browser, *arguments,
                 "--remote-debugging-pipe", "about:blank"],
                pass_fds=child_ends,
                stdout=log,
                stderr=log,
            )  # fmt: skip
        for end in child_ends:
            os.close(end)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable", session=self.session)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("Browser.close")
            except BrowserError:
                self.process.kill()
            self.process.wait(timeout=self.timeout)
        os.close(self._commands)
        os.close(self._replies)

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise BrowserError("chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                log = self._log.read_text(errors="replace")[-3000:]
                raise BrowserError(
                    f"chromium closed its pipe (exit status {self.process.poll()}); its log:\n{log}"
                )
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, *, session: str | None = None, **params) -> dict:
        """Send one command and wait for its reply, keeping the events that arrive meanwhile."""
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        os.write(self._commands, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def _wait_for(self, event: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(message.get("method") == event for message in self.events):
            self.events.append(self._message(deadline))

    def open(self, page: Path) -> list[str]:
        """Load a local page until its load event; the URLs of every request it made, its own included."""
        self.events.clear()
        self.call("Page.navigate", url=page.resolve().as_uri(), session=self.session)
        self._wait_for("Page.loadEventFired")
        return [
            message["params"]["request"]["url"]
            for message in self.events
            if message.get("method") == "Network.requestWillBeSent"
            and message.get("sessionId") == self.session
        ]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True, session=self.session)
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def page_errors(self) -> list[str]:
        """The uncaught JavaScript exceptions of the page since it was opened."""
        return [
            message["params"]["exceptionDetails"].get("exception", {}).get("description", "")
            for message in self.events
            if message.get("method") == "Runtime.exceptionThrown"
        ]

    def dom(self) -> str:
        """The rendered document as HTML."""
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> None:
        """A PNG of the window."""
        reply = self.call("Page.captureScreenshot", format="png", session=self.session)
        path.write_bytes(base64.b64decode(reply["data"]))
