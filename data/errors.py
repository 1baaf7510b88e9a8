"""The one exception type of the data pipeline.

Start-up problems (missing manifest, empty corpus, tokenizer mismatch, bad config) and bad shards
under ``bad_shard_policy="raise"`` all surface as ``DataError`` with a message that names the file
and the conflicting values, so a training job fails in one readable line instead of a traceback
from deep inside a worker process.
"""
from __future__ import annotations


class DataError(RuntimeError):
    """A data-pipeline failure; the message names the offending file and values."""


class DataWarning(UserWarning):
    """A build that worked but will trouble training (an empty val split); ``hybrid-lm data``
    prints it as one ``WARNING`` line."""
