"""Issue 13, "one schema": the sample metadata, the manifest and the groups are each defined once
(``fillup_data.schema``) and everything that writes or reads them derives from that; the new key
``source_key`` is written by new builds and read as "" from builds made before it."""

import json
import re
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fillup_data.build import run_build
from fillup_data.errors import FillupError
from fillup_data.recipe import load_recipe
from fillup_data.schema import sample
from fillup_data.schema.manifest import Manifest
from fillup_data.schema.sample import (METADATA_KEYS, keys_of_version, real_metadata, synthetic_metadata,
                                       validate)
from fillup_data.shards.card import features, render_card
from fillup_data.shards.index_parquet import index_row, read_index, write_index
from fillup_data.shards.writer import ShardWriter
from fillup_data.state import write_json_atomic

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
FIRST_RELEASE_KEYS = ("label", "class_name", "is_synthetic", "strategy", "prompt", "seed", "token_step",
                      "guidance_scale", "num_inference_steps", "model", "source_path")


def _synthetic(**over):
    args = dict(strategy="image_variation", prompt="", seed=7, token_step=-1, guidance_scale=3, num_inference_steps=50,
                model="m", source_key="train-real-00003-000001")
    args.update(over)
    return synthetic_metadata(2, "cat", **args)


# --------------------------------------------------------------------------- the sample metadata
def test_every_key_has_its_type_arrow_type_card_dtype_and_not_applicable_value():
    assert [f.name for f in sample.FIELDS] == list(METADATA_KEYS)
    assert keys_of_version(1) == FIRST_RELEASE_KEYS  # what builds before source_key hold
    assert METADATA_KEYS == FIRST_RELEASE_KEYS + ("source_key",)
    arrow = {int: "int64", float: "double", bool: "bool", str: "string"}
    dtype = {int: "int64", float: "float64", bool: "bool", str: "string"}
    for f in sample.FIELDS:
        assert str(f.arrow_type) == arrow[f.type] and f.feature_dtype == dtype[f.type], f.name
        assert f.doc, f.name
        assert f.not_applicable is None or type(f.not_applicable) is f.type, f.name
    real, syn = real_metadata(0, "cat", "cats/1.jpg"), _synthetic()
    assert list(real) == list(syn) == list(METADATA_KEYS)
    assert real["source_key"] == "" and syn["source_key"] == "train-real-00003-000001"
    assert validate(real) == real and validate(syn)["guidance_scale"] == 3.0  # an int scale is written as a float
    assert _synthetic(source_key="")["source_key"] == "" and "source_key" not in FIRST_RELEASE_KEYS


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("seed"), r"keys differ from the contract: missing \['seed'\], extra \[\]"),
    (lambda m: m.pop("source_key"), r"keys differ from the contract: missing \['source_key'\]"),
    (lambda m: m.update(score=0.5), r"keys differ from the contract: missing \[\], extra \['score'\]"),
    (lambda m: m.update(prompt=None), r"'prompt' is null"),
    (lambda m: m.update(source_key=None), r"'source_key' is null"),
    (lambda m: m.update(seed="3"), r"'seed' must be int, got '3'"),
    (lambda m: m.update(label=True), r"'label' must be int, got True"),
    (lambda m: m.update(is_synthetic=1), r"'is_synthetic' must be bool, got 1"),
    (lambda m: m.update(guidance_scale="7.5"), r"'guidance_scale' must be float, got '7.5'"),
    (lambda m: m.update(source_key=3), r"'source_key' must be str, got 3"),
])
def test_the_writer_refuses_metadata_off_the_contract_naming_the_sample(tmp_path, change, message):
    writer = ShardWriter(tmp_path / "train-synthetic-00004.tar", "jpg")
    meta = _synthetic()
    change(meta)
    with pytest.raises(ValueError, match=r"^sample train-synthetic-00004-000009 \(train-synthetic-00004\.tar\): "
                                         r"metadata " + message):
        writer.write("train-synthetic-00004-000009", 2, b"jpg", meta)
    writer.abort()


@pytest.fixture
def schema_with_a_new_key(monkeypatch):
    """The schema as a later change (a score, say) would leave it: one more MetadataField."""
    new = sample.MetadataField("sharpness", float, -1.0, "a score added later", since=sample.SCHEMA_VERSION + 1)
    fields = sample.FIELDS + (new,)
    monkeypatch.setattr(sample, "FIELDS", fields)
    monkeypatch.setattr(sample, "FIELD_BY_NAME", {f.name: f for f in fields})
    monkeypatch.setattr(sample, "METADATA_KEYS", tuple(f.name for f in fields))
    return new


