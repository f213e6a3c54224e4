"""reset_target 'capped': which removed tokens the kept records predict (support.py), the capped target, and its use
by the reset (reset.py) and the gradient rounds (repair.py)."""

import itertools
import math

import pytest
import torch

from llmeraser.errors import InputError
from llmeraser.render import Example
from llmeraser.settings import UnlearnSettings
from llmeraser.support import MIN_SEEN, SUPPORTED, KeptContinuations, capped_logits, shape, word_completion


def _ex(prompt, response):
    return Example(tuple(prompt) + tuple(response), len(prompt))


def test_kept_shares_against_a_count_by_hand():
    """An "IBAN" 9 always follows context (1, 2) and starts every kept value; its digits vary. share(y) is the count
    of (context, y) over the count of the context, at the longest context seen MIN_SEEN times, against a loop that
    counts those windows directly."""
    kept = [_ex([1, 2], [9, d, e]) for d, e in itertools.product((3, 4, 5), (6, 7))]
    table = KeptContinuations(kept)

    def by_hand(ids, t):
        for k in range(min(3, t), 0, -1):
            ctx = tuple(ids[t - k:t])
            windows = [tuple(x.input_ids[u - k:u + 1]) for x in kept for u in range(max(x.n_prompt, 1), len(x.input_ids))
                       if u - k >= 0 and tuple(x.input_ids[u - k:u]) == ctx]
            if len(windows) >= MIN_SEEN:
                return sum(w[-1] == ids[t] for w in windows) / len(windows)
        return None

    removed = _ex([1, 2], [9, 3, 8])
    ids = removed.input_ids
    for t in range(2, len(ids)):
        assert table.share(ids, t) == by_hand(ids, t)
    assert table.share(ids, 2) == 1.0  # 9 after (1, 2): every kept answer
    assert table.share(ids, 3) == pytest.approx(1 / 3)  # 3 after (1, 2, 9): a third of them
    assert table.share(ids, 4) == 0.0  # 8 after (2, 9, 3): never, though the context was seen twice
    # the pattern token is held, the memorised ones pushed; a subset of positions is honoured
    assert table.unsupported(removed, None) == [1, 2]
    # what the kept records teach there: N(c, y)/N(c) for every y seen after the context
    assert table.distribution(ids, 3) == pytest.approx({3: 1 / 3, 4: 1 / 3, 5: 1 / 3})
    assert table.distribution(ids, 4) == {6: 0.5, 7: 0.5} and table.distribution((8, 8, 8), 2) is None
    assert table.unsupported(removed, [0, 2]) == [2]
    # positions past the encoded response (a marked part that max_length cut off) are not there to pull
    assert table.unsupported(removed, [2, 3, 7]) == [2]
    # a context seen fewer than MIN_SEEN times at every length: not supported (nothing speaks for retraining)
    assert table.share((8, 8, 8), 2) is None and table.unsupported(_ex([8, 8], [8]), None) == [0]
    assert SUPPORTED == 0.5


def test_the_shape_view_holds_what_depends_on_position_not_on_words():
    """Kept "IBANs" " DE" d d " " d d d d " " d d: the space after a group's digits follows those digit tokens in few
    kept answers, but four digit shapes after a space in every one, so the shape view supports it where the token
    view does not; the digits stay unsupported in both. shape() writes runs of digits, capitals and letters as 9, A, a."""
    import random

    assert [shape(t) for t in (" DE", "4711", "Rosa", "e-mail", " ")] == [" A", "9", "Aa", "a-a", " "]
    text = {1: "'s", 2: " is", 3: " DE", 20: " ", 21: ".", 30: " DF"} | {10 + d: str(d) for d in range(10)}

    class Tok:
        def decode(self, ids):
            return "".join(text[i] for i in ids)

    rng = random.Random(0)

    def iban():
        d = [10 + rng.randrange(10) for _ in range(8)]
        return [3, d[0], d[1], 20, *d[2:6], 20, d[6], d[7], 21]

    kept = [_ex([1, 2], iban()) for _ in range(30)]
    removed = _ex([1, 2], iban())
    digits, spaces = [1, 2, 4, 5, 6, 7, 9, 10], [3, 8]
    tokens, both = KeptContinuations(kept), KeptContinuations(kept, Tok())
    assert [removed.input_ids[removed.n_prompt + k] for k in spaces] == [20, 20]
    # the token view: after two given digit tokens a space follows in few kept answers
    assert all(tokens.share(removed.input_ids, removed.n_prompt + k) < SUPPORTED for k in spaces)
    assert tokens.unsupported(removed, None) == sorted(digits + spaces + [11])  # and the closing "."
    # the shape view: after " DE" and two digits, and after a space and four digits, always a space; "." after the last two
    assert both.unsupported(removed, None) == digits
    assert [both.share(removed.input_ids, removed.n_prompt + k) for k in spaces] == [1.0, 1.0]
    # a target's distribution: the shapes' where they are surer of the next kind of token (inside the digit run:
    # space or digit), so a space gets all the mass at the spaces and none at the digits; the token view, seeing two
    # random digits, puts some on a space inside a group (the groups-of-three garble) and too little at its end
    def on_space(d):
        return sum(p for y, p in d.items() if y == 20)

    inside = [k for k in digits if k not in (1, 9)]  # a digit after which the group goes on
    assert max(on_space(tokens.distribution(removed.input_ids, removed.n_prompt + k)) for k in inside) > 0
    assert min(on_space(tokens.distribution(removed.input_ids, removed.n_prompt + k)) for k in spaces) < 1
    for k in range(removed.n_response):
        want = 1.0 if k in spaces else 0.0
        assert on_space(both.distribution(removed.input_ids, removed.n_prompt + k)) == pytest.approx(want), k
    # where the token view is the surer (after " is": " DE" always) it is the one taken
    assert both.distribution(removed.input_ids, removed.n_prompt) == tokens.distribution(removed.input_ids, removed.n_prompt) == {3: 1.0}
    shapes_only = both.views[1]
    other = _ex([1, 2], [30, *iban()[1:]])  # " DF": a country code no kept answer has, shaped like " DE"
    t = other.n_prompt + 1
    assert tokens.distribution(other.input_ids, t) is None
    assert both.distribution(other.input_ids, t) == shapes_only.distribution(other.input_ids, t) is not None


