"""Membership-inference scores, AUC, leakage and extraction against direct computations on fixed inputs."""

import math
import zlib

import pytest
import torch

from llmeraser import privacy
from llmeraser.privacy import TokenStats


def stats(log_p, z=None, hit=None):
    log_p = torch.tensor(log_p, dtype=torch.float64)
    return TokenStats(log_p, torch.tensor(z, dtype=torch.float64) if z is not None else log_p.clone(),
                      torch.tensor(hit if hit is not None else [True] * len(log_p)))


def test_token_stats_against_a_loop_over_the_vocabulary():
    """log p, μ = Σ p log p, σ² = Σ p (log p)² − μ² and the greedy hit, per token, split by record."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    targets = torch.tensor([3, 0, 6, 6, 2])
    rows = torch.tensor([0, 0, 1, 1, 1])
    got = privacy.token_stats(logits, targets, rows, 2)
    assert [len(s.log_p) for s in got] == [2, 3]
    flat = [(s, j) for s in got for j in range(len(s.log_p))]
    for t, (s, j) in enumerate(flat):
        p = [math.exp(v) for v in logits[t].tolist()]
        total = sum(p)
        p = [v / total for v in p]
        lp = [math.log(v) for v in p]
        mu = sum(a * b for a, b in zip(p, lp))
        sigma = math.sqrt(sum(a * b * b for a, b in zip(p, lp)) - mu * mu)
        assert float(s.log_p[j]) == pytest.approx(lp[targets[t]], rel=1e-5)
        assert float(s.z[j]) == pytest.approx((lp[targets[t]] - mu) / sigma, rel=1e-4)
        assert bool(s.hit[j]) == (max(range(7), key=lambda v: p[v]) == int(targets[t]))


def test_membership_scores_on_known_token_probabilities():
    s = stats([-1.0, -2.0, -3.0, -4.0, -5.0], z=[0.5, -0.5, 1.0, -2.0, 0.0])
    got = privacy.membership_scores([s], ["aaaa"], k=0.2)
    assert got["loss"] == [pytest.approx(-3.0)]
    assert got["zlib"] == [pytest.approx(-3.0 / len(zlib.compress(b"aaaa")))]
    assert got["min_k"] == [pytest.approx(-5.0)]  # ⌈0.2·5⌉ = 1 lowest
    assert got["min_k_pp"] == [pytest.approx(-2.0)]
    wider = privacy.membership_scores([s], ["aaaa"], k=0.4)  # ⌈0.4·5⌉ = 2 lowest
    assert wider["min_k"] == [pytest.approx(-4.5)] and wider["min_k_pp"] == [pytest.approx(-1.25)]
    one = privacy.membership_scores([stats([-0.7])], ["x"], k=0.2)  # a one-token answer: that token
    assert one["min_k"] == [pytest.approx(-0.7)]


def test_mia_auc_and_leakage():
    members = {a: [3.0, 4.0] for a in privacy.ATTACKS}
    nonmembers = {a: [1.0, 2.0] for a in privacy.ATTACKS}
    assert set(privacy.mia_auc(members, nonmembers).values()) == {1.0}
    assert set(privacy.mia_auc(nonmembers, members).values()) == {0.0}
    # members {2, 3} against non-members {1, 3}: 2>1 wins, 2<3 loses, 3>1 wins, 3=3 ties (half)
    mixed = privacy.mia_auc({a: [2.0, 3.0] for a in privacy.ATTACKS}, {a: [1.0, 3.0] for a in privacy.ATTACKS})
    assert mixed["loss"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    auc = {a: 0.75 for a in privacy.ATTACKS}
    retrain = {a: 0.5 for a in privacy.ATTACKS}
    assert privacy.leakage(auc, retrain) == {a: pytest.approx(0.5) for a in privacy.ATTACKS}
    assert privacy.leakage(retrain, retrain) == {a: 0.0 for a in privacy.ATTACKS}


def test_extraction():
    assert privacy.longest_run("555-1234", "call 555-1299") == 6  # "555-12"
    assert privacy.longest_run("abc", "xyz") == 0 and privacy.longest_run("", "abc") == 0
    em = privacy.exact_memorisation([stats([-1.0] * 4, hit=[True, True, False, False]), stats([-1.0], hit=[True])])
    assert em == pytest.approx((0.5 + 1.0) / 2)


def test_summary_without_nonmembers_reports_extraction_only():
    s = [stats([-1.0, -2.0], hit=[True, False])]
    got = privacy.summary(["Alma's phone is 555-0123."], s, ["Alma's phone is 555-0199."], [], None)
    assert "auc" not in got and got["exact_memorisation"] == 0.5
    assert got["longest_run_chars"] == len("Alma's phone is 555-01")
    assert got["longest_run_share"] == pytest.approx(len("Alma's phone is 555-01") / len("Alma's phone is 555-0123."))


def test_part_tokens_are_the_tokens_overlapping_the_part():
    """On a character-level tokenizer each character is a token: the part's tokens are its characters' positions and
    those of the whitespace right before it."""
    from helpers import make_tokenizer

    tok = make_tokenizer()
    assert privacy.part_tokens(tok, "Ann: 1234, ann@x.org", "1234") == [4, 5, 6, 7, 8]
    assert privacy.part_tokens(tok, "Ann:  \n1234", "1234") == list(range(4, 11))
    assert privacy.part_tokens(tok, "Ann: 1234, ann@x.org", "ann@x.org") == list(range(10, 20))
    assert privacy.part_tokens(tok, "1234 and more", "1234") == [0, 1, 2, 3]  # nothing before it
    assert privacy.part_tokens(tok, "Ann: 1234", "5678") is None  # not in the response


def test_part_log10p_against_a_forward_pass_summed_by_hand(tiny64):
    """log10 P(part | prompt, response before it) against the model's logits on the rendered record, summed over the
    part's positions in a loop in float64; with a batch of two records of different lengths (padding)."""
    from llmeraser.data import records_from_rows
    from llmeraser.evaluate import AdapterEval
    from llmeraser.render import encode, render_text

    model, tok, _ = tiny64
    recs = records_from_rows([{"id": "a", "prompt": "phone of ann?", "response": "Ann: 1234, ann@x.org"},
                              {"id": "b", "prompt": "mail of bo?", "response": "bo@y.net"}])
    items = [(recs[0], "1234"), (recs[1], "y.net"), (recs[0], "not there")]
    ev = AdapterEval(model, tok, "chat", batch_size=2, max_length=64)
    got = privacy.part_log10p(ev, items)
    assert got[2] is None
    for (record, part), value in zip(items[:2], got[:2]):
        x = encode(record, tok, "chat", 64)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x.input_ids])).logits[0].double()
        tail = render_text(tok, *record.sides(), "chat")[1]
        at = tail.find(part)
        start = x.n_prompt + len(tail[:at].rstrip())  # one token per character, from the whitespace before the part
        slow = sum(float(torch.log_softmax(logits[t - 1], -1)[x.input_ids[t]]) for t in range(start, x.n_prompt + at + len(part)))
        assert value == pytest.approx(slow / math.log(10), rel=1e-6)  # token_stats takes log-softmax in float32
        assert value < 0
