"""The demo wing: everything the offline demo and its experiments are made of, in one place.

- ``world``: the procedural world (coloured shapes on textured backgrounds, the harder backgrounds), its
  captions (prefixes derived from Textual Inversion's templates) and held-out (shape, colour) pairs;
- ``source``: the ``demo`` recipe source, a long-tailed set drawn from the world;
- ``toyworld``: the small text-to-image model of the world (model, training, export, evaluation, the world
  classifier) and, in ``toyworld/pipeline``, its shipped weights (``builtin:toyworld``);
- ``experiment``: the paper's Table 6 in miniature (``make experiment``); ``compare_experiment``: Table 1 in
  miniature (``make compare``); ``experiment_steps``: what the two share.

The rest of the package never imports this wing (the loader knows the weights' folder by path), so the
library works without it; the wing imports the library like any user.
"""
