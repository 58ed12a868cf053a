"""Shared pieces of the beacon_peft benchmarks.

Modules here are deliberately small and, except for ``kvpress_env`` (main venv only),
importable from both the main venv and the separate kvpress venv:

- ``metrics``: perplexity, KV-cache bytes, peak RSS, timing, summary JSONL records.
- ``needles``: passkey / multi-key needle-in-a-haystack prompt generators and scoring.
- ``kvpress_env``: creates the kvpress venv and drives ``kvpress_worker`` as a subprocess.
- ``kvpress_worker``: script run *inside* the kvpress venv (never import it from beacon code).
"""
