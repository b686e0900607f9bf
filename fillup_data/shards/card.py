"""The dataset card (``README.md`` of a build): YAML configs + declared features, and a body.

``datasets`` infers features from 5 samples of one tar unless they are declared, and a config
without its own declaration gets ``cls`` as a plain int, so every config declares the same
features (``dataset_info`` as a list with ``config_name``).  Only tars go into ``data_files``:
the builder is picked by the most common extension, so tokens and JSON stay out.
"""

from __future__ import annotations

import yaml

from fillup_data.shards.figures import DISTRIBUTION_PNG, SAMPLES_PNG, SYNTHETIC_SAMPLES_PNG
from fillup_data.schema.groups import GROUPS
from fillup_data.schema.manifest import sample_keys_in
from fillup_data.schema.sample import json_features


class _NoAliasDumper(yaml.SafeDumper):
    """Write every config's features out in full: anchors/aliases confuse some YAML readers."""

    def ignore_aliases(self, data):
        return True


PAPER_CITATION = """@article{shin2023fillup,
  title   = {Fill-Up: Balancing Long-Tailed Data with Generative Models},
  author  = {Shin, Joonghyuk and Kang, Minguk and Park, Jaesik},
  journal = {arXiv preprint arXiv:2306.07200},
  year    = {2023}
}"""


def features(manifest: dict) -> list[dict]:
    ext = manifest["recipe"]["shards"]["image_format"]
    names = {str(c["index"]): c["name"] for c in manifest["classes"]}
    return [
        {"name": "cls", "dtype": {"class_label": {"names": names}}},
        {"name": ext, "dtype": "image"},
        {"name": "json", "struct": json_features(sample_keys_in(manifest))},
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]


def _split_stats(shards: list[dict]) -> dict:
    return {
        "num_examples": sum(s["num_samples"] for s in shards),
        "num_bytes": sum(s["num_bytes"] for s in shards),
    }


def card_configs(manifest: dict, include_real: bool = True) -> list[dict]:
    """Configs over the shards this repo holds: default, real, synthetic (contract)."""
    shards = manifest["shards"]

    def pick(split, origin):
        return [s for s in shards if s["split"] == split and s["origin"] == origin and (include_real or origin != "real")]

    def pattern(split, origin):
        return f"data/{split}-{origin}-*.tar"

    train_real, train_syn, test_real = pick("train", "real"), pick("train", "synthetic"), pick("test", "real")
    configs = []
    default_train = [x for x, ok in ((pattern("train", "real"), train_real), (pattern("train", "synthetic"), train_syn)) if ok]
    if default_train:
        splits = [("train", default_train, train_real + train_syn)]
        if test_real:
            splits.append(("test", [pattern("test", "real")], test_real))
        configs.append(("default", splits))
    if train_real:
        splits = [("train", [pattern("train", "real")], train_real)]
        if test_real:
            splits.append(("test", [pattern("test", "real")], test_real))
        configs.append(("real", splits))
    if train_syn:
        configs.append(("synthetic", [("train", [pattern("train", "synthetic")], train_syn)]))
    out = []
    for name, splits in configs:
        out.append(
            {
                "config_name": name,
                "data_files": [{"split": s, "path": paths if len(paths) > 1 else paths[0]} for s, paths, _ in splits],
                "splits": [{"name": s, **_split_stats(sh)} for s, _, sh in splits],
            }
        )
    return out


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return label
    return "100M<n<1B"


def card_metadata(manifest: dict, include_real: bool = True) -> dict:
    recipe = manifest["recipe"]
    configs = card_configs(manifest, include_real)
    feats = features(manifest)
    total = sum(s["num_samples"] for s in manifest["shards"] if include_real or s["origin"] != "real")
    license_ = recipe["publish"]["license"]
    return {
        "pretty_name": manifest["name"],
        "license": license_,
        "task_categories": ["image-classification"],
        "size_categories": [_size_category(total)],
        "annotations_creators": ["machine-generated"],
        "source_datasets": [manifest.get("source_dataset", recipe["source"]["kind"])],
        "tags": ["webdataset", "synthetic", "long-tailed", "fill-up", "textual-inversion"],
        "configs": [{"config_name": c["config_name"], "data_files": c["data_files"]} for c in configs],
        "dataset_info": [
            {"config_name": c["config_name"], "features": feats, "splits": c["splits"]} for c in configs
        ],
    }


