"""Judging the toyworld generator with the world classifier (the world's "classification accuracy score").

``prompt_fidelity``: generate images from words ("a photo of a red circle") and count how often the
classifier sees both the asked shape and the asked colour (chance 1/64). ``inversion_fidelity``: the
same for images generated from a Textual Inversion token learned from a class's few images, through
the project's own inversion and generation code (``fillup_data.inversion``, ``fillup_data.generation``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fillup_data import world
from fillup_data.toyworld.classifier import WorldClassifier, classify

CHANCE = 1 / (len(world.SHAPES) * len(world.COLOURS))
PROMPT = "a photo of a {token}"  # the recipes' generation prompt; single_template puts the class name in it


@dataclass
class FidelityReport:
    """Per-class both-correct rates (and shape-only / colour-only), plus the mean over classes."""

    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def both(self) -> float:
        return sum(v["both"] for v in self.per_class.values()) / max(1, len(self.per_class))

    @property
    def shape(self) -> float:
        return sum(v["shape"] for v in self.per_class.values()) / max(1, len(self.per_class))

    @property
    def colour(self) -> float:
        return sum(v["colour"] for v in self.per_class.values()) / max(1, len(self.per_class))


def score(classifier: WorldClassifier, images, shape: str, colour: str) -> dict[str, float]:
    preds = classify(classifier, images)
    n = max(1, len(preds))
    return {
        "both": sum(p == (shape, colour) for p in preds) / n,
        "shape": sum(p[0] == shape for p in preds) / n,
        "colour": sum(p[1] == colour for p in preds) / n,
        "n": len(preds),
    }


def _generator_cfg(strategy: str, guidance: float, steps: int, batch_size: int):
    from fillup_data.recipe import GeneratorConfig

    return GeneratorConfig(
        model="builtin:toyworld",
        strategy=strategy,
        prompt=PROMPT,
        guidance_scale=guidance,
        num_inference_steps=steps,
        scheduler="ddim",
        resolution=32,
        batch_size=batch_size,
    )


def generate_from_words(pipe, combos, n_per: int, *, guidance: float, steps: int = 25, seed: int = 0, batch_size: int = 16):
    """``{combo: [images]}`` from "a photo of a {colour} {shape}" via the single_template strategy."""
    from fillup_data.generation.generator import SampleSpec, SyntheticGenerator

    names = [world.class_name(s, c) for s, c in combos]
    gen = SyntheticGenerator(pipe, _generator_cfg("single_template", guidance, steps, batch_size), names)
    specs = [SampleSpec(i, seed * 100_000 + i * 1000 + k) for i in range(len(combos)) for k in range(n_per)]
    samples = gen.generate(specs)
    out = {combo: [] for combo in combos}
    for spec, sample in zip(specs, samples):
        out[combos[spec.class_index]].append(sample.image)
    return out


def prompt_fidelity(pipe, classifier, combos, n_per: int = 16, *, guidance: float, steps: int = 25, seed: int = 0) -> FidelityReport:
    images = generate_from_words(pipe, combos, n_per, guidance=guidance, steps=steps, seed=seed)
    report = FidelityReport()
    for (s, c), ims in images.items():
        report.per_class[world.class_name(s, c)] = score(classifier, ims, s, c)
    return report


def invert_world_class(
    pipe,
    shape: str,
    colour: str,
    *,
    n_images: int = 10,
    steps: int = 600,
    num_vectors: int = 4,
    learning_rate: float = 5e-3,
    batch_size: int = 2,
    init_word: str = world.GENERIC_SHAPE,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> Path:
    """Learn a token for (shape, colour) from ``n_images`` fresh world images with the project's
    Textual Inversion trainer (recipe-style settings; the init word names no class)."""
    from fillup_data.inversion import invert_class
    from fillup_data.recipe import InversionConfig

    images = [world.draw(shape, colour, [seed, 0xE1, k])[0] for k in range(n_images)]
    cfg = InversionConfig(
        num_vectors=num_vectors,
        init_word=init_word,
        learning_rate=learning_rate,
        batch_size=batch_size,
        steps_per_image=1,
        min_steps=steps,
        max_steps=steps,
        checkpoint_every=min(100, steps),
        mixed_precision="no",
    )
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="toyworld-ti-"))
    return invert_class(
        pipe,
        images,
        class_index=0,
        class_name=world.class_name(shape, colour),
        cfg=cfg,
        resolution=32,
        seed=seed,
        out_path=out_dir / "00000.safetensors",
        model_id="builtin:toyworld",
        model_revision="",
        progress=False,
    )


def generate_from_token(pipe, token_path: Path, n: int, *, guidance: float, steps: int = 25, seed: int = 0, batch_size: int = 16, token_step: int = -1):
    """Images from "a photo of a <token>" with the token's last (or given) checkpoint."""
    from fillup_data.generation.generator import SampleSpec, SyntheticGenerator

    gen = SyntheticGenerator(pipe, _generator_cfg("textual_inversion", guidance, steps, batch_size), ["class"], {0: token_path})
    return [s.image for s in gen.generate([SampleSpec(0, seed * 100_000 + k, token_step) for k in range(n)])]


