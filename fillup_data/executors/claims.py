"""Task claims in the build folder, so independent ranks share a phase without a coordinator.

``state_dir/claims/<task>.json`` holds the owner (host, pid, rank, a random nonce) and an expiry that a
heartbeat thread pushes forward while the task runs. Creating it with O_CREAT|O_EXCL means one rank
wins a free task. A claim whose expiry has passed belongs to a rank that stopped (killed, preempted,
node lost): another rank takes it over. Takeover is serialised by a second O_EXCL file named after the
stale claim's nonce, so of several ranks seeing the same stale claim exactly one replaces it; a rank
that wins the lock re-reads the claim and gives up if it changed meanwhile.

Expiry is wall-clock time: hosts sharing a build folder need clocks within a small part of the lease.
A claim whose owner ran on this host and is no longer alive (a rank killed and re-run on the same node)
is stale at once, without waiting for its lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fillup_data.executors.records import task_file_name
from fillup_data.state import process_gone_on_this_host, write_json_atomic

log = logging.getLogger("fillup_data.executors")


@dataclass(frozen=True)
class HeldClaim:
    task_id: str
    nonce: str


def owner_died_on_this_host(owner: dict) -> bool:
    """The claim's process ran here and is gone. A pid reused since reads as alive: then the lease decides."""
    pid = owner.get("pid")
    return isinstance(pid, int) and process_gone_on_this_host(str(owner.get("host")), pid)


class ClaimStore:
    def __init__(self, state_dir: Path, rank: int, lease_seconds: float):
        self.dir = Path(state_dir) / "claims"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.lease_seconds = lease_seconds

    def path(self, task_id: str) -> Path:
        return self.dir / f"{task_file_name(task_id)}.json"

    def read(self, task_id: str) -> dict | None:
        """The current claim, or None when there is none. A file cut short by a crash between its
        creation and its first write expires one lease after its mtime, like any abandoned claim."""
        path = self.path(task_id)
        try:
            text = path.read_text()
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        try:
            claim = json.loads(text)
            if isinstance(claim, dict) and "expires" in claim and "owner" in claim:
                return claim
        except json.JSONDecodeError:
            pass
        return {"task": task_id, "owner": {"nonce": f"unreadable-{mtime}"}, "expires": mtime / 1e9 + self.lease_seconds}

    def try_claim(self, task_id: str) -> tuple[HeldClaim | None, dict | None]:
        """(our claim, the stale claim we took over or None); (None, None) when someone else holds it."""
        nonce = uuid.uuid4().hex
        if self._create_exclusive(task_id, nonce):
            return HeldClaim(task_id, nonce), None
        stale = self.read(task_id)
        if stale is None:  # released between our attempt and the read: one more try
            return (HeldClaim(task_id, nonce), None) if self._create_exclusive(task_id, nonce) else (None, None)
        if stale["expires"] > time.time() and not owner_died_on_this_host(stale["owner"]):
            return None, None
        lock = self.dir / f"{task_file_name(task_id)}.takeover-{stale['owner']['nonce']}"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return None, None  # another rank is taking this one over
        try:
            again = self.read(task_id)
            if again is None or again["owner"].get("nonce") != stale["owner"]["nonce"]:
                return None, None
            write_json_atomic(self.path(task_id), self._content(task_id, nonce))
        finally:
            lock.unlink(missing_ok=True)
        return HeldClaim(task_id, nonce), stale

    def renew(self, claim: HeldClaim) -> bool:
        """Push the expiry forward; False when the claim is no longer ours (we stalled past the lease)."""
        current = self.read(claim.task_id)
        if current is None or current["owner"].get("nonce") != claim.nonce:
            return False
        write_json_atomic(self.path(claim.task_id), self._content(claim.task_id, claim.nonce))
        return True

    def release(self, claim: HeldClaim) -> None:
        current = self.read(claim.task_id)
        if current is not None and current["owner"].get("nonce") == claim.nonce:
            self.path(claim.task_id).unlink(missing_ok=True)

    @contextlib.contextmanager
    def heartbeat(self, claim: HeldClaim):
        """Renew ``claim`` every third of a lease while the body runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_seconds / 3):
                if not self.renew(claim):
                    log.warning("lost the claim on %s (stalled past its lease?); another rank may run it too",
                                claim.task_id)
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat {claim.task_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _create_exclusive(self, task_id: str, nonce: str) -> bool:
        try:
            fd = os.open(self.path(task_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._content(task_id, nonce), f)
        return True

    def _content(self, task_id: str, nonce: str) -> dict:
        return {"task": task_id, "expires": time.time() + self.lease_seconds,
                "owner": {"host": socket.gethostname(), "pid": os.getpid(), "rank": self.rank, "nonce": nonce}}


def live_claims(state_dir: Path) -> dict[str, dict]:
    """task id -> claim, for claims renewed within their lease: the tasks running now."""
    now, live = time.time(), {}
    for path in sorted((Path(state_dir) / "claims").glob("*.json")):
        try:
            claim = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if isinstance(claim, dict) and claim.get("expires", 0) > now and "task" in claim:
            live[claim["task"]] = claim
    return live
