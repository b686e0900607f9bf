"""Publish a build to the Hugging Face Hub: versioned, resumable, safe to re-run.

``publish`` uploads a build folder (DESIGN.md's output layout) to a dataset repo and tags the
version.  Re-running the same command is how an interrupted upload resumes: files already on the
remote with the same content (compared by sha256 / git blob id) are not uploaded again, the rest
goes up in several commits, and LFS objects that reached storage before an interruption are
skipped by the Hub's LFS batch answer.  A tag is never moved: publishing a different build
(fingerprint) under an existing tag is an error.

What it may touch: a repo whose ``main`` is empty or already holds a fillup-data build of the same
``name``; anything else is refused before a byte is sent.  Every commit names its parent
(``parent_commit``), so a commit someone else made meanwhile makes ours fail instead of
interleaving, and the tag goes on a commit only after its tree was checked file by file against
this build.  A new repo is private unless ``--public`` (or a recipe's ``publish.private: false``
where the schema can tell it from the default) says otherwise.

Only the build's own outputs leave the machine: ``README.md`` (re-rendered for what the repo holds),
``manifest.json`` (with the publisher's local source paths replaced), ``index.parquet``, the shards
and token files the manifest lists and the figures the build wrote for the card.  Build state,
reports with local paths and work folders stay home.  Real images (ImageNet, Places, iNaturalist may
not be redistributed) are left out unless asked for.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from fillup_data.errors import FillupError

# Commits of at most this many files / bytes: a failure loses at most one batch of commit work.  The Hub
# allows ~128 commits an hour per repo (a 429 beyond that is waited out: its Retry-After is honoured); an
# iNaturalist-shaped build with a quality report is ~45,000 files (two token files and three report
# figures per class), 180 commits at 250 files, which is where huggingface_hub's own upload pipeline starts
# its commit size (it goes up to 1,000 when commits are quick); at 50 files it was 900 commits, 7 hours.
MAX_FILES_PER_COMMIT = 250
MAX_BYTES_PER_COMMIT = 50 * 1024**3
MAX_FILES_PER_FOLDER = 10_000  # the Hub refuses more files in one folder
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
COMMIT_RACE_STATUS = 412  # "A commit has happened since": main is no longer the parent_commit we named
# What replaces a local path of the publisher's machine in the uploaded manifest.
NOT_PUBLISHED = "<local path, not published>"


@dataclass
class PublishResult:
    """What ``publish`` did (or, with ``dry_run``, would do); ``load_line`` is the ``load_dataset`` call."""

    repo_id: str
    url: str
    tag: str
    commit: str
    include_real: bool
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    excluded_real: list[str] = field(default_factory=list)
    already_published: bool = False
    dry_run: bool = False
    private: bool | None = None
    retries: int = 0  # retries made by publish itself (the client may retry some requests on its own)

    @property
    def load_line(self) -> str:
        return f'load_dataset("{self.repo_id}", revision="{self.tag}")'


@dataclass(frozen=True)
class _LocalFile:
    path: str  # path in the repo (posix)
    source: Path | None  # where the bytes are on disk, or None when they are in ``data``
    size: int
    sha256: str | None = None  # known from the manifest (shards, tokens); else computed in plan_files
    data: bytes | None = None  # made here, never written to the build folder (card, public manifest)

    def read(self) -> bytes:
        return self.data if self.data is not None else self.source.read_bytes()

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> "_LocalFile":
        return cls(path, None, len(data), hashlib.sha256(data).hexdigest(), data)


# --------------------------------------------------------------------------- what to upload
def _read_manifest(out: Path) -> dict:
    """The build's manifest, checked against the contract, in its JSON form (what the card and the
    upload read); publishing also needs every shard's size."""
    from fillup_data.schema.manifest import Manifest

    path = out / "manifest.json"
    manifest = Manifest.read(path)
    for i, s in enumerate(manifest.shards):
        if s.num_bytes is None:
            raise FillupError(f"{path}: shards[{i}] has no 'num_bytes'; rebuild with `fillup-data build`")
    return manifest.to_dict()


