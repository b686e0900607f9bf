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

from fillup_data.demo import world
from fillup_data.demo.toyworld.classifier import WorldClassifier, classify

CHANCE = 1 / (len(world.SHAPES) * len(world.COLOURS))
PROMPT = "a photo of a {token}"  # the recipes' generation prompt; single_template puts the class name in it

# The checks tests/test_toyworld.py runs and `measure` reports, with the same settings and seeds, so
# every test threshold sits under a committed measurement. They average over *all* pairs of a kind,
# not the ones the model draws best: all 56 seen pairs (one image each), all 8 held-out pairs, and
# Textual Inversion on all four of the demo's held-out tail classes (inverted jointly, as a build does).
CHECK_GUIDANCE = 3.0
CHECK_STEPS = 20
CHECK_SEEN_PER_PAIR = 1
CHECK_HELD_PER_PAIR = 4
DEMO_HELD_OUT = tuple(world.world_classes(10)[6:])  # white diamond, orange hexagon, yellow circle, purple square
CHECK_TI_IMAGES = 10
CHECK_TI_STEPS = 400  # the demo recipe's min_steps
CHECK_TI_PER_CLASS = 16


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


def _inversion_cfg(steps: int, num_vectors: int, *, learning_rate: float = 5e-3, batch_size: int = 2,
                   init_word: str = world.GENERIC_SHAPE):
    from fillup_data.recipe import InversionConfig

    return InversionConfig(
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

    images = [world.draw(shape, colour, [seed, 0xE1, k])[0] for k in range(n_images)]
    cfg = _inversion_cfg(steps, num_vectors, learning_rate=learning_rate, batch_size=batch_size, init_word=init_word)
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


def invert_world_classes(pipe, combos, *, n_images: int = 10, steps: int = 600, num_vectors: int = 4,
                         seed: int = 0, out_dir: str | Path | None = None, hard: bool = False) -> dict[tuple[str, str], Path]:
    """Tokens for several (shape, colour) classes learned jointly (one UNet pass per step for all, as a
    build's ``invert_classes`` does), each from ``n_images`` of its own world images (``hard``: with the
    harder backgrounds, as the miniature experiment's real images)."""
    from fillup_data.inversion import InversionJob, invert_classes

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="toyworld-ti-"))
    jobs = [
        InversionJob(i, world.class_name(s, c), [world.draw(s, c, [seed, 0xE1, k], hard=hard)[0] for k in range(n_images)],
                     out_dir / f"{i:05d}.safetensors")
        for i, (s, c) in enumerate(combos)
    ]
    paths = invert_classes(pipe, jobs, cfg=_inversion_cfg(steps, num_vectors), resolution=32, seed=seed,
                           model_id="builtin:toyworld", model_revision="", progress=False)
    return dict(zip(combos, paths))


def zeroed_token(token_path: Path, out_path: Path) -> Path:
    """A copy of a token file with every vector zero: the control that shows a check needs the token."""
    from fillup_data.inversion.token_file import read_token_file, write_token_file

    token = read_token_file(token_path)
    token.checkpoints = {k: torch.zeros_like(v) for k, v in token.checkpoints.items()}
    return write_token_file(out_path, token)


def token_fidelity(pipe, classifier, tokens: dict[tuple[str, str], Path], n_per: int, *, guidance: float,
                   steps: int = 25, seed: int = 0) -> FidelityReport:
    """Both-right rates of images generated from each class's token (its last checkpoint)."""
    report = FidelityReport()
    for (s, c), path in tokens.items():
        ims = generate_from_token(pipe, path, n_per, guidance=guidance, steps=steps, seed=seed)
        report.per_class[world.class_name(s, c)] = score(classifier, ims, s, c)
    return report


def prompt_check(pipe, classifier, seed: int = 0) -> dict[str, FidelityReport]:
    """Words for every seen pair and every held-out pair (the tests' settings)."""
    kw = {"guidance": CHECK_GUIDANCE, "steps": CHECK_STEPS, "seed": seed}
    return {
        "seen": prompt_fidelity(pipe, classifier, world.pretraining_combos(), CHECK_SEEN_PER_PAIR, **kw),
        "held_out": prompt_fidelity(pipe, classifier, list(world.HELD_OUT), CHECK_HELD_PER_PAIR, **kw),
    }


def inversion_check(pipe, classifier, out_dir: str | Path, seed: int = 0, hard: bool = False) -> dict[str, FidelityReport]:
    """Textual Inversion on all the demo's held-out classes (the tests' settings), and the control:
    the same tokens with their vectors zeroed. ``hard``: the class images have the harder backgrounds
    (the miniature experiment's situation; the generated images are scored the same way)."""
    out_dir = Path(out_dir)
    tokens = invert_world_classes(pipe, list(DEMO_HELD_OUT), n_images=CHECK_TI_IMAGES, steps=CHECK_TI_STEPS,
                                  seed=seed, out_dir=out_dir, hard=hard)
    zeroed = {k: zeroed_token(p, out_dir / f"zeroed-{p.name}") for k, p in tokens.items()}
    kw = {"guidance": CHECK_GUIDANCE, "steps": CHECK_STEPS, "seed": seed}
    return {"token": token_fidelity(pipe, classifier, tokens, CHECK_TI_PER_CLASS, **kw),
            "zeroed_token": token_fidelity(pipe, classifier, zeroed, CHECK_TI_PER_CLASS, **kw)}


def generate_from_token(pipe, token_path: Path, n: int, *, guidance: float, steps: int = 25, seed: int = 0, batch_size: int = 16, token_step: int = -1):
    """Images from "a photo of a <token>" with the token's last (or given) checkpoint."""
    from fillup_data.generation.generator import SampleSpec, SyntheticGenerator
    from fillup_data.inversion.token_file import read_token_file

    i = read_token_file(token_path).class_index  # a generator checks that a token file is its class's
    gen = SyntheticGenerator(pipe, _generator_cfg("textual_inversion", guidance, steps, batch_size), ["class"] * (i + 1),
                             {i: token_path})
    return [s.image for s in gen.generate([SampleSpec(i, seed * 100_000 + k, token_step) for k in range(n)])]


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


MEASURE_PARTS = ("classifier", "words", "inversion", "checks", "hard")


