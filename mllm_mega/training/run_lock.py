"""One run per run directory: ``run_dir/run.lock``, taken by rank 0 at start and released at exit.

The lock is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+/Lustre/GPFS, unlike
``flock``, which many shared filesystems do not propagate between nodes) and holds the holder's host, pid and
start time. A daemon thread refreshes its mtime every ``HEARTBEAT_S``, so a lock is stale when its holder is a
dead process on this host, or when it has not been refreshed for ``STALE_AFTER_S`` (a holder on another node
that died); a stale lock is broken with a warning.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: the holder is gone (or hung beyond use)


class RunLocked(ValueError):
    """Another live run holds the run directory (a launch error: exit 2)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("start_time", 0)))
    return f"host {holder.get('host')!r} pid {holder.get('pid')} (started {started}, command {holder.get('command')!r})"


def stale_reason(holder: dict | None, mtime: float, *, now: float | None = None,
                 stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why a lock whose content is HOLDER (None: unreadable) and mtime MTIME is stale, or None if it is live."""
    now = time.time() if now is None else now
    if holder is not None and holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"])):
        return f"its holder, pid {holder['pid']} on this host, is not running"
    if now - mtime > stale_after_s:
        return f"not refreshed for {now - mtime:.0f}s (> {stale_after_s:.0f}s)"
    return None


class RunLock:
    def __init__(self, run_dir: str, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 log=print):
        self.path = os.path.join(run_dir, LOCK)
        self.stale_after_s, self.heartbeat_s, self.log = stale_after_s, heartbeat_s, log
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
                   "command": " ".join(sys.argv)[:300]}
        self._stop = threading.Event()
        self._thread = None

    def _read(self) -> tuple[dict | None, float] | None:
        try:
            mtime = os.stat(self.path).st_mtime
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            return (holder if isinstance(holder, dict) and "pid" in holder else None), mtime
        except ValueError:
            return None, mtime  # half-written by a holder killed while creating it: judged by its age

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(5):  # a few rounds: another launcher may break or take the lock between our steps
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                state = self._read()
                if state is None:
                    continue  # released just now
                holder, mtime = state
                reason = stale_reason(holder, mtime, stale_after_s=self.stale_after_s)
                if reason is None:
                    raise RunLocked(f"{os.path.dirname(self.path)} is in use by another run: {_describe(holder or {})}"
                                    f" holds {self.path}. Wait for it to finish, stop it, or use another run_dir")
                self._break(holder, reason)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            self._start_heartbeat()
            return
        raise RunLocked(f"could not take {self.path}: other launchers keep taking it")

    def _break(self, holder: dict | None, reason: str) -> None:
        # rename, not remove: of two launchers breaking the same stale lock only one rename succeeds, and
        # a fresh lock taken meanwhile is recognised (its content differs) and put back
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        with open(aside) as f:
            try:
                moved = json.load(f)
            except ValueError:
                moved = None
        if holder is not None and moved != holder:
            try:
                os.link(aside, self.path)  # fails if yet another lock exists: then that one wins
            except FileExistsError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        self.log(f"[train] WARNING: broke the stale lock {self.path} of {_describe(holder or {})}: {reason}")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (never another run's)."""
        self._stop.set()
        state = self._read()
        if state is not None and state[0] is not None and state[0].get("pid") == self.me["pid"] and \
                state[0].get("host") == self.me["host"] and state[0].get("start_time") == self.me["start_time"]:
            os.remove(self.path)