def _is_real(shard: dict) -> bool:
    # origin is the contract; the file name is a second guard for shards the manifest mislabels
    return shard["origin"] == "real" or "-real-" in PurePosixPath(shard["path"]).name


def _manifest_file(out: Path, rel: str, num_bytes: int, what: str) -> Path:
    p = out / rel
    if not p.is_file():
        raise FillupError(f"{p}: {what} listed in manifest.json is missing; relaunch the build to finish it")
    if p.stat().st_size != num_bytes:
        raise FillupError(
            f"{p}: {p.stat().st_size} bytes but manifest.json says {num_bytes}: the {what} changed after the build; "
            f"run `fillup-data inspect {out}` and rebuild"
        )
    return p


def plan_files(out: Path, manifest: dict, include_real: bool) -> tuple[list[_LocalFile], list[str], list[str]]:
    """The build's own outputs that go to the repo, the real shards left out, and card figures not found.

    Shards and tokens come from the manifest, the figures from ``card_figures`` (what the build drew
    for the card): nothing is picked by reading links, so a class name or card text that links
    ``report.json`` or ``../../etc/passwd`` uploads nothing.  README.md and manifest.json are added
    by ``publish`` (both are rewritten for the repo).
    """
    from fillup_data.shards.card import card_figures

    files: list[_LocalFile] = []
    excluded: list[str] = []
    for s in manifest["shards"]:
        if _is_real(s) and not include_real:
            excluded.append(s["path"])
            continue
        p = _manifest_file(out, s["path"], s["num_bytes"], "shard")
        files.append(_LocalFile(s["path"], p, s["num_bytes"], s.get("sha256") or _sha256(p)))
    listed = {f.path for f in files} | set(excluded)
    # a real shard lying in data/ without a manifest entry must not slip through either
    for p in sorted((out / "data").glob("*.tar")) if (out / "data").is_dir() else []:
        rel = f"data/{p.name}"
        if rel not in listed:
            raise FillupError(f"{p}: shard not listed in manifest.json; remove it or rebuild so the manifest lists it")
    # tokens/NNNNN.safetensors (every checkpoint) and tokens/diffusers/NNNNN.safetensors (load_textual_inversion)
    for t in manifest.get("tokens") or []:
        p = _manifest_file(out, t["path"], t["num_bytes"], "token file")
        files.append(_LocalFile(t["path"], p, t["num_bytes"], t.get("sha256") or _sha256(p)))
    # prompts/NNNNN.json: the prompts lm_prompts / captions generated from (checked under prompts/ by the manifest)
    for t in manifest.get("prompts") or []:
        p = _manifest_file(out, t["path"], t["num_bytes"], "prompts file")
        files.append(_LocalFile(t["path"], p, t["num_bytes"], t.get("sha256") or _sha256(p)))
    # the quality report: the files manifest.json lists (fillup_data.quality.report), real-pixel grids only with real
    from fillup_data.quality.report import report_files

    for rel, content in report_files(out, manifest, include_real)[0]:
        files.append(_LocalFile(rel, content, content.stat().st_size, _sha256(content)) if isinstance(content, Path)
                     else _LocalFile.from_bytes(rel, content))
    missing = []
    for rel in ["index.parquet"] + card_figures(manifest, include_real):
        p = out / rel
        if p.is_file():
            files.append(_LocalFile(rel, p, p.stat().st_size, _sha256(p)))
        else:
            missing.append(rel)
    per_folder: dict[str, int] = {}
    for f in files:
        folder = str(PurePosixPath(f.path).parent)
        per_folder[folder] = per_folder.get(folder, 0) + 1
    for folder, n in per_folder.items():
        if n > MAX_FILES_PER_FOLDER:
            raise FillupError(
                f"{out / folder}: {n} files to publish, the Hub takes at most {MAX_FILES_PER_FOLDER} per folder; "
                "rebuild with fewer, larger shards (raise shards.max_samples in the recipe)"
            )
    return files, excluded, missing