def _group_table(manifest: dict) -> str:
    rows = ["| group | classes | real | synthetic | total | test |", "|---|---:|---:|---:|---:|---:|"]
    for g in (*GROUPS, "all"):
        cs = [c for c in manifest["classes"] if g == "all" or c["group"] == g]
        real, syn, test = (sum(c[k] for c in cs) for k in ("real", "synthetic", "test"))
        rows.append(f"| {g} | {len(cs)} | {real:,} | {syn:,} | {real + syn:,} | {test:,} |")
    return "\n".join(rows)


def card_figures(manifest: dict, include_real: bool = True) -> list[str]:
    """The figures (build-relative paths) the card shows: publish uploads exactly these, never what a link says.

    The real-beside-synthetic grid shows real pixels, so a card without real images shows the synthetic-only grid.
    """
    has_syn = any(s["origin"] == "synthetic" for s in manifest["shards"])
    return [DISTRIBUTION_PNG, SAMPLES_PNG if include_real or not has_syn else SYNTHETIC_SAMPLES_PNG]


def _setups_line(manifest: dict) -> str:
    """One line per distinct pixel setup of the build's synthetic shards (empty for older builds)."""
    seen: dict[str, int] = {}
    for sh in manifest.get("shards", []):
        ps = sh.get("pixel_setup")
        if ps:
            text = (f"`{ps.get('device')}`, {ps.get('dtype')}, {'compiled' if ps.get('compile') else 'eager'}, "
                    f"micro-batch {ps.get('micro_batch')}, torch {ps.get('torch')}, diffusers {ps.get('diffusers')}"
                    + (f", {ps['cpu_threads']} CPU threads" if ps.get("cpu_threads") else ""))
            seen[text] = seen.get(text, 0) + 1
    return "".join(f"\nSynthetic shards made on {text}: {n}.\n" for text, n in seen.items())


def _quality_section(manifest: dict) -> str:
    """A link to the quality report when ``fillup-data quality`` recorded one (its files are not data_files)."""
    quality, scores = manifest.get("quality"), manifest.get("scores")
    if not quality or not scores:
        return ""
    return f"""
## Quality scores

`index.parquet` has the columns `{'`, `'.join(scores['columns'])}` (CLIP `{scores.get('clip_model')}`, classifier
`{scores.get('classifier') or 'none'}`): filter on them as you see fit, every image is kept. The
[quality report]({quality['report']}) has per-class score distributions, FID and precision/recall against the real
images, near-copy counts and the best and worst images of each class.
"""


def _prompt_line(gen: dict) -> str:
    """What the synthetic images were conditioned on, in the words of their strategy (never a recipe field
    the strategy does not use)."""
    strategy = gen.get("strategy")
    if strategy == "lm_prompts" and gen.get("language_model"):
        return f"prompts written by `{gen['language_model']['model']}`"
    if strategy == "captions" and gen.get("captioner"):
        return f"prompts `{gen['captioner']['template']}` from captions by `{gen['captioner']['model']}`"
    if strategy == "clip_templates":
        n = len(gen.get("templates") or ()) or 80
        return (f"the recipe's {n} prompt templates" if gen.get("templates") else
                "the 80 CLIP templates of the paper's figure A9") + " with the class name, used evenly per class"
    if strategy in ("image_variation", "reimagine"):
        prompt = f", prompt `{gen['prompt']}`" if gen.get("prompt") else ""
        noise = f", noise level {gen.get('noise_level', 0)}" if strategy == "reimagine" else ""
        return f"variations of the class's real training images, each used evenly (`source_key`){noise}{prompt}"
    return f"prompt `{gen['prompt']}`"


