"""The prompt templates Textual Inversion trains with, as plain constants in a module of their own, so
the demo world's caption sampler derives its caption prefixes from the same list
(``fillup_data.demo.world.CAPTION_PREFIXES``)."""

from __future__ import annotations

# The prompt templates of the original Textual Inversion code (rinongal/textual_inversion,
# ``imagenet_templates_small``; also the diffusers example). The paper's authors built on that
# code; the paper names only the generation prompt "a photo of *".
TEMPLATES = (
    "a photo of a {token}", "a rendering of a {token}", "a cropped photo of the {token}",
    "the photo of a {token}", "a photo of a clean {token}", "a photo of a dirty {token}",
    "a dark photo of the {token}", "a photo of my {token}", "a photo of the cool {token}",
    "a close-up photo of a {token}", "a bright photo of the {token}", "a cropped photo of a {token}",
    "a photo of the {token}", "a good photo of the {token}", "a photo of one {token}",
    "a close-up photo of the {token}", "a rendition of the {token}", "a photo of the clean {token}",
    "a rendition of a {token}", "a photo of a nice {token}", "a good photo of a {token}",
    "a photo of the nice {token}", "a photo of the small {token}", "a photo of the weird {token}",
    "a photo of the large {token}", "a photo of a cool {token}", "a photo of a small {token}",
)  # fmt: skip
