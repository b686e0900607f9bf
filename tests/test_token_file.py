"""Token files without a pipeline: the fillup format, embeddings made by other tools, malformed files,
and ``fillup-data export-token``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fillup_data.cli import main
from fillup_data.errors import FillupError
from fillup_data.inversion import export_diffusers, is_complete, read_embedding, read_token_file
from fillup_data.inversion.token_file import (
    TokenFile,
    load_safetensors,
    serialize_safetensors,
    write_token_file,
)

DIM = 32


def make_token(checkpoints: dict[int, torch.Tensor] | None = None, **over) -> TokenFile:
    g = torch.Generator().manual_seed(0)
    checkpoints = checkpoints or {s: torch.randn(4, DIM, generator=g) for s in (100, 200, 300)}
    fields = dict(
        class_index=17, class_name="zebra", checkpoints=checkpoints, n_images=3, steps=max(checkpoints),
        learning_rate=5e-3, weight_decay=0.0, batch_size=2, model_id="m", model_revision="r", init_word="object",
        num_vectors=4, seed=0, resolution=512, loss_curve=[0.5] * len(checkpoints),
    )  # fmt: skip
    fields.update(over)
    return TokenFile(**fields)


@pytest.fixture
def token_path(tmp_path):
    return write_token_file(tmp_path / "00017.safetensors", make_token())


def test_token_file_roundtrip_is_byte_stable_and_validated(tmp_path):
    tf = make_token({100: torch.ones(4, 8), 200: torch.zeros(4, 8)})
    a = write_token_file(tmp_path / "a.safetensors", tf)
    b = write_token_file(tmp_path / "b.safetensors", read_token_file(a))
    assert a.read_bytes() == b.read_bytes()
    assert is_complete(a)
    with pytest.raises(FillupError, match="no checkpoint at step 150; available steps: 100, 200"):
        tf.vectors(150)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(a.read_bytes()[:-10])
    assert not is_complete(truncated)
    with pytest.raises(FillupError, match="t.safetensors"):
        read_token_file(truncated)


# --------------------------------------------------------------------------- other tools' files
def rinongal_file(path, vec: torch.Tensor, old_torch: bool = False):
    """What rinongal/textual_inversion's EmbeddingManager.save() writes: string_to_token holds the
    placeholder's CLIP id (a 0-d view of the tokenized prompt), string_to_param an nn.ParameterDict."""
    tokens = torch.full((1, 77), 49407)
    tokens[0, 0], tokens[0, 1] = 49406, 265
    params = torch.nn.ParameterDict()
    params["*"] = torch.nn.Parameter(vec.clone(), requires_grad=True)
    if old_torch:  # torch 1.10-1.12 (rinongal's environment) pickled a ParameterDict without _keys
        del params.__dict__["_keys"]
        params.__dict__["_initialized"] = True
    torch.save({"string_to_token": {"*": tokens[0, 1]}, "string_to_param": params}, path)
    return path


@pytest.mark.parametrize("old_torch", [False, True], ids=["torch2", "torch1.12"])
def test_reads_rinongal_files(tmp_path, old_torch):
    vec = torch.randn(2, 768)
    name, got = read_embedding(rinongal_file(tmp_path / "embeddings_gs-6099.pt", vec, old_torch))
    assert name is None and torch.equal(got, vec) and got.dtype == torch.float32 and not got.requires_grad
    # the allowance is scoped to the read: it does not leak into the process's torch.load
    with pytest.raises(Exception, match="ParameterDict"):
        torch.load(tmp_path / "embeddings_gs-6099.pt", weights_only=True)


def test_reads_a1111_pt_and_kohya_safetensors(tmp_path):
    vec = torch.randn(4, 768)
    a1111 = {  # Embedding.save() in AUTOMATIC1111/stable-diffusion-webui
        "string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_()}, "name": "mytok",
        "step": 2999, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }  # fmt: skip
    torch.save(a1111, tmp_path / "mytok.pt")
    name, got = read_embedding(tmp_path / "mytok.pt")
    assert name == "mytok" and torch.equal(got, vec)
    # kohya sd-scripts' .safetensors (A1111 reads it as a one-tensor file): {"emb_params": [n, dim]}
    save_file({"emb_params": vec.half()}, tmp_path / "kohya.safetensors", metadata={"ss_name": "x"})
    name, got = read_embedding(tmp_path / "kohya.safetensors")
    assert name is None and torch.equal(got, vec.half().float())


