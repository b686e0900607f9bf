"""Model loading, the built-in tiny pipeline and the shipped full-size configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fillup_data.errors import FillupError
import fillup_data.models.architectures as architectures
from fillup_data.models import cache_dir, count_parameters, load_component_config, load_pipeline, resolve_model
from fillup_data.models.architectures import BUILTIN_RECORD, save_random_pipeline_atomically


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sd15_configs_have_the_real_parameter_counts():
    counts = count_parameters("sd15")  # meta device: no memory, no init
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert load_component_config("sd15", "tokenizer")["model_max_length"] == 77
    assert load_component_config("sd15", "scheduler")["beta_schedule"] == "scaled_linear"


def test_tiny_model_builds_deterministically(tmp_path):
    a = save_random_pipeline_atomically("tiny", tmp_path / "a", seed=0)
    b = save_random_pipeline_atomically("tiny", tmp_path / "b", seed=0)
    c = save_random_pipeline_atomically("tiny", tmp_path / "c", seed=1)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db
    assert "unet/diffusion_pytorch_model.safetensors" in da
    assert da["unet/diffusion_pytorch_model.safetensors"] != dc["unet/diffusion_pytorch_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_builtin_alias_resolves_to_cached_folder(tiny_model_cache):
    path = Path(resolve_model("builtin:tiny-sd"))
    assert path.is_dir() and (path / "model_index.json").is_file()
    assert str(path).startswith(str(tiny_model_cache))
    assert resolve_model("builtin:tiny-sd") == str(path)
    assert resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(FillupError, match="builtin:tiny-sd"):
        resolve_model("builtin:nope")


def test_tiny_tokenizer_knows_init_word_and_prompt_words(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert tok.tokenize("object") == ["object</w>"]
    ids = tok("a photo of a red cat, cropped!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.model_max_length == 77


@pytest.mark.parametrize(
    "name,cls", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler")]
)
def test_load_pipeline_swaps_scheduler(tiny_model_cache, name, cls):
    pipe = load_pipeline("builtin:tiny-sd", device="cpu", scheduler=name)
    assert type(pipe.scheduler).__name__ == cls
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # the model's schedule is kept
    assert pipe.unet.dtype == torch.float32  # auto on CPU
    assert pipe.safety_checker is None


def test_load_pipeline_errors_are_actionable(tiny_model_cache, tmp_path):
    with pytest.raises(FillupError, match="ships no safety checker"):
        load_pipeline("builtin:tiny-sd", device="cpu", safety_checker=True)
    with pytest.raises(FillupError, match="cannot load"):
        load_pipeline(str(tmp_path / "missing-model"), device="cpu")


def test_load_pipeline_dtype(tiny_model_cache):
    pipe = load_pipeline("builtin:tiny-sd", device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16


@pytest.fixture
def counted_builds(tmp_path, monkeypatch):
    """A fresh FILLUP_CACHE (the session's shared one stays intact) and a list of the builds made."""
    monkeypatch.setenv("FILLUP_CACHE", str(tmp_path / "cache"))
    builds = []
    real = architectures.build_random_pipeline

    def counting(config_set, path=None, seed=0):
        builds.append(config_set)
        return real(config_set, path, seed)

    monkeypatch.setattr(architectures, "build_random_pipeline", counting)
    return builds


def test_model_cache_is_private_to_the_test_session(tmp_path_factory):
    # no fixture asked for: tests/conftest.py must still keep builds out of the user's ~/.cache
    assert cache_dir().is_relative_to(tmp_path_factory.getbasetemp())
    assert not cache_dir().is_relative_to(Path.home() / ".cache")


def test_builtin_model_built_once_then_reused(counted_builds):
    path = Path(resolve_model("builtin:tiny-sd"))
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model("builtin:tiny-sd") == str(path)
    assert counted_builds == ["tiny"]  # the second call built nothing
    assert weights.stat().st_mtime_ns == mtime


def test_corrupted_builtin_model_is_rebuilt_not_reused(counted_builds):
    path = Path(resolve_model("builtin:tiny-sd"))
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only a content check sees it
    weights.write_bytes(bytes(data))
    assert resolve_model("builtin:tiny-sd") == str(path)
    assert counted_builds == ["tiny", "tiny"]
    assert weights.read_bytes() == good
    (path / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # a missing file too
    resolve_model("builtin:tiny-sd")
    assert len(counted_builds) == 3 and (path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # nothing left aside


@pytest.mark.parametrize("record", [
    {"config_set": "tiny", "seed": 0},  # what earlier versions wrote: no builder, no digests
    "builder from another version",
    "",  # empty: a crash while writing it
])
def test_builtin_model_from_another_builder_is_rebuilt(counted_builds, record):
    path = Path(resolve_model("builtin:tiny-sd"))
    if record == "builder from another version":
        data = json.loads((path / BUILTIN_RECORD).read_text())
        record = {**data, "builder": "0" * 64}
    (path / BUILTIN_RECORD).write_text(json.dumps(record) if record else "")
    resolve_model("builtin:tiny-sd")
    assert counted_builds == ["tiny", "tiny"]
    assert json.loads((path / BUILTIN_RECORD).read_text())["builder"] == architectures.builder_identity("tiny")


def test_models_never_import_the_demo_wing():
    """The loader owns where the shipped toyworld folder lies; the demo wing (world, toyworld training, export,
    evaluation, experiments) imports the loader, never the other way round (issue 14: no import circle)."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "fillup_data" / "models"
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("fillup_data.demo") for n in names), f"{path.name} imports {names}"
