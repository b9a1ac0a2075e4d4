"""Collectives. Every all-reduce, gather and broadcast of the runtime goes through here."""

from __future__ import annotations

import torch


class Comm:
    """One process owning the whole model: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial result (row-parallel layers call this)."""
        return partial

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Each rank's vocabulary slice of the logits, concatenated in rank order."""
        return logits
