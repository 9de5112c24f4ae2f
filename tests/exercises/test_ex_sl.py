"""Graded: part 3, SL-CAI (minicai/losses.py, minicai/slcai.py): the SFT loss on assistant tokens
only, and the paper's critique/revision transcript."""
import math

import pytest
import torch

from grading import check, check_float, check_text, load, mistakes
from minicai import losses, slcai

ex = pytest.mark.exercise


# ------------------------------------------------------------------------------ sft_loss
@ex("sft_loss")
def test_sft_loss_matches_the_fixture():
    fx = load("sft_loss")
    check(losses.sft_loss(fx["logits"], fx["targets"], fx["mask"]), fx["loss"],
          "sft_loss: mean NLL over the assistant tokens", known=mistakes(fx))
    check(losses.sft_loss(fx["logits"], fx["targets"], fx["mask"], denominator=12.0), fx["loss_den12"],
          "sft_loss(denominator=12): the masked sum divided by 12")


@ex("sft_loss")
def test_sft_loss_ignores_masked_positions():
    fx = load("sft_loss")
    m = fx["mask"]
    logits = torch.where(m[..., None], fx["logits"], torch.full_like(fx["logits"], 1e4))  # garbage on the prompt
    got = losses.sft_loss(logits, fx["targets"], m)
    assert torch.isfinite(got), "sft_loss: masking: huge logits at masked-out positions made the loss non-finite"
    check(got, fx["loss"], "sft_loss: masking: logits at masked-out (prompt/padding) positions changed the loss")


@ex("sft_loss")
def test_sft_loss_hand_value():
    # V = 2, three positions, targets [1, 1, -100], mask [1, 1, 0]:
    #   logits [0, 0]     -> p(1) = 1/2, NLL = ln 2 = 0.6931472
    #   logits [0, ln 3]  -> p(1) = 3/4, NLL = ln(4/3) = 0.2876821
    #   masked position (target -100, logits [50, -50]) is ignored
    # mean over the 2 assistant tokens: (0.6931472 + 0.2876821) / 2 = 0.4904146; with denominator 4: 0.2452073
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]]])
    targets, mask = torch.tensor([[1, 1, -100]]), torch.tensor([[True, True, False]])
    check_float(losses.sft_loss(logits, targets, mask), 0.4904146, "sft_loss hand value", atol=1e-6)
    check_float(losses.sft_loss(logits, targets, mask, denominator=4.0), 0.2452073, "sft_loss(denominator=4)", atol=1e-6)


# ------------------------------------------------------------------------------ paper_transcript
@ex("paper_transcript")
def test_paper_transcript_matches_the_fixture():
    for i, case in enumerate(load("paper_transcript")["cases"]):
        check_text(slcai.render_paper([tuple(e) for e in case["events"]]), case["text"], f"render_paper case {i}")


@ex("paper_transcript")
def test_paper_transcript_hand_value():
    # the paper's layout: "\n\nHuman: {prompt}\n\nAssistant:" then " {answer}", then the request
    # "\n\nCritiqueRequest: {request}\n\nCritique:" where the model continues
    events = [("user", "Hi"), ("assistant", "Hello"), ("critique_request", "Is it rude?")]
    check_text(slcai.render_paper(events), "\n\nHuman: Hi\n\nAssistant: Hello\n\nCritiqueRequest: Is it rude?\n\nCritique:",
               "render_paper hand value")
