"""The build's stages, as tasks an executor can run anywhere (datatrove's contract).

1. index     ``fillup_data.index``    read the source once; ``.fillup/index.json``          (one worker)
2. plan      ``fillup_data.plan``     counts, seeds, checkpoints, shards; ``.fillup/plan.json`` (one worker)
3. real      ``stages.real``          one task per real shard              ┐ phase A, in any order
4. invert    ``stages.invert``        one task per inversion group         ┘
5. generate  ``stages.generate``      one task per synthetic shard           phase B (needs every token)
6. assemble  ``stages.assemble``      verify shards; manifest, index.parquet, card      (one worker)

A task is a pure function of (recipe, build folder, task id): it returns at once when its completion
record exists and writes that record last, so any executor may run it, twice or after a crash, and the
bytes under ``data/`` and ``tokens/`` do not depend on which worker ran what. ``stages.tasks`` lists the
tasks of a build and holds the runner that workers use.
"""