def test_a_key_added_to_the_schema_reaches_shards_index_and_card(tmp_path, schema_with_a_new_key):
    meta = real_metadata(0, "cat", "cats/1.jpg")
    assert meta["sharpness"] == -1.0
    writer = ShardWriter(tmp_path / "data" / "train-real-00000.tar", "jpg")
    writer.write("train-real-00000-000000", 0, b"jpg", meta)
    writer.close()
    with tarfile.open(tmp_path / "data" / "train-real-00000.tar") as tar:
        stored = json.loads(tar.extractfile("train-real-00000-000000.json").read())
    assert set(stored) == set(METADATA_KEYS) | {"sharpness"}
    write_index(tmp_path / "index.parquet", [index_row(writer.records[0], "data/train-real-00000.tar", "train", meta)])
    schema = pq.read_schema(tmp_path / "index.parquet")
    assert str(schema.field("sharpness").type) == "double" and schema.names[-2:] == ["sharpness", "retries"]
    assert read_index(tmp_path / "index.parquet")[0]["sharpness"] == -1.0
    manifest = {"recipe": {"shards": {"image_format": "jpg"}}, "classes": [{"index": 0, "name": "cat"}],
                "sample_keys": list(sample.METADATA_KEYS)}
    struct = next(f["struct"] for f in features(manifest) if f["name"] == "json")
    assert struct[-1] == {"name": "sharpness", "dtype": "float64"}
    with pytest.raises(ValueError, match=r"missing \['sharpness'\]"):
        validate({k: v for k, v in meta.items() if k != "sharpness"})


# --------------------------------------------------------------------------- builds made before source_key
def _tiny_demo():
    return load_recipe(DEMO, ["generator.strategy=none", "source.max_images=6", "source.min_images=2",
                              "source.test_per_class=1", "shards.max_samples=9"])