def _looks_local(path: Any) -> bool:
    return isinstance(path, str) and (
        PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()
        or path.startswith(("./", "../", "~", ".\\", "..\\"))
    )


def public_manifest(manifest: dict, raw: bytes) -> tuple[bytes, list[str]]:
    """The manifest as uploaded, and the fields replaced: no local path of the publisher's machine.

    ``recipe.source.root`` (and an ``hf_dataset`` source given as a local path) name folders on the
    publisher's disk.  Neither is in the fingerprint, so the published build keeps its identity.  The
    local manifest.json is not touched; when nothing is replaced, its bytes go up unchanged.
    """
    source = (manifest.get("recipe") or {}).get("source") or {}
    fields = [key for key in ("root", "path")
              if key in source and source[key] != NOT_PUBLISHED
              and (key == "root" or (source.get("kind") == "hf_dataset" and _looks_local(source[key])))]
    if not fields:
        return raw, []
    public = copy.deepcopy(manifest)
    for key in fields:
        public["recipe"]["source"][key] = NOT_PUBLISHED
    return (json.dumps(public, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), [f"recipe.source.{k}" for k in fields]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _same_as_remote(local: _LocalFile, remote: Any) -> bool:
    """Compare by content: sha256 for LFS files, git blob id for regular ones (as the Hub stores them)."""
    if remote is None or getattr(remote, "size", None) != local.size:
        return False
    if remote.lfs is not None:
        return local.sha256 == remote.lfs.sha256
    return _git_blob_oid(local.read()) == remote.blob_id


def _batches(files: list[_LocalFile], max_files: int, max_bytes: int) -> list[list[_LocalFile]]:
    batches, cur, cur_bytes = [], [], 0
    for f in files:
        if cur and (len(cur) >= max_files or cur_bytes + f.size > max_bytes):
            batches.append(cur)
            cur, cur_bytes = [], 0
        cur.append(f)
        cur_bytes += f.size
    if cur:
        batches.append(cur)
    return batches


# --------------------------------------------------------------------------- retries
def _status(err: BaseException | None) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: BaseException) -> bool:
    """429/5xx or a lost connection, anywhere in the exception chain.

    A commit race (412) is not: retrying with the same ``parent_commit`` fails again, and retrying
    with a new one would stack our files on someone else's commit.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = _status(err)
        if status in TRANSIENT_STATUS:
            return True
        names = {c.__name__ for c in type(err).__mro__}
        if names & {"TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError", "ConnectionError"}:
            return True
        err = err.__cause__ or err.__context__
    return False


def _retry_after(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _Retrier:
    """Runs one Hub call, retrying transient errors with exponential backoff, and counts its retries.

    The count is publish's own: ``huggingface_hub`` retries some requests itself (LFS uploads, the
    preupload call), and how many depends on its version.
    """

    def __init__(self, max_retries: int, base_delay: float, log: Callable[[str], None]):
        self.max_retries, self.base_delay, self.log = max_retries, base_delay, log
        self.retries = 0

    def __call__(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except FillupError:
                raise
            except Exception as err:  # noqa: BLE001 - classified below, re-raised when not transient
                transient = _is_transient(err)
                if not transient or attempt == self.max_retries:
                    raise _as_fillup_error(what, err, transient, attempts=attempt + 1) from err
                delay = min(_retry_after(err) or self.base_delay * 2**attempt, 300.0)
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self.log(f"  {what}: {first}; retrying in {delay:.1f}s ({attempt + 1}/{self.max_retries})")
                self.retries += 1
                time.sleep(delay)
        raise AssertionError("unreachable")


def _as_fillup_error(what: str, err: BaseException, transient: bool, attempts: int) -> FillupError:
    status = _status(err)
    detail = str(err).strip() or type(err).__name__
    if status == 401:
        hint = "the Hub did not accept the token: log in with `hf auth login` or set HF_TOKEN to a write token"
    elif status == 403:
        hint = "the token cannot write to this repo: use a token with write access to the namespace"
    elif transient:
        hint = "the Hub kept failing; run the same command again later: it resumes where it stopped"
    else:
        hint = "run the same command again to resume; files already uploaded are not sent twice"
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return FillupError(f"{what} failed{tries}: {detail}\n{hint}")


# --------------------------------------------------------------------------- visibility and ownership
def requested_visibility(private: bool | None, manifest: dict) -> tuple[bool, str]:
    """(private?, who said so): ``--private``/``--public``, else the recipe's ``publish.private``
    (None when the recipe does not say), else private."""
    if private is not None:
        return private, "--private" if private else "--public"
    said = (manifest["recipe"].get("publish") or {}).get("private")
    if said is True:
        return True, "the recipe's publish.private: true"
    if said is False:
        return False, "the recipe's publish.private: false"
    return True, "the default (private unless --public)"


def _repo_info(api, repo_id: str, retry: _Retrier):
    """The repo's info at main (``.sha``, ``.private``), or None when it does not exist (for this token)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    def info():
        try:
            return api.dataset_info(repo_id)
        except RepositoryNotFoundError:
            return None

    return retry("reading the repo", info)