@torch.no_grad()
def image_grid(images, cols: int = 8):
    """One PIL image of ``images`` in rows of ``cols`` (for eyeballing and the card)."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def measure(pipe, classifier, *, n_per: int = 16, steps: int = 25, ti_classes=None, ti_steps: int = 600,
            ti_vectors: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """The numbers behind benchmarks/RESULTS.md "toyworld": prompt fidelity for seen and held-out pairs
    at guidance 1 and 3, and Textual Inversion vs words on held-out classes."""
    import time

    from fillup_data.toyworld.classifier import evaluate_classifier

    rng = np.random.default_rng(seed)
    seen_all = world.pretraining_combos()
    seen = [seen_all[i] for i in sorted(rng.choice(len(seen_all), size=len(world.HELD_OUT), replace=False))]
    held = list(world.HELD_OUT)
    out: dict = {"chance_both": CHANCE, "n_per_class": n_per, "ddim_steps": steps}
    t0 = time.time()
    c = evaluate_classifier(classifier)
    out["classifier"] = c.__dict__
    for guidance in (1.0, 3.0):
        for name, combos in (("seen", seen), ("held_out", held)):
            r = prompt_fidelity(pipe, classifier, combos, n_per, guidance=guidance, steps=steps, seed=seed)
            out[f"words_{name}_g{guidance:g}"] = {"both": r.both, "shape": r.shape, "colour": r.colour, "per_class": r.per_class}
            if progress:
                print(f"words {name} guidance {guidance:g}: both {r.both:.3f} shape {r.shape:.3f} colour {r.colour:.3f}", flush=True)
    ti = {}
    for shape, colour in ti_classes or [("hexagon", "orange"), ("star", "red"), ("square", "purple"), ("ring", "blue")]:
        t = time.time()
        path = invert_world_class(pipe, shape, colour, n_images=10, steps=ti_steps, num_vectors=ti_vectors, seed=seed)
        t_inv = time.time() - t
        entry = {"invert_seconds": round(t_inv, 1)}
        for guidance in (1.0, 3.0):
            ims = generate_from_token(pipe, path, n_per * 2, guidance=guidance, steps=steps, seed=seed)
            entry[f"token_g{guidance:g}"] = score(classifier, ims, shape, colour)
            words = generate_from_words(pipe, [(shape, colour)], n_per * 2, guidance=guidance, steps=steps, seed=seed)
            entry[f"words_g{guidance:g}"] = score(classifier, words[(shape, colour)], shape, colour)
        ti[world.class_name(shape, colour)] = entry
        if progress:
            print(f"TI {shape} {colour}: {json.dumps(entry)}", flush=True)
    out["textual_inversion"] = {"steps": ti_steps, "num_vectors": ti_vectors, "n_images": 10, "init_word": world.GENERIC_SHAPE,
                                "learning_rate": 5e-3, "batch_size": 2, "classes": ti}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def results_markdown(result: dict, *, machine: str, date: str, notes: str = "") -> str:
    """The "toyworld" section of benchmarks/RESULTS.md from ``measure``'s output."""
    c = result["classifier"]
    lines = [
        "## toyworld",
        "",
        (
            f"{date}, {machine}. Produced by `python scripts/train_toyworld.py measure` "
            f"({result['n_per_class']} images per class and setting, DDIM {result['ddim_steps']} steps, "
            "prompt \"a photo of a {colour} {shape}\" or \"a photo of a <token>\"; chance for both right = 1/64 = 0.016)."
        ),
        "",
        (
            f"World classifier on {c['n']} fresh world images: shape {c['shape_accuracy']:.4f}, colour "
            f"{c['colour_accuracy']:.4f}, both {c['both_accuracy']:.4f}."
        ),
        "",
        "| prompts from words | guidance | both right | shape right | colour right |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("seen", "seen pairs (8)"), ("held_out", "held-out pairs (8)")):
        for g in (1, 3):
            r = result[f"words_{name}_g{g}"]
            lines.append(f"| {label} | {g} | {r['both']:.3f} | {r['shape']:.3f} | {r['colour']:.3f} |")
    ti = result["textual_inversion"]
    lines += [
        "",
        (
            f"Textual Inversion on held-out pairs ({ti['n_images']} images, {ti['num_vectors']} vectors from "
            f"\"{ti['init_word']}\", lr {ti['learning_rate']}, batch {ti['batch_size']}, {ti['steps']} steps; "
            "both-right rate of generated images, token vs the class's words):"
        ),
        "",
        "| class | invert s | token g1 | words g1 | token g3 | words g3 |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in ti["classes"].items():
        lines.append(
            f"| {name} | {e['invert_seconds']} | {e['token_g1']['both']:.3f} | {e['words_g1']['both']:.3f} | "
            f"{e['token_g3']['both']:.3f} | {e['words_g3']['both']:.3f} |"
        )
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"