def measure(pipe, classifier, *, n_per: int = 16, steps: int = 25, ti_classes=None, ti_steps: int = 600,
            ti_vectors: int = 4, seed: int = 0, parts=MEASURE_PARTS, work_dir: str | Path | None = None,
            progress: bool = True) -> dict:
    """The numbers behind benchmarks/RESULTS.md "toyworld": ``classifier`` (accuracy on fresh images),
    ``words`` (prompt fidelity, 8 seen and 8 held-out pairs, guidance 1 and 3, ``n_per`` images per pair),
    ``inversion`` (Textual Inversion vs words on held-out classes, ``2 * n_per`` images per class and
    setting), ``checks`` (what the tests assert, at the tests' settings), ``hard`` (the Textual Inversion check
    from images with the harder backgrounds: can the generator draw the miniature experiment's classes)."""
    import time

    from fillup_data.demo.toyworld.classifier import evaluate_classifier

    unknown = set(parts) - set(MEASURE_PARTS)
    if unknown:
        raise ValueError(f"unknown measure parts {sorted(unknown)}; choose from {MEASURE_PARTS}")
    out: dict = {"chance_both": CHANCE, "parts": [p for p in MEASURE_PARTS if p in parts]}
    t0 = time.time()

    def say(msg: str) -> None:
        if progress:
            print(f"[{time.time() - t0:7.1f} s] {msg}", flush=True)

    if "classifier" in parts:
        out["classifier"] = evaluate_classifier(classifier).__dict__
        vae = pipe.vae
        out["classifier_vae_roundtrip"] = evaluate_classifier(
            classifier,
            transform=lambda x: vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample.clamp(-1, 1).float().cpu(),
        ).__dict__
        out["classifier_hard_backgrounds"] = evaluate_classifier(classifier, hard_fraction=1.0).__dict__
        say(f"classifier on VAE round trips {out['classifier_vae_roundtrip']}")
        say(f"classifier {out['classifier']}")
    if "words" in parts:
        rng = np.random.default_rng(seed)
        seen_all = world.pretraining_combos()
        seen = [seen_all[i] for i in sorted(rng.choice(len(seen_all), size=len(world.HELD_OUT), replace=False))]
        words = {"n_per_pair": n_per, "ddim_steps": steps}
        for guidance in (1.0, 3.0):
            for name, combos in (("seen", seen), ("held_out", list(world.HELD_OUT))):
                r = prompt_fidelity(pipe, classifier, combos, n_per, guidance=guidance, steps=steps, seed=seed)
                words[f"{name}_g{guidance:g}"] = {"both": r.both, "shape": r.shape, "colour": r.colour, "per_class": r.per_class}
                say(f"words {name} guidance {guidance:g}: both {r.both:.3f} shape {r.shape:.3f} colour {r.colour:.3f}")
        out["words"] = words
    if "inversion" in parts:
        ti = {}
        for shape, colour in ti_classes or [("hexagon", "orange"), ("star", "red"), ("square", "purple"), ("ring", "blue")]:
            t = time.time()
            path = invert_world_class(pipe, shape, colour, n_images=10, steps=ti_steps, num_vectors=ti_vectors, seed=seed)
            entry = {"invert_seconds": round(time.time() - t, 1)}
            for guidance in (1.0, 3.0):
                ims = generate_from_token(pipe, path, n_per * 2, guidance=guidance, steps=steps, seed=seed)
                entry[f"token_g{guidance:g}"] = score(classifier, ims, shape, colour)
                words_ims = generate_from_words(pipe, [(shape, colour)], n_per * 2, guidance=guidance, steps=steps, seed=seed)
                entry[f"words_g{guidance:g}"] = score(classifier, words_ims[(shape, colour)], shape, colour)
            ti[world.class_name(shape, colour)] = entry
            say(f"TI {shape} {colour}: {json.dumps(entry)}")
        out["inversion"] = {"steps": ti_steps, "num_vectors": ti_vectors, "n_images": 10, "init_word": world.GENERIC_SHAPE,
                            "learning_rate": 5e-3, "batch_size": 2, "images_per_class": n_per * 2, "ddim_steps": steps,
                            "classes": ti}
    if "checks" in parts:
        checks: dict = {"guidance": CHECK_GUIDANCE, "ddim_steps": CHECK_STEPS, "seen_per_pair": CHECK_SEEN_PER_PAIR,
                        "held_per_pair": CHECK_HELD_PER_PAIR, "ti_images": CHECK_TI_IMAGES, "ti_steps": CHECK_TI_STEPS,
                        "ti_per_class": CHECK_TI_PER_CLASS}
        for name, r in prompt_check(pipe, classifier, seed=seed).items():
            checks[f"words_{name}"] = _report_dict(r)
            say(f"check words {name}: both {r.both:.3f} colour {r.colour:.3f}")
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="toyworld-check-"))
        for name, r in inversion_check(pipe, classifier, work / "check-tokens", seed=seed).items():
            checks[name] = _report_dict(r)
            say(f"check {name}: both {r.both:.3f} per class {json.dumps({k: v['both'] for k, v in r.per_class.items()})}")
        out["checks"] = checks
    if "hard" in parts:
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="toyworld-check-"))
        hard = {"ti_images": CHECK_TI_IMAGES, "ti_steps": CHECK_TI_STEPS, "ti_per_class": CHECK_TI_PER_CLASS,
                "guidance": CHECK_GUIDANCE, "ddim_steps": CHECK_STEPS}
        for name, r in inversion_check(pipe, classifier, work / "hard-tokens", seed=seed, hard=True).items():
            hard[name] = _report_dict(r)
            say(f"hard-background {name}: both {r.both:.3f} per class {json.dumps({k: v['both'] for k, v in r.per_class.items()})}")
        out["hard"] = hard
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _report_dict(r: FidelityReport) -> dict:
    return {"both": r.both, "shape": r.shape, "colour": r.colour, "per_class": r.per_class}


