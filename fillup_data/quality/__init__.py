"""Quality scores for every sample of a build (``fillup-data score``) and the per-class quality report
(``fillup-data quality``).

``score`` adds the columns of ``fillup_data.schema.scores`` to ``index.parquet`` (shards are never
touched), caching per-shard CLIP features and scores under ``OUT/.fillup/scores/`` so that a killed
run redoes only unfinished shards; ``quality`` reads those features back for FID and precision/recall.
"""