_METHOD = {
    "textual_inversion": "Textual Inversion per class on a frozen text-to-image model, then generation",
    "single_template": "one prompt template with the class name",
    "clip_templates": "the 80 CLIP prompt templates with the class name",
    "lm_prompts": "prompts a language model wrote for each class",
    "captions": "captions of the class's real images as prompts",
    "image_variation": "image variations of the class's real images",
    "reimagine": "unCLIP variations (Reimagine) of the class's real images",
}


def method_line(gen: dict) -> str:
    """How the synthetic images were made, for the card's opening sentence."""
    strategy = gen.get("strategy")
    return "no synthetic images" if strategy == "none" else _METHOD.get(strategy, f"strategy {strategy}")


def _prompts_section(manifest: dict) -> str:
    """For builds that made their prompts first (lm_prompts, captions): where they are and how they were used."""
    if not manifest.get("prompts"):
        return ""
    made_by = ("a language model writes each class's prompts once" if manifest["recipe"]["generator"]["strategy"]
               == "lm_prompts" else "a captioner writes one caption per real training image, `source_key` names it")
    return f"""## Prompts

`prompts/NNNNN.json` holds the prompts class NNNNN was generated from ({made_by}), with the model, its
settings and seed. Synthetic sample k of a class used entry k mod n of its list; its `json` records the exact `prompt`.

"""


def _sharding_line(manifest: dict, include_real: bool) -> str:
    """How the shards divide among training processes (the counts this repo holds)."""
    counts: dict[str, int] = {}
    for s in manifest["shards"]:
        if include_real or s["origin"] != "real":
            name = f"{s['split']}-{s['origin']}"
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return ""
    multiples = {k: v.get("multiple_of", 1) for k, v in (manifest.get("sharding") or {}).items()}
    listed = ", ".join(f"{name} {n}" + (f" (a multiple of {multiples[name]})" if multiples.get(name, 1) > 1 else "")
                       for name, n in counts.items())
    return (f"\nShards: {listed}. `datasets.distributed.split_dataset_by_node` gives each rank shards of its own "
            "only when the world size divides a split's shard count (otherwise every rank reads every shard and keeps "
            "one sample in world size); `fillup_data.loader` deals whole shards to ranks x DataLoader workers by "
            "sample count, and splits samples instead when there are fewer shards than readers.\n")