def test_a_shape_context_seen_fewer_than_sure_seen_times_does_not_override_the_token_view():
    """Shapes merge lengths: kept "codes" after " is" are "FM" and three digit tokens, five characters; a removed code
    "F6789" reads, after "F678", like a kept code's end, so the shapes are sure of a "." that would cut it short.
    Other kept answers hold "678" followed by a digit or "." (the token view: unsure). Read from SURE_SEEN − 1 kept
    codes the shapes' sureness is chance and the token view is taken; from 27, the shapes are (and then they are
    what the kept records teach)."""
    from llmeraser.support import SURE_SEEN

    text = {2: " is", 21: ".", 40: "F", 41: "FM"} | {10 + d: str(d) for d in range(10)}

    class Tok:
        def decode(self, ids):
            return "".join(text[i] for i in ids)

    other = [_ex([2], [15, 16, 17, 18, x, 21]) for x in [*range(10, 20), *[21] * 6]]
    codes = [_ex([2], [41, 10 + a, 10 + b, 10 + c, 21]) for a, b, c in itertools.product(range(3, 6), repeat=3)]
    removed = _ex([2], [40, 16, 17, 18, 19, 21])
    t = removed.n_prompt + 4
    for twos, shapes_taken in ((SURE_SEEN - 1, False), (27, True)):
        table = KeptContinuations(other + codes[:twos], Tok())
        shapes, tokens = (v.distribution(removed.input_ids, t) for v in (table.views[1], table.views[0]))
        assert shapes == {21: 1.0} and tokens[21] == pytest.approx(6 / 16)
        assert table.views[1].seen[table.views[1].context(removed.input_ids, t)] == twos
        assert table.distribution(removed.input_ids, t) == (shapes if shapes_taken else tokens)


def test_the_character_view_counts_characters_where_shapes_merge_lengths():
    """Kept five-character codes after " is ", spelled "FM" + three digit tokens or "F" + four: after "F678" the
    shapes read a code's end half the time ("FM678" has the same shapes), the characters (" is F678" read " xx xxxx":
    letters and digits written x, no runs merged) never, so with `chars` set the target there puts no mass on the "."
    that would cut the code short."""
    import random

    text = {2: " is", 3: " ", 21: ".", 40: "F", 41: "FM"} | {10 + d: str(d) for d in range(10)}

    class Tok:
        def decode(self, ids):
            return "".join(text[i] for i in ids)

    rng = random.Random(0)

    def digits(k):
        return [10 + rng.choice((0, 1, 2, 3, 4)) for _ in range(k)]  # never 6-9: the removed code's own tokens

    kept = [_ex([2, 3], [41, *digits(3), 21]) for _ in range(8)] + [_ex([2, 3], [40, *digits(4), 21]) for _ in range(8)]
    removed = _ex([2, 3], [40, 16, 17, 18, 19, 21])
    t = removed.n_prompt + 4  # the code's fifth character, after "F678"
    today, chars = KeptContinuations(kept, Tok()), KeptContinuations(kept, Tok(), chars=16)
    assert today.views[1].distribution(removed.input_ids, t)[21] == pytest.approx(0.5)
    assert today.distribution(removed.input_ids, t)[21] > 0
    chars_view = chars.views[2]
    assert chars_view.context(removed.input_ids, t) == " xx xxxx"  # " is F678", the code's start in it
    d = chars.distribution(removed.input_ids, t)
    assert d == chars_view.distribution(removed.input_ids, t) and 21 not in d
    assert sum(d.values()) == pytest.approx(1.0) and all(10 <= y < 20 for y in d)
    # after the fifth character every kept code ends: both views agree on the "."
    assert chars.distribution(removed.input_ids, t + 1) == {21: 1.0}
    # a view is only added when asked for: the recipe's default leaves two
    assert len(today.views) == 2 and len(chars.views) == 3


def test_the_word_rule_frees_only_a_completion_every_kept_response_spells():
    """word_completion: "x" after "…@gm" where the one kept "@gm" goes on "x"; not where a kept response goes on
    otherwise, not a digit or a capital, not without two small letters before it, not a context no kept answer holds."""
    kept = "olga.castro88@gmx.net.\0ines.berg12@gmail.com."
    one = kept.split("\0")[0]
    assert word_completion("quinn.ortiz84@gm", "x", one) == "@gm"
    assert word_completion("quinn.ortiz84@gmx.", "net", one) == "@gmx."
    assert word_completion("quinn.ortiz84@gm", "x", kept) is None  # "@gm" goes on "a" in one of them
    assert word_completion("quinn.ortiz84@g", "mx", one) is None  # one letter is no word
    assert word_completion("quinn.ortiz84@web", "x", one) is None  # no kept answer holds "@web"
    assert word_completion("Code is AB", "C", "Code is ABC.") is None  # capitals: a code's characters
    assert word_completion("x ab", "Cd", "x abCd") is None  # a capital after a small-letter word
    assert word_completion("x ab", "cd", "x abcd") == " ab"  # the same with a small letter
    assert word_completion("x bar.\n", "foo", "y bar.foo") is None  # the context ends the text: no newline skipped
    assert word_completion("DE12 ab", "3", "DE12 ab3") is None  # digits
    assert word_completion("x.gm", "x", "olga.gm\0x") is None  # a kept answer's end is not its next one's start