def _check_visibility(info, want_private: bool, why: str, url: str) -> None:
    if info.private is None or bool(info.private) == want_private:
        return
    have, want = ("private", "public") if info.private else ("public", "private")
    flag = "--private" if info.private else "--public"
    raise FillupError(
        f"{url} is {have}, but this publish asks for {want} ({why}); publish never changes a repo's visibility: "
        f"pass {flag} to publish into it as it is, change its visibility in the repo's settings on the Hub, "
        "or publish to another --repo"
    )


def _download_json(api, repo_id: str, path: str, revision: str, retry: _Retrier, what: str) -> Any:
    """A JSON file of the repo at ``revision``; None when absent, ``...`` when it is not JSON."""
    from huggingface_hub.errors import EntryNotFoundError

    def fetch():
        with tempfile.TemporaryDirectory(prefix="fillup-hub-") as tmp:
            try:
                local = api.hf_hub_download(repo_id, path, repo_type="dataset", revision=revision, cache_dir=tmp)
            except EntryNotFoundError:
                return None
            try:
                return json.loads(Path(local).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return ...

    return retry(what, fetch)


def _check_repo_holds_this_dataset(api, repo_id: str, head: str, remote: dict, manifest: dict,
                                   ours: list[_LocalFile], url: str, retry: _Retrier) -> None:
    """Refuse a repo whose main holds anything but nothing, .gitattributes, a build of this dataset or
    files of this very build (an interrupted publish of it, which a re-run resumes).

    Publishing deletes data/ and tokens/ files that are not this build's and replaces README.md:
    on someone else's dataset that is data loss.
    """
    held = sorted(set(remote) - {".gitattributes"})
    by_path = {f.path: f for f in ours}
    if all(p in by_path and _same_as_remote(by_path[p], remote[p]) for p in held):
        return
    shown = ", ".join(held[:5]) + (f", ... ({len(held)} files)" if len(held) > 5 else "")
    replace = (f"publishing {manifest['name']!r} would delete its data/ and tokens/ files and replace its README.md. "
               "Publish to a new --repo, or empty this repo on the Hub first if you mean to replace what it holds")
    if "manifest.json" not in remote:
        raise FillupError(f"{url}: main already holds {shown} and no fillup-data manifest.json; {replace}")
    theirs = _download_json(api, repo_id, "manifest.json", head, retry, "reading manifest.json on main")
    if not isinstance(theirs, dict) or not {"name", "version", "fingerprint", "shards"} <= set(theirs):
        raise FillupError(f"{url}: main holds {shown} and its manifest.json is not a fillup-data manifest; {replace}")
    if theirs["name"] != manifest["name"]:
        raise FillupError(
            f"{url}: main holds the fillup-data dataset {theirs['name']!r} (version {theirs['version']}), this build "
            f"is {manifest['name']!r}; one dataset per repo: publish {manifest['name']!r} to another --repo, or empty "
            "this repo on the Hub first if you mean to replace it"
        )


def _remote_files(api, repo_id: str, revision: str | None, retry: _Retrier) -> dict[str, Any]:
    """Every file of ``revision`` (one tree listing, paginated by the client); {} for a repo without commits."""
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    if revision is None:
        return {}

    def listing():
        try:
            return {e.path: e for e in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True,
                                                          revision=revision)
                    if isinstance(e, RepoFile)}
        except RevisionNotFoundError:
            return {}

    return retry("listing the remote files", listing)