def test_reads_diffusers_files(tmp_path):
    vec = torch.randn(4, DIM)
    torch.save({"<cat>": vec}, tmp_path / "learned_embeds.bin")  # diffusers' textual_inversion.py
    torch.save({"<dog>": vec[0]}, tmp_path / "old.bin")  # one 1-D vector (early sd-concepts-library)
    save_file({"<cat>": vec}, tmp_path / "learned_embeds.safetensors")
    assert read_embedding(tmp_path / "learned_embeds.bin")[0] == "<cat>"
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.safetensors")[1], vec)
    name, v = read_embedding(tmp_path / "old.bin")
    assert name == "<dog>" and torch.equal(v, vec[:1])


class Evil:
    """A pickle that runs a command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickles_with_other_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": torch.randn(1, DIM)}, "x": Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(FillupError) as e:
        read_embedding(tmp_path / "evil.pt")
    msg = str(e.value)
    assert "evil.pt" in msg and "system" in msg and "refusing to unpickle" in msg
    # hidden beside a real ParameterDict, as in a doctored rinongal file
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, DIM))})
    torch.save({"string_to_param": params, "string_to_token": {"*": Evil(marker)}}, tmp_path / "evil2.pt")
    with pytest.raises(FillupError, match="evil2.pt: holds Python objects"):
        read_embedding(tmp_path / "evil2.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------- malformed files
def _rewrite(src, dst, tensors=None, drop_meta=(), **meta):
    """``src`` with tensors replaced and metadata fields replaced (JSON values) or dropped."""
    t, m = load_safetensors(src)
    t.update(tensors or {})
    m = {k: v for k, v in m.items() if k not in drop_meta}
    m.update({k: json.dumps(v) for k, v in meta.items()})
    dst.write_bytes(serialize_safetensors(t, m))
    return dst


def _write(dst, data: bytes):
    dst.write_bytes(data)
    return dst


def _other_safetensors(dst):
    save_file({"conv.weight": torch.randn(3, 3)}, dst)  # some model's weights, not a token
    return dst


MALFORMED = {
    # name: (make the file from a valid one, what the error must say)
    "empty": (lambda src, dst: _write(dst, b""), "not a readable safetensors file"),
    "truncated": (lambda src, dst: _write(dst, src.read_bytes()[:-100]), "not a readable safetensors file"),
    "not_safetensors": (lambda src, dst: _write(dst, b"\x80\x04this is a pickle"), "not a readable"),
    "other_safetensors": (lambda src, dst: _other_safetensors(dst), "not a fillup token file (format None"),
    "missing_keys": (lambda src, dst: _rewrite(src, dst, drop_meta=("seed", "num_vectors")), "metadata lacks num_vectors, seed"),
    "missing_tensor": (lambda src, dst: _rewrite(src, dst, checkpoint_steps=[100, 200, 300, 400]),
                       "checkpoint tensor step_00400 is missing"),
    "rank_1": (lambda src, dst: _rewrite(src, dst, {"step_00200": torch.randn(DIM)}),
               "checkpoint step_00200: token vectors have shape [32]"),
    "rank_3": (lambda src, dst: _rewrite(src, dst, {"step_00200": torch.randn(1, 4, DIM)}),
               "checkpoint step_00200: token vectors have shape [1, 4, 32]"),
    "int_tensor": (lambda src, dst: _rewrite(src, dst, {"step_00100": torch.ones(4, DIM, dtype=torch.int64)}),
                   "dtype int64; expected a float tensor"),
    "rows_not_num_vectors": (lambda src, dst: _rewrite(src, dst, {"step_00300": torch.randn(3, DIM)}),
                             "3 token vectors, but the file says num_vectors = 4"),
    "dims_differ": (lambda src, dst: _rewrite(src, dst, {"step_00300": torch.randn(4, 16)}),
                    "step_00300 has shape [4, 16], unlike the others"),
    "no_checkpoints": (lambda src, dst: _rewrite(src, dst, checkpoint_steps=[]), "checkpoint_steps is []"),
    "wrong_type": (lambda src, dst: _rewrite(src, dst, class_index="seventeen"), "class_index is 'seventeen', expected int"),
    "steps_not_ints": (lambda src, dst: _rewrite(src, dst, checkpoint_steps=["100"]), "checkpoint_steps is ['100']"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_token_file_is_a_clear_error(tmp_path, token_path, case, capsys):
    make, says = MALFORMED[case]
    bad = make(token_path, tmp_path / f"{case}.safetensors")
    with pytest.raises(FillupError) as e:
        read_token_file(bad)
    assert str(e.value).startswith(str(bad)) and says in str(e.value), str(e.value)
    assert not is_complete(bad)
    assert main(["export-token", str(bad), "--out", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and says in err
    assert not (tmp_path / "out.safetensors").exists()


def test_malformed_token_file_from_the_cli_exits_2_without_traceback(tmp_path, token_path):
    bad = MALFORMED["rank_3"][0](token_path, tmp_path / "bad.safetensors")
    done = subprocess.run([sys.executable, "-m", "fillup_data.cli", "export-token", str(bad), "--out",
                           str(tmp_path / "o.safetensors")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad.safetensors: checkpoint step_00200: token vectors have shape [1, 4, 32]" in done.stderr


def test_token_for_another_text_encoder_is_refused(tmp_path, token_path):
    with pytest.raises(FillupError) as e:
        read_token_file(token_path, dim=768)
    assert str(e.value).startswith(str(token_path)) and "dimension 32 but the text encoder has 768" in str(e.value)
    assert read_token_file(token_path, dim=DIM).checkpoint_steps == [100, 200, 300]
    save_file({"<cat>": torch.randn(2, 1024)}, tmp_path / "sd2.safetensors")
    with pytest.raises(FillupError, match="sd2.safetensors: token vectors have dimension 1024 but the text encoder has 768"):
        read_embedding(tmp_path / "sd2.safetensors", dim=768)


@pytest.mark.parametrize("content, says", [
    ({"string_to_param": {}}, "string_to_param is empty"),
    ({"string_to_param": {"a": torch.randn(1, DIM), "b": torch.randn(1, DIM)}}, "holds 2 placeholders (a, b)"),
    ({"string_to_param": {"*": "not a tensor"}}, "expected a tensor of token vectors, got str"),
    ({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, "SDXL clip_l/clip_g files are not supported"),
    ({"<cat>": torch.randn(1, 2, DIM)}, "token vectors have shape [1, 2, 32]"),
    ([torch.randn(1, DIM)], "holds a list, not a textual inversion embedding"),
])  # fmt: skip
def test_malformed_embedding_is_a_clear_error(tmp_path, content, says):
    torch.save(content, tmp_path / "e.pt")
    with pytest.raises(FillupError) as e:
        read_embedding(tmp_path / "e.pt")
    assert str(e.value).startswith(str(tmp_path / "e.pt")) and says in str(e.value), str(e.value)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(FillupError, match="empty.pt: cannot be read with torch.load"):
        read_embedding(tmp_path / "empty.pt")


# --------------------------------------------------------------------------- export-token --step
def test_export_token_step_writes_exactly_that_checkpoint(tmp_path, token_path, capsys):
    token = read_token_file(token_path)
    for step in (100, 200, 300):
        out = tmp_path / f"s{step}.safetensors"
        assert main(["export-token", str(token_path), "--step", str(step), "--out", str(out)]) == 0
        tensors, _ = load_safetensors(out)
        assert list(tensors) == ["<fillup-00017>"]
        assert torch.equal(tensors["<fillup-00017>"], token.checkpoints[step])
        name, vec = read_embedding(out)
        assert name == "<fillup-00017>" and torch.equal(vec, token.checkpoints[step])
    assert len({(tmp_path / f"s{s}.safetensors").read_bytes() for s in (100, 200, 300)}) == 3
    # no --step: the last checkpoint; --token: the string the file binds
    assert main(["export-token", str(token_path), "--token", "<zebra>", "--out", str(tmp_path / "last.safetensors")]) == 0
    tensors, _ = load_safetensors(tmp_path / "last.safetensors")
    assert list(tensors) == ["<zebra>"] and torch.equal(tensors["<zebra>"], token.checkpoints[300])
    assert "step 300" in capsys.readouterr().out


def test_export_token_missing_step_lists_the_available_ones(tmp_path, token_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["export-token", str(token_path), "--step", "150", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 150" in err and "[100, 200, 300]" in err
    assert not out.exists()
    with pytest.raises(FillupError, match="no checkpoint at step 150; available steps: 100, 200, 300"):
        export_diffusers(token_path, 150, out)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ""])
def test_export_token_writes_safetensors_only(tmp_path, token_path, suffix, capsys):
    """The one output format (diffusers' one-tensor safetensors, which A1111 reads too); a .bin or .pt
    holding safetensors bytes would fail in A1111, which unpickles those."""
    out = tmp_path / f"tok{suffix}"
    assert main(["export-token", str(token_path), "--out", str(out)]) == 2
    assert "written as .safetensors only" in capsys.readouterr().err
    assert not out.exists()