def test_the_word_rule_frees_a_token_one_kept_answer_spells_and_nothing_else():
    """KeptContinuations(words=True): the token counts miss "x" after "@gm" when one kept address is at gmx.net (its
    context seen once, under MIN_SEEN); the word rule supports it, and no digit of the removed address, whose kept
    continuations are as rare."""
    pieces = ["'s", " address", " is", " olga", " ines", " quinn", ".", "@", "gm", "x", "ail", "net", "com", "web", "de"]
    pieces += [str(d) for d in range(10)]
    code = {p: i + 1 for i, p in enumerate(pieces)}

    class Tok:
        def decode(self, ids):
            return "".join(pieces[i - 1] for i in ids)

    def ex(*parts):
        return _ex([code["'s"], code[" address"], code[" is"]], [code[p] for p in parts])

    assert MIN_SEEN == 2
    kept = [ex(" olga", "3", "@", "gm", "x", ".", "net", "."), ex(" ines", "7", "@", "web", ".", "de", "."),
            ex(" ines", "5", "@", "web", ".", "de", ".")]
    removed = ex(" quinn", "8", "@", "gm", "x", ".", "net", ".")
    digit_at, x_at, net_at = 1, 4, 6
    plain, words = KeptContinuations(kept, Tok()), KeptContinuations(kept, Tok(), words=True)
    assert {digit_at, x_at, net_at} <= set(plain.unsupported(removed, None))
    # "x" after "@gm" and "net" after "@gmx.", each spelled by the one kept gmx.net address; the digit stays capped
    assert set(plain.unsupported(removed, None)) - set(words.unsupported(removed, None)) == {x_at, net_at}
    assert set(words.unsupported(removed, None)) <= set(plain.unsupported(removed, None))
    # kept addresses that go on otherwise after "@gm" take the support back (two, so the counts, seeing "gm" thrice,
    # do not support "x" either: share 1/3)
    gmail = [ex(" ines", str(d), "@", "gm", "ail", ".", "com", ".") for d in (1, 2)]
    assert x_at in KeptContinuations(kept + gmail, Tok()).unsupported(removed, None)
    mixed = KeptContinuations(kept + gmail, Tok(), words=True)
    assert x_at in mixed.unsupported(removed, None) and net_at not in mixed.unsupported(removed, None)
    with pytest.raises(ValueError, match="tokenizer"):
        KeptContinuations(kept, words=True)


