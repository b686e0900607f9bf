"""The build's contracts, each defined once: the per-sample metadata (``sample``: the ``json`` of every
sample, the columns of ``index.parquet``, the card's declared features), the build's record
(``manifest``: ``manifest.json``) and the many/medium/few groups (``groups``).  Everything else
derives from these modules instead of restating keys or types."""
