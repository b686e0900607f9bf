"""``fillup-data publish`` against the loopback Hub, with the real ``huggingface_hub``/``datasets`` clients.

The build under test is a real demo build with Textual Inversion on the tiny pipeline, shrunk (fewer
images and steps, small shards) so it takes seconds: several real and synthetic shards and token files.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.hubserver import HubServer, hub_server  # noqa: F401  (fixture)

from fillup_data.errors import FillupError
from fillup_data.hub import PublishResult, add_publish_parser, publish

TOKEN = "hf_secret_test_token_0123456789"
REPO = "org/demo-fillup"


# --------------------------------------------------------------------------- fixtures
def _real_shards(out: Path) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return sorted(s["path"] for s in manifest["shards"] if s["origin"] == "real")


def _count(out: Path, split: str, synthetic: bool | None = None) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(s["num_samples"] for s in manifest["shards"] if s["split"] == split
               and (synthetic is None or (s["origin"] == "synthetic") == synthetic))


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory) -> Path:
    import torch

    from fillup_data.build import run_build
    from fillup_data.recipe import load_recipe

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo") / "build"
    from tests.test_synthesis import MINI

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "demo.yaml", MINI)
    run_build(recipe, out, workers=1, progress=False, log=lambda *_: None)
    return out


@pytest.fixture
def demo_build(demo_template: Path, tmp_path: Path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(demo_template, out)
    return out


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch) -> HubServer:  # noqa: F811
    """In-process clients pointed at the loopback Hub: online, Xet off (the server speaks classic LFS)."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    return hub_server


def _uploadable(out: Path, include_real: bool = True) -> set[str]:
    """The build's files publish sends besides README.md and manifest.json: its known outputs."""
    from fillup_data.shards.card import card_figures

    manifest = json.loads((out / "manifest.json").read_text())
    files = {s["path"] for s in manifest["shards"] if include_real or s["origin"] != "real"}
    files |= {t["path"] for t in manifest["tokens"]} | {"index.parquet"}
    return files | set(card_figures(manifest, include_real))