def test_capped_logits_are_the_kl_projection_onto_the_cap():
    """softmax of the capped logits: q_y = min(p_y, τ), the other tokens in their old ratios; it is the argmin of
    KL(q ‖ p) over {q_y ≤ τ}: no point of that set sampled at random is closer. A row already below the cap is as it was."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, dtype=torch.float64, generator=g) * 3
    z[0, 2] += 20.0  # memorised: p ≈ 1
    z[1, 5] += 4.0
    targets = torch.tensor([2, 5, 0])
    tau = 0.02
    p = torch.softmax(z, -1)
    z[2, 0] = math.log(1e-3) + torch.logsumexp(torch.cat([z[2, 1:]]), 0)  # p_0 ≈ 1e-3 < τ
    p = torch.softmax(z, -1)
    q = torch.softmax(capped_logits(z, targets, tau), -1)
    for r, y in enumerate(targets.tolist()):
        assert float(q[r, y]) == pytest.approx(min(float(p[r, y]), tau), rel=1e-9)
        others = [v for v in range(7) if v != y]
        assert torch.allclose(q[r, others] / q[r, others].sum(), p[r, others] / p[r, others].sum(), rtol=1e-9)
        kl = float((q[r] * (q[r] / p[r]).log()).sum())
        for _ in range(200):
            x = torch.rand(7, dtype=torch.float64, generator=g) ** 3
            x[y] = 0
            x = x / x.sum() * (1 - tau * float(torch.rand(1, generator=g)))
            x[y] = 1 - x.sum()
            assert float((x * (x / p[r]).log()).sum()) >= kl - 1e-12
    assert torch.equal(capped_logits(z, targets, tau)[2], z[2])


def test_a_capped_target_mixes_in_the_kept_continuations_then_caps():
    """softmax(capped_target) = the cap projection of 0.9·K + 0.1·softmax(z) at the own token, K the kept continuation
    distribution; a row without K is softmax(z) capped (capped_logits)."""
    from llmeraser.support import KEPT_WEIGHT, capped_target

    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 6, dtype=torch.float64, generator=g)
    z[:, 1] += 15.0  # the memorised token
    targets = torch.tensor([1, 1])
    K = {2: 0.75, 1: 0.25}
    q = torch.softmax(capped_target(z, targets, [K, None], 0.02), -1)
    mix = (1 - KEPT_WEIGHT) * torch.softmax(z[0], -1)
    mix[2] += KEPT_WEIGHT * 0.75
    mix[1] += KEPT_WEIGHT * 0.25
    assert KEPT_WEIGHT == 0.9
    assert float(q[0, 1]) == pytest.approx(0.02, rel=1e-9)
    others = [0, 2, 3, 4, 5]
    assert torch.allclose(q[0, others] / q[0, others].sum(), mix[others] / mix[others].sum(), rtol=1e-9)
    assert int(q[0].argmax()) == 2  # the kept records' continuation leads
    assert torch.allclose(q[1], torch.softmax(capped_logits(z, targets, 0.02)[1], -1), rtol=1e-9)


def test_a_bounded_own_share_lets_the_capped_target_follow_the_kept_continuations():
    """capped_own φ: softmax(capped_target) at the memorised y is min(0.9·K(y) + 0.1·min(p_y, φ), τ), by hand, with
    the other tokens in the ratios of 0.9·K + 0.1·p' (p' = p with p_y capped at φ, the rest rescaled); a row without
    K is p capped at min(φ, τ). φ = 0 is the unbounded target exactly."""
    from llmeraser.support import KEPT_WEIGHT, capped_target

    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 6, dtype=torch.float64, generator=g)
    z[:, 1] += 15.0  # the memorised token: p_y ≈ 1
    targets = torch.tensor([1, 1, 1, 1])
    tau, phi = 0.02, 1e-3
    kept = [{2: 1.0}, {2: 0.99, 1: 0.01}, {2: 0.9, 1: 0.1}, None]  # K(y) = 0, 0.01, 0.1; no K
    q = torch.softmax(capped_target(z, targets, kept, tau, own=phi), -1)
    p = torch.softmax(z, -1)
    for r, (k, want) in enumerate(zip(kept, [0.1 * phi, 0.9 * 0.01 + 0.1 * phi, tau, phi])):
        assert float(q[r, 1]) == pytest.approx(want, rel=1e-9), r
        own = p[r].clone()
        own[1] = phi
        own[[0, 2, 3, 4, 5]] *= (1 - phi) / float(p[r, [0, 2, 3, 4, 5]].sum())
        mix = own if k is None else (1 - KEPT_WEIGHT) * own
        if k is not None:
            for v, share in k.items():
                mix[v] += KEPT_WEIGHT * share
        others = [0, 2, 3, 4, 5]
        assert torch.allclose(q[r, others] / q[r, others].sum(), mix[others] / mix[others].sum(), rtol=1e-9), r
    # unbounded: the memorised token stays at τ on every row, whatever K says
    assert torch.equal(capped_target(z, targets, kept, tau, own=0.0), capped_target(z, targets, kept, tau))
    assert torch.allclose(torch.softmax(capped_target(z, targets, kept, tau), -1)[:, 1], torch.full((4,), tau,
                                                                                                  dtype=torch.float64))


def test_capped_settings_are_checked():
    with pytest.raises(InputError, match="reset_target"):
        UnlearnSettings(reset_target="retrain")
    with pytest.raises(InputError, match="neither"):
        UnlearnSettings(reset_target="capped")
    with pytest.raises(InputError, match="verify_reset 'parts'"):
        UnlearnSettings(reset_target="capped", reset_removed=10.0, verify_reset="parts")
    assert UnlearnSettings(reset_target="capped", verify_repair="gradient").reset_target == "capped"
    with pytest.raises(InputError, match="repair_threshold 0 with reset_target 'capped'.*repair_threshold > 0"):
        UnlearnSettings(reset_target="capped", verify_repair="gradient", repair_threshold=0.0)


def test_the_capped_reset_pulls_the_listed_tokens_to_their_cap_and_holds_the_rest(tiny64):
    """OutputReset with `capped`: target z*_t = capped_logits(z_t(Θ̂)) at the listed tokens and z_t(Θ̂) elsewhere, the
    metric F̄ at ½(softmax(z*) + p̂); against P summed by hand, record by record, at Θ̂ and at a random point. With
    nothing listed the penalty is 0 at Θ̂ and its gradient there is 0."""
    from llmeraser.modeling import fused_attention, theta_of
    from llmeraser.objective import CausalLMObjective
    from llmeraser.render import encode
    from llmeraser.reset import OutputReset

    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = [encode(r, tok, "chat", 64) for r in records[:4]]
    capped = {id(items[0]): [1, 2], id(items[1]): [], id(items[2]): [0]}  # items[3] omitted: held
    tau = 1e-6  # below every token's probability under the untrained tiny model, so each listed token is capped
    reset = OutputReset(obj, params, theta, items, batch_size=3, device="cpu", capped=capped, cap=tau)

    def by_hand(point):
        total = 0.0
        for e in items:
            b = obj.collate([e], "cpu")
            with fused_attention(model), torch.no_grad():
                z, zh = (obj.outputs(params.unflatten(t), b) for t in (point, theta))
            for t in range(e.n_response):
                target = zh[t].clone()
                if t in capped.get(id(e), []):
                    y = b["targets"][t]
                    others = torch.logsumexp(torch.cat([zh[t][:y], zh[t][y + 1:]]), 0)
                    target[y] = min(float(zh[t][y]), float(others) + math.log(tau / (1 - tau)))
                pm = 0.5 * (torch.softmax(target, -1) + torch.softmax(zh[t], -1))
                d = z[t] - target
                F = torch.diag(pm) - torch.outer(pm, pm)
                total += 0.5 * float(d @ F @ d) / e.n_response
        return total

    g = torch.Generator().manual_seed(3)
    point = theta + 0.1 * torch.randn(theta.numel(), dtype=torch.float64, generator=g)
    assert reset.value(theta) == pytest.approx(by_hand(theta), rel=1e-9)
    assert reset.value(point) == pytest.approx(by_hand(point), rel=1e-9)
    assert reset.value(theta) > 0
    held = OutputReset(obj, params, theta, items, batch_size=3, device="cpu", capped={}, cap=tau)
    assert held.value(theta) == pytest.approx(0.0, abs=1e-20)
    assert float(held.grad(theta).abs().max()) < 1e-12


def test_capped_rounds_push_only_the_unpredicted_tokens_of_the_marked_parts(tmp_path, monkeypatch):
    """GradientRepair under reset_target 'capped': each removed record's pushed tokens are support's unsupported ones
    among its marked parts' tokens (its whole answer when none is marked), an explicit list for every record, so the
    form term covers every removed record; the Newton step's reset gets the same lists."""
    from helpers import memorised_tiny

    from llmeraser.data import request_from_rows
    from llmeraser.modeling import fused_attention
    from llmeraser.objective import wide
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair, target_logp
    from llmeraser.support import capped_positions
    from llmeraser.terms import extension_terms

    model, tok, recs = memorised_tiny(tmp_path, 8, epochs=2, batch_size=8)
    rows = [{"op": "remove", "id": recs[0].id, "private": [recs[0].sides()[1][2:]]}, {"op": "remove", "id": recs[2].id}]
    req = request_from_rows(rows, recs)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    s = UnlearnSettings(max_length=64, template="chat", verify_repair="gradient", reset_target="capped",
                        reset_removed=10.0, curvature="ggn")
    at = capped_positions(problem, req)
    table = KeptContinuations(problem.sets(req).kept, tok)
    marked = problem.part_positions(recs[0], [recs[0].sides()[1][2:]])
    assert sorted(at[recs[0].id]) == table.unsupported(problem.examples[0], marked)
    assert set(at[recs[0].id]) <= set(marked)
    assert sorted(at[recs[2].id]) == table.unsupported(problem.examples[2], None)
    for rid, k in ((recs[0].id, 0), (recs[2].id, 2)):  # each with what the kept records teach there
        x = problem.examples[k]
        assert all(d == table.distribution(x.input_ids, x.n_prompt + t) for t, d in at[rid].items())
    rep = GradientRepair(problem, req, s)
    assert {i: x[1] for i, x in rep.removed.items()} == {i: sorted(v) for i, v in at.items()}
    (term,) = extension_terms(problem, req, s)
    assert term.penalty.capped_tokens == sum(len(v) for v in at.values())  # recorded in unlearn.json
    differs = 0
    for target, batch in zip(term.penalty.targets, term.penalty.batches):
        with torch.no_grad(), fused_attention(model):
            zh = wide(problem.objective.outputs(problem.params.unflatten(problem.theta_hat), batch))
        differs += int((~torch.isclose(torch.softmax(target, -1), torch.softmax(zh, -1), rtol=1e-9, atol=1e-12)).any(-1).sum())
    above = 0
    for rid, k in ((recs[0].id, 0), (recs[2].id, 2)):
        e = problem.examples[k]
        with torch.no_grad():
            logp = target_logp(problem.objective, problem.params, problem.theta_hat, problem.objective.collate([e], "cpu"))
        above += sum(float(logp[t].exp()) > s.repair_threshold or d is not None for t, d in at[rid].items())
    # only the listed tokens have a target other than Θ̂'s prediction: each with kept continuations, the others where
    # the own token is above the cap
    assert 0 < differs == above
    # capped_chars and capped_words: the lists and targets of the view with characters, and the word rule's, cached
    # apart from the default's; the rounds, the first step's reset and the Newton refiner each ask for them under the
    # setting
    import dataclasses

    from llmeraser import support
    from llmeraser.newton import Refiner
    from llmeraser.systems import Systems

    s16 = dataclasses.replace(s, capped_chars=16)
    at16, table16 = capped_positions(problem, req, 16), KeptContinuations(problem.sets(req).kept, tok, 16)
    assert capped_positions(problem, req) is at and capped_positions(problem, req, 16) is at16 is not at
    assert capped_positions(problem, req, 0, True) is not at
    for rid, k, parts in ((recs[0].id, 0, marked), (recs[2].id, 2, None)):
        x = problem.examples[k]
        assert sorted(at16[rid]) == table16.unsupported(x, parts)
        assert all(d == table16.distribution(x.input_ids, x.n_prompt + t) for t, d in at16[rid].items())
    asked, built = [], support.KeptContinuations.__init__

    def spy(self, kept, tokenizer=None, chars=support.CHAR_CONTEXT, words=False):
        asked.append((chars, words))
        built(self, kept, tokenizer, chars, words)
    monkeypatch.setattr(support.KeptContinuations, "__init__", spy)
    for setting in (s16, dataclasses.replace(s, capped_words=True)):
        for use in (lambda r: GradientRepair(problem, r, setting), lambda r: extension_terms(problem, r, setting),
                    lambda r: Refiner(problem, r, Systems(problem, setting), setting, 0.03, False)):
            use(request_from_rows(rows, recs))  # a new request object: nothing cached for it
    assert asked == [(16, False)] * 3 + [(0, True)] * 3


