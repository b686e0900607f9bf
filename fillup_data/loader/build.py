"""One build: its ``manifest.json`` (contract) and where its shards live, a local folder or a Hub dataset repo.

Hub shards are not downloaded: a :class:`ShardRef` carries the URL ``huggingface_hub.hf_hub_url`` gives
for the pinned revision, and :mod:`fillup_data.loader.transport` streams it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.schema.manifest import Manifest

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^\s@]+))?$")


@dataclass(frozen=True)
class ShardRef:
    """One shard of one build: where to stream it from and what the manifest says it holds."""

    url: str  # absolute local path, or an http(s) URL
    path: str  # the path inside the build, as written in the manifest
    split: str
    origin: str
    num_samples: int
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    # the keys a score filter keeps (None: every sample); see fillup_data.loader.score_filter
    keep: frozenset[str] | None = field(default=None, repr=False, compare=False)

    @property
    def num_kept(self) -> int:
        """The samples a reader yields from this shard: all of them, or those the filter keeps."""
        return self.num_samples if self.keep is None else len(self.keep)


class Build:
    """A build's manifest and the place its files live (a local folder or a Hub dataset repo)."""

    def __init__(
        self,
        manifest: Manifest,
        where: str,
        *,
        base_dir: Path | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
        endpoint: str | None = None,
        headers: dict[str, str] | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
    ):
        self.manifest = manifest
        self.where = where
        self.base_dir = base_dir
        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = endpoint
        self._headers = tuple(sorted((headers or {}).items()))
        self._cache_dir = cache_dir
        self._token = token
        self.classes = sorted(manifest.classes, key=lambda c: c.index)
        self.many_above = manifest.many_above
        self.few_below = manifest.few_below

    # ---- opening
    @classmethod
    def open(cls, ref: str | os.PathLike, *, cache_dir: str | None = None, token: str | bool | None = None) -> "Build":
        """Open ``ref``: a build folder (``manifest.json`` inside) or a Hub id ``org/name[@revision]``."""
        path = Path(ref)
        if path.is_dir():
            return cls.open_local(path)
        text = str(ref)
        if path.exists():
            raise FillupError(f"{ref}: not a build folder (expected a directory with manifest.json)")
        m = _HUB_ID.match(text)
        if text.startswith((".", "/", "~")) or not m:
            raise FillupError(
                f"{ref}: no such build folder, and not a Hub dataset id (org/name[@revision]); pass the OUT "
                "folder of `fillup-data build` or a published dataset id"
            )
        return cls.open_hub(m.group("repo"), m.group("rev"), cache_dir=cache_dir, token=token)

    @classmethod
    def open_local(cls, folder: str | os.PathLike) -> "Build":
        folder = Path(folder).resolve()
        mpath = folder / "manifest.json"
        if not mpath.is_file():
            raise FillupError(f"{folder}: no manifest.json; is this the OUT folder of `fillup-data build`?")
        return cls(Manifest.read(mpath), str(mpath), base_dir=folder)

    @classmethod
    def open_hub(
        cls,
        repo_id: str,
        revision: str | None = None,
        *,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
    ) -> "Build":
        """Read the manifest with ``hf_hub_download`` (cached) and stream shards from ``hf_hub_url``.

        ``endpoint`` defaults to ``HF_ENDPOINT`` read now, not at import, so a test or a mirror set
        after ``huggingface_hub`` was imported is honoured.
        """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import build_hf_headers

        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        where = f"{repo_id}@{revision or 'main'}"
        try:
            mpath = hf_hub_download(
                repo_id, "manifest.json", repo_type="dataset", revision=revision,
                cache_dir=cache_dir, token=token, endpoint=endpoint,
            )
        except Exception as err:  # the hub raises many types: offline, 404, auth, connection
            raise FillupError(
                f"{where}: no local folder of that name, and manifest.json cannot be read from the Hub "
                f"({type(err).__name__}: {err}); check the path or repo id, the revision tag, your token "
                "(hf auth login) and HF_HUB_OFFLINE"
            ) from None
        headers = build_hf_headers(token=token)
        return cls(
            Manifest.read(mpath, f"{where}:manifest.json"), f"{where}:manifest.json", repo_id=repo_id,
            revision=revision, endpoint=endpoint, headers=headers, cache_dir=cache_dir, token=token,
        )

    # ---- the per-sample index
    @property
    def index_where(self) -> str:
        """How errors name this build's ``index.parquet``."""
        if self.base_dir is not None:
            return str(self.base_dir / "index.parquet")
        return f"{self.repo_id}@{self.revision or 'main'}:index.parquet"

    def index_file(self) -> Path:
        """A local copy of ``index.parquet``: the build's own file, or the Hub's through ``hf_hub_download``
        (cached, like the manifest; publish uploads it next to the manifest)."""
        if self.base_dir is not None:
            path = self.base_dir / "index.parquet"
            if not path.is_file():
                raise FillupError(f"{self.index_where}: no such file; is {self.base_dir} a complete build?")
            return path
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(
                self.repo_id, "index.parquet", repo_type="dataset", revision=self.revision,
                cache_dir=self._cache_dir, token=self._token, endpoint=self.endpoint,
            ))
        except Exception as err:  # the hub raises many types: offline, 404, auth, connection
            raise FillupError(
                f"{self.index_where}: cannot be read from the Hub ({type(err).__name__}: {err}); a build published "
                "by `fillup-data publish` has it: check the revision, your token and HF_HUB_OFFLINE"
            ) from None

    # ---- what the manifest says
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def class_names(self) -> list[str]:
        return [str(c.name) for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def real_counts(self) -> list[int]:
        return [int(c.real) for c in self.classes]

    def shard_url(self, path: str) -> str:
        if self.base_dir is not None:
            return str(self.base_dir / path)
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, path, repo_type="dataset", revision=self.revision, endpoint=self.endpoint)

    def shards(self, split: str, origin: str | None = None) -> list[ShardRef]:
        out = []
        for s in self.manifest.shards:
            if s.split != split or (origin is not None and s.origin != origin):
                continue
            out.append(
                ShardRef(
                    url=self.shard_url(s.path), path=s.path, split=s.split, origin=s.origin,
                    num_samples=s.num_samples, headers=self._headers,
                )
            )
        return out