@pytest.fixture(scope="module")
def old_build(tmp_path_factory):
    """A build as the code before ``source_key`` wrote it: shards and index with the first release's
    keys, a manifest without ``sample_keys``, and that code's card."""
    out = tmp_path_factory.mktemp("old") / "out"
    first = tuple(f for f in sample.FIELDS if f.since == 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "FIELDS", first)
        patch.setattr(sample, "FIELD_BY_NAME", {f.name: f for f in first})
        patch.setattr(sample, "METADATA_KEYS", tuple(f.name for f in first))
        run_build(_tiny_demo(), out, workers=1, progress=False, log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["sample_keys"]
    write_json_atomic(out / "manifest.json", manifest)
    (out / "README.md").write_text(render_card(manifest), encoding="utf-8")
    return out


def test_an_old_build_is_what_the_previous_code_wrote(old_build):
    assert "source_key" not in pq.read_schema(old_build / "index.parquet").names
    with tarfile.open(next((old_build / "data").glob("train-real-*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        assert tuple(sorted(json.loads(tar.extractfile(member).read()))) == tuple(sorted(FIRST_RELEASE_KEYS))
    assert "sample_keys" not in json.loads((old_build / "manifest.json").read_text())


def test_an_old_build_reads_through_the_manifest_the_index_and_the_loader(old_build):
    from fillup_data.loader import TrainingData, eval_transform, make_loader

    manifest = Manifest.read(old_build / "manifest.json")
    assert manifest.sample_keys is None and manifest.metadata_keys == FIRST_RELEASE_KEYS
    rows = read_index(old_build / "index.parquet")
    assert rows and all(r["source_key"] == "" for r in rows)
    assert read_index(old_build / "index.parquet", columns=["key", "source_key"])[0]["source_key"] == ""
    data = TrainingData.open(old_build)
    keys = [k for batch in make_loader(data, "real", "train", 4, eval_transform(8, 8), train=False, return_keys=True)
            for k in batch[2]]
    assert sorted(keys) == sorted(r["key"] for r in rows if r["split"] == "train")


def test_an_old_build_loads_with_datasets_and_its_republished_card_declares_its_own_keys(old_build, tmp_path):
    import datasets

    ds = datasets.load_dataset(str(old_build), split="train")
    assert tuple(ds.features["json"]) == FIRST_RELEASE_KEYS
    # publish re-renders the card with today's code: it still declares what the old shards hold, so no
    # column of None values appears where the shards have no source_key
    manifest = json.loads((old_build / "manifest.json").read_text())
    card = render_card(manifest, include_real=True, repo_id="org/old")
    copy = tmp_path / "copy"
    shutil.copytree(old_build, copy)
    (copy / "README.md").write_text(card, encoding="utf-8")
    ds = datasets.load_dataset(str(copy), split="train")
    assert tuple(ds.features["json"]) == FIRST_RELEASE_KEYS
    assert all(v is not None for v in ds[0]["json"].values())


def test_a_new_build_records_its_sample_keys_and_writes_source_key(tmp_path):
    out = tmp_path / "out"
    run_build(_tiny_demo(), out, workers=1, progress=False, log=lambda *_: None)
    manifest = Manifest.read(out / "manifest.json")
    assert manifest.sample_keys == list(METADATA_KEYS)
    assert all(r["source_key"] == "" for r in pq.read_table(out / "index.parquet").to_pylist())
    with tarfile.open(out / manifest.shards[0].path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        assert json.loads(tar.extractfile(member).read())["source_key"] == ""


# --------------------------------------------------------------------------- the manifest
def test_the_manifest_reads_and_writes_the_bytes_assemble_wrote(old_build, tmp_path):
    manifest = Manifest.read(old_build / "manifest.json")
    manifest.write(tmp_path / "manifest.json")
    assert (tmp_path / "manifest.json").read_bytes() == (old_build / "manifest.json").read_bytes()
    assert manifest.model is None and "model" in manifest.to_dict()  # said: nothing was generated
    assert all(s.pixel_setup is None and "pixel_setup" not in s.to_dict() for s in manifest.shards)  # real shards
    assert [c.index for c in manifest.classes] == list(range(len(manifest.classes)))


def _broken(tmp_path, old_build, edit) -> Path:
    data = json.loads((old_build / "manifest.json").read_text())
    edit(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("fingerprint"), r"missing key 'fingerprint'"),
    (lambda m: m.update(classes={}), r"missing or malformed 'classes' list"),
    (lambda m: m["classes"][1].pop("real"), r"classes\[1\] has no 'real'"),
    (lambda m: m["classes"][1].update(index=7), r"class indices are not 0\.\."),
    (lambda m: m["shards"][0].pop("origin"), r"shards\[0\] has no 'origin'"),
    (lambda m: m["shards"][0].update(path="../x.tar"), r"shards\[0\]\.path '\.\./x\.tar' is not a file under data/"),
    (lambda m: m["shards"][0].update(num_samples=-1), r"shards\[0\]\.num_samples -1 is not a count"),
    (lambda m: m.update(sample_keys=["label", "mood"]), r"sample_keys names keys .* \['mood'\]"),
])
def test_a_bad_manifest_is_an_error_naming_the_file_and_field(tmp_path, old_build, edit, message):
    path = _broken(tmp_path, old_build, edit)
    with pytest.raises(FillupError, match=rf"^{re.escape(str(path))}: .*{message}"):
        Manifest.read(path)


def test_a_manifest_that_is_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{\n  "name": "x",\n  oops\n}\n')
    with pytest.raises(FillupError, match=rf"^{re.escape(str(path))}:3: not valid JSON"):
        Manifest.read(path)
    with pytest.raises(FillupError, match=r"no manifest.json"):
        Manifest.read(tmp_path / "missing" / "manifest.json")


# --------------------------------------------------------------------------- groups and the fingerprint
def test_groups_are_defined_once():
    from fillup_data import loader, plan
    from fillup_data.demo import experiment
    from fillup_data.recipe import GroupsConfig
    from fillup_data.schema import groups
    from fillup_data.train import evaluate

    assert plan.group_of is loader.group_of is groups.group_of
    assert plan.GROUPS is evaluate.GROUPS is groups.GROUPS and experiment.COLUMNS == ("overall", *groups.GROUPS)
    thresholds = GroupsConfig(many_above=10, few_below=3)
    assert [groups.group_of(n, thresholds) for n in (11, 10, 3, 2)] == ["many", "medium", "medium", "few"]
    assert [groups.group_of(n, 10, 3) for n in (11, 10, 3, 2)] == ["many", "medium", "medium", "few"]
    assert groups.count_groups([{"group": "few"}, {"group": "many"}, {"group": "few"}]) == {
        "many": 1, "medium": 0, "few": 2}


def test_the_fingerprint_changes_with_the_sample_schema(monkeypatch):
    from fillup_data import recipe as recipe_module

    r = _tiny_demo()
    before = recipe_module.fingerprint(r)
    monkeypatch.setattr(recipe_module, "SCHEMA_VERSION", recipe_module.SCHEMA_VERSION + 1)
    assert recipe_module.fingerprint(r) != before