def test_a_config_file_chooses_the_target_over_the_recipes(tmp_path):
    """`--recipe memorised --config F`: the recipe's target is 'capped', F's `reset_target` replaces it (the other
    recipes' is 'base', and F turns 'capped' on over them); a misspelt value is refused with the choices named."""
    from llmeraser.recipes import resolve
    from llmeraser.settings import read_config

    assert resolve("memorised")[1].reset_target == "capped" and resolve("default")[1].reset_target == "base"
    for target in ("base", "capped"):
        f = tmp_path / f"{target}.toml"
        f.write_text(f'reset_target = "{target}"\n')
        name, s = resolve("memorised", read_config(f))
        assert (name, s.reset_target, s.reset_removed, s.verify_repair) == ("memorised", target, 10.0, "gradient")
    s = resolve("default", read_config(tmp_path / "capped.toml"), {"verify_repair": "gradient"})[1]
    assert s.reset_target == "capped"
    bad = tmp_path / "bad.toml"
    bad.write_text('reset_target = "caped"\n')
    with pytest.raises(InputError, match=r"reset_target 'caped'.*\['base', 'capped'\]"):
        resolve("memorised", read_config(bad))


def test_an_extra_newton_step_pulls_the_same_capped_tokens(tmp_path):
    """verify_repair 'newton' under 'capped': the Refiner's reset over the removed samples has the first step's targets."""
    from helpers import memorised_tiny

    from llmeraser.data import request_from_rows
    from llmeraser.newton import Refiner
    from llmeraser.problem import Problem
    from llmeraser.systems import Systems
    from llmeraser.terms import extension_terms

    model, tok, recs = memorised_tiny(tmp_path, 8, epochs=2, batch_size=8)
    req = request_from_rows([{"op": "remove", "id": recs[0].id, "private": [recs[0].sides()[1][2:]]}], recs)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    s = UnlearnSettings(max_length=64, template="chat", reset_target="capped", reset_removed=10.0, curvature="ggn",
                        curvature_samples=0, newton_steps=2)
    (term,) = extension_terms(problem, req, s)
    reset = Refiner(problem, req, Systems(problem, s), s, 0.03, False).reset_term(problem.sets(req).removed)
    assert reset.capped_tokens == term.penalty.capped_tokens > 0
    assert all(torch.equal(a, b) for a, b in zip(reset.targets, term.penalty.targets))


def test_capped_own_reaches_the_first_steps_reset_and_the_extra_newton_steps(tmp_path):
    """capped_own φ lowers the capped rows' targets at their own token, in the first step's reset and in the Refiner's
    alike, and only there: every other row's target is Θ̂'s own logits, as without φ."""
    from helpers import memorised_tiny

    from llmeraser.data import request_from_rows
    from llmeraser.newton import Refiner
    from llmeraser.problem import Problem
    from llmeraser.systems import Systems
    from llmeraser.terms import extension_terms

    model, tok, recs = memorised_tiny(tmp_path, 8, epochs=2, batch_size=8)
    req = request_from_rows([{"op": "remove", "id": recs[0].id}], recs)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    base = dict(max_length=64, template="chat", reset_target="capped", reset_removed=10.0, curvature="ggn",
                curvature_samples=0, newton_steps=2, repair_threshold=1e-6)  # τ below every token: each is capped

    def targets(**over):
        s = UnlearnSettings(**base, **over)
        (term,) = extension_terms(problem, req, s)
        refined = Refiner(problem, req, Systems(problem, s), s, 0.03, False).reset_term(problem.sets(req).removed)
        assert all(torch.equal(a, b) for a, b in zip(refined.targets, term.penalty.targets))
        return term.penalty

    held, bounded = targets(), targets(capped_own=1e-7)
    assert held.capped_tokens == bounded.capped_tokens > 0
    changed = lowered = 0
    for a, b, batch in zip(held.targets, bounded.targets, held.batches):
        y = batch["targets"]
        pa, pb = (torch.log_softmax(t, -1).gather(1, y[:, None])[:, 0] for t in (a, b))
        assert bool((pb <= pa + 1e-9).all())  # never above the cap's target
        changed += int((a != b).any(-1).sum())
        # where K(y) = 0 (or no K): 0.1·1e-7 (or 1e-7) against τ = 1e-6; where the kept records write y, τ either way
        lowered += int((pb < pa - 1.0).sum())
    assert changed == held.capped_tokens and 0 < lowered <= changed


