"""Publish a build to the Hugging Face Hub: versioned, resumable, safe to re-run.

``publish`` uploads a build folder (DESIGN.md's output layout) to a dataset repo and tags the
version.  Re-running the same command is how an interrupted upload resumes: files already on the
remote with the same content (compared by sha256 / git blob id through ``paths-info``) are not
uploaded again, the rest goes up in several ``upload_folder`` commits, and LFS objects that reached
storage before an interruption are skipped by the Hub's LFS batch answer.  A tag is never moved:
publishing a different build (fingerprint) under an existing tag is an error.

Only an allow-list of the build leaves the machine: ``README.md`` (re-rendered for what the repo
holds), ``manifest.json``, ``index.parquet``, ``data/*.tar``, ``tokens/*.safetensors`` and the local
files the card links to.  Build state, reports with local paths and work folders stay home.  Real
images (ImageNet, Places, iNaturalist may not be redistributed) are left out unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from fillup_data.errors import FillupError

# Commits of at most this many files / bytes: a failure loses at most one batch of commit work, and
# a 1000-shard dataset takes ~20 commits, well under the Hub's ~128 commits/hour.
MAX_FILES_PER_COMMIT = 50
MAX_BYTES_PER_COMMIT = 50 * 1024**3
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
COMMIT_RACE = "A commit has happened since"
CARD_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img[^>]+src=[\"']([^\"']+)[\"']")


@dataclass
class PublishResult:
    """What ``publish`` did; ``load_line`` is the exact ``load_dataset`` call for users."""

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

    @property
    def load_line(self) -> str:
        return f'load_dataset("{self.repo_id}", revision="{self.tag}")'


@dataclass(frozen=True)
class _LocalFile:
    path: str  # path in the repo (posix)
    source: Path  # where the bytes are on disk
    size: int
    sha256: str | None = None  # known from the manifest (shards, tokens); else computed on demand


# --------------------------------------------------------------------------- what to upload
def _read_manifest(out: Path) -> dict:
    path = out / "manifest.json"
    if not path.is_file():
        raise FillupError(f"{path}: no manifest: is {out} a finished build? Run `fillup-data build ... --out {out}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FillupError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); rebuild with `fillup-data build`") from None
    for key in ("name", "version", "fingerprint", "recipe", "classes", "shards"):
        if key not in manifest:
            raise FillupError(f"{path}: missing key {key!r}; the build is incomplete or from another tool: rebuild it")
    for i, s in enumerate(manifest["shards"]):
        for key in ("path", "split", "origin", "num_samples", "num_bytes"):
            if key not in s:
                raise FillupError(f"{path}: shards[{i}] has no {key!r}; rebuild with `fillup-data build`")
    return manifest


def _is_real(shard: dict) -> bool:
    # origin is the contract; the file name is a second guard for shards the manifest mislabels
    return shard["origin"] == "real" or "-real-" in PurePosixPath(shard["path"]).name


def _card_links(card: str, out: Path) -> list[str]:
    """Local files (images) the card links to, relative to the build folder."""
    found = []
    for m in CARD_LINK.finditer(card):
        target = (m.group(1) or m.group(2) or "").split("#")[0].split("?")[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            continue  # absolute URLs and absolute paths are not files of the build
        rel = PurePosixPath(target)
        if ".." in rel.parts:
            continue
        if (out / rel).is_file() and str(rel) not in found:
            found.append(str(rel))
    return found


def plan_files(out: Path, manifest: dict, include_real: bool, card: str) -> tuple[list[_LocalFile], list[str]]:
    """The build's files that go to the repo (data first, card and manifest last) and the real shards left out."""
    files: list[_LocalFile] = []
    excluded: list[str] = []
    for s in manifest["shards"]:
        p = out / s["path"]
        if _is_real(s) and not include_real:
            excluded.append(s["path"])
            continue
        if not p.is_file():
            raise FillupError(f"{p}: shard listed in manifest.json is missing; relaunch the build to finish it")
        size = p.stat().st_size
        if size != s["num_bytes"]:
            raise FillupError(
                f"{p}: {size} bytes but manifest.json says {s['num_bytes']}: the shard changed after the build; "
                f"run `fillup-data inspect {out}` and rebuild"
            )
        files.append(_LocalFile(s["path"], p, size, s.get("sha256")))
    listed = {f.path for f in files} | set(excluded)
    # a real shard lying in data/ without a manifest entry must not slip through either
    for p in sorted((out / "data").glob("*.tar")) if (out / "data").is_dir() else []:
        rel = f"data/{p.name}"
        if rel not in listed:
            raise FillupError(f"{p}: shard not listed in manifest.json; remove it or rebuild so the manifest lists it")
    tokens = {t["path"]: t for t in manifest.get("tokens") or []}
    # tokens/NNNNN.safetensors (every checkpoint) and tokens/diffusers/NNNNN.safetensors (load_textual_inversion)
    for p in sorted((out / "tokens").rglob("*.safetensors")) if (out / "tokens").is_dir() else []:
        rel = p.relative_to(out).as_posix()
        if ".partial." in p.name:
            continue
        files.append(_LocalFile(rel, p, p.stat().st_size, tokens.get(rel, {}).get("sha256")))
    if (out / "index.parquet").is_file():
        files.append(_LocalFile("index.parquet", out / "index.parquet", (out / "index.parquet").stat().st_size))
    for rel in _card_links(card, out):
        if rel not in {f.path for f in files} and not rel.startswith("data/"):
            files.append(_LocalFile(rel, out / rel, (out / rel).stat().st_size))
    files.append(_LocalFile("manifest.json", out / "manifest.json", (out / "manifest.json").stat().st_size))
    return files, excluded


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _git_blob_oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _same_as_remote(local: _LocalFile, remote: Any) -> bool:
    """Compare by content: sha256 for LFS files, git blob id for regular ones (as the Hub stores them)."""
    if remote is None or getattr(remote, "size", None) != local.size:
        return False
    if remote.lfs is not None:
        return (local.sha256 or _sha256(local.source)) == remote.lfs.sha256
    return _git_blob_oid(local.source) == remote.blob_id


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


