"""A loopback Hugging Face Hub for tests: the real ``huggingface_hub`` / ``datasets`` clients talk to it.

No machine here reaches huggingface.co, and mocking the client would test our assumptions about
the Hub instead of the Hub protocol.  This server implements only the endpoints those clients call
(create repo, repo info, refs, preupload, LFS batch + upload + verify, NDJSON commit, tag, tree,
paths-info, resolve, validate-yaml) with a real commit model: every commit is a snapshot of the
file tree under a sha1 id, branches and tags point at commit ids, and revisions resolve by branch,
tag, ``refs/...`` name or (prefix of a) commit id.  Errors carry the ``X-Error-Code`` headers the
client maps to ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``.

Xet is not implemented: clients must run with ``HF_HUB_DISABLE_XET=1`` (``client_env`` sets it),
which makes ``huggingface_hub`` use the classic LFS protocol.

Faults can be injected (``server.fail(...)``) to test retries and resumable uploads: an error
answer, a connection dropped before the request is handled, or one dropped after it was handled
(the commit landed, its answer was lost).  ``server.before(...)`` runs test code (a second client's
commit, say) just before a matching request is handled, and ``HubServer(honor_parent_commit=False)``
reproduces a Hub that accepted a commit without checking ``parentCommit`` (datasets#7708).  Every
request is recorded (method, path, status; never the token) in ``server.log``.

Usage::

    with HubServer() as hub:
        env = hub.client_env(tmp_path)          # HF_ENDPOINT, HF_HOME, HF_TOKEN, Xet off, ...
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

# The .gitattributes the Hub writes into a new repo (abridged to the patterns that matter here):
# these paths are stored with LFS whatever their size.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gz", "*.h5", "*.joblib", "*.lz4", "*.npy",
        "*.npz", "*.onnx", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors",
        "*.tar", "*.tar.*", "*.tgz", "*.zip", "*.zst", "*tfevents*", "*.jpg", "*.jpeg", "*.png",
        "*.webp", "*.mp3", "*.wav",
    )
)
LFS_PATTERNS = tuple(line.split()[0] for line in DEFAULT_GITATTRIBUTES.splitlines())
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores any file of 10 MB or more with LFS
REPO_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub calls ``oid`` / ``blobId`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------- storage model
@dataclass(frozen=True)
class Blob:
    """One file version: a regular git blob (``data``) or an LFS pointer (``lfs_sha256``)."""

    size: int
    data: bytes | None = None
    lfs_sha256: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def git_oid(self) -> str:
        if self.is_lfs:
            return git_blob_oid(lfs_pointer(self.lfs_sha256, self.size))
        return git_blob_oid(self.data)

    @property
    def etag(self) -> str:
        return self.lfs_sha256 if self.is_lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    description: str
    date: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: float
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content (the "bucket")

    def resolve(self, revision: str) -> Commit | None:
        """Branch, tag, ``refs/heads|tags/...``, full commit id or a unique prefix of >= 7 chars."""
        rev = revision
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix):
                oid = table.get(rev[len(prefix):])
                return self.commits.get(oid) if oid else None
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.tags:
            return self.commits[self.tags[rev]]
        if rev in self.commits:
            return self.commits[rev]
        if re.fullmatch(r"[0-9a-f]{7,39}", rev):
            hits = [c for oid, c in self.commits.items() if oid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None


class HubError(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` (optional) and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Fault:
    """Answer matching requests number ``after`` .. ``after + times - 1`` (0-based) with an error.

    ``status`` 0 drops the connection without an answer (a network failure): before the request is
    handled, or after it with ``handled=True`` (the change happened, the client never hears of it).
    ``run`` makes it a hook instead of a fault: the callable runs, then the request is handled normally.
    """

    method: str
    pattern: str  # regex searched in the request path
    status: int = 500
    after: int = 0
    times: int | None = 1  # None: every matching request from ``after`` on
    message: str = "Internal Error (injected by the test server)"
    headers: dict[str, str] = field(default_factory=dict)
    handled: bool = False
    run: Callable[[], None] | None = None
    seen: int = 0
    fired: int = 0

    def check(self, method: str, path: str) -> bool:
        if method != self.method or not re.search(self.pattern, path):
            return False
        index = self.seen
        self.seen += 1
        if index < self.after or (self.times is not None and index >= self.after + self.times):
            return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str  # path and query, URL-decoded
    status: int
    authenticated: bool  # whether a Bearer token came with it (the token itself is never kept)


# --------------------------------------------------------------------------- the server
class HubServer:
    """A Hub-compatible HTTP server on 127.0.0.1 with in-memory storage; use as a context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tree_page_size: int = 1000,
        max_body_bytes: int = 1 << 30,
        request_timeout_s: float = 60.0,
        honor_parent_commit: bool = True,
    ):
        self.tree_page_size = tree_page_size
        self.honor_parent_commit = honor_parent_commit
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.repos: dict[tuple[str, str], Repo] = {}
        self.faults: list[Fault] = []
        self.log: list[LoggedRequest] = []
        self.lock = threading.RLock()
        self._upload_secret = secrets.token_hex(8)  # "signs" the LFS upload URLs like S3 presigning
        self._clock = 0
        handler = type("Handler", (_Handler,), {"hub": self, "timeout": request_timeout_s})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle
    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test helpers
    def fail(self, method: str, pattern: str, status: int = 500, **kwargs: Any) -> Fault:
        """Inject a fault (see :class:`Fault`); returns it so a test can read ``fault.fired``."""
        fault = Fault(method=method.upper(), pattern=pattern, status=status, **kwargs)
        with self.lock:
            self.faults.append(fault)
        return fault

    def before(self, method: str, pattern: str, fn: Callable[[], None], after: int = 0, times: int | None = 1) -> Fault:
        """Run ``fn`` just before matching requests ``after`` .. ``after + times - 1`` are handled."""
        return self.fail(method, pattern, status=200, after=after, times=times, run=fn)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def requests(self, method: str | None = None, pattern: str | None = None) -> list[LoggedRequest]:
        with self.lock:
            return [
                r for r in self.log
                if (method is None or r.method == method) and (pattern is None or re.search(pattern, r.path))
            ]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> list[tuple[Commit, set[str]]]:
        """The commits leading to ``revision``, oldest first, each with the paths it added, changed or deleted."""
        repo = self.repo(repo_id, repo_type)
        commit = repo.resolve(revision)
        out = []
        while commit is not None:
            before = repo.commits[commit.parent].files if commit.parent else {}
            changed = {p for p in set(before) | set(commit.files) if before.get(p) != commit.files.get(p)}
            out.append((commit, changed))
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out[::-1]

    def files_at(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        """Every file of a revision with its content (LFS content resolved)."""
        repo = self.repo(repo_id, repo_type)
        commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return {p: (b.data if not b.is_lfs else repo.lfs[b.lfs_sha256]) for p, b in commit.files.items()}

    def client_env(self, home: str | os.PathLike, token: str = "hf_loopback_test_token") -> dict[str, str]:
        """Environment for a client process: this endpoint, Xet off, online, caches under ``home``."""
        home = Path(home)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0",
            HF_DATASETS_OFFLINE="0",
            HF_HOME=str(home / "hf_home"),
            HF_DATASETS_CACHE=str(home / "hf_datasets_cache"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
            HF_HUB_ETAG_TIMEOUT="30",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_TOKEN=token,
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            OMP_NUM_THREADS="1",
        )
        return env

    def run_client(self, code: str, home: str | os.PathLike, timeout: float = 180, **extra_env: str) -> str:
        """Run Python ``code`` in a fresh interpreter configured by :meth:`client_env`; return stdout.

        A subprocess is the faithful way: ``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT``
        and friends into module constants at import time.
        """
        env = self.client_env(home)
        env.update(extra_env)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"client process failed (rc={proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc.stdout

    # -- state transitions (called with the lock held)
    def _next_time(self) -> float:
        self._clock += 1
        return time.time() + self._clock * 1e-3

    def _commit(self, repo: Repo, branch: str, files: dict[str, Blob], title: str, description: str) -> Commit:
        parent = repo.branches.get(branch)
        date = self._next_time()
        h = hashlib.sha1()
        h.update(f"{repo.repo_type}/{repo.repo_id}\0{parent}\0{title}\0{description}\0{date}\0".encode())
        for path in sorted(files):
            h.update(f"{path}\0{files[path].git_oid}\n".encode())
        commit = Commit(h.hexdigest(), parent, dict(files), title, description, date)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def upload_url(self, repo: Repo, sha256: str) -> str:
        sig = hashlib.sha256(f"{self._upload_secret}:{repo.repo_id}:{sha256}".encode()).hexdigest()[:32]
        return f"{self.endpoint}/_lfs/{repo.repo_type}/{repo.repo_id}/{sha256}?sig={sig}"

    def check_upload_sig(self, repo: Repo, sha256: str, sig: str) -> bool:
        return secrets.compare_digest(self.upload_url(repo, sha256).rsplit("sig=", 1)[1], sig)


# --------------------------------------------------------------------------- request handling
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_TYPES = r"(?P<type>model|dataset|space)s"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    hub: HubServer  # set on the subclass made per server
    server_version = "LoopbackHub/1.0"

    # quiet: the default handler prints every request to stderr
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing
    def _dispatch(self, method: str) -> None:
        self._body_cache = None  # the handler object lives as long as the keep-alive connection
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = parse_qs(split.query, keep_blank_values=True)
        shown = unquote(self.path)
        authenticated = (self.headers.get("Authorization") or "").startswith("Bearer ")
        status = 500
        try:
            with self.hub.lock:
                fault = next((f for f in self.hub.faults if f.check(method, unquote(self.raw_path))), None)
            if fault is not None and fault.run is not None:
                fault.run()  # a hook: outside the lock, so it may itself call this server
                fault = None
            if fault is not None and fault.status == 0 and fault.handled:
                # handle the request, then lose the answer: the client sees a dropped connection
                answer, self.wfile = self.wfile, io.BytesIO()
                try:
                    self._route(method)
                finally:
                    self.wfile = answer
                status = 0
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault is not None:
                self._drain_body()
                if fault.status == 0:  # a dropped connection
                    status = 0
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                raise HubError(fault.status, fault.message, headers=fault.headers)
            status = self._route(method)
        except HubError as err:
            status = err.status
            self._send_error(err)
        except Exception as err:  # a bug in the server: answer 500 so the client does not hang
            status = 500
            self._send_error(HubError(500, f"loopback hub crashed: {type(err).__name__}: {err}"))
            raise
        finally:
            with self.hub.lock:
                self.hub.log.append(LoggedRequest(method, shown, status, authenticated))

    def _send_error(self, err: HubError) -> None:
        body = json.dumps({"error": err.message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message.splitlines()[0]}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(err.headers)
        self._send(err.status, body, headers)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k in (headers or {})):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> int:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})
        return status

    def _body(self) -> bytes:
        if getattr(self, "_body_cache", None) is not None:
            return self._body_cache
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > self.hub.max_body_bytes:
                    raise HubError(413, f"request body over {self.hub.max_body_bytes} bytes")
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
            data = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > self.hub.max_body_bytes:
                self.close_connection = True
                raise HubError(413, f"request body over {self.hub.max_body_bytes} bytes")
            data = self.rfile.read(length) if length else b""
        self._body_cache = data
        return data

    def _drain_body(self) -> None:
        try:
            self._body()
        except HubError:
            self.close_connection = True

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"null")
        except json.JSONDecodeError as err:
            raise HubError(400, f"request body is not JSON: {err}") from None

    def _require_token(self) -> None:
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo_id = unquote(repo_id)
        if write:
            self._require_token()
        repo = self.hub.repos.get((repo_type, repo_id))
        authenticated = (self.headers.get("Authorization") or "").startswith("Bearer ")
        if repo is None or (repo.private and not authenticated):
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", code="RevisionNotFound")
        return commit

    # -- routing
    def _route(self, method: str) -> int:
        p = self.raw_path
        hub = self.hub
        routes: list[tuple[str, str, Any]] = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", r"/api/whoami-v2", self._whoami),
            ("GET", rf"/api/{_TYPES}/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("GET", rf"/api/{_TYPES}/{_REPO}/refs", self._refs),
            ("POST", rf"/api/{_TYPES}/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/{_TYPES}/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", rf"/api/{_TYPES}/{_REPO}/tag/(?P<rev>[^/]+)", self._create_tag),
            ("DELETE", rf"/api/{_TYPES}/{_REPO}/tag/(?P<tag>[^/]+)", self._delete_tag),
            ("GET", rf"/api/{_TYPES}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
            ("POST", rf"/api/{_TYPES}/{_REPO}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("POST", r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch",
             self._lfs_batch),
            ("PUT", r"/_lfs/(?P<type>model|dataset|space)/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})",
             self._lfs_put),
            ("POST", r"/_lfs/(?P<type>model|dataset|space)/(?P<repo>[^/]+/[^/]+)/verify", self._lfs_verify),
            ("GET", r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
             self._resolve),
            ("HEAD", r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
             self._resolve),
        ]
        for route_method, pattern, fn in routes:
            if route_method != method:
                continue
            m = re.fullmatch(pattern, p)
            if m is None:
                continue
            args = {k: v for k, v in m.groupdict().items()}
            if method in ("POST", "PUT"):
                self._body()  # read the upload outside the lock: other requests keep being served
            if "prefix" in args:
                prefix = args.pop("prefix") or ""
                args["type"] = {"": "model", "datasets/": "dataset", "spaces/": "space"}[prefix]
            with hub.lock:
                return fn(**args)
        raise HubError(404, f"loopback hub: no route for {method} {unquote(p)}")

    # -- endpoints
    def _whoami(self) -> int:
        self._require_token()
        return self._json({"type": "user", "name": "loopback-user", "orgs": [], "auth": {"type": "access_token"}})

    def _create_repo(self) -> int:
        self._require_token()
        body = self._json_body() or {}
        name, org = body.get("name"), body.get("organization")
        repo_type = body.get("type") or "model"
        if not name or not org:
            raise HubError(400, "the loopback hub needs 'organization' and 'name' (use a repo id 'org/name')")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", org):
            raise HubError(400, f"Invalid repo name {org}/{name}")
        repo_id = f"{org}/{name}"
        url = f"{self.hub.endpoint}/{REPO_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            return self._json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = Repo(repo_type, repo_id, private, time.time())
        self.hub.repos[(repo_type, repo_id)] = repo
        attrs = DEFAULT_GITATTRIBUTES.encode()
        self.hub._commit(repo, "main", {".gitattributes": Blob(len(attrs), data=attrs)}, "initial commit", "")
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> int:
        body = self._json_body() or {}
        content = body.get("content") or ""
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as err:
                return self._json({"errors": [{"message": f"Invalid YAML in README.md metadata: {err}"}]}, 400)
            if meta is not None and not isinstance(meta, dict):
                return self._json({"errors": [{"message": "README.md metadata must be a YAML mapping"}]}, 400)
        return self._json({"errors": [], "warnings": []})

    def _card_data(self, repo: Repo, commit: Commit) -> dict | None:
        blob = commit.files.get("README.md")
        if blob is None or blob.is_lfs:
            return None
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", blob.data.decode("utf-8", "replace"), re.S)
        if not m:
            return None
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError:
            return None
        return meta if isinstance(meta, dict) else None

    def _repo_info(self, type: str, repo: str, rev: str | None = None) -> int:  # noqa: A002
        r = self._repo(type, repo)
        commit = self._commit_at(r, rev or "main")
        blobs = (self.query.get("blobs") or ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            b = commit.files[path]
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=b.size, blobId=b.git_oid)
                if b.is_lfs:
                    entry["lfs"] = {"size": b.size, "sha256": b.lfs_sha256,
                                    "pointerSize": len(lfs_pointer(b.lfs_sha256, b.size))}
            siblings.append(entry)
        info = {
            "_id": hashlib.sha1(r.repo_id.encode()).hexdigest()[:24],
            "id": r.repo_id,
            "author": r.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(r.created),
            "private": r.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        card = self._card_data(r, commit)
        if card is not None:
            info["cardData"] = card
        return self._json(info)

    def _refs(self, type: str, repo: str) -> int:  # noqa: A002
        r = self._repo(type, repo)

        def refs(table: dict[str, str], kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(table.items())]

        return self._json(
            {"branches": refs(r.branches, "heads"), "converts": [], "tags": refs(r.tags, "tags"), "pullRequests": []}
        )

    def _preupload(self, type: str, repo: str, rev: str) -> int:  # noqa: A002
        r = self._repo(type, repo, write=True)
        commit = self._commit_at(r, rev)
        body = self._json_body() or {}
        files = []
        for f in body.get("files") or []:
            path, size = f["path"], int(f["size"])
            sample = base64.b64decode(f.get("sample") or "")
            lfs = (
                size >= LFS_SIZE_THRESHOLD
                or any(fnmatch(path.rsplit("/", 1)[-1], pat) or fnmatch(path, pat) for pat in LFS_PATTERNS)
                or b"\0" in sample  # binary content goes to LFS, as on the Hub
            )
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if existing.is_lfs else existing.git_oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return self._json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, type: str, repo: str) -> int:  # noqa: A002
        r = self._repo(type, repo, write=True)
        body = self._json_body() or {}
        if body.get("operation") != "upload":
            raise HubError(400, "the loopback hub only implements LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in body.get("objects") or []:
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in r.lfs:  # already stored objects get no actions: the client skips them
                entry["actions"] = {
                    "upload": {"href": self.hub.upload_url(r, oid), "header": {}},
                    "verify": {"href": f"{self.hub.endpoint}/_lfs/{r.repo_type}/{r.repo_id}/verify", "header": {}},
                }
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                          headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, type: str, repo: str, oid: str) -> int:  # noqa: A002
        r = self.hub.repos.get((type, unquote(repo)))
        sig = (self.query.get("sig") or [""])[0]
        if r is None or not self.hub.check_upload_sig(r, oid, sig):
            raise HubError(403, "upload URL signature does not match")
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not hash to {oid}")
        r.lfs[oid] = data
        etag = hashlib.md5(data).hexdigest()  # noqa: S324 - S3 ETag semantics, not security
        self._send(200, b"", {"ETag": f'"{etag}"'})
        return 200

    def _lfs_verify(self, type: str, repo: str) -> int:  # noqa: A002
        r = self._repo(type, repo, write=True)
        body = self._json_body() or {}
        data = r.lfs.get(body.get("oid", ""))
        if data is None or len(data) != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} was not uploaded (or has another size)")
        return self._json({"success": True})

    def _commit(self, type: str, repo: str, rev: str) -> int:  # noqa: A002
        r = self._repo(type, repo, write=True)
        branch = unquote(rev).removeprefix("refs/heads/")
        if branch not in r.branches:
            raise HubError(400 if r.resolve(branch) else 404, f"Invalid rev id: {branch} is not a branch",
                           code=None if r.resolve(branch) else "RevisionNotFound")
        if self.query.get("create_pr"):
            raise HubError(400, "the loopback hub does not implement pull requests")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        head = r.branches[branch]
        parent = header.get("parentCommit")
        if parent and not head.startswith(parent) and self.hub.honor_parent_commit:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(r.commits[head].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                files[path] = Blob(len(data), data=data)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in r.lfs:
                    raise HubError(400, f"LFS file {path}: object {oid} was never uploaded (upload it first)")
                files[path] = Blob(len(r.lfs[oid]), lfs_sha256=oid)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self.hub._commit(r, branch, files, header.get("summary") or "", header.get("description") or "")
        url = f"{self.hub.endpoint}/{REPO_PREFIX[r.repo_type]}{r.repo_id}/commit/{commit.oid}"
        return self._json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _create_tag(self, type: str, repo: str, rev: str) -> int:  # noqa: A002
        r = self._repo(type, repo, write=True)
        commit = self._commit_at(r, rev)
        tag = (self._json_body() or {}).get("tag")
        if not tag or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", tag):
            raise HubError(400, f"Invalid tag name {tag!r}")
        if tag in r.tags:
            raise HubError(409, f"Tag {tag} already exists")
        r.tags[tag] = commit.oid
        return self._json({})

    def _delete_tag(self, type: str, repo: str, tag: str) -> int:  # noqa: A002
        r = self._repo(type, repo, write=True)
        if r.tags.pop(unquote(tag), None) is None:
            raise HubError(404, f"Invalid rev id: {unquote(tag)}", code="RevisionNotFound")
        return self._json({})

    # -- tree listing
    def _entries(self, r: Repo, commit: Commit, expand: bool) -> dict[str, dict]:
        """Every file and folder of a commit as the Hub's tree entries, keyed by path."""
        entries: dict[str, dict] = {}
        folders: dict[str, list[str]] = {}
        for path, b in commit.files.items():
            e: dict[str, Any] = {"type": "file", "oid": b.git_oid, "size": b.size, "path": path}
            if b.is_lfs:
                e["lfs"] = {"oid": b.lfs_sha256, "size": b.size, "pointerSize": len(lfs_pointer(b.lfs_sha256, b.size))}
            entries[path] = e
            parts = path.split("/")
            for i in range(1, len(parts)):
                folders.setdefault("/".join(parts[:i]), []).append(f"{path}:{b.git_oid}")
        for folder, children in folders.items():
            oid = hashlib.sha1("\n".join(sorted(children)).encode()).hexdigest()
            entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
        if expand:
            last = {"id": commit.oid, "title": commit.title, "date": _iso(commit.date)}
            for e in entries.values():
                e["lastCommit"] = last
        return entries

    def _tree(self, type: str, repo: str, rev: str, path: str | None = None) -> int:  # noqa: A002
        r = self._repo(type, repo)
        commit = self._commit_at(r, rev)
        path = unquote(path or "").strip("/")
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        expand = (self.query.get("expand") or ["false"])[0].lower() in ("1", "true")
        entries = self._entries(r, commit, expand)
        if path and (path not in entries or entries[path]["type"] != "directory"):
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        prefix = f"{path}/" if path else ""
        listed = [
            e for p, e in sorted(entries.items())
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])
        ]
        # Cursor pagination with a Link header, as the Hub (1000 entries a page, 50 with expand)
        page_size = min(self.hub.tree_page_size, 50) if expand else self.hub.tree_page_size
        start = int((self.query.get("cursor") or ["0"])[0] or 0)
        page = listed[start:start + page_size]
        headers = {}
        if start + page_size < len(listed):
            q = f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={start + page_size}"
            headers["Link"] = f'<{self.hub.endpoint}{self.raw_path}?{q}>; rel="next"'
        return self._json(page, headers=headers)

    def _paths_info(self, type: str, repo: str, rev: str) -> int:  # noqa: A002
        r = self._repo(type, repo)
        commit = self._commit_at(r, rev)
        ctype = self.headers.get("Content-Type") or ""
        body = self._body().decode()
        if "json" in ctype:
            form = json.loads(body or "{}")
            paths, expand = form.get("paths") or [], bool(form.get("expand"))
        else:
            form = parse_qs(body, keep_blank_values=True)
            paths = form.get("paths") or []
            expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        entries = self._entries(r, commit, expand)
        out = [entries[p.strip("/")] for p in paths if p.strip("/") in entries]
        return self._json(out)

    # -- downloads
    def _resolve(self, type: str, repo: str, rev: str, path: str) -> int:  # noqa: A002
        r = self._repo(type, repo)
        commit = self._commit_at(r, rev)
        path = unquote(path)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        data = r.lfs[blob.lfs_sha256] if blob.is_lfs else blob.data
        headers = {
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if blob.is_lfs:
            headers["X-Linked-Etag"] = f'"{blob.lfs_sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m is None or (m.group(1) == "" and m.group(2) == ""):
                raise HubError(416, f"Invalid Range header {rng!r}", headers={"Content-Range": f"bytes */{len(data)}"})
            if m.group(1) == "":  # suffix range: the last N bytes
                start, end = max(0, len(data) - int(m.group(2))), len(data) - 1
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            if start >= len(data) or start > end:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            data = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
            status = 206
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers)
        return status


# --------------------------------------------------------------------------- pytest glue
try:
    import pytest
except ImportError:  # pragma: no cover - the module is importable without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def hub_server() -> Iterator[HubServer]:
        """A fresh loopback Hub per test, on a free port."""
        with HubServer() as hub:
            yield hub
