"""Fixtures for the ML-core tests (models, inversion, generation); imported by tests/conftest.py."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw


@pytest.fixture
def restore_threads():
    """Give the test process back its torch thread count (training code sets it); yields the count before."""
    import torch

    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_cache(fillup_cache):
    """The session's private FILLUP_CACHE (tests/conftest.py sets it for every test)."""
    return fillup_cache


@pytest.fixture
def fresh_tiny_pipe(tiny_model_cache):
    """A newly loaded tiny pipeline (for tests that modify it)."""
    from fillup_data.models import load_pipeline

    return load_pipeline("builtin:tiny-sd", device="cpu", scheduler="ddim")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_cache):
    """A shared tiny pipeline; tests must not modify it."""
    from fillup_data.models import load_pipeline

    return load_pipeline("builtin:tiny-sd", device="cpu", scheduler="ddim")


def draw_class_images(n: int, colour=(200, 30, 30), shape_colour=(20, 20, 220), size: int = 40) -> list[Image.Image]:
    """``n`` small images of one procedurally drawn class (a disc on a plain background)."""
    images = []
    for i in range(n):
        im = Image.new("RGB", (size + 2 * i, size), colour)
        d = ImageDraw.Draw(im)
        d.ellipse((5 + i, 5, 30 + i, 30), fill=shape_colour)
        images.append(im)
    return images


@pytest.fixture
def class_images():
    return draw_class_images(4)