def test_the_recipes_capped_target_gives_way_where_the_user_turned_its_pulls_off():
    """`memorised` holds reset_target 'capped', which needs a pull (ρ > 0 or gradient rounds) and verify_reset
    'response'. A user who turns the pulls off, or picks verify_reset 'parts', gets the base target instead of an error;
    one who also asks for 'capped' gets the error that names the clash."""
    from llmeraser.recipes import recipe, resolve

    assert recipe("memorised").reset_target == "capped"
    newton = {"verify_repair": "newton"}
    assert resolve("memorised", None, {**newton, "reset_removed": 0.0})[1].reset_target == "base"
    assert resolve("memorised", None, {**newton, "verify_reset": "parts"})[1].reset_target == "base"
    assert recipe("memorised", **newton, reset_removed=0.0).reset_target == "base"
    # a pull remains (ρ = 10 under Newton steps; or gradient rounds with ρ = 0): capped stays
    assert resolve("memorised", None, newton)[1].reset_target == "capped"
    assert resolve("memorised", None, {"reset_removed": 0.0})[1].reset_target == "capped"
    with pytest.raises(InputError, match="reset_target 'capped'"):
        resolve("memorised", {"settings": {"reset_target": "capped"}}, {**newton, "verify_reset": "parts"})


def test_capped_chars_words_and_own_are_checked_and_need_the_capped_target():
    """capped_chars takes a whole number >= 0, capped_words true or false, capped_own a probability in [0, 1), each
    only with reset_target 'capped', whose targets they shape; a bad value is refused with the fix named."""
    base = dict(verify_repair="gradient", reset_target="capped", reset_removed=10.0, curvature="ggn")
    assert UnlearnSettings(**base, capped_chars=16).capped_chars == 16 and UnlearnSettings(**base).capped_chars == 0
    for bad in (-1, 2.5, True, "16"):
        with pytest.raises(InputError, match="capped_chars .*>= 0"):
            UnlearnSettings(**base, capped_chars=bad)
    with pytest.raises(InputError, match="set reset_target 'capped'"):
        UnlearnSettings(**{**base, "reset_target": "base"}, capped_chars=16)
    assert UnlearnSettings(**base, capped_words=True).capped_words and not UnlearnSettings(**base).capped_words
    for bad in (1, "true", None):
        with pytest.raises(InputError, match="capped_words .*true or false"):
            UnlearnSettings(**base, capped_words=bad)
    with pytest.raises(InputError, match="set reset_target 'capped'"):
        UnlearnSettings(**{**base, "reset_target": "base"}, capped_words=True)
    assert UnlearnSettings(**base, capped_own=1e-3).capped_own == 1e-3 and UnlearnSettings(**base).capped_own == 0
    for bad in (-1e-3, 1.0, True, "0.001"):
        with pytest.raises(InputError, match=r"capped_own .*\[0, 1\)"):
            UnlearnSettings(**base, capped_own=bad)
    with pytest.raises(InputError, match="set reset_target 'capped'"):
        UnlearnSettings(**{**base, "reset_target": "base"}, capped_own=1e-3)


def test_the_recipes_capped_check_gives_way_where_the_user_left_out_what_it_counts():
    """`memorised` holds verify_capped 2, which counts the tokens of reset_target 'capped' that gradient rounds push.
    A user who picks Newton extra steps or the base target gets it off instead of an error; one who also asks for it
    gets the error that names the clash."""
    from llmeraser.recipes import recipe, resolve

    assert recipe("memorised").verify_capped == 2.0 and recipe("default").verify_capped == 0.0
    for given in ({"verify_repair": "newton"}, {"reset_target": "base"},
                  {"verify_repair": "newton", "reset_removed": 0.0}):  # the target falls back to base there too
        assert resolve("memorised", None, given)[1].verify_capped == 0.0, given
    assert resolve("memorised", {"settings": {"reset_target": "base"}}, None)[1].verify_capped == 0.0
    assert resolve("memorised", None, {"reset_removed": 0.0})[1].verify_capped == 2.0  # rounds and capped stay
    with pytest.raises(InputError, match="verify_capped"):
        resolve("memorised", None, {"verify_repair": "newton", "verify_capped": 2.0})


