"""The browser behind a MiniWoB++ environment: chromedriver and headless Chromium in one process group of their own.

`Browser` starts chromedriver in a new session (Chromium joins its process group), opens a WebDriver session with
per-command timeouts, and kills the whole group when it dies or is closed, so a wedged browser never outlives its
environment. Process groups of environments whose owning process died without cleaning up (e.g. a Ray actor killed
after a timeout) are registered in a per-user directory and reaped when a new browser starts on the same host.
Selenium is imported only when a browser starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--force-device-scale-factor=1",
)
_BROWSER_REGISTRY = Path(tempfile.gettempdir()) / f"recforge-browsers-{os.getuid()}"
"""One file per live browser process group (name: group id, content: owning pid), for reaping orphans."""
_BROWSER_NAMES = {"chromedriver", "chromium", "chrome", "chrome_crashpad", "chrome_crashpad_handler"}


def _group_members(pgid: int) -> list[tuple[int, str, int]]:
    """Live (pid, name, parent pid) of the processes in process group `pgid`, read from /proc (zombies skipped)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append((int(entry.name), name, int(ppid)))
    return members


def _kill_group(pgid: int, wait_s: float = 3.0) -> None:
    """SIGKILL the group until none of its members is left alive (zombies aside), for at most `wait_s`: SIGKILL is
    delivered asynchronously, and a browser may fork a helper while the first signal is on its way."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not _group_members(pgid):
            return
        if time.monotonic() > deadline:
            log.warning("Browser process group %d still has live members %s after SIGKILL.", pgid,
                        [pid for pid, _, _ in _group_members(pgid)])
            return
        time.sleep(0.02)


def _reap_orphaned_browsers() -> None:
    """Kill browser groups registered by processes that died without closing them (one file per group)."""
    if not _BROWSER_REGISTRY.is_dir():
        return
    for entry in _BROWSER_REGISTRY.iterdir():
        try:
            pgid, owner = int(entry.name), int(entry.read_text().strip())
            os.kill(owner, 0)
            continue  # owner alive: its browser is in use
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        members = _group_members(pgid)
        if members and all(name in _BROWSER_NAMES for _, name, _ in members):  # never kill a reused group id
            log.warning("Reaping orphaned browser group %d (%d processes) of dead process %d.", pgid,
                        len(members), owner)
            _kill_group(pgid)
        entry.unlink(missing_ok=True)


class Browser:
    """One chromedriver (own process group, joined by Chromium) and its WebDriver session."""

    def __init__(self, chrome_binary: str, chromedriver: str, *, window_size: tuple[int, int],
                 command_timeout_s: float) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.chromium.remote_connection import ChromiumRemoteConnection
        from selenium.webdriver.remote.client_config import ClientConfig

        os.environ.setdefault("SE_OFFLINE", "true")  # Selenium must never go to the network for drivers
        os.environ.setdefault("SE_AVOID_STATS", "true")
        _reap_orphaned_browsers()
        self.profile_dir = tempfile.mkdtemp(prefix="recforge-chromium-")
        self.service = Service(chromedriver, log_output=subprocess.DEVNULL, popen_kw={"start_new_session": True})
        try:
            self.service.start()
        except BaseException:
            shutil.rmtree(self.profile_dir, ignore_errors=True)
            raise
        self.pgid = self.service.process.pid
        try:
            _BROWSER_REGISTRY.mkdir(exist_ok=True)
            (_BROWSER_REGISTRY / str(self.pgid)).write_text(str(os.getpid()))
            options = webdriver.ChromeOptions()
            options.binary_location = chrome_binary
            for flag in (*CHROMIUM_FLAGS, f"--window-size={window_size[0]},{window_size[1]}",
                         f"--user-data-dir={self.profile_dir}"):
                options.add_argument(flag)
            url = self.service.service_url
            connection = ChromiumRemoteConnection(
                remote_server_addr=url, vendor_prefix="goog", browser_name="chrome", ignore_proxy=True,
                client_config=ClientConfig(remote_server_addr=url, keep_alive=True,
                                           timeout=int(max(1, command_timeout_s))))
            self.driver = webdriver.Remote(command_executor=connection, options=options)
            self.driver.set_script_timeout(command_timeout_s)
            self.driver.set_page_load_timeout(command_timeout_s)
        except BaseException:
            self.kill()
            raise

    def pids(self) -> dict[str, list[int]]:
        """{"chromedriver": [pid], "chromium": [browser pid, its helper pids...]} (the main browser first)."""
        members = _group_members(self.pgid)
        browser = sorted((p for p, n, _ in members if n != "chromedriver"),
                         key=lambda pid: (not any(p == pid and ppid == self.pgid for p, _, ppid in members), pid))
        return {"chromedriver": [p for p, n, _ in members if n == "chromedriver"], "chromium": browser}

    def kill(self) -> None:
        """SIGKILL the whole group (driver and browser) and remove the profile; never blocks for long."""
        _kill_group(self.pgid)
        try:
            self.service.process.wait(timeout=5)
        except (subprocess.TimeoutExpired, OSError):
            log.warning("chromedriver %d did not exit after SIGKILL.", self.pgid)
        (_BROWSER_REGISTRY / str(self.pgid)).unlink(missing_ok=True)
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    def quit(self) -> None:
        try:
            self.driver.quit()
        except Exception as err:  # a dead browser cannot quit politely; the group is killed below anyway
            log.debug("driver.quit() failed: %s", err)
        self.kill()


def press_key(driver: Any, key: str) -> None:
    """Press `key` ("Enter", "Control+a", "+", a character) in the page, modifiers held around it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    named = {"Enter": Keys.ENTER, "Tab": Keys.TAB, "Backspace": Keys.BACKSPACE, "Delete": Keys.DELETE,
             "Escape": Keys.ESCAPE, "Space": Keys.SPACE, "ArrowUp": Keys.ARROW_UP, "ArrowDown": Keys.ARROW_DOWN,
             "ArrowLeft": Keys.ARROW_LEFT, "ArrowRight": Keys.ARROW_RIGHT, "Home": Keys.HOME, "End": Keys.END,
             "PageUp": Keys.PAGE_UP, "PageDown": Keys.PAGE_DOWN,
             "Control": Keys.CONTROL, "Shift": Keys.SHIFT, "Alt": Keys.ALT, "Meta": Keys.META}
    *mods, last = [key] if key == "+" else ([*key[:-2].split("+"), "+"] if key.endswith("++") else key.split("+"))
    chain = ActionChains(driver, duration=0)
    for mod in mods:
        chain.key_down(named[mod])
    chain.key_down(named.get(last, last)).key_up(named.get(last, last))
    for mod in reversed(mods):
        chain.key_up(named[mod])
    chain.perform()
