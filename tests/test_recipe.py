import json
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


# --------------------------------------------------------------------------- ${VAR}: where, and which
def split_file(**paths):
    return {"kind": "split_file", "root": "/data", "train": "t.txt", **paths}


@pytest.mark.parametrize("name", ["HF_TOKEN", "hf_token", "AWS_SECRET_ACCESS_KEY", "MY_Api_Key", "DB_PASSWORD"])
def test_secret_looking_variable_is_refused_even_in_a_path_field(monkeypatch, name):
    monkeypatch.setenv(name, "hf_abcdefgh")
    with pytest.raises(RecipeError) as e:
        parse_recipe(minimal(source=split_file(root="${" + name + "}")))
    assert "source.root" in str(e.value) and name in str(e.value) and "secret" in str(e.value)
    assert "hf_abcdefgh" not in str(e.value)
    with pytest.raises(RecipeError, match="looks like a secret"):  # a default does not make it safe
        parse_recipe(minimal(source=split_file(root="${" + name + ":-/data}")))


def test_variable_outside_path_fields_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setenv("CLASS_WORD", "zebra")
    for section, field, value in [
        ("generator", "prompt", "a photo of a {token} ${CLASS_WORD}"),
        ("publish", "license", "${CLASS_WORD}"),
        ("publish", "repo", "${CLASS_WORD}/x"),
    ]:
        with pytest.raises(RecipeError) as e:
            parse_recipe(minimal(**{section: {field: value}}))
        assert f"{section}.{field}: ${{CLASS_WORD}} is not expanded here" in str(e.value)
        assert "source.root" in str(e.value)  # says where variables do work


def test_variables_expand_in_data_and_model_paths(monkeypatch):
    monkeypatch.setenv("DATA_X", "/mnt/d")
    r = parse_recipe(minimal(source=split_file(root="${DATA_X}", train="${DATA_X}/t", test="${TST:-v.txt}",
                                               class_names="${DATA_X}/c"),
                             generator={"model": "${MODELS_X:-/models}/sd15"}))
    assert (r.source.root, r.source.train, r.source.test, r.source.class_names) == ("/mnt/d", "/mnt/d/t", "v.txt", "/mnt/d/c")
    assert r.generator.model == "/models/sd15"
    r = parse_recipe(minimal(source={"kind": "hf_dataset", "path": "${CIFAR_X:-uoft-cs/cifar100}"}))
    assert r.source.path == "uoft-cs/cifar100"


def test_stored_recipe_is_read_back_verbatim(monkeypatch):
    from fillup_data.recipe import parse_stored_recipe

    monkeypatch.setenv("HOME", "/home/someone")
    stored = parse_recipe(minimal(source=split_file())).resolved()
    # a build whose data folder is literally named "${HOME}", and a prompt from a build made before
    # variables were refused in prompts: a manifest holds the resolved recipe, never re-expanded
    stored["source"]["root"] = "/mnt/${HOME}/imagenet"
    stored["generator"]["prompt"] = "a photo of a {token} ${HOME}"
    again = parse_stored_recipe(json.loads(json.dumps(stored)), "build/manifest.json")
    assert again.resolved() == stored
    assert fingerprint(again) == fingerprint(parse_stored_recipe(stored))
    with pytest.raises(RecipeError, match="build/manifest.json: the recipe is not valid"):
        parse_stored_recipe({**stored, "seed": -1}, "build/manifest.json")


# --------------------------------------------------------------------------- the prompt needs its placeholder
def test_textual_inversion_prompt_without_token_fails_validation():
    with pytest.raises(RecipeError) as e:
        parse_recipe(minimal(generator={"strategy": "textual_inversion", "prompt": "a photo of a {class_name}"}))
    assert "generator.prompt" in str(e.value) and "{token}" in str(e.value) and "textual_inversion" in str(e.value)
    parse_recipe(minimal(generator={"strategy": "textual_inversion", "prompt": "a {class_name}, a {token}"}))


def test_single_template_prompt_needs_the_class_name_and_none_needs_nothing():
    with pytest.raises(RecipeError) as e:
        parse_recipe(minimal(generator={"strategy": "single_template", "prompt": "a photo"}))
    assert "generator.prompt" in str(e.value) and "{class_name}" in str(e.value)
    for prompt in ("a photo of a {class_name}", "a photo of a {token}"):
        parse_recipe(minimal(generator={"strategy": "single_template", "prompt": prompt}))
    parse_recipe(minimal(generator={"strategy": "none", "prompt": "unused"}))


def test_validate_cli_names_the_prompt_field(tmp_path, capsys):
    from fillup_data.cli import main

    p = tmp_path / "r.yaml"
    p.write_text("name: x\nsource: {kind: demo}\ngenerator: {prompt: 'a photo of a {class_name}'}\n")
    assert main(["validate", str(p)]) == 2
    assert "generator.prompt: must contain {token}" in capsys.readouterr().err


# --------------------------------------------------------------------------- YAML aliases
BILLION_LAUGHS = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    + ["name: x", "source: {kind: demo}", ""]
)  # 1 KB of YAML, 9^10 strings once every alias is expanded


def test_alias_bomb_is_refused_quickly(tmp_path):
    import resource
    import subprocess
    import sys

    def limit_memory():  # should the check regress, the bomb must not take the machine down with it
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    p = tmp_path / "bomb.yaml"
    p.write_text(BILLION_LAUGHS)
    done = subprocess.run([sys.executable, "-m", "fillup_data.cli", "validate", str(p)], capture_output=True,
                          text=True, timeout=20, preexec_fn=limit_memory)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bomb.yaml: with its aliases" in done.stderr and "more than 10,000 values" in done.stderr
    assert "Traceback" not in done.stderr


def test_self_referring_alias_and_deep_nesting_are_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nsource: {kind: demo}\nseed: &loop [1, *loop]\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3: a YAML alias refers to a value that contains it"):
        load_recipe(p)
    p.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(p)


def test_a_few_aliases_are_still_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nsource: {kind: demo}\nversion: &v 1.2.0\nparent_version: *v\n"
                 "fill: {policy: addon, target: &n 40}\ngroups: {many_above: *n}\n")
    r = load_recipe(p)
    assert r.parent_version == r.version == "1.2.0" and r.fill.target == r.groups.many_above == 40


@pytest.mark.parametrize("field", ["generator.batch_size", "inversion.classes_per_pass"])
def test_auto_sizes_accept_auto_or_a_positive_integer(field):
    demo = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
    section, key = field.split(".")
    assert getattr(getattr(load_recipe(demo, [f"{field}=auto"]), section), key) == "auto"
    assert getattr(getattr(load_recipe(demo, [f"{field}=3"]), section), key) == 3
    for bad in ("0", "-2"):
        with pytest.raises(RecipeError, match=rf"{field}: must be auto or a positive integer \(got -?\d\)"):
            load_recipe(demo, [f"{field}={bad}"])
