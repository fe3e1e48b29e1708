"""Offline prealignment: instruction data -> prealigned Parquet shards + manifest (docs/design.md, Contract 1).

Run by ``tools/prealign.py``; the training side reads the output through ``dskd_scale.data`` and never imports
this package. Modules, in the order data flows through them:

- ``sources``: reading the input data (local files, ``save_to_disk`` folders, Hub datasets) and prompt formats;
- ``rows`` / ``batch_rows``: one example -> one row (tokenise, truncate, align), and the same for a chunk at once;
- ``stats``: per-chunk and per-shard statistics, merged into the manifest;
- ``shards``: deterministic shard files, per-shard records, resume checks;
- ``report``: the alignment report (text, coverage histogram);
- ``process_group``: one process or MPI ranks;
- ``pipeline``: ``run_prealign``, which ties them together.
"""