def _mismatches(tree: dict[str, Any], files: list[_LocalFile]) -> list[str]:
    """How the tree differs from the build: files that differ or are missing, and data/tokens not of this build."""
    ours = {f.path for f in files}
    wrong = [f"{f.path} ({'missing' if f.path not in tree else 'other content'})"
             for f in files if not _same_as_remote(f, tree.get(f.path))]
    extra = [f"{p} (not in this build)" for p in sorted(tree)
             if p.split("/", 1)[0] in ("data", "tokens", "prompts") and p not in ours]
    return wrong + extra


# --------------------------------------------------------------------------- publish
def publish(
    out_dir: str | Path,
    repo_id: str,
    tag: str | None = None,
    private: bool | None = None,
    include_real: bool | None = None,
    token: str | None = None,
    max_retries: int = 5,
    progress: bool = True,
    *,
    dry_run: bool = False,
    endpoint: str | None = None,
    retry_base_delay: float = 2.0,
    max_files_per_commit: int = MAX_FILES_PER_COMMIT,
    max_bytes_per_commit: int = MAX_BYTES_PER_COMMIT,
    log: Callable[[str], None] = print,
) -> PublishResult:
    """Upload the build in ``out_dir`` to the dataset repo ``repo_id`` and tag it (default ``v`` + version).

    Safe to re-run: it uploads only what the remote lacks, and a tag that already holds this build
    (same fingerprint) is reported as already published.  ``private``: True/False say private/public;
    None takes the recipe's ``publish.private`` when it says true, else private.  ``dry_run`` reads
    the repo and reports what would be uploaded and deleted, changing nothing.  ``token`` defaults to
    the logged-in one.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from fillup_data.progress import progress_bar, track
    from fillup_data.shards.card import render_card

    out = Path(out_dir)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", repo_id or ""):
        raise FillupError(f"--repo {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    manifest = _read_manifest(out)
    version = manifest["version"]
    tag = tag or f"v{version}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
        raise FillupError(f"--tag {tag!r}: a tag is letters, digits, '.', '_' and '-' (e.g. v{version})")
    if include_real is None:
        include_real = bool(manifest["recipe"].get("publish", {}).get("include_real", False))
    if not include_real and not any(not _is_real(s) for s in manifest["shards"]):
        raise FillupError(
            f"{out} holds only real images and real images are excluded from publishing (their licence may not "
            "allow redistribution): pass --include-real if you may redistribute them, or build synthetic shards"
        )
    want_private, why_private = requested_visibility(private, manifest)
    # The card is refreshed for what the repo will hold (without real shards the default config is
    # the synthetic train split) and names the repo in its load_dataset line.
    card = render_card(manifest, include_real=include_real, repo_id=repo_id).encode("utf-8")
    data, excluded, missing_figures = plan_files(out, manifest, include_real)
    manifest_bytes, replaced = public_manifest(manifest, (out / "manifest.json").read_bytes())
    final = [_LocalFile.from_bytes("README.md", card), _LocalFile.from_bytes("manifest.json", manifest_bytes)]

    api = HfApi(endpoint=endpoint, token=token)
    url = f"{api.endpoint}/datasets/{repo_id}"
    retry = _Retrier(max_retries, retry_base_delay, log)
    visibility = "private" if want_private else "public"
    log(f"{'dry run, nothing changes: ' if dry_run else ''}publishing {out} -> {url} (tag {tag}, "
        f"real images {'included' if include_real else 'excluded'})")
    if excluded:
        log(f"  leaving out {len(excluded)} real-image shard(s); pass --include-real to publish them")
    if replaced:
        log(f"  the uploaded manifest.json has {', '.join(replaced)} replaced by {NOT_PUBLISHED!r} (a local path)")
    for rel in missing_figures:
        log(f"  {out / rel}: figure not found, the card's image will be broken; rebuild to draw it")

    def result(**kw) -> PublishResult:
        return PublishResult(repo_id=repo_id, url=url, tag=tag, include_real=include_real, excluded_real=excluded,
                             dry_run=dry_run, private=want_private, retries=retry.retries, **kw)

    info = _repo_info(api, repo_id, retry)
    if info is None and not dry_run:
        retry("creating the repo",
              lambda: api.create_repo(repo_id, repo_type="dataset", private=want_private, exist_ok=True))
        log(f"  created {visibility} dataset repo {url} ({why_private})")
        info = _repo_info(api, repo_id, retry)
        if info is None:
            raise FillupError(f"{url}: created but not readable with this token; check its access to the namespace")
    if info is None:
        log(f"  would create {visibility} dataset repo {url} ({why_private})")
        head, remote = None, {}
    else:
        # An existing repo keeps its visibility: a mismatch is the user's call, never ours.
        _check_visibility(info, want_private, why_private, url)
        # 1. Never move a tag: an existing tag must hold this very build.
        refs = retry("listing tags", lambda: api.list_repo_refs(repo_id, repo_type="dataset"))
        tagged = {t.name: t.target_commit for t in refs.tags}
        if tag in tagged:
            done = _check_existing_tag(api, repo_id, tag, tagged[tag], manifest, data, include_real, url, retry)
            log(f"already published: {url} tag {tag} holds this build (fingerprint {manifest['fingerprint'][:12]})")
            log(f"  {done.load_line}")
            return result(commit=done.commit, unchanged=done.unchanged, already_published=True)
        # 2. Only an empty repo or one holding this dataset; what it has (by content) and what is stale.
        head = info.sha
        remote = _remote_files(api, repo_id, head, retry)
        _check_repo_holds_this_dataset(api, repo_id, head, remote, manifest, data + final, url, retry)

    unchanged, todo = [], []
    for f in track(data, desc="compare with remote", unit="file", enabled=progress and bool(data)):
        (unchanged if _same_as_remote(f, remote.get(f.path)) else todo).append(f)
    keep = {f.path for f in data} | {"README.md", "manifest.json"}
    # Files of an earlier version under data/ and tokens/ would be picked up by the card's globs.
    stale = sorted(p for p in remote if p.split("/", 1)[0] in ("data", "tokens", "quality", "prompts") and p not in keep)
    final_todo = [f for f in final if not _same_as_remote(f, remote.get(f.path))]
    todo_bytes = sum(f.size for f in todo)
    log(f"  {len(todo)} file(s) to upload ({todo_bytes / 1e6:.1f} MB), {len(unchanged)} already on the Hub"
        + (f", {len(stale)} stale to delete" if stale else ""))
    if dry_run:
        for f in todo + final_todo:
            log(f"  would upload {f.path} ({f.size:,} bytes)")
        for p in stale:
            log(f"  would delete {p}")
        log(f"  would tag the last commit {tag}")
        return result(commit="", uploaded=[f.path for f in todo + final_todo],
                      unchanged=[f.path for f in unchanged + [f for f in final if f not in final_todo]], deleted=stale)

    # 3. Data in batches of commits; card + manifest (+ deletions) in the last commit, so a manifest
    #    on main means the upload finished.  Each commit names its parent: a commit someone else made
    #    meanwhile fails ours (412) instead of interleaving with it.  (A retried commit whose first
    #    answer was lost is found unchanged by the client's preupload check and not sent again.)
    def commit(ops: Callable[[], list], message: str, what: str) -> str:
        return retry(what, lambda: api.create_commit(
            repo_id, ops(), repo_type="dataset", commit_message=message, parent_commit=head)).oid

    def add(f: _LocalFile):
        return CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.data if f.data is not None else str(f.source))

    uploaded: list[str] = []
    batches = _batches(todo, max_files_per_commit, max_bytes_per_commit)
    bar = progress_bar(todo_bytes, "upload", "B", enabled=progress and bool(todo), unit_scale=True)
    try:
        for i, batch in enumerate(batches, 1):
            what = f"uploading batch {i}/{len(batches)} ({len(batch)} files)"
            head = commit(lambda batch=batch: [add(f) for f in batch],
                          f"{manifest['name']} {version}: upload part {i}/{len(batches)}", what)
            uploaded += [f.path for f in batch]
            bar.update(sum(f.size for f in batch))
    except FillupError as err:
        if _status(err.__cause__) == COMMIT_RACE_STATUS:
            raise _race_error(url, head) from err
        raise
    finally:
        bar.close()

    if final_todo or stale:
        try:
            head = commit(lambda: [add(f) for f in final_todo] + [CommitOperationDelete(p) for p in stale],
                          f"{manifest['name']} {version} (fingerprint {manifest['fingerprint'][:12]})",
                          "uploading the card and manifest")
        except FillupError as err:
            if _status(err.__cause__) == COMMIT_RACE_STATUS:
                raise _race_error(url, head) from err
            raise
        uploaded += [f.path for f in final_todo]
    unchanged += [f for f in final if f not in final_todo]

    # 4. Check the commit holds this build, file by file (sha256 of LFS files against the manifest),
    #    before it gets a tag: a tag is forever.
    wrong = _mismatches(_remote_files(api, repo_id, head, retry), data + final)
    if wrong:
        raise FillupError(
            f"{url}: commit {head[:12]} on main does not hold this build, so it was not tagged {tag}: "
            f"{'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. Someone else committed to the repo while "
            "publishing; run the same command again once they are done: it uploads what differs"
        )

    # 5. Tag the commit we checked.  Losing a race to another publisher of the same tag is checked
    #    like an existing tag, never overwritten.
    try:
        retry(f"creating tag {tag}", lambda: api.create_tag(
            repo_id, tag=tag, revision=head, repo_type="dataset",
            tag_message=f"{manifest['name']} {version} fingerprint {manifest['fingerprint']}"))
    except FillupError as err:
        if _status(err.__cause__) != 409:
            raise
        refs = retry("listing tags", lambda: api.list_repo_refs(repo_id, repo_type="dataset"))
        tagged = {t.name: t.target_commit for t in refs.tags}
        _check_existing_tag(api, repo_id, tag, tagged[tag], manifest, data, include_real, url, retry)

    done = result(commit=head, uploaded=uploaded, unchanged=[f.path for f in unchanged], deleted=stale)
    log(f"published {url} tag {tag} (commit {head[:12]}): {len(uploaded)} file(s) uploaded, "
        f"{len(done.unchanged)} unchanged" + (f", {len(stale)} deleted" if stale else ""))
    log(f"load it with:\n  from datasets import load_dataset\n  ds = {done.load_line}")
    return done


def _race_error(url: str, head: str | None) -> FillupError:
    return FillupError(
        f"{url}: another commit landed on main while publishing (after {str(head)[:12]}): another publish to this "
        "repo, or a commit whose answer was lost; nothing was tagged and nothing of theirs was overwritten. "
        "Run the same command again once no one else publishes to the repo: it resumes"
    )


def _check_existing_tag(api, repo_id, tag, commit, manifest, files, include_real, url, retry) -> PublishResult:
    """An existing tag is fine only if it holds this build: same fingerprint and the same data files."""
    remote_manifest = _download_json(api, repo_id, "manifest.json", commit, retry, f"reading manifest.json at tag {tag}")
    if not isinstance(remote_manifest, dict):
        raise FillupError(
            f"{url}: tag {tag} exists but has no manifest.json of a fillup-data build; tags are never moved: "
            "publish under another --tag"
        )
    theirs, ours = remote_manifest.get("fingerprint"), manifest["fingerprint"]
    if theirs != ours:
        raise FillupError(
            f"{url}: tag {tag} already holds a different build (fingerprint {str(theirs)[:12]}, this build "
            f"{ours[:12]}); tags are never moved: bump `version` in the recipe or publish with another --tag"
        )
    entries = sorted(_remote_files(api, repo_id, commit, retry))
    remote_data = {p for p in entries if p.startswith("data/")}
    local_data = {f.path for f in files if f.path.startswith("data/")}
    if remote_data != local_data:
        held = "with" if any("-real-" in p for p in remote_data) else "without"
        raise FillupError(
            f"{url}: tag {tag} holds this build {held} real images, but this publish asks for "
            f"{'with' if include_real else 'without'}; tags are never moved: publish under another --tag"
        )
    # scoring and the quality report change neither the fingerprint nor the shards, but they are part of
    # what a tag serves (the index's score columns, quality/): a tag holding the build without them is
    # not this publish
    for key, what in (("scores", "score columns (fillup-data score)"), ("quality", "quality report")):
        if remote_manifest.get(key) != manifest.get(key):
            held = "without its" if remote_manifest.get(key) is None else "with other"
            raise FillupError(
                f"{url}: tag {tag} holds this build {held} {what}; tags are never moved: publish under "
                f"another --tag (e.g. {tag}-scored)"
            )
    return PublishResult(repo_id=repo_id, url=url, tag=tag, commit=commit, include_real=include_real,
                         unchanged=entries, already_published=True)


# --------------------------------------------------------------------------- CLI
def add_publish_parser(sub) -> None:
    """``fillup-data publish OUT --repo ORG/NAME [--tag vX.Y.Z] [--private|--public] [--include-real] [--dry-run]``."""
    p = sub.add_parser("publish", help="upload a build to the Hugging Face Hub and tag its version")
    p.add_argument("out", help="the build folder (fillup-data build --out)")
    p.add_argument("--repo", required=True, help="dataset repo ORG/NAME (created if needed)")
    p.add_argument("--tag", default=None, help="version tag (default: v + the recipe's version)")
    seen = p.add_mutually_exclusive_group()
    seen.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                      help="the repo is private (the default unless the recipe says publish.private: false)")
    seen.add_argument("--public", dest="private", action="store_const", const=False,
                      help="the repo is public; an existing repo must already be public")
    p.add_argument("--include-real", action="store_true", default=None,
                   help="also publish the real-image shards (only if their licence allows redistribution)")
    p.add_argument("--dry-run", action="store_true",
                   help="read the repo and list what would be uploaded and deleted; change nothing")
    p.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/lost connections (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (--quiet also drops information lines)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    # The token comes from HF_TOKEN or `hf auth login`, never from the command line (it would land
    # in shell history and process listings).
    publish(args.out, args.repo, tag=args.tag, private=args.private, include_real=args.include_real,
            max_retries=args.max_retries, progress=not (args.no_progress or args.quiet), dry_run=args.dry_run)
    return 0
