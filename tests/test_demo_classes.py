"""The demo source's named classes (recipe ``source.classes``): which (shape, colour) pairs, most images first."""

from __future__ import annotations

import numpy as np
import pytest

from fillup_data.demo import world
from fillup_data.errors import FillupError

NAMES = ["red circle", "red hexagon", "orange circle", "blue square", "purple diamond", "orange hexagon",
         "blue diamond", "purple square", "red ring", "yellow star", "white cross", "yellow circle"]


def test_class_names_parse_back_to_their_pairs_and_unknown_words_are_named():
    for shape in world.SHAPES:
        for colour in world.COLOURS:
            assert world.parse_class_name(world.class_name(shape, colour)) == (shape, colour)
    for bad, word in (("red blob", "'red blob'"), ("circle red", "'circle red'"), ("red", "'red'"),
                      ("dark red circle", "'dark red circle'")):
        with pytest.raises(ValueError, match=word):
            world.parse_class_name(bad)


def _recipe(tmp_path, source: str):
    from fillup_data.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nversion: 1.0.0\nsource: {source}\nfill: {{policy: fill_to, target: 20}}\n"
                    "generator: {model: builtin:toyworld, resolution: 32}\n")
    return load_recipe(path)


def test_named_classes_are_drawn_in_their_order_with_the_long_tail_counts(tmp_path):
    from fillup_data.demo.source import DemoSource

    names = ", ".join(NAMES)
    recipe = _recipe(tmp_path, f"{{kind: demo, classes: [{names}], max_images: 30, min_images: 3, test_per_class: 2}}")
    assert recipe.source.num_classes == len(NAMES)
    src = DemoSource(recipe.source, seed=5)
    assert src.class_names == NAMES
    assert src.train_counts == world.longtail_counts(len(NAMES), 30, 3) and src.train_counts[0] == 30
    counts = np.bincount([it.label for it in src.items("train")], minlength=len(NAMES))
    assert counts.tolist() == src.train_counts
    # an image of class 2 is an orange circle, drawn from the same seeds as a default-order class would be
    item = next(it for it in src.items("train") if it.label == 2)
    _, _, label, i = item.locator.split("/")
    expected = world.draw("circle", "orange", [5, 0, 2, int(i)], size=32)[0]
    assert np.array_equal(np.asarray(src.load(item)), np.asarray(expected))
    # without names: the world's spread order, as before the field existed
    default = DemoSource(_recipe(tmp_path, "{kind: demo, num_classes: 12}").source, seed=5)
    assert default.classes == world.world_classes(12)


@pytest.mark.parametrize("source, message", [
    ("{kind: demo, classes: [red circle, red blob]}", r"source.*classes\[1\]: 'red blob' is not"),
    ("{kind: demo, classes: [red circle, blue ring, red circle]}", r"classes\[2\]: 'red circle' is already classes\[0\]"),
    ("{kind: demo, num_classes: 11, classes: [%s]}" % ", ".join(NAMES), r"num_classes \(11\) differs from the 12 names"),
    ("{kind: demo, classes: [red circle, blue ring]}", r"classes: 2 names; the demo source takes 10 to 48"),
])
def test_bad_class_lists_are_refused_naming_the_entry(tmp_path, source, message):
    with pytest.raises(FillupError, match=message):
        _recipe(tmp_path, source)


def test_the_miniature_recipe_puts_confusable_classes_in_its_head():
    """``make experiment``'s classes: every many-shot class has a near neighbour (a near colour with the same
    shape, or the same colour with a near shape) among the many- and medium-shot classes, and 8 classes are
    pairs the generator never saw in pretraining."""
    from pathlib import Path

    from fillup_data.recipe import load_recipe

    src = load_recipe(Path(__file__).parents[1] / "recipes" / "demo_experiment.yaml").source
    pairs = [world.parse_class_name(n) for n in src.classes]
    counts = world.longtail_counts(len(pairs), src.max_images, src.min_images)
    near_colour = {"red": "orange", "orange": "red", "blue": "purple", "purple": "blue"}
    near_shape = {"circle": "hexagon", "hexagon": "circle", "square": "diamond", "diamond": "square"}
    head = [p for p, n in zip(pairs, counts) if n > 100]
    upper = {p for p, n in zip(pairs, counts) if n >= 20}
    assert len(head) >= 4
    for shape, colour in head:
        assert (shape, near_colour.get(colour)) in upper or (near_shape.get(shape), colour) in upper, (shape, colour)
    assert len(set(pairs) & set(world.HELD_OUT)) == 8
