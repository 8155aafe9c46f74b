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


def whole_sequence_logits(model, variant, vocab: int, prompt: int, pad: int):
    """``model`` optimized whole-sequence with ``variant`` on :func:`left_padded_prompt`, as a
    function ``sequences [2, T] -> logits [2, T, V]`` (the prompt's mask, then ones): the
    reference a decoder export with the same variant must reproduce step by step.
    """
    import attnopt
    from attnopt.export._decoder_capture import position_ids_for

    ids, mask = left_padded_prompt(vocab, prompt, pad)
    example = {"input_ids": ids, "attention_mask": mask,
               "position_ids": position_ids_for(mask, prompt)}
    opt = attnopt.optimize(model, example, attnopt.Config(variant=variant))
    assert opt.report.rows and all(r.outcome == "rewritten" for r in opt.report.rows)

    def logits(seq: torch.Tensor) -> torch.Tensor:
        m = torch.cat([mask, torch.ones(2, seq.shape[1] - prompt, dtype=mask.dtype)], 1)
        with torch.no_grad():
            return opt(input_ids=seq, attention_mask=m,
                       position_ids=position_ids_for(m, seq.shape[1])).logits.float()

    return logits