def _exact(path: str) -> str:
    """An ``allow_patterns`` / ``delete_patterns`` entry (fnmatch) that matches only ``path``."""
    return re.sub(r"([*?\[])", r"[\1]", path)


# --------------------------------------------------------------------------- retries
def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: BaseException) -> bool:
    """429/5xx, a lost connection or the Hub's commit race, anywhere in the exception chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = _status(err)
        if status in TRANSIENT_STATUS:
            return True
        if COMMIT_RACE in str(err):
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


def _with_retries(what: str, fn: Callable[[], Any], max_retries: int, base_delay: float, log: Callable) -> Any:
    """Run ``fn``; on a transient error wait base_delay * 2**attempt (or Retry-After) and run it again."""
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except FillupError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when not transient
            if not _is_transient(err) or attempt == max_retries:
                raise _as_fillup_error(what, err, transient=_is_transient(err)) from err
            delay = min(_retry_after(err) or base_delay * 2**attempt, 300.0)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log(f"  {what}: {first}; retrying in {delay:.1f}s ({attempt + 1}/{max_retries})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _as_fillup_error(what: str, err: BaseException, transient: bool) -> FillupError:
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
    return FillupError(f"{what} failed: {detail}\n{hint}")


# --------------------------------------------------------------------------- publish
def publish(
    out_dir: str | Path,
    repo_id: str,
    tag: str | None = None,
    private: bool = False,
    include_real: bool | None = None,
    token: str | None = None,
    max_retries: int = 5,
    progress: bool = True,
    *,
    endpoint: str | None = None,
    retry_base_delay: float = 2.0,
    max_files_per_commit: int = MAX_FILES_PER_COMMIT,
    max_bytes_per_commit: int = MAX_BYTES_PER_COMMIT,
    log: Callable[[str], None] = print,
) -> PublishResult:
    """Upload the build in ``out_dir`` to the dataset repo ``repo_id`` and tag it (default ``v`` + version).

    Safe to re-run: it uploads only what the remote lacks, and a tag that already holds this build
    (same fingerprint) is reported as already published.  ``token`` defaults to the logged-in one.
    """
    from huggingface_hub import HfApi
    from tqdm.auto import tqdm

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
    # The card is refreshed for what the repo will hold (without real shards the default config is
    # the synthetic train split) and names the repo in its load_dataset line.
    card = render_card(manifest, include_real=include_real, repo_id=repo_id)
    files, excluded = plan_files(out, manifest, include_real, card)

    api = HfApi(endpoint=endpoint, token=token)
    url = f"{api.endpoint}/datasets/{repo_id}"
    retry = dict(max_retries=max_retries, base_delay=retry_base_delay, log=log)
    log(f"publishing {out} -> {url} (tag {tag}, real images {'included' if include_real else 'excluded'})")
    if excluded:
        log(f"  leaving out {len(excluded)} real-image shard(s); pass --include-real to publish them")

    _with_retries(
        "creating the repo",
        lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True),
        **retry,
    )

    # 1. Never move a tag: an existing tag must hold this very build.
    refs = _with_retries("listing tags", lambda: api.list_repo_refs(repo_id, repo_type="dataset"), **retry)
    tagged = {t.name: t.target_commit for t in refs.tags}
    if tag in tagged:
        result = _check_existing_tag(api, repo_id, tag, tagged[tag], manifest, files, include_real, url, retry)
        log(f"already published: {url} tag {tag} holds this build (fingerprint {manifest['fingerprint'][:12]})")
        log(f"  {result.load_line}")
        return result

    # 2. What the remote already has (by content) and what is stale there.
    remote = _remote_files(api, repo_id, retry)
    staging = Path(tempfile.mkdtemp(prefix="fillup-publish-"))
    try:
        (staging / "README.md").write_text(card, encoding="utf-8")
        shutil.copy2(out / "manifest.json", staging / "manifest.json")
        final = [_LocalFile(name, staging / name, (staging / name).stat().st_size)
                 for name in ("README.md", "manifest.json")]
        data = [f for f in files if f.path != "manifest.json"]

        unchanged, todo = [], []
        for f in tqdm(data, desc="compare with remote", unit="file", disable=not progress or not data):
            (unchanged if _same_as_remote(f, remote.get(f.path)) else todo).append(f)
        keep = {f.path for f in data} | {"README.md", "manifest.json"}
        # Files of an earlier version under data/ and tokens/ would be picked up by the card's globs.
        stale = sorted(p for p in remote if p.split("/", 1)[0] in ("data", "tokens") and p not in keep)
        todo_bytes = sum(f.size for f in todo)
        log(f"  {len(todo)} file(s) to upload ({todo_bytes / 1e6:.1f} MB), {len(unchanged)} already on the Hub"
            + (f", {len(stale)} stale to delete" if stale else ""))

        # 3. Data in batches of commits; card + manifest (+ deletions) in the last commit, so a
        #    manifest on main means the upload finished.
        uploaded: list[str] = []
        batches = _batches(todo, max_files_per_commit, max_bytes_per_commit)
        bar = tqdm(total=todo_bytes, desc="upload", unit="B", unit_scale=True, disable=not progress or not todo)
        for i, batch in enumerate(batches, 1):
            what = f"uploading batch {i}/{len(batches)} ({len(batch)} files)"
            _with_retries(
                what,
                lambda batch=batch, i=i: api.upload_folder(
                    repo_id=repo_id, repo_type="dataset", folder_path=out,
                    allow_patterns=[_exact(f.path) for f in batch],
                    commit_message=f"{manifest['name']} {version}: upload part {i}/{len(batches)}",
                ),
                **retry,
            )
            uploaded += [f.path for f in batch]
            bar.update(sum(f.size for f in batch))
        bar.close()

        final_todo = [f for f in final if not _same_as_remote(f, remote.get(f.path))]
        info = _with_retries(
            "uploading the card and manifest",
            lambda: api.upload_folder(
                repo_id=repo_id, repo_type="dataset", folder_path=staging,
                allow_patterns=["README.md", "manifest.json"],
                delete_patterns=[_exact(p) for p in stale] or None,
                commit_message=f"{manifest['name']} {version} (fingerprint {manifest['fingerprint'][:12]})",
            ),
            **retry,
        )
        uploaded += [f.path for f in final_todo]
        unchanged += [f for f in final if f not in final_todo]
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    commit = info.oid
    # 4. Tag the commit we just made. Losing a race to another publisher of the same tag is checked
    #    like an existing tag, never overwritten.
    try:
        _with_retries(
            f"creating tag {tag}",
            lambda: api.create_tag(repo_id, tag=tag, revision=commit, repo_type="dataset",
                                   tag_message=f"{manifest['name']} {version} fingerprint {manifest['fingerprint']}"),
            **retry,
        )
    except FillupError as err:
        if _status(err.__cause__) != 409:
            raise
        refs = _with_retries("listing tags", lambda: api.list_repo_refs(repo_id, repo_type="dataset"), **retry)
        tagged = {t.name: t.target_commit for t in refs.tags}
        _check_existing_tag(api, repo_id, tag, tagged[tag], manifest, files, include_real, url, retry)

    result = PublishResult(
        repo_id=repo_id, url=url, tag=tag, commit=commit, include_real=include_real, uploaded=uploaded,
        unchanged=[f.path for f in unchanged], deleted=stale, excluded_real=excluded,
    )
    log(f"published {url} tag {tag} (commit {commit[:12]}): {len(uploaded)} file(s) uploaded, "
        f"{len(result.unchanged)} unchanged" + (f", {len(stale)} deleted" if stale else ""))
    log(f"load it with:\n  from datasets import load_dataset\n  ds = {result.load_line}")
    return result


def _remote_files(api, repo_id: str, retry: dict) -> dict[str, Any]:
    """Every file on ``main`` (one tree listing, paginated by the client)."""
    from huggingface_hub.hf_api import RepoFile

    def listing():
        try:
            return {e.path: e for e in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True)
                    if isinstance(e, RepoFile)}
        except Exception as err:  # an empty repo (no main yet) lists as nothing
            if _status(err) == 404 and "Revision" in type(err).__name__:
                return {}
            raise

    return _with_retries("listing the remote files", listing, **retry)


def _check_existing_tag(api, repo_id, tag, commit, manifest, files, include_real, url, retry) -> PublishResult:
    """An existing tag is fine only if it holds this build: same fingerprint and the same data files."""
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    def fetch():
        with tempfile.TemporaryDirectory(prefix="fillup-tag-") as tmp:
            try:
                path = api.hf_hub_download(repo_id, "manifest.json", repo_type="dataset", revision=commit,
                                           cache_dir=tmp)
            except EntryNotFoundError:
                return None
            return json.loads(Path(path).read_text(encoding="utf-8"))

    remote_manifest = _with_retries(f"reading manifest.json at tag {tag}", fetch, **retry)
    if remote_manifest is None:
        raise FillupError(
            f"{url}: tag {tag} exists but has no manifest.json (not a fillup-data build); tags are never moved: "
            "publish under another --tag"
        )
    theirs, ours = remote_manifest.get("fingerprint"), manifest["fingerprint"]
    if theirs != ours:
        raise FillupError(
            f"{url}: tag {tag} already holds a different build (fingerprint {str(theirs)[:12]}, this build "
            f"{ours[:12]}); tags are never moved: bump `version` in the recipe or publish with another --tag"
        )
    entries = _with_retries(
        f"listing tag {tag}",
        lambda: [e.path for e in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True, revision=commit)
                 if isinstance(e, RepoFile)],
        **retry,
    )
    remote_data = {p for p in entries if p.startswith("data/")}
    local_data = {f.path for f in files if f.path.startswith("data/")}
    if remote_data != local_data:
        held = "with" if any("-real-" in p for p in remote_data) else "without"
        raise FillupError(
            f"{url}: tag {tag} holds this build {held} real images, but this publish asks for "
            f"{'with' if include_real else 'without'}; tags are never moved: publish under another --tag"
        )
    return PublishResult(repo_id=repo_id, url=url, tag=tag, commit=commit, include_real=include_real,
                         unchanged=sorted(entries), already_published=True)


# --------------------------------------------------------------------------- CLI
def add_publish_parser(sub) -> None:
    """``fillup-data publish OUT --repo ORG/NAME [--tag vX.Y.Z] [--private] [--include-real]`` (contract)."""
    p = sub.add_parser("publish", help="upload a build to the Hugging Face Hub and tag its version")
    p.add_argument("out", help="the build folder (fillup-data build --out)")
    p.add_argument("--repo", required=True, help="dataset repo ORG/NAME (created if needed)")
    p.add_argument("--tag", default=None, help="version tag (default: v + the recipe's version)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--include-real", action="store_true", default=None,
                   help="also publish the real-image shards (only if their licence allows redistribution)")
    p.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/commit races (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    # The token comes from HF_TOKEN or `hf auth login`, never from the command line (it would land
    # in shell history and process listings).
    publish(args.out, args.repo, tag=args.tag, private=args.private, include_real=args.include_real,
            max_retries=args.max_retries, progress=not args.no_progress)
    return 0