def results_markdown(result: dict, *, machine: str, date: str, command: str, commit: str, notes: str = "") -> str:
    """The "toyworld" section of benchmarks/RESULTS.md from ``measure``'s output (the parts it holds)."""
    lines = [
        "## toyworld",
        "",
        f"{date}, commit {commit}, {machine}. Produced by `{command}` in {result['seconds'] / 60:.1f} min "
        "(chance for shape and colour both right = 1/64 = 0.016).",
    ]
    if "classifier" in result:
        c = result["classifier"]
        lines += [
            "",
            f"World classifier on {c['n']} fresh world images (seeds above every training batch's): shape "
            f"{c['shape_accuracy']:.4f}, colour {c['colour_accuracy']:.4f}, both {c['both_accuracy']:.4f}.",
        ]
        v = result.get("classifier_vae_roundtrip")
        if v:
            lines[-1] += (f" The same images after the toyworld autoencoder's encode/decode round trip: shape "
                          f"{v['shape_accuracy']:.4f}, colour {v['colour_accuracy']:.4f}, both {v['both_accuracy']:.4f}.")
        h = result.get("classifier_hard_backgrounds")
        if h:
            lines[-1] += (f" {h['n']} images with the harder backgrounds: shape {h['shape_accuracy']:.4f}, "
                          f"colour {h['colour_accuracy']:.4f}, both {h['both_accuracy']:.4f}.")
    if "words" in result:
        w = result["words"]
        lines += [
            "",
            f"Prompts \"a photo of a {{colour}} {{shape}}\", {w['n_per_pair']} images per pair and setting, "
            f"DDIM {w['ddim_steps']} steps (seen: 8 pairs drawn at random from the 56):",
            "",
            "| prompts from words | guidance | both right | shape right | colour right |",
            "|---|---|---|---|---|",
        ]
        for name, label in (("seen", "seen pairs (8)"), ("held_out", "held-out pairs (8)")):
            for g in (1, 3):
                r = w[f"{name}_g{g}"]
                lines.append(f"| {label} | {g} | {r['both']:.3f} | {r['shape']:.3f} | {r['colour']:.3f} |")
    if "inversion" in result:
        ti = result["inversion"]
        lines += [
            "",
            f"Textual Inversion on held-out pairs ({ti['n_images']} images, {ti['num_vectors']} vectors from "
            f"\"{ti['init_word']}\", lr {ti['learning_rate']}, batch {ti['batch_size']}, {ti['steps']} steps); "
            f"both-right rate of {ti['images_per_class']} images per class and setting from \"a photo of a <token>\" "
            f"vs from the class's words, DDIM {ti['ddim_steps']} steps:",
            "",
            "| class | invert s | token g1 | words g1 | token g3 | words g3 |",
            "|---|---|---|---|---|---|",
        ]
        for name, e in ti["classes"].items():
            lines.append(
                f"| {name} | {e['invert_seconds']} | {e['token_g1']['both']:.3f} | {e['words_g1']['both']:.3f} | "
                f"{e['token_g3']['both']:.3f} | {e['words_g3']['both']:.3f} |"
            )
    if "checks" in result:
        k = result["checks"]
        lines += [
            "",
            f"What the tests check (tests/test_toyworld.py, same settings and seeds: guidance {k['guidance']:g}, "
            f"DDIM {k['ddim_steps']} steps; means over all pairs of a kind):",
            "",
            "| check | images | both right | shape right | colour right |",
            "|---|---|---|---|---|",
            f"| words, all 56 seen pairs | {56 * k['seen_per_pair']} | {_cells(k['words_seen'])} |",
            f"| words, all 8 held-out pairs | {8 * k['held_per_pair']} | {_cells(k['words_held_out'])} |",
        ]
        n_ti = len(k["token"]["per_class"])
        lines.append(f"| Textual Inversion, the demo's {n_ti} held-out classes ({k['ti_images']} images, "
                     f"{k['ti_steps']} steps, jointly) | {n_ti * k['ti_per_class']} | {_cells(k['token'])} |")
        lines.append(f"| the same tokens zeroed (control) | {n_ti * k['ti_per_class']} | {_cells(k['zeroed_token'])} |")
        lines += ["", _per_class_line(k)]
    if "hard" in result:
        k = result["hard"]
        n_ti = len(k["token"]["per_class"])
        lines += [
            "",
            f"Textual Inversion from images with the harder backgrounds (the miniature experiment's real images: "
            f"{k['ti_images']} per class, {k['ti_steps']} steps, jointly; guidance {k['guidance']:g}, DDIM "
            f"{k['ddim_steps']} steps):",
            "",
            "| check | images | both right | shape right | colour right |",
            "|---|---|---|---|---|",
            f"| tokens of the demo's {n_ti} held-out classes, from harder-background images | {n_ti * k['ti_per_class']} "
            f"| {_cells(k['token'])} |",
            f"| the same tokens zeroed (control) | {n_ti * k['ti_per_class']} | {_cells(k['zeroed_token'])} |",
            "",
            _per_class_line(k),
        ]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def _per_class_line(k: dict) -> str:
    """Each class's both-right rate from its token, and in brackets from the same token zeroed."""
    return "Per class, token (zeroed): " + ", ".join(
        f"{name} {v['both']:.3f} ({k['zeroed_token']['per_class'][name]['both']:.3f})"
        for name, v in k["token"]["per_class"].items()) + "."


def _cells(r: dict) -> str:
    return f"{r['both']:.3f} | {r['shape']:.3f} | {r['colour']:.3f}"
