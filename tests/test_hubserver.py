"""The loopback Hub against the real ``huggingface_hub`` and ``datasets`` clients (in subprocesses)."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from pathlib import Path

import pytest

from tests.hubserver import HubServer, hub_server  # noqa: F401  (fixture)

CARD = """\
---
license: mit
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.tar
  - split: test
    path: data/test-*.tar
dataset_info:
- config_name: default
  features:
  - name: jpg
    dtype: image
  - name: cls
    dtype:
      class_label:
        names:
          '0': circle
          '1': square
  - name: json
    struct:
    - name: label
      dtype: int64
    - name: class_name
      dtype: string
---
# tiny
"""


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, int]]) -> None:
    """A webdataset shard: members ``key.jpg``, ``key.cls``, ``key.json`` (keys without dots)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, label in samples:
            members = {
                "jpg": _jpeg((200, 10, 10) if label else (10, 10, 200)),
                "cls": str(label).encode(),
                "json": json.dumps({"label": label, "class_name": ["circle", "square"][label]}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "data").mkdir(parents=True)
    _write_tar(root / "data" / "train-00000.tar", [(f"s{i:03d}", i % 2) for i in range(5)])
    _write_tar(root / "data" / "train-00001.tar", [(f"s{i:03d}", i % 2) for i in range(5, 9)])
    _write_tar(root / "data" / "test-00000.tar", [(f"t{i:03d}", i % 2) for i in range(4)])
    (root / "README.md").write_text(CARD)
    return root


def _client(hub: HubServer, tmp_path: Path, code: str) -> dict:
    """Run client code that prints one JSON line last; return it parsed."""
    out = hub.run_client(textwrap.dedent(code), tmp_path / "client")
    return json.loads(out.strip().splitlines()[-1])


def test_upload_tag_download_and_load_dataset(hub_server: HubServer, tiny_dataset: Path, tmp_path: Path):
    res = _client(hub_server, tmp_path, f"""
        import json
        from huggingface_hub import HfApi, HfFileSystem, hf_hub_download
        api = HfApi()
        url = api.create_repo("org/tiny", repo_type="dataset")
        again = api.create_repo("org/tiny", repo_type="dataset", exist_ok=True)
        info = api.upload_folder(repo_id="org/tiny", repo_type="dataset", folder_path={str(tiny_dataset)!r})
        api.create_tag("org/tiny", tag="v1.0.0", repo_type="dataset", revision=info.oid)
        refs = api.list_repo_refs("org/tiny", repo_type="dataset")
        # a later commit on main must not change what the tag serves
        api.upload_file(path_or_fileobj=b"changed", path_in_repo="README.md", repo_id="org/tiny", repo_type="dataset")
        card = open(hf_hub_download("org/tiny", "README.md", repo_type="dataset", revision="v1.0.0")).read()
        card_main = open(hf_hub_download("org/tiny", "README.md", repo_type="dataset")).read()
        fs = HfFileSystem()
        listing = sorted(fs.ls("datasets/org/tiny@v1.0.0/data", detail=False))
        head = fs.open("datasets/org/tiny@v1.0.0/data/test-00000.tar", "rb", block_size=100).read(512)
        from datasets import load_dataset
        ds = load_dataset("org/tiny", revision="v1.0.0")
        print(json.dumps({{
            "url": str(url), "again": str(again), "commit": info.oid,
            "tags": {{t.name: t.target_commit for t in refs.tags}},
            "branches": {{b.name: b.target_commit for b in refs.branches}},
            "card_ok": card.startswith("---"), "card_main": card_main,
            "listing": listing, "head_is_tar": head[257:262] == b"ustar",
            "splits": {{k: len(v) for k, v in ds.items()}},
            "cls_names": ds["train"].features["cls"].names,
            "train_cls_match_json": all(r["cls"] == r["json"]["label"] for r in ds["train"]),
            "train_cls": sorted(ds["train"]["cls"]),
            "labels": [r["cls"] for r in ds["test"]],
            "json0": ds["test"][0]["json"],
            "image_size": list(ds["test"][0]["jpg"].size),
        }}))
    """)
    assert res["url"].endswith("/datasets/org/tiny") and res["again"] == res["url"]
    assert res["tags"] == {"v1.0.0": res["commit"]}
    assert res["branches"] == {"main": res["commit"]}
    assert hub_server.repo("org/tiny").branches["main"] != res["commit"]  # main moved on, the tag did not
    assert res["card_ok"] and res["card_main"] == "changed"
    assert res["listing"] == [f"datasets/org/tiny@v1.0.0/data/{n}" for n in
                              ("test-00000.tar", "train-00000.tar", "train-00001.tar")]
    assert res["head_is_tar"]
    assert res["splits"] == {"train": 9, "test": 4}
    assert res["cls_names"] == ["circle", "square"]
    assert res["train_cls_match_json"] and res["train_cls"] == sorted(i % 2 for i in range(9))
    assert res["labels"] == [0, 1, 0, 1]
    assert res["json0"] == {"label": 0, "class_name": "circle"}
    assert res["image_size"] == [8, 8]
    # shards went through LFS, the card as a regular file
    repo = hub_server.repo("org/tiny")
    tagged = repo.commits[repo.tags["v1.0.0"]]
    assert tagged.files["data/train-00000.tar"].is_lfs and not tagged.files["README.md"].is_lfs
    # the token is sent but never kept
    assert all(r.authenticated for r in hub_server.requests("POST", "/commit/"))
    assert "hf_loopback_test_token" not in repr(hub_server.log)


def test_errors_map_to_client_exceptions(hub_server: HubServer, tiny_dataset: Path, tmp_path: Path):
    res = _client(hub_server, tmp_path, f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import (HfHubHTTPError, RepositoryNotFoundError,
                                            RevisionNotFoundError, EntryNotFoundError)
        api = HfApi()
        out = {{}}
        def catch(name, fn):
            try:
                fn(); out[name] = "no error"
            except Exception as e:
                out[name] = [type(e).__name__, getattr(getattr(e, "response", None), "status_code", None)]
        catch("repo", lambda: api.dataset_info("org/missing"))
        api.create_repo("org/tiny", repo_type="dataset")
        catch("create_again", lambda: api.create_repo("org/tiny", repo_type="dataset"))
        api.upload_folder(repo_id="org/tiny", repo_type="dataset", folder_path={str(tiny_dataset)!r})
        catch("revision", lambda: api.dataset_info("org/tiny", revision="v9"))
        catch("entry", lambda: hf_hub_download("org/tiny", "nope.txt", repo_type="dataset"))
        api.create_tag("org/tiny", tag="v1", repo_type="dataset")
        catch("tag_again", lambda: api.create_tag("org/tiny", tag="v1", repo_type="dataset"))
        api.create_tag("org/tiny", tag="v1", repo_type="dataset", exist_ok=True)
        catch("anonymous_write", lambda: HfApi(token=False).create_tag("org/tiny", tag="v2", repo_type="dataset"))
        out["exists"] = [api.file_exists("org/tiny", "README.md", repo_type="dataset"),
                         api.file_exists("org/tiny", "nope", repo_type="dataset"),
                         api.revision_exists("org/tiny", "v1", repo_type="dataset")]
        print(json.dumps(out))
    """)
    assert res["repo"] == ["RepositoryNotFoundError", 404]
    assert res["create_again"] == ["HfHubHTTPError", 409]
    assert res["revision"] == ["RevisionNotFoundError", 404]
    assert res["entry"][0] in ("RemoteEntryNotFoundError", "EntryNotFoundError")
    assert res["tag_again"] == ["HfHubHTTPError", 409]
    assert res["anonymous_write"][1] == 401
    assert res["exists"] == [True, False, True]


def test_resumable_upload_after_injected_fault(hub_server: HubServer, tiny_dataset: Path, tmp_path: Path):
    """A 403 on the 2nd LFS PUT stops ``upload_folder``; re-running uploads only the missing objects."""
    fault = hub_server.fail("PUT", r"^/_lfs/", status=403, after=1, times=None, message="simulated outage")
    code = f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("org/tiny", repo_type="dataset", exist_ok=True)
        try:
            api.upload_folder(repo_id="org/tiny", repo_type="dataset", folder_path={str(tiny_dataset)!r})
            print(json.dumps({{"ok": True}}))
        except Exception as e:
            print(json.dumps({{"ok": False, "error": type(e).__name__}}))
    """
    first = _client(hub_server, tmp_path, code)
    assert first["ok"] is False and fault.fired >= 1
    stored_before = set(hub_server.repo("org/tiny").lfs)
    assert len(stored_before) == 1  # one shard made it to storage, nothing was committed
    assert set(hub_server.files_at("org/tiny")) == {".gitattributes"}
    hub_server.clear_faults()
    hub_server.clear_log()
    second = _client(hub_server, tmp_path, code)
    assert second["ok"] is True
    puts = hub_server.requests("PUT", r"^/_lfs/")
    assert len(puts) == 2 and not any(oid in r.path for r in puts for oid in stored_before)
    files = hub_server.files_at("org/tiny")
    for p in ("data/train-00000.tar", "data/train-00001.tar", "data/test-00000.tar", "README.md"):
        assert files[p] == (tiny_dataset / p).read_bytes()


def test_tree_pagination_ranges_and_dropped_connection(tiny_dataset: Path, tmp_path: Path):
    with HubServer(tree_page_size=2) as hub:
        drop = hub.fail("GET", r"/resolve/.*/README\.md$", status=0, after=1)  # drop the download once: the client retries
        res = _client(hub, tmp_path, f"""
            import json
            from huggingface_hub import HfApi, hf_hub_download
            import httpx2
            api = HfApi()
            api.create_repo("org/tiny", repo_type="dataset")
            api.upload_folder(repo_id="org/tiny", repo_type="dataset", folder_path={str(tiny_dataset)!r})
            files = sorted(f.path for f in api.list_repo_tree("org/tiny", repo_type="dataset", recursive=True))
            infos = api.get_paths_info("org/tiny", ["README.md", "data", "missing"], repo_type="dataset")
            r = httpx2.get(api.endpoint + "/datasets/org/tiny/resolve/main/README.md", headers={{"Range": "bytes=0-2"}})
            card = open(hf_hub_download("org/tiny", "README.md", repo_type="dataset")).read()
            print(json.dumps({{"files": files, "infos": [type(i).__name__ + ":" + i.path for i in infos],
                               "range": [r.status_code, r.text, r.headers["content-range"]], "card": card[:3]}}))
        """)
        assert res["files"] == [".gitattributes", "README.md", "data", "data/test-00000.tar",
                                "data/train-00000.tar", "data/train-00001.tar"]
        assert len(hub.requests("GET", r"/tree/main")) == 3  # 6 entries, 2 per page
        assert res["infos"] == ["RepoFile:README.md", "RepoFolder:data"]
        assert res["range"] == [206, "---", f"bytes 0-2/{len(CARD)}"]
        assert res["card"] == "---" and drop.fired == 1


def test_visibility_parent_commit_and_lost_answers(hub_server: HubServer, tmp_path: Path):
    """What publish relies on, through the real client: a repo's visibility, a commit on a stale
    ``parent_commit`` refused with 412, and a commit whose answer is lost having landed all the same."""
    hub_server.fail("POST", r"/commit/main$", status=0, handled=True, after=2)
    res = _client(hub_server, tmp_path, """
        import json
        from huggingface_hub import HfApi, CommitOperationAdd
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
        api = HfApi()
        api.create_repo("org/secret", repo_type="dataset", private=True)
        api.create_repo("org/open", repo_type="dataset", private=False)
        out = {"private": [api.dataset_info("org/secret").private, api.dataset_info("org/open").private]}
        try:
            HfApi(token=False).dataset_info("org/secret"); out["anonymous"] = "visible"
        except RepositoryNotFoundError:
            out["anonymous"] = "not found"
        first = api.dataset_info("org/open").sha
        api.create_commit("org/open", [CommitOperationAdd("a.txt", b"a")], commit_message="a",
                          repo_type="dataset", parent_commit=first)
        try:
            api.create_commit("org/open", [CommitOperationAdd("b.txt", b"b")], commit_message="b",
                              repo_type="dataset", parent_commit=first)
            out["stale_parent"] = "accepted"
        except HfHubHTTPError as e:
            out["stale_parent"] = e.response.status_code
        try:  # the third commit: handled, then the connection drops
            api.create_commit("org/open", [CommitOperationAdd("c.txt", b"c")], commit_message="c", repo_type="dataset")
            out["lost"] = "answered"
        except Exception as e:
            out["lost"] = type(e).__name__
        out["files"] = sorted(api.list_repo_files("org/open", repo_type="dataset"))
        print(json.dumps(out))
    """)
    assert res["private"] == [True, False] and res["anonymous"] == "not found"
    assert res["stale_parent"] == 412
    assert res["lost"] != "answered" and res["files"] == [".gitattributes", "a.txt", "c.txt"]
    assert [sorted(changed) for _, changed in hub_server.history("org/open")] == [[".gitattributes"], ["a.txt"], ["c.txt"]]


def test_hook_runs_a_second_client_before_the_request(hub_server: HubServer, monkeypatch):
    """``before`` lets a second client commit between two of ours; ``honor_parent_commit=False`` is a
    Hub that lets a stale parent through."""
    import huggingface_hub.constants as C
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)

    def commit(api: HfApi, path: str, parent: str | None = None) -> None:
        api.upload_file(path_or_fileobj=path.encode(), path_in_repo=path, repo_id="org/tiny", repo_type="dataset",
                        parent_commit=parent)

    api = HfApi(endpoint=hub_server.endpoint, token="hf_loopback_test_token")
    hook = hub_server.before("POST", r"/commit/main$", lambda: commit(api, "theirs.txt"), after=1)
    api.create_repo("org/tiny", repo_type="dataset")
    commit(api, "ours.txt", api.dataset_info("org/tiny").sha)  # the 1st commit: no hook
    with pytest.raises(HfHubHTTPError) as err:  # the 2nd: their commit lands first, ours is refused
        commit(api, "ours-too.txt", api.dataset_info("org/tiny").sha)
    assert err.value.response.status_code == 412 and hook.fired == 1
    assert set(hub_server.files_at("org/tiny")) == {".gitattributes", "ours.txt", "theirs.txt"}

    with HubServer(honor_parent_commit=False) as lax:
        lax_api = HfApi(endpoint=lax.endpoint, token="hf_loopback_test_token")
        lax_api.create_repo("org/tiny", repo_type="dataset")
        stale = lax_api.dataset_info("org/tiny").sha
        commit(lax_api, "one.txt")
        commit(lax_api, "two.txt", stale)  # accepted on a stale parent
        assert set(lax.files_at("org/tiny")) == {".gitattributes", "one.txt", "two.txt"}
