"""A fuse run over files: what makes it resumable, order-preserving and safe for the user's data.

``single`` (one caption file: validate, resume from the ``journal``, stream rows through the
engine, publish), ``outputs`` (when an existing output is complete, file names), ``dataset`` (a
folder or glob of shards, one engine stream), ``cluster`` (the same on Ray), ``merge`` (``--shard``
parts back into input order) and ``progress`` (the events a run reports, and their display).
"""
