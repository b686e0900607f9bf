"""Issue 14, the exact autoencoder: parameter-free space-to-depth with the AutoencoderKL interface.

Lossless on world images, loads as a component of a pipeline folder through ``from_pretrained`` (no
remote code), and the project's generation and inversion code run on it unchanged; the toyworld
trainer pairs a generator with it, and a resumed run or its export cannot switch autoencoders.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from fillup_data.demo import world
from fillup_data.errors import FillupError
from fillup_data.models.space_to_depth import SpaceToDepthAutoencoder, measure_latent_std
from fillup_data.demo.toyworld import model as tw

MODULE = "fillup_data.models.space_to_depth"


def _world_images(seed: int, n: int) -> np.ndarray:
    return world.sample_world(seed, n, size=tw.RESOLUTION)[0]


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- the component


def test_round_trip_is_exact_on_world_images_and_the_posterior_is_a_point():
    ae = tw.build_exact_autoencoder()
    x = _pixels(_world_images(3, 16))
    dist = ae.encode(x).latent_dist
    assert dist.mean.shape == (16, tw.LATENT_CHANNELS, 16, 16)
    assert torch.equal(dist.mean, tw.space_to_depth(x))
    # what Textual Inversion and img2img draw from it: the mean itself, whatever the generator
    assert torch.equal(dist.sample(torch.Generator().manual_seed(0)), dist.mean)
    assert torch.equal(dist.mode(), dist.mean) and float(dist.std.abs().max()) == 0.0
    assert torch.equal(ae.decode(dist.mean).sample, x)
    assert torch.equal(ae.decode(dist.mean, return_dict=False)[0], x)
    assert torch.equal(ae.encode(x, return_dict=False)[0].mean, dist.mean)
    assert torch.equal(ae(x).sample, x)
    half = ae.to(torch.float16)  # a rearrangement: exact in any dtype
    assert half.dtype == torch.float16
    assert torch.equal(half.decode(half.encode(x.half()).latent_dist.mean).sample, x.half())


def test_scaling_factor_gives_about_unit_std_latents_on_world_images():
    ae = tw.build_exact_autoencoder()
    assert ae.config.scaling_factor == tw.SCALING_FACTOR
    assert 0.85 <= measure_latent_std(ae, _pixels(_world_images(11, 256))) <= 1.15


def test_config_reads_like_an_autoencoderkl_and_refuses_contradictions():
    ae = SpaceToDepthAutoencoder()
    assert ae.config.latent_channels == 12 and list(ae.config.block_out_channels) == [3, 12]
    assert sum(p.numel() for p in ae.parameters()) == 0
    four = SpaceToDepthAutoencoder(downsample_factor=4)
    assert four.config.latent_channels == 48 and len(four.config.block_out_channels) == 3  # vae_scale_factor 4
    with pytest.raises(ValueError, match="latent_channels 8 contradicts"):
        SpaceToDepthAutoencoder(latent_channels=8)
    with pytest.raises(ValueError, match="power of 2"):
        SpaceToDepthAutoencoder(downsample_factor=3)
    with pytest.raises(ValueError, match="must have 2 entries"):
        SpaceToDepthAutoencoder(block_out_channels=[3, 12, 48])


# ----------------------------------------------------------------------------- as a pipeline component


@pytest.fixture(scope="module")
def exact_folder(tmp_path_factory):
    """A StableDiffusionPipeline folder: the toyworld UNet config (12 channels at 32 px, seeded random
    weights), its text encoder and tokenizer, and the exact autoencoder."""
    tokenizer = tw.build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = tw.build_pipeline(tw.build_unet(), tw.build_exact_autoencoder(), tw.build_text_encoder(tokenizer),
                                 tokenizer)
    folder = tmp_path_factory.mktemp("exact") / "pipeline"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def exact_pipe(exact_folder):
    from fillup_data.models import load_pipeline

    return load_pipeline(str(exact_folder), dtype="float32", device="cpu", scheduler="ddim")


def test_pipeline_folder_names_the_class_and_our_loader_loads_it_in_a_fresh_process(exact_folder, monkeypatch):
    import fillup_data.models
    from fillup_data.models import load_pipeline

    index = json.loads((exact_folder / "model_index.json").read_text())
    assert index["vae"] == [MODULE, "SpaceToDepthAutoencoder"]
    files = [p.name for p in exact_folder.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".py", ".bin", ".pt", ".pkl", ".ckpt"))]  # no code, no pickle
    # as in a process that never imported the module (diffusers 0.42 resolves it from sys.modules only)
    monkeypatch.delitem(sys.modules, MODULE)
    monkeypatch.delattr(fillup_data.models, "space_to_depth")
    pipe = load_pipeline(str(exact_folder), dtype="float32", device="cpu", scheduler="ddim")
    assert type(pipe.vae).__module__ == MODULE and type(pipe.vae).__name__ == "SpaceToDepthAutoencoder"
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.in_channels == 12
    assert pipe.vae.config.scaling_factor == tw.SCALING_FACTOR
    images = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_our_sampler_equals_the_pipeline_call_on_it(exact_pipe):
    from fillup_data.generation.sampler import DenoisingSampler
    from tests.test_generation_fast import _reference  # diffusers' own call, through our host-side finishing

    embeds = exact_pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, False)[0]
    seeds = [5, 6]
    sampler = DenoisingSampler(exact_pipe)
    for guidance in (1.0, 3.0):
        kw = dict(guidance_scale=guidance, num_inference_steps=2, eta=0.0)
        ours = sampler.images(embeds, [torch.Generator("cpu").manual_seed(s) for s in seeds], height=32, width=32,
                              **kw)
        pixels, bad = _reference(exact_pipe, embeds, seeds, **kw)
        assert ours.pixels.shape == (2, 32, 32, 3)
        assert np.array_equal(ours.pixels, pixels), guidance
        assert np.array_equal(ours.bad, bad)


def test_textual_inversion_trains_on_the_exact_latents(exact_pipe, tmp_path):
    from PIL import Image

    from fillup_data.inversion import TextualInversionTrainer, invert_class, read_token_file
    from fillup_data.inversion.trainer import preprocess_image
    from fillup_data.recipe import InversionConfig

    images = [Image.fromarray(a) for a in _world_images(21, 2)]
    cfg = InversionConfig(steps_per_image=1, min_steps=2, max_steps=2, checkpoint_every=1, batch_size=2)
    trainer = TextualInversionTrainer(exact_pipe, cfg, resolution=32, seed=0, model_id="", model_revision="")
    mean, std = trainer._encode_latents(images)
    pixels = torch.stack([preprocess_image(im, 32) for im in images])
    assert torch.equal(mean, tw.space_to_depth(torch.cat([pixels, torch.flip(pixels, dims=[3])])))
    assert float(std.abs().max()) == 0.0
    out = invert_class(exact_pipe, images, class_index=0, class_name="red circle", cfg=cfg, resolution=32, seed=0,
                       out_path=tmp_path / "00000.safetensors", model_id="", model_revision="", progress=False)
    token = read_token_file(out)
    assert token.checkpoint_steps == [1, 2]
    last = token.checkpoints[2]
    assert torch.isfinite(last).all() and not torch.equal(last, trainer._init_vectors)


# ----------------------------------------------------------------------------- training and export


def test_exact_latents_are_what_the_toyworld_unet_has_always_trained_on():
    from fillup_data.demo.toyworld.train import batch_for_step

    tokenizer = tw.build_tokenizer()
    today, _, _ = batch_for_step(0, 7, 4, tokenizer)
    exact, _, _ = batch_for_step(0, 7, 4, tokenizer, autoencoder=tw.build_exact_autoencoder())
    assert torch.equal(today, exact)


def test_training_records_the_autoencoder_and_neither_resume_nor_export_can_switch(tmp_path, restore_threads):
    from fillup_data.models import load_pipeline
    from fillup_data.demo.toyworld.export import INFO_NAME, export_pipeline
    from fillup_data.demo.toyworld.train import GeneratorTrainConfig, train_generator

    cfg = GeneratorTrainConfig(steps=1, batch_size=2, warmup_steps=1, checkpoint_every=1, autoencoder="exact")
    train_generator(tmp_path, cfg, progress=False, threads=1)
    state_path = tmp_path / "generator" / "state.json"
    assert json.loads(state_path.read_text())["config"]["autoencoder"] == "exact"
    with pytest.raises(FillupError, match="autoencoder: 'exact' in the state, 'trained' now"):
        train_generator(tmp_path, dataclasses.replace(cfg, steps=2, autoencoder="trained"), progress=False, threads=1)
    with pytest.raises(FillupError, match="trained for --autoencoder exact, not trained"):
        export_pipeline(tmp_path, dataclasses.replace(cfg, autoencoder="trained"), tmp_path / "out")
    # no VAE stage ran: the exact export needs none
    out = export_pipeline(tmp_path, cfg, tmp_path / "out")
    assert json.loads((out / "model_index.json").read_text())["vae"] == [MODULE, "SpaceToDepthAutoencoder"]
    info = json.loads((out / INFO_NAME).read_text())
    assert info["autoencoder"] == "exact" and "--autoencoder exact --unet large" in info["reproduce"]
    pipe = load_pipeline(str(out), dtype="float32", device="cpu")
    assert isinstance(pipe.vae, SpaceToDepthAutoencoder) and pipe.unet.config.in_channels == 12

    # a state written before the option existed was made for the trained VAE: it resumes as such
    old = tmp_path / "old"
    train_generator(old, dataclasses.replace(cfg, autoencoder="trained"), progress=False, threads=1)
    state = json.loads((old / "generator" / "state.json").read_text())
    del state["config"]["autoencoder"]
    (old / "generator" / "state.json").write_text(json.dumps(state))
    with pytest.raises(FillupError, match="autoencoder: 'trained' in the state, 'exact' now"):
        train_generator(old, dataclasses.replace(cfg, steps=2), progress=False, threads=1)
    with pytest.raises(FillupError, match="no trained VAE"):  # the trained export still needs its VAE
        export_pipeline(old, None, tmp_path / "old-out")


def test_unet_channels_follow_the_autoencoders_latent_channels(tmp_path, monkeypatch, restore_threads):
    from safetensors.torch import load_file

    from fillup_data.demo.toyworld.train import GeneratorTrainConfig, train_generator

    # a 4x space-to-depth: 48 latent channels at 8x8
    monkeypatch.setattr(tw, "build_exact_autoencoder", lambda: SpaceToDepthAutoencoder(downsample_factor=4))
    cfg = GeneratorTrainConfig(steps=1, batch_size=2, warmup_steps=1, checkpoint_every=1, autoencoder="exact")
    train_generator(tmp_path, cfg, progress=False, threads=1)
    weights = load_file(str(tmp_path / "generator" / "weights.safetensors"))
    assert weights["unet.conv_in.weight"].shape[1] == 48 and weights["unet.conv_out.weight"].shape[0] == 48


def test_an_unknown_autoencoder_is_refused_by_name(tmp_path):
    from fillup_data.demo.toyworld.train import GeneratorTrainConfig, train_generator

    with pytest.raises(FillupError, match="autoencoder 'vq' is not one of trained, exact"):
        train_generator(tmp_path, GeneratorTrainConfig(steps=1, autoencoder="vq"), progress=False, threads=1)


def _train_toyworld_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_toyworld.py"
    spec = importlib.util.spec_from_file_location("train_toyworld_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_flag_trains_and_exports_on_the_exact_autoencoder(tmp_path, restore_threads, capsys):
    script = _train_toyworld_script()
    work, out = tmp_path / "work", tmp_path / "pipeline"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["vae", "--autoencoder", "exact", "--work", str(work)])
    assert exit_info.value.code == 2 and "no weights to train" in capsys.readouterr().err
    common = ["--work", str(work), "--steps", "1", "--threads", "1", "--autoencoder", "exact"]
    assert script.main(["generator", *common]) == 0
    assert script.main(["export", *common, "--out", str(out)]) == 0
    assert not (work / "vae").exists()
    assert json.loads((out / "model_index.json").read_text())["vae"] == [MODULE, "SpaceToDepthAutoencoder"]
