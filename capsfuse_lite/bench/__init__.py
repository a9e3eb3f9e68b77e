"""Benchmarks a user runs on their own machine: ``measure`` (``capsfuse-lite bench``), ``baselines``
(the systems compared against) and ``model`` (random-weight GGUFs of any LLaMA shape)."""