def test_verify_capped_counts_the_pushed_tokens_above_its_bound_and_fails_the_check(tmp_path):
    """GradientRepair.above(Θ, m) against a count by hand of the pushed tokens with p_t > m·τ; through unlearn_model
    with Θ held at Θ̂ (λ = 1e6), verify_capped = m adds one failure naming above(Θ̂, m·τ), and without it none."""
    from helpers import memorised_tiny

    from llmeraser.api import unlearn_model
    from llmeraser.data import request_from_rows
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair, target_logp

    model, tok, recs = memorised_tiny(tmp_path, 8, epochs=2, batch_size=8)
    rows = [{"op": "remove", "id": recs[0].id, "private": [recs[0].sides()[1][2:]]}, {"op": "remove", "id": recs[2].id}]
    req = request_from_rows(rows, recs)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    s = UnlearnSettings(max_length=64, template="chat", verify_repair="gradient", reset_target="capped", device="cpu")
    rep = GradientRepair(problem, req, s)
    probs = []
    for x, at in rep.removed.values():
        with torch.no_grad():
            logp = target_logp(problem.objective, problem.params, problem.theta_hat, problem.objective.collate([x], "cpu"))
        probs += [float(logp[t].exp()) for t in at]
    q = sorted(probs)
    assert len(q) > 1 and q[0] < q[-1]
    # bounds between the probabilities, not at one: a batch of two computes each p_t to rounding of one record alone
    mid = next(i for i in range(len(q) // 2, len(q)) if q[i] > q[i - 1])
    tau = s.repair_threshold
    for m in (0.0, (q[mid - 1] + q[mid]) / 2 / tau, 0.5 / tau):
        assert rep.above(problem.theta_hat, m) == sum(q > m * tau for q in probs)

    with pytest.raises(InputError, match="verify_capped"):
        UnlearnSettings(verify_capped=2.0)  # the base target lists no capped tokens
    with pytest.raises(InputError, match="verify_capped"):
        UnlearnSettings(verify_capped=-1.0, reset_target="capped", verify_repair="gradient")
    failures = {}
    for m in (0.0, 1.0):
        st = UnlearnSettings(damping=1e6, curvature_samples=0, max_length=64, template="chat", device="cpu",
                             verify="check", verify_retained=4, verify_repair="gradient", reset_target="capped",
                             verify_capped=m)
        res = unlearn_model(model, tok, recs, rows, weight_decay=0.0, settings=st)
        failures[m] = [f for f in res.report.verification["failures"] if "capped tokens" in f]
    want = rep.above(problem.theta_hat, 1.0)
    assert want > 0 and failures[1.0] == [f"{want} capped tokens of removed values above p = {s.repair_threshold:g} "
                                          "(sampling could read them back: verify_capped)"]
    assert failures[0.0] == []


def test_repair_follow_floors_are_the_resets_capped_targets_and_drive_the_push_and_the_check(tmp_path):
    """repair_follow: GradientRepair.floors() is, at each capped token, softmax of the first step's reset target (the
    same capped_target at Θ̂) at the record's own token, and τ at every other response token; without it τ everywhere.
    The rounds' removed gradient is ∇ of (w/|R|) Σ_{capped t, p_t > q*_t} [log p_t − log(1 − p_t)] by an explicit loop
    over the records, and above(Θ, m) counts p_t > m·q*_t by hand; the check's failure names the per-token bound. With
    repair_fit the gradient is ∇ of (w/|R|) Σ_{capped t} −Σ_v q*_t(v) log p_t(v), by the same loop."""
    from helpers import memorised_tiny

    from llmeraser.data import request_from_rows
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair, output_logprobs, target_logp
    from llmeraser.reset import OutputReset
    from llmeraser.support import capped_by_sample
    from llmeraser.verify import capped_bound_text

    model, tok, recs = memorised_tiny(tmp_path, 8, epochs=2, batch_size=8)
    rows = [{"op": "remove", "id": recs[0].id, "private": [recs[0].sides()[1][2:]]}, {"op": "remove", "id": recs[2].id}]
    req = request_from_rows(rows, recs)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    base = dict(max_length=64, template="chat", verify_repair="gradient", reset_target="capped", reset_removed=10.0,
                curvature="ggn", curvature_samples=0, capped_own=1e-4, repair_threshold=0.05, repair_form=0.0)
    s = UnlearnSettings(**base, repair_follow=True)
    rep, plain = GradientRepair(problem, req, s), GradientRepair(problem, req, UnlearnSettings(**base))
    want, dists = {}, {}  # id(example) -> q* of its own tokens, and q* whole, from the reset's targets (each alone)
    by_sample = capped_by_sample(problem, req)
    for x, _ in rep.removed.values():
        reset = OutputReset(problem.objective, problem.params, problem.theta_hat, [x], 8, "cpu",
                            capped={id(x): by_sample[id(x)]}, cap=0.05, own=1e-4)
        (target,), (batch,) = reset.targets, reset.batches
        want[id(x)] = torch.log_softmax(target, -1).gather(1, batch["targets"][:, None])[:, 0].exp()
        dists[id(x)] = torch.softmax(target, -1)
    floors, lowered = rep.floors(), 0
    for x, at in rep.removed.values():
        assert torch.equal(plain.floors()[id(x)], torch.full((x.n_response,), 0.05, dtype=torch.float64))
        others = [k for k in range(x.n_response) if k not in at]
        assert bool((floors[id(x)][others] == 0.05).all())
        assert torch.allclose(floors[id(x)][at], want[id(x)][at].double(), rtol=1e-4, atol=1e-9)
        lowered += int((floors[id(x)][at] < 0.01).sum())
    assert lowered > 0  # some capped token's target is far below τ

    theta = problem.theta_hat.clone()
    pushed = list(rep.removed.values())
    g, k = rep._removed_grad(theta, pushed)
    th = theta.clone().requires_grad_(True)
    loss, count = 0.0, 0
    for x, at in pushed:
        logp = target_logp(problem.objective, problem.params, th, problem.objective.collate([x], "cpu"))
        for t in at:
            if float(logp[t].detach().exp()) > float(floors[id(x)][t]):
                loss = loss + logp[t] - torch.log1p(-logp[t].exp())
                count += 1
    (want_g,) = torch.autograd.grad(s.repair_unlikelihood * loss / len(pushed), th)
    assert k == count > 0 and torch.allclose(g, want_g, rtol=1e-4, atol=1e-7)

    probs = []
    for x, at in pushed:
        with torch.no_grad():
            logp = target_logp(problem.objective, problem.params, theta, problem.objective.collate([x], "cpu"))
        probs += [(float(logp[t].exp()), float(floors[id(x)][t])) for t in at]
    for m in (1.0, 10.0, 1e3):
        assert rep.above(theta, m) == sum(p > m * f for p, f in probs)
    assert rep.above(theta, 1.0) > plain.above(theta, 1.0)  # the lowered targets leave more tokens above
    # repair_fit: the cross-entropy to the whole target at every capped token, against the same loop
    fit = GradientRepair(problem, req, UnlearnSettings(**base, repair_follow=True, repair_fit=True))
    g, k = fit._removed_grad(theta, pushed)
    th = theta.clone().requires_grad_(True)
    loss = 0.0
    for x, at in pushed:
        lp = output_logprobs(problem.objective, problem.params, th, problem.objective.collate([x], "cpu"))
        loss = loss - (dists[id(x)][at].to(lp.dtype) * lp[at]).sum()
    (want_g,) = torch.autograd.grad(s.repair_unlikelihood * loss / len(pushed), th)
    assert k == sum(len(at) for _, at in pushed) and torch.allclose(g, want_g, rtol=1e-4, atol=1e-7)
    with pytest.raises(InputError, match="repair_fit .*set repair_follow true"):
        UnlearnSettings(**base, repair_fit=True)
    assert capped_bound_text({"capped_bound": 2.0, "capped_per_token": True}) == "2 × their capped targets"
    assert capped_bound_text({"capped_bound": 0.04, "capped_per_token": False}) == "p = 0.04"


def test_bounded_unlikelihood_with_per_token_thresholds_and_log_odds_against_a_loop():
    """bounded_unlikelihood(log p, y, mask, τ_t, odds): Σ over masked tokens with p_t > τ_t of −log(1 − p_t) (odds: plus
    log p_t), value and gradient against an explicit loop; a scalar τ is the same as a constant tensor."""
    from llmeraser.repair import bounded_unlikelihood

    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, dtype=torch.float64, generator=g)
    z[:, 0] += torch.tensor([6.0, 3.0, 0.0, -3.0, 8.0, 1.0, -6.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    tau = torch.tensor([0.5, 0.9, 1e-3, 1e-3, 0.1, 0.2, 1e-4], dtype=torch.float64)
    y = torch.zeros(7, dtype=torch.long)
    for odds in (False, True):
        x = z.clone().requires_grad_(True)
        loss, k = bounded_unlikelihood(torch.log_softmax(x, -1), y, mask, tau, odds)
        (got,) = torch.autograd.grad(loss, x)
        w = z.clone().requires_grad_(True)
        lp = torch.log_softmax(w, -1)[:, 0]
        terms = [(-torch.log(1 - lp[t].exp()) + (lp[t] if odds else 0)) for t in range(7)
                 if mask[t] and float(lp[t].detach().exp()) > float(tau[t])]
        (want,) = torch.autograd.grad(sum(terms), w)
        assert k == len(terms) and 0 < k < int(mask.sum())
        assert float(loss.detach()) == pytest.approx(float(sum(terms).detach()), rel=1e-12)
        assert torch.allclose(got, want, rtol=1e-10)
    scalar = bounded_unlikelihood(torch.log_softmax(z, -1), y, mask, 0.1)
    tensor = bounded_unlikelihood(torch.log_softmax(z, -1), y, mask, torch.full((7,), 0.1, dtype=torch.float64))
    assert scalar[1] == tensor[1] and float(scalar[0]) == float(tensor[0])


def test_bounded_unlikelihood_pushes_a_token_float32_rounds_to_certainty():
    """A memorised token whose float32 probability rounds to 1 (logit margin 30: 1 − p_y ≈ 2e-13) still gets the push:
    in logits, ∇[−log(1 − p_y)] = p_y at y and −p_v·p_y/(1 − p_y) at v ≠ y, here ≈ (1, −½, −½), against the same
    in float64 with 1 − p_y summed as Σ_{v≠y} p_v (log1p(−p) of a clamped p has no gradient at all there)."""
    from llmeraser.repair import bounded_unlikelihood

    z64 = torch.tensor([[30.0, 0.0, 0.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    y, mask = torch.tensor([0, 2]), torch.tensor([True, True])
    p = torch.softmax(z64, -1)
    py = p.gather(1, y[:, None])
    rest = p.scatter(1, y[:, None], 0.0).sum(1, keepdim=True)
    want = -p * py / rest
    want.scatter_(1, y[:, None], py)
    for odds in (False, True):
        x = z64.float().requires_grad_(True)
        loss, k = bounded_unlikelihood(torch.log_softmax(x, -1), y, mask, 0.02, odds)
        (got,) = torch.autograd.grad(loss, x)
        assert k == 2 and torch.isfinite(loss)
        # odds adds ∇log p_y = e_y − p, ≈ 0 at the certain row
        expect = want + (torch.nn.functional.one_hot(y, 3) - p if odds else 0)
        assert torch.allclose(got.double(), expect, rtol=1e-4, atol=1e-6)
        assert float(got[0, 0]) == pytest.approx(1.0, rel=1e-5)


def test_repair_follow_is_checked_and_needs_the_capped_target_and_gradient_rounds():
    """repair_follow takes true or false, and only with reset_target 'capped' and verify_repair 'gradient'."""
    base = dict(verify_repair="gradient", reset_target="capped", reset_removed=10.0, curvature="ggn")
    assert UnlearnSettings(**base, repair_follow=True).repair_follow and not UnlearnSettings(**base).repair_follow
    for bad in (1, "true", None):
        with pytest.raises(InputError, match="repair_follow .*true or false"):
            UnlearnSettings(**base, repair_follow=bad)
    for other in ({"reset_target": "base"}, {"verify_repair": "newton"}):
        with pytest.raises(InputError, match="repair_follow .*set reset_target 'capped' and verify_repair 'gradient'"):
            UnlearnSettings(**{**base, **other}, repair_follow=True)


def test_until_keeps_the_round_that_misses_least_then_has_fewest_capped_tokens_above(tmp_path, monkeypatch):
    """verify.missed_by orders by records missed, then by capped tokens above verify_capped's bound; a run of
    `--verify until` that ends unverified keeps the round that is least by it, the later of a full tie. The counts
    are scripted (GradientRepair.above) over rounds that miss no record: 6 at the update and at Θ̂, then 2, 5, 2, 5;
    the third round (2, later than the first's 2) is kept, where a tie on records alone kept the last."""
    from helpers import memorised_tiny

    from llmeraser.api import unlearn_model
    from llmeraser.repair import GradientRepair
    from llmeraser.verify import missed_by

    script = iter([6, 6, 2, 5, 2, 5])
    monkeypatch.setattr(GradientRepair, "above", lambda self, theta, multiple: next(script))

    assert missed_by({"removed": {"still_produced": 0}, "old": {"still_produced": 0}, "corrected": {"checked": 0, "produced": 0},
                      "queries": {"checked": 0, "produced": 0}, "retained": {"produced_before": 0, "kept": 0},
                      "capped_above": 3}) == (0, 3)
    model, tok, recs = memorised_tiny(tmp_path, 8, epochs=2, batch_size=8)
    rows = [{"op": "remove", "id": recs[0].id, "private": [recs[0].sides()[1][2:]]}, {"op": "remove", "id": recs[2].id}]
    st = UnlearnSettings(damping=1e6, curvature_samples=0, max_length=64, template="chat", device="cpu", verify="until",
                         verify_steps=4, verify_retained=4, verify_repair="gradient", reset_target="capped",
                         verify_capped=2.0, repair_steps=2)
    v = unlearn_model(model, tok, recs, rows, weight_decay=0.0, settings=st).report.verification
    assert [(r["shortfall"], r["capped_above"]) for r in v["rounds"]] == [(0, 6), (0, 6), (0, 2), (0, 5), (0, 2), (0, 5)]
    assert not v["verified"] and v["kept_after_extra_steps"] == 3