def render_card(manifest: dict, include_real: bool = True, repo_id: str | None = None, body_extra: str = "") -> str:
    meta = card_metadata(manifest, include_real)
    recipe = manifest["recipe"]
    gen = recipe["generator"]
    name = manifest["name"]
    target = repo_id or "path/to/" + name
    version = manifest["version"]
    has_real = any(s["origin"] == "real" for s in manifest["shards"]) and include_real
    has_syn = any(s["origin"] == "synthetic" for s in manifest["shards"])
    ext = recipe["shards"]["image_format"]
    default_note = ""
    if not include_real and has_syn:
        default_note = (
            "\n**Real images are not included in this repository** (their licence does not allow redistribution): "
            "the `default` config is the synthetic train split only. Build the real shards locally with "
            "`fillup-data build RECIPE --set generator.strategy=none --out real-build` from the same recipe and combine "
            "them with this repository through `fillup_data.loader` (local real + Hub synthetic).\n"
        )
    distribution_png, samples_png = card_figures(manifest, include_real)
    samples_figure = (
        f"![real (left) and synthetic (right) samples of head, medium and tail classes]({samples_png})"
        if samples_png == SAMPLES_PNG
        else f"![synthetic samples of head, medium and tail classes]({samples_png})"
    )
    origin = "synthetic" if has_syn else "real"
    n_train = sum(1 for sh in manifest["shards"] if sh["split"] == "train" and sh["origin"] == origin)
    wds_pattern = (f"data/train-{origin}-00000.tar" if n_train <= 1
                   else f"data/train-{origin}-{{00000..{n_train - 1:05d}}}.tar")
    token_classes = sorted({t["class_index"] for t in manifest.get("tokens") or []})
    tokens_section = ""
    if token_classes:
        c = f"{token_classes[0]:05d}"
        tokens_section = f"""## Class tokens

`tokens/diffusers/NNNNN.safetensors` is class NNNNN's learned Textual Inversion token (last checkpoint) in
diffusers format; `tokens/NNNNN.safetensors` holds every checkpoint (`step_00100`, ...) with metadata.

```python
from huggingface_hub import hf_hub_download
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{gen['model']}")
pipe.load_textual_inversion(hf_hub_download("{target}", "tokens/diffusers/{c}.safetensors",
                                            repo_type="dataset", revision="v{version}"))
image = pipe("a photo of a <fillup-{c}>", guidance_scale={gen['guidance_scale']}).images[0]
```

"""
    prompts_section = _prompts_section(manifest)
    yaml_text = yaml.dump(meta, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, width=120)
    body = f"""# {name}

A long-tailed image dataset balanced with synthetic images by the **Fill-Up** method
({method_line(gen)}), built with
fillup-data version {manifest.get('package_version', '')}.

- version: `{version}`, fingerprint `{manifest['fingerprint'][:16]}`
- source: `{recipe['source']['kind']}`, {len(manifest['classes'])} classes, imbalance factor {manifest.get('imbalance_factor', 'n/a')}
- fill policy: `{recipe['fill']['policy']}` {recipe['fill'].get('target') or ''}
- generator: `{gen['model']}` ({gen['strategy']}), {_prompt_line(gen)}, guidance {gen['guidance_scale']},
  {gen['num_inference_steps']} {gen['scheduler']} steps, {gen['resolution']} px
{default_note}
## Counts by group (real training images: many > {recipe['groups']['many_above']}, few < {recipe['groups']['few_below']})

{_group_table(manifest)}

## Figures

![images per class before and after fill-up]({distribution_png})

{samples_figure}

## Configs

- `default`: {"real + synthetic train, real test" if has_real and has_syn else ("synthetic train" if has_syn else "real train and test")}
- `real`: real images only{"" if has_real else " (not in this repository)"}
- `synthetic`: synthetic images only{"" if has_syn else " (none in this build)"}

Every sample has `{ext}` (the image), `cls` (class index, a `ClassLabel`) and `json` with the same keys in every
sample: `{'`, `'.join(sample_keys_in(manifest))}`. `is_synthetic` flags real vs synthetic; `seed`, `token_step`,
`prompt`, `guidance_scale` and `num_inference_steps` regenerate any synthetic image; `source_path` names a real image's
file.
{_sharding_line(manifest, include_real)}
## How to load

```python
from datasets import load_dataset
ds = load_dataset("{target}", revision="v{version}")            # or "real" / "synthetic" configs
```
```python
import webdataset as wds                                       # plain webdataset
ds = wds.WebDataset("{wds_pattern}").decode("pil").to_tuple("{ext}", "cls", "json")
```
```python
from fillup_data.loader import TrainingData, make_loader, train_transform   # pip install fillup-data
data = TrainingData.open("{target}@v{version}")                 # data.real_counts: the Balanced Softmax prior
loader = make_loader(data, "filled", "train", batch_size=64, transform=train_transform(224))
```

## Regenerate any synthetic image from its metadata

Every synthetic image has its own seeded generator: its `json` (class, `seed`, `token_step`, `prompt`, guidance,
steps, model) and this repo's `manifest.json` (scheduler, resolution, and per shard the `pixel_setup`: device kind,
dtype, compile, micro-batch, torch and diffusers versions) and token files regenerate it. On the recorded setup the
pixels are identical; elsewhere `fillup-data regenerate` reports the PSNR against the stored image.
{_setups_line(manifest)}

```python
from fillup_data.synthesis import regenerate
image = regenerate("path/to/local/copy", sample["json"])     # or: fillup-data regenerate BUILD --key KEY --image x.png
```

{tokens_section}{prompts_section}`index.parquet` has one row per sample (key, shard, byte offset and size inside the tar, and all metadata),
`manifest.json` the recipe, per-class counts and every shard's sha256; `tokens/NNNNN.safetensors` every checkpoint of
each class's learned token.
{_quality_section(manifest)}{body_extra}
## Citation

```bibtex
{PAPER_CITATION}
```
"""
    return f"---\n{yaml_text}---\n\n{body}"
