"""Shared test set-up: offline HF, deterministic seeds, a cache for converted real weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ATTNOPT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the library's error measure)."""
    ref, out = ref.double(), out.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def left_padded_prompt(vocab: int, length: int, pad: int, seed: int = 7):
    """A decoder prompt of batch 2: random ids, the second row left-padded by ``pad`` tokens
    (id 0, mask 0). Returns ``(ids, attention_mask)``.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask
