from pathlib import Path

import pytest

from fillup_data.errors import RecipeError
from fillup_data.recipe import InversionConfig, apply_overrides, fingerprint, load_recipe, parse_recipe

RECIPES = sorted(Path(__file__).resolve().parent.parent.glob("recipes/*.yaml"))


def minimal(**over):
    d = {"name": "x", "source": {"kind": "demo"}}
    d.update(over)
    return d


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.version


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "imagenet_lt.yaml", "places_lt.yaml", "inat2018.yaml", "cifar100_lt.yaml"} <= names


def test_paper_defaults():
    inv = InversionConfig()
    assert (inv.num_vectors, inv.init_word, inv.learning_rate, inv.batch_size) == (4, "object", 5e-3, 2)
    # paper B.3: steps = min(max(100 * n, 2000), 10000)
    assert inv.steps_for(3) == 2000 and inv.steps_for(50) == 5000 and inv.steps_for(1280) == 10000
    assert inv.checkpoint_steps(3)[:2] == [100, 200] and inv.checkpoint_steps(3)[-1] == 2000
    assert len(inv.checkpoint_steps(1280)) == 100


def test_unknown_key_names_field_path():
    with pytest.raises(RecipeError) as e:
        parse_recipe(minimal(fill={"policy": "fill_to", "target": 5, "tagret": 3}))
    assert "fill.tagret" in str(e.value) and "unknown field" in str(e.value)


def test_wrong_type_and_range_name_field_and_value():
    with pytest.raises(RecipeError) as e:
        parse_recipe(minimal(shards={"quality": 101}, inversion={"batch_size": "two"}))
    msg = str(e.value)
    assert "shards.quality" in msg and "101" in msg and "less than or equal to 100" in msg
    assert "inversion.batch_size" in msg and "'two'" in msg


def test_unknown_source_kind_lists_allowed():
    with pytest.raises(RecipeError) as e:
        parse_recipe(minimal(source={"kind": "s3"}))
    assert "split_file" in str(e.value) and "demo" in str(e.value)


def test_policy_needs_target():
    with pytest.raises(RecipeError, match="needs 'target'"):
        parse_recipe(minimal(fill={"policy": "fill_to"}))
    with pytest.raises(RecipeError, match="takes no 'target'"):
        parse_recipe(minimal(fill={"policy": "fill_to_max", "target": 3}))


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("DATA_ROOT_X", "/data/in")
    r = parse_recipe(minimal(source={"kind": "split_file", "root": "${DATA_ROOT_X}", "train": "${T:-t.txt}"}))
    assert r.source.root == "/data/in" and r.source.train == "t.txt"
    monkeypatch.delenv("DATA_ROOT_X")
    with pytest.raises(RecipeError, match=r"source.root: environment variable DATA_ROOT_X is not set"):
        parse_recipe(minimal(source={"kind": "split_file", "root": "${DATA_ROOT_X}", "train": "t"}))


def test_overrides_keep_types(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nsource: {kind: demo}\nfill: {policy: fill_to, target: 10}\n")
    r = load_recipe(p, ["fill.target=500", "inversion.learning_rate=1e-3", "generator.safety_checker=true",
                        "generator.strategy=none"])
    assert r.fill.target == 500 and r.inversion.learning_rate == 1e-3 and r.generator.safety_checker is True
    assert r.generator.strategy == "none"
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(RecipeError, match="fill.bogus"):
        load_recipe(p, ["fill.bogus=1"])


def test_yaml_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsource: {kind: demo\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: not valid YAML"):
        load_recipe(p)


def test_fingerprint_stable_and_sensitive():
    a = parse_recipe(minimal())
    assert fingerprint(a) == fingerprint(parse_recipe(minimal()))
    assert fingerprint(a) != fingerprint(parse_recipe(minimal(seed=1)))
    assert fingerprint(a, "m@1") != fingerprint(a, "m@2")
    # where the data lives and where it is published do not change the bytes built
    s1 = minimal(source={"kind": "split_file", "root": "/a", "train": "t"})
    s2 = minimal(source={"kind": "split_file", "root": "/b", "train": "t"}, publish={"repo": "o/n"})
    assert fingerprint(parse_recipe(s1)) == fingerprint(parse_recipe(s2))