def _other_build(demo_build: Path, tmp_path: Path, version: str = "1.0.1") -> Path:
    """Another build of the same dataset: new version and fingerprint, one synthetic shard with other bytes."""
    from fillup_data.shards.writer import sha256_file

    other = tmp_path / "other"
    shutil.copytree(demo_build, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(version=version, fingerprint="f" * 64)
    shard = next(s for s in manifest["shards"] if s["origin"] == "synthetic")
    with (other / shard["path"]).open("ab") as f:
        f.write(b"\0" * 1024)  # two more end-of-archive blocks: still a valid tar, other bytes
    shard.update(num_bytes=(other / shard["path"]).stat().st_size, sha256=sha256_file(other / shard["path"]))
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return other


def _assert_holds_build(hub: HubServer, revision: str, out: Path, include_real: bool = True) -> None:
    files = hub.files_at(REPO, revision)
    assert set(files) == {".gitattributes", "README.md", "manifest.json"} | _uploadable(out, include_real)
    for p in _uploadable(out, include_real):
        assert files[p] == (out / p).read_bytes(), p
    assert json.loads(files["manifest.json"]) == json.loads((out / "manifest.json").read_text())


def _publish(hub: HubServer, out: Path, logs: list[str] | None = None, **kw) -> PublishResult:
    kw.setdefault("retry_base_delay", 0.01)
    return publish(out, kw.pop("repo_id", REPO), token=TOKEN, endpoint=hub.endpoint, progress=False,
                   log=(logs.append if logs is not None else (lambda *_: None)), **kw)


def _client(hub: HubServer, tmp_path: Path, code: str) -> dict:
    out = hub.run_client(textwrap.dedent(code), tmp_path / "client")
    return json.loads(out.strip().splitlines()[-1])


ROWS_CODE = """
    import hashlib, json
    from datasets import load_dataset
    def rows(ds):
        out = {}
        for split, d in ds.items():
            img = [c for c in d.column_names if c in ("jpg", "png", "webp")][0]
            out[split] = sorted(
                json.dumps([r["cls"], r["json"], hashlib.sha256(r[img].tobytes()).hexdigest()], sort_keys=True)
                for r in d)
        return out
"""


# --------------------------------------------------------------------------- end to end
def test_publish_then_load_dataset_matches_local(hub: HubServer, demo_build: Path, tmp_path: Path):
    logs: list[str] = []
    res = _publish(hub, demo_build, logs, include_real=True)
    assert res.tag == "v1.0.0" and not res.already_published and res.include_real
    assert res.load_line == f'load_dataset("{REPO}", revision="v1.0.0")'
    text = "\n".join(logs)
    assert res.url in text and res.load_line in text and TOKEN not in text
    files = hub.files_at(REPO, "v1.0.0")
    assert set(files) == {".gitattributes", "README.md", "manifest.json"} | _uploadable(demo_build)
    assert {"index.parquet", "data/train-real-00000.tar", "data/test-real-00000.tar",
            "data/train-synthetic-00000.tar", "data/train-synthetic-00001.tar",
            "tokens/00001.safetensors", "tokens/00002.safetensors", "tokens/diffusers/00002.safetensors"} <= set(files)
    for p in files:  # byte-identical; the card is the refreshed one naming the repo
        if p not in (".gitattributes", "README.md"):
            assert files[p] == (demo_build / p).read_bytes(), p
    assert f'load_dataset("{REPO}", revision="v1.0.0")' in files["README.md"].decode()
    assert "hf_secret" not in repr(hub.log)

    got = _client(hub, tmp_path, ROWS_CODE + f"""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file
    local = rows(load_dataset({str(demo_build)!r}))
    remote = rows(load_dataset("{REPO}", revision="v1.0.0"))
    syn = load_dataset("{REPO}", "synthetic", revision="v1.0.0")
    token = load_file(hf_hub_download("{REPO}", "tokens/diffusers/00001.safetensors", repo_type="dataset",
                                      revision="v1.0.0"))
    print(json.dumps({{"same": local == remote, "sizes": {{k: len(v) for k, v in remote.items()}},
                       "syn": {{k: len(v) for k, v in syn.items()}}, "token": {{k: list(v.shape) for k, v in token.items()}},
                       "cls_names": load_dataset("{REPO}", revision="v1.0.0", split="test").features["cls"].names}}))
    """)
    assert got["same"], "load_dataset through the Hub differs from load_dataset(OUT)"
    assert got["sizes"] == {"train": _count(demo_build, "train"), "test": _count(demo_build, "test")}
    assert got["syn"] == {"train": _count(demo_build, "train", synthetic=True)} and got["syn"]["train"] > 0
    assert got["token"] == {"<fillup-00001>": [4, 32]}
    manifest = json.loads((demo_build / "manifest.json").read_text())
    assert got["cls_names"] == [c["name"] for c in manifest["classes"]]


def test_real_images_excluded_by_default_and_card_lists_only_what_repo_holds(hub: HubServer, demo_build: Path,
                                                                             tmp_path: Path):
    manifest = json.loads((demo_build / "manifest.json").read_text())
    manifest["recipe"]["publish"]["include_real"] = False  # the default of every non-demo recipe
    (demo_build / "manifest.json").write_text(json.dumps(manifest, indent=2))
    res = _publish(hub, demo_build)
    assert not res.include_real
    assert sorted(res.excluded_real) == _real_shards(demo_build)
    files = hub.files_at(REPO, "v1.0.0")
    assert not any("-real-" in p for p in files)
    assert not any(p.startswith((".fillup", "report")) for p in files)  # build state never leaves the machine
    assert {"tokens/00001.safetensors", "index.parquet", "manifest.json"} <= set(files)
    assert "assets/samples-synthetic.png" in files and "assets/samples.png" not in files  # no real pixels
    from huggingface_hub import DatasetCard

    card = DatasetCard(files["README.md"].decode())
    configs = {c["config_name"]: c["data_files"] for c in card.data["configs"]}
    assert set(configs) == {"default", "synthetic"}
    assert configs["default"] == [{"split": "train", "path": "data/train-synthetic-*.tar"}]
    got = _client(hub, tmp_path, ROWS_CODE + f"""
    ds = load_dataset("{REPO}", revision="v1.0.0")
    print(json.dumps({{k: [len(v), sum(r["is_synthetic"] for r in v["json"])] for k, v in ds.items()}}))
    """)
    n = _count(demo_build, "train", synthetic=True)
    assert got == {"train": [n, n]}


def test_load_textual_inversion_from_the_published_repo(hub: HubServer, demo_build: Path, tmp_path: Path):
    """diffusers reads a class token published under tokens/ (downloaded from the dataset repo first:
    ``load_textual_inversion`` itself only fetches from model repos)."""
    import torch
    from huggingface_hub import hf_hub_download

    from fillup_data.models.architectures import build_random_pipeline

    res = _publish(hub, demo_build, include_real=True)
    from fillup_data.inversion import read_token_file

    path = hf_hub_download(REPO, "tokens/diffusers/00002.safetensors", repo_type="dataset", revision=res.tag,
                           endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    pipe = build_random_pipeline("tiny")
    pipe.load_textual_inversion(path)
    token = read_token_file(demo_build / "tokens" / "00002.safetensors")
    expected = token.vectors(token.checkpoint_steps[-1])  # the last checkpoint of the learned token
    names = ["<fillup-00002>"] + [f"<fillup-00002>_{i}" for i in range(1, 4)]  # diffusers' multi-vector expansion
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    got = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(got, expected.to(got.dtype))


# --------------------------------------------------------------------------- resuming and retries
def test_interrupted_upload_resumes_uploading_only_what_is_missing(hub: HubServer, demo_build: Path):
    # One file per commit; the 4th LFS upload dies (403: not transient, the run stops like a killed job).
    hub.fail("PUT", r"^/_lfs/", status=403, after=3, times=None, message="simulated interruption")
    with pytest.raises(FillupError, match="run the same command again"):
        _publish(hub, demo_build, include_real=True, max_files_per_commit=1)
    repo = hub.repo(REPO)
    committed = set(hub.files_at(REPO)) - {".gitattributes"}
    stored = set(repo.lfs)
    assert len(committed) == 3 and "manifest.json" not in committed and not repo.tags

    hub.clear_faults()
    hub.clear_log()
    res = _publish(hub, demo_build, include_real=True, max_files_per_commit=1)
    assert set(res.unchanged) >= committed and not set(res.uploaded) & committed
    puts = hub.requests("PUT", r"^/_lfs/")
    assert puts and not any(oid in r.path for r in puts for oid in stored), "an object was uploaded twice"
    local = _uploadable(demo_build)
    assert len(puts) == len(local) - len(stored)
    assert set(hub.files_at(REPO, "v1.0.0")) >= local | {"README.md", "manifest.json"}

    # a third run has nothing to do: no upload, no commit
    hub.clear_log()
    again = _publish(hub, demo_build, include_real=True)
    assert again.already_published
    assert not hub.requests("PUT") and not hub.requests("POST", "/commit/")


def test_transient_errors_are_retried_with_backoff(hub: HubServer, demo_build: Path):
    """Each injected fault costs exactly one more request, whoever retries it: publish itself (commits,
    tags) or huggingface_hub inside a call (LFS uploads); the count of publish's own retries is its own."""
    f503 = hub.fail("POST", r"/commit/main$", status=503, times=2)
    f429 = hub.fail("POST", r"/tag/", status=429, times=1, headers={"Retry-After": "0"})
    drop = hub.fail("PUT", r"^/_lfs/", status=0, after=2, times=1)  # a lost connection mid-upload
    logs: list[str] = []
    res = _publish(hub, demo_build, logs, include_real=True)
    assert (f503.fired, f429.fired, drop.fired) == (2, 1, 1)
    _assert_holds_build(hub, res.tag, demo_build)
    commits = len(hub.history(REPO)) - 1  # our commits on top of the repo's initial commit
    assert len(hub.requests("POST", r"/commit/main$")) == commits + 2
    assert len(hub.requests("POST", r"/tag/")) == 2
    assert len(hub.requests("PUT", r"^/_lfs/")) == len(hub.repo(REPO).lfs) + 1
    assert res.retries == sum("retrying" in line for line in logs) >= 1


def test_retry_accounting_is_our_own(monkeypatch):
    """Our retry loop alone, on the exceptions huggingface_hub raises: lost connections and 5xx are
    retried, a commit race (412) and a 4xx are not, and give-up names the attempts."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from fillup_data import hub as hubmod

    monkeypatch.setattr(hubmod.time, "sleep", lambda s: None)

    def http_error(status: int) -> HfHubHTTPError:
        return HfHubHTTPError(f"{status} error", response=httpx2.Response(
            status, request=httpx2.Request("POST", "http://127.0.0.1/api/datasets/o/n/commit/main")))

    def failing(errors: list[BaseException]):
        calls = []

        def fn():
            calls.append(1)
            if errors:
                raise errors.pop(0)
            return "ok"
        return fn, calls

    retry = hubmod._Retrier(max_retries=3, base_delay=0.0, log=lambda *_: None)
    fn, calls = failing([httpx2.RemoteProtocolError("Server disconnected"), http_error(503)])
    assert retry("x", fn) == "ok" and len(calls) == 3 and retry.retries == 2
    for status in (412, 404):
        retry = hubmod._Retrier(max_retries=3, base_delay=0.0, log=lambda *_: None)
        fn, calls = failing([http_error(status)])
        with pytest.raises(FillupError) as err:
            retry("x", fn)
        assert len(calls) == 1 and retry.retries == 0 and err.value.__cause__.response.status_code == status
    retry = hubmod._Retrier(max_retries=2, base_delay=0.0, log=lambda *_: None)
    fn, calls = failing([http_error(500)] * 5)
    with pytest.raises(FillupError, match=r"(?s)after 3 attempts.*kept failing"):
        retry("x", fn)
    assert len(calls) == 3 and retry.retries == 2


def test_gives_up_after_max_retries_with_clear_error(hub: HubServer, demo_build: Path):
    hub.fail("POST", r"/commit/main$", status=500, times=None)
    logs: list[str] = []
    with pytest.raises(FillupError, match=r"(?s)after 3 attempts.*kept failing.*resumes"):
        _publish(hub, demo_build, logs, include_real=True, max_retries=2)
    assert sum("retrying" in line for line in logs) == 2  # publish's own tries: 1 + max_retries
    assert len(hub.requests("POST", r"/commit/main$")) >= 3  # (more if the client retried inside a try)
    assert not hub.repo(REPO).tags and "manifest.json" not in hub.files_at(REPO)


# --------------------------------------------------------------------------- versions and tags
def test_same_tag_with_a_different_build_is_refused(hub: HubServer, demo_build: Path, tmp_path: Path):
    _publish(hub, demo_build, include_real=True)
    other = tmp_path / "other"
    shutil.copytree(demo_build, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "f" * 64  # a build of another recipe
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = hub.repo(REPO).tags["v1.0.0"]
    with pytest.raises(FillupError, match="tag v1.0.0 already holds a different build.*never moved"):
        _publish(hub, other, include_real=True)
    assert hub.repo(REPO).tags["v1.0.0"] == before
    # the same build again is fine and says so
    logs: list[str] = []
    assert _publish(hub, demo_build, logs, include_real=True).already_published
    assert any("already published" in line for line in logs)
    # another tag for the other build works, and the old tag still serves the old build
    res = _publish(hub, other, tag="v1.0.1", include_real=True)
    assert json.loads(hub.files_at(REPO, res.tag)["manifest.json"])["fingerprint"] == "f" * 64
    assert json.loads(hub.files_at(REPO, "v1.0.0")["manifest.json"])["fingerprint"] != "f" * 64


def test_a_build_scored_after_its_tag_is_published_under_a_new_tag(hub: HubServer, demo_build: Path, capsys):
    """`score` changes neither the fingerprint nor the shards, yet the tag would lack the score columns a
    filtered training run needs: publishing to the same tag is refused, a new tag carries them."""
    from fillup_data.cli import main

    _publish(hub, demo_build, include_real=True)
    before = hub.repo(REPO).tags["v1.0.0"]
    assert main(["score", str(demo_build), "--clip-model", "builtin:tiny-clip", "--device", "cpu", "--quiet"]) == 0
    with pytest.raises(FillupError, match="tag v1.0.0 holds this build without its score columns.*v1.0.0-scored"):
        _publish(hub, demo_build, include_real=True)
    assert hub.repo(REPO).tags["v1.0.0"] == before
    res = _publish(hub, demo_build, tag="v1.0.0-scored", include_real=True)
    assert json.loads(hub.files_at(REPO, res.tag)["manifest.json"])["scores"]["clip_model"] == "builtin:tiny-clip"
    assert "clip_score" in pq.read_schema(io.BytesIO(hub.files_at(REPO, res.tag)["index.parquet"])).names


def test_tag_with_real_images_is_not_reused_without_them(hub: HubServer, demo_build: Path):
    _publish(hub, demo_build, include_real=True)
    with pytest.raises(FillupError, match="with real images.*another --tag"):
        _publish(hub, demo_build, include_real=False)
    # a new tag without real images deletes the real shards from main, the old tag keeps them
    res = _publish(hub, demo_build, include_real=False, tag="v1.0.0-synthetic")
    assert sorted(res.deleted) == _real_shards(demo_build)
    assert not any("-real-" in p for p in hub.files_at(REPO, res.tag))
    assert "data/train-real-00000.tar" in hub.files_at(REPO, "v1.0.0")


def test_foreign_tag_without_manifest_is_refused(hub: HubServer, demo_build: Path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO, repo_type="dataset", private=True)
    api.create_tag(REPO, tag="v1.0.0", repo_type="dataset")
    with pytest.raises(FillupError, match="no manifest.json"):
        _publish(hub, demo_build, include_real=True)


# --------------------------------------------------------------------------- whose repo, which visibility
def _foreign_repo(hub: HubServer, private: bool = True) -> None:
    """Someone's dataset: a card and a data file, uploaded with the real client."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO, repo_type="dataset", private=private)
    api.upload_file(path_or_fileobj=b"# their dataset\n", path_in_repo="README.md", repo_id=REPO, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=REPO, repo_type="dataset")


def test_repo_holding_another_dataset_is_refused_untouched(hub: HubServer, demo_build: Path, tmp_path: Path):
    _foreign_repo(hub)
    before = dict(hub.repo(REPO).branches)
    with pytest.raises(FillupError, match=r"(?s)main already holds README.md, data/train.csv and no fillup-data "
                                          r"manifest.json.*would delete.*another --repo|new --repo"):
        _publish(hub, demo_build, include_real=True)
    assert hub.repo(REPO).branches == before and not hub.repo(REPO).tags
    assert set(hub.files_at(REPO)) == {".gitattributes", "README.md", "data/train.csv"}

    # a fillup-data build of another dataset is someone else's too
    other = _other_build(demo_build, tmp_path)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "another-dataset"
    (other / "manifest.json").write_text(json.dumps(manifest))
    _publish(hub, other, repo_id="org/another", include_real=True)
    hub.clear_log()
    with pytest.raises(FillupError, match="holds the fillup-data dataset 'another-dataset'.*one dataset per repo"):
        _publish(hub, demo_build, repo_id="org/another", include_real=True)
    assert not hub.requests("POST", "/commit/|/tag/|/preupload/") and not hub.requests("PUT")


def test_dry_run_lists_uploads_and_deletions_and_changes_nothing(hub: HubServer, demo_build: Path):
    logs: list[str] = []
    res = _publish(hub, demo_build, logs, include_real=True, dry_run=True)
    assert res.dry_run and (REPO not in {r for _, r in hub.repos})  # not even created
    assert set(res.uploaded) == _uploadable(demo_build) | {"README.md", "manifest.json"}
    assert any(f"would create private dataset repo" in line for line in logs)
    assert any("would upload data/train-real-00000.tar" in line for line in logs)

    _publish(hub, demo_build, include_real=True)
    state = (dict(hub.repo(REPO).branches), dict(hub.repo(REPO).tags), set(hub.repo(REPO).lfs))
    hub.clear_log()
    logs.clear()
    res = _publish(hub, demo_build, logs, include_real=False, tag="v1.0.0-synthetic", dry_run=True)
    assert sorted(res.deleted) == _real_shards(demo_build) and res.commit == ""
    # the card changes without real images, and shows the synthetic-only figure
    assert set(res.uploaded) == {"README.md", "assets/samples-synthetic.png"}
    assert all(any(f"would delete {p}" in line for line in logs) for p in _real_shards(demo_build))
    assert (dict(hub.repo(REPO).branches), dict(hub.repo(REPO).tags), set(hub.repo(REPO).lfs)) == state
    writes = [r for r in hub.log if r.method in ("PUT", "DELETE")
              or (r.method == "POST" and "/paths-info/" not in r.path)]
    assert not writes, writes


def test_new_repo_is_private_unless_public_is_asked(hub: HubServer, demo_build: Path, monkeypatch):
    from fillup_data import recipe as recipe_mod
    from fillup_data.hub import requested_visibility

    res = _publish(hub, demo_build, include_real=True)
    assert hub.repo(REPO).private and res.private
    create = [r for r in hub.requests("POST", "/api/repos/create")]
    assert len(create) == 1

    _publish(hub, demo_build, repo_id="org/public-one", include_real=True, private=False)
    assert not hub.repo("org/public-one").private

    manifest = json.loads((demo_build / "manifest.json").read_text())
    manifest["recipe"]["publish"]["private"] = True
    assert requested_visibility(None, manifest) == (True, "the recipe's publish.private: true")
    assert requested_visibility(False, manifest)[0] is False  # the command line wins, as for --include-real
    manifest["recipe"]["publish"]["private"] = None  # the schema's default: not said, so private
    assert requested_visibility(None, manifest) == (True, "the default (private unless --public)")
    manifest["recipe"]["publish"]["private"] = False  # said: public
    assert requested_visibility(None, manifest) == (False, "the recipe's publish.private: false")
    assert recipe_mod.PublishConfig().private is None


def test_existing_repo_visibility_is_never_changed(hub: HubServer, demo_build: Path):
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo(REPO, repo_type="dataset", private=False)
    with pytest.raises(FillupError, match=r"is public, but this publish asks for private \(the default.*--public"):
        _publish(hub, demo_build, include_real=True)
    assert len(hub.history(REPO)) == 1 and not hub.repo(REPO).private
    res = _publish(hub, demo_build, include_real=True, private=False)
    assert res.tag in hub.repo(REPO).tags and not hub.repo(REPO).private

    _publish(hub, demo_build, repo_id="org/secret", include_real=True, private=True)
    with pytest.raises(FillupError, match=r"is private, but this publish asks for public \(--public\).*--private"):
        _publish(hub, demo_build, repo_id="org/secret", include_real=True, private=False, tag="v1.0.0-b")
    assert hub.repo("org/secret").private and "v1.0.0-b" not in hub.repo("org/secret").tags


# --------------------------------------------------------------------------- concurrent publishes
def _second_client_commits_their_shard(hub: HubServer, other: Path):
    """A hook: another publisher's data commit (the real client), overwriting one of our shard paths."""
    from huggingface_hub import HfApi

    rel = next(s["path"] for s in json.loads((other / "manifest.json").read_text())["shards"]
               if s["origin"] == "synthetic")

    def commit():
        HfApi(endpoint=hub.endpoint, token=TOKEN).upload_file(
            path_or_fileobj=str(other / rel), path_in_repo=rel, repo_id=REPO, repo_type="dataset")
    return rel, commit


def test_concurrent_commit_fails_ours_cleanly_and_rerun_tags_the_right_files(hub: HubServer, demo_build: Path,
                                                                             tmp_path: Path):
    """Another publisher's shard lands between our data commit and our card commit: ours must fail
    without tagging (a tag over their shard and our manifest would be wrong forever)."""
    other = _other_build(demo_build, tmp_path)
    rel, their_commit = _second_client_commits_their_shard(hub, other)
    hub.before("POST", r"/commit/main$", their_commit, after=1)
    with pytest.raises(FillupError, match="(?s)another commit landed on main while publishing.*nothing was tagged"):
        _publish(hub, demo_build, include_real=True)
    assert not hub.repo(REPO).tags and "manifest.json" not in hub.files_at(REPO)
    assert hub.files_at(REPO)[rel] == (other / rel).read_bytes()  # theirs, not overwritten
    # they finish their publish, then the same command finishes ours; each tag holds its own build
    _publish(hub, other, include_real=True)
    res = _publish(hub, demo_build, include_real=True)
    _assert_holds_build(hub, res.tag, demo_build)
    _assert_holds_build(hub, "v1.0.1", other)


def test_tree_is_checked_against_the_manifest_before_tagging(demo_build: Path, tmp_path: Path, monkeypatch):
    """A Hub that took a commit without honouring parent_commit (datasets#7708): the interleaved tree
    holds their shard under our manifest, and the file check keeps the tag off it."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    other = _other_build(demo_build, tmp_path)
    with HubServer(honor_parent_commit=False) as hub:
        rel, their_commit = _second_client_commits_their_shard(hub, other)
        hub.before("POST", r"/commit/main$", their_commit, after=1)
        with pytest.raises(FillupError, match=rf"does not hold this build, so it was not tagged v1.0.0: "
                                              rf"{re.escape(rel)} \(other content\)"):
            _publish(hub, demo_build, include_real=True)
        assert not hub.repo(REPO).tags
        assert json.loads(hub.files_at(REPO)["manifest.json"])["version"] == "1.0.0"  # the interleaved main


# --------------------------------------------------------------------------- lost connections, commit sizes
@pytest.mark.parametrize("commit", [0, 4], ids=["data-commit", "card-commit"])
def test_lost_answer_to_a_commit_completes_by_retry(hub: HubServer, demo_build: Path, commit: int):
    """The commit lands but its answer is lost: publish retries, nothing is committed twice, and the
    run ends with the tag on a main that holds this build."""
    lost = hub.fail("POST", r"/commit/main$", status=0, handled=True, after=commit)
    res = _publish(hub, demo_build, include_real=True, max_files_per_commit=10)
    assert lost.fired == 1 and res.retries >= 1
    assert hub.repo(REPO).tags[res.tag] == hub.repo(REPO).branches["main"] == res.commit
    assert len(hub.history(REPO)) == 1 + -(-len(_uploadable(demo_build)) // 10) + 1  # no commit twice
    _assert_holds_build(hub, res.tag, demo_build)


def test_commits_are_split_under_the_per_commit_limit(hub: HubServer, demo_build: Path):
    res = _publish(hub, demo_build, include_real=True, max_files_per_commit=4)
    history = hub.history(REPO, res.tag)
    ours = history[1:]  # after the repo's initial commit
    n = len(_uploadable(demo_build))
    assert len(ours) == -(-n // 4) + 1  # the data in ceil(n / 4) commits, then card + manifest
    assert all(len(changed) <= 4 for _, changed in ours)
    assert ours[-1][1] == {"README.md", "manifest.json"}
    assert set().union(*(changed for _, changed in ours)) == _uploadable(demo_build) | {"README.md", "manifest.json"}


def test_more_files_in_a_folder_than_the_hub_takes_is_refused(demo_build: Path, monkeypatch):
    from fillup_data import hub as hubmod

    monkeypatch.setattr(hubmod, "MAX_FILES_PER_FOLDER", 3)
    with pytest.raises(FillupError, match=r"/data: \d+ files to publish, the Hub takes at most 3.*max_samples"):
        publish(demo_build, REPO, include_real=True, progress=False, log=lambda *_: None)


# --------------------------------------------------------------------------- what leaves the machine
def test_local_source_root_is_not_published(hub: HubServer, demo_build: Path):
    manifest = json.loads((demo_build / "manifest.json").read_text())
    manifest["recipe"]["source"] = {"kind": "split_file", "root": "/home/alice/datasets/ImageNet-LT",
                                    "train": "ImageNet_LT_train.txt", "test": None, "class_names": None,
                                    "imbalance_factor": None, "imbalance_max": None}
    (demo_build / "manifest.json").write_text(json.dumps(manifest, indent=2))
    local = (demo_build / "manifest.json").read_bytes()
    logs: list[str] = []
    res = _publish(hub, demo_build, logs, include_real=True)
    files = hub.files_at(REPO, res.tag)
    assert not any(b"/home/alice" in data for data in files.values())
    published = json.loads(files["manifest.json"])
    assert published["recipe"]["source"]["root"] == "<local path, not published>"
    assert published["fingerprint"] == manifest["fingerprint"] and published["shards"] == manifest["shards"]
    assert (demo_build / "manifest.json").read_bytes() == local  # the build keeps its own record
    assert any("recipe.source.root replaced" in line for line in logs)
    from fillup_data.recipe import parse_recipe

    parse_recipe(published["recipe"])  # still a valid recipe (regenerate reads it)
    assert _publish(hub, demo_build, include_real=True).already_published


def test_only_the_builds_own_outputs_are_uploaded_whatever_the_card_links(hub: HubServer, demo_build: Path,
                                                                         tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (demo_build / "assets" / "leak.png").symlink_to(secret)
    (demo_build / "notes.png").write_bytes(b"\x89PNG local notes")
    manifest = json.loads((demo_build / "manifest.json").read_text())
    # class names come from the user's class list and land in the card's YAML
    manifest["classes"][0]["name"] = "![a](report.json) ![b](../../etc/passwd) ![c](notes.png)"
    manifest["classes"][1]["name"] = "<img src='assets/leak.png'> ![d](.fillup/plan.json)"
    (demo_build / "manifest.json").write_text(json.dumps(manifest, indent=2))
    res = _publish(hub, demo_build, include_real=True)
    files = hub.files_at(REPO, res.tag)
    assert "report.json" in files["README.md"].decode()  # the link is there, the file is not
    assert set(files) == {".gitattributes", "README.md", "manifest.json"} | _uploadable(demo_build)
    assert not any(b"not for the Hub" in data for data in files.values())


# --------------------------------------------------------------------------- bad input, CLI
def test_bad_input_is_a_clear_error(demo_build: Path, tmp_path: Path):
    with pytest.raises(FillupError, match="no manifest"):
        publish(tmp_path, REPO, progress=False, log=lambda *_: None)
    with pytest.raises(FillupError, match="ORG/NAME"):
        publish(demo_build, "no-namespace", progress=False, log=lambda *_: None)
    with pytest.raises(FillupError, match="--tag"):
        publish(demo_build, REPO, tag="bad tag", progress=False, log=lambda *_: None)
    with (demo_build / "data" / "train-synthetic-00000.tar").open("ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(FillupError, match=r"train-synthetic-00000.tar: .* bytes but manifest.json says"):
        publish(demo_build, REPO, include_real=True, progress=False, log=lambda *_: None)
    (demo_build / "data" / "train-synthetic-00000.tar").unlink()
    with pytest.raises(FillupError, match="missing; relaunch the build"):
        publish(demo_build, REPO, include_real=True, progress=False, log=lambda *_: None)
    manifest = json.loads((demo_build / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["origin"] == "real"]
    (demo_build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FillupError, match="only real images.*--include-real"):
        publish(demo_build, REPO, include_real=False, progress=False, log=lambda *_: None)


def test_bad_token_is_a_clear_error(hub: HubServer, demo_build: Path):
    hub.fail("POST", r"/api/repos/create", status=401, message="Invalid credentials in Authorization header")
    with pytest.raises(FillupError, match="HF_TOKEN") as err:
        _publish(hub, demo_build, include_real=True)
    assert TOKEN not in str(err.value)


def test_cli_publish(hub: HubServer, demo_build: Path, monkeypatch, capsys):
    import argparse

    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(demo_build / "no-token-file"))
    parser = argparse.ArgumentParser(prog="fillup-data")
    add_publish_parser(parser.add_subparsers())
    args = parser.parse_args(["publish", str(demo_build), "--repo", REPO, "--tag", "v1.0.0-rc1", "--private",
                              "--no-progress"])
    assert args.include_real is None  # the recipe decides unless the flag is given
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f'load_dataset("{REPO}", revision="v1.0.0-rc1")' in out and TOKEN not in out
    assert "v1.0.0-rc1" in hub.repo(REPO).tags and hub.repo(REPO).private
    assert all(r.authenticated for r in hub.requests("POST"))


def test_cli_visibility_flags_dry_run_and_refusal_exit_status(hub: HubServer, demo_build: Path, monkeypatch, capsys):
    import huggingface_hub.constants as C

    from fillup_data.cli import main

    monkeypatch.setattr(C, "ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(demo_build / "no-token-file"))
    with pytest.raises(SystemExit) as exit_:
        main(["publish", str(demo_build), "--repo", REPO, "--private", "--public"])
    assert exit_.value.code == 2  # argparse: not allowed together
    capsys.readouterr()
    assert main(["publish", str(demo_build), "--repo", REPO, "--public", "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "would create public dataset repo" in out and "would upload manifest.json" in out and not hub.repos
    assert main(["publish", str(demo_build), "--repo", REPO, "--public", "--no-progress"]) == 0
    assert not hub.repo(REPO).private
    capsys.readouterr()
    assert main(["publish", str(demo_build), "--repo", REPO, "--tag", "v2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is public, but this publish asks for private" in err
    assert "Traceback" not in err and TOKEN not in err


# --------------------------------------------------------------------------- the real Hub (opt-in)
@pytest.mark.skipif(not (os.environ.get("HF_TOKEN") and os.environ.get("FILLUP_LIVE_HUB_REPO")),
                    reason="set HF_TOKEN and FILLUP_LIVE_HUB_REPO=org/name to publish to the real Hub")
def test_live_publish_to_the_hub(demo_build: Path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    repo = os.environ["FILLUP_LIVE_HUB_REPO"]
    tag = f"v1.0.0-test{os.getpid()}"
    res = publish(demo_build, repo, tag=tag, private=True, include_real=True, progress=False,
                  endpoint="https://huggingface.co")
    assert res.tag == tag
    again = publish(demo_build, repo, tag=tag, include_real=True, progress=False, endpoint="https://huggingface.co")
    assert again.already_published
