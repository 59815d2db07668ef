"""Embeddings of the user's own images with a backbone file (``dinov2-repro embed``, docs/embed.md).

:func:`embed_files` is what the verb calls; :func:`read_embeddings` reads its output back. The
output is the curation shard format, so ``dinov2-repro curate embed --from-embeddings OUT`` takes it.
"""
from __future__ import annotations

from .run import EmbedResult, embed_files, read_embeddings

__all__ = ["EmbedResult", "embed_files", "read_embeddings"]
