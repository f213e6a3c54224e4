"""First-order repair for `unlearn --verify until` with verify_repair = 'gradient'.

Each round takes `repair_steps` Adam steps on

    J(Θ) = (1/|B|) Σ_{i∈B} L_i(Θ) + (1/|N|) Σ_{i∈N} L_i(Θ) + (w/|R|) Σ_{r∈R} Σ_{t∈T_r, p_t(Θ)>τ} −log(1 − p_t(Θ))
           + (v/|R_F|) Σ_{r∈R_F} (1/|F_r|) Σ_{t∈F_r} −log p_t(Θ)

B: the next `repair_batch` kept records of a seeded shuffle (each kept record once per pass), with verify_restore
also up to `repair_batch` of the kept records whose answers the round's start made uncertain (the same in every
step of the round: retraining fits them, and a sampled batch meets each only once a pass). N: every new version
(corrections, modified queries). R: every removed record (the threshold, not the last check, decides which still
push: a record that left the greedy answer may come back). T_r: the tokens of r's marked private parts (every
response token of a record without marked parts). p_t: the teacher-forced probability of the record's own token t;
τ = repair_threshold, w = repair_unlikelihood. R_F: the removed records with marked private parts; F_r: their other
response tokens (the sentence around the values), v = repair_form. With reset_target 'capped', T_r keeps only the
tokens the kept records do not predict (support.py: retraining still gives an IBAN's "DE") and F_r is every other
response token of every removed record. With repair_follow each capped token t of T_r instead enters while
p_t(Θ) > q*_t, q*_t its capped target's probability of the token at Θ̂ (support.capped_target, the reset's target, fixed
for the request), by its log-odds:

    −log(1 − p_t)  →  log p_t − log(1 − p_t)

Why both: q*_t goes down to 0.1·capped_own where no kept record writes the token, far below τ, and near there
−log(1 − p) ≈ p has gradient p·∇log p, which vanishes; the log-odds keeps −log(1 − p)'s push near p = 1 and adds
∇log p's, which does not (BENCHMARKS.md#forgetting-follow). With repair_fit as well, each capped token's term is
instead the cross-entropy to its whole capped target, −Σ_v q*_t(v) log p_t(v) (every capped token, no threshold), so
that the round raises what the kept records write there as it lowers the removed token (BENCHMARKS.md#forgetting-fit).
With repair_old, R also holds each response correction's old record, T_r its replaced value's tokens from the first
that differs from the new answer (replaced_values), and no form term (the new answer's own loss keeps its words);
verify_capped bounds them as it bounds a removed value's, so that sampling reads the old value back no more easily
than a removed one (BENCHMARKS.md#forgetting-old-values). |R| then counts them too, so each removed record's push is
|removed|/|R| of what it is without repair_old (Adam's step scale and verify_capped's bound are unchanged).
The gradient is clipped to norm 1, as in training; Adam's moments persist across rounds.

Why first order: an extra Newton step costs a CG run over every kept record, and on the memorised n = 256 run its
CG stayed above relative residual 1 and no correction was learned in 10 steps (BENCHMARKS.md#gradient-repair).
Why the unlikelihood and not the reset's pull toward the base model: a removed record's private value (a
condition, an e-mail domain) is often also a kept record's; pulling its tokens toward the base model lowers
them in every context, and on that run it lost 43 of 63 sampled retained answers in 5 steps. The unlikelihood
asks only that the memorised token stop being likely, and stops pushing once p_t ≤ τ.
Why the form term: retraining, having learnt the sentence from the kept records, answers a removed prompt in the
record's sentence with another value; the unlikelihood alone let whole answers drift into garble
(docs/benchmarks-history.md#removed-forms). The fixed words carry nothing the request marks private.
"""

from __future__ import annotations

import random

import torch

from . import distributed
from .data import EditRequest
from .modeling import fused_attention
from .objective import wide
from .problem import Problem
from .reset import first_difference, pulled_tokens
from .settings import UnlearnSettings
from .support import capped_positions, capped_target, others_logsumexp

# Adam's moment decay rates and denominator guard, as torch.optim.Adam's defaults
BETAS, EPS = (0.9, 0.999), 1e-8
# the gradient norm each step is clipped to (train.py's max_grad_norm default)
CLIP = 1.0


def output_logprobs(objective, params, theta: torch.Tensor, batch: dict) -> torch.Tensor:
    """log p(· | context) at each response token at Θ (with grad): [tokens, vocab] in collate's order, float32 or wider."""
    return torch.log_softmax(wide(objective.outputs(params.unflatten(theta), batch)), -1)


def target_logp(objective, params, theta: torch.Tensor, batch: dict) -> torch.Tensor:
    """log p_t of each response token's own target at Θ (with grad), in collate's order, in float32 or wider."""
    return output_logprobs(objective, params, theta, batch).gather(1, batch["targets"][:, None])[:, 0]


def bounded_unlikelihood(logprobs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, threshold,
                         odds: bool = False):
    """(Σ_{t ∈ mask, p_t > τ_t} −log(1 − p_t), how many tokens entered it) from output_logprobs' rows and each row's
    own token y_t; `threshold`: τ, or a tensor of each token's τ_t; `odds`: the log-odds log p_t − log(1 − p_t) in
    place of −log(1 − p_t).
    log(1 − p_y) = logsumexp_{v≠y} log p_v, exact: a memorised token has p_y within float32's rounding of 1, where
    log1p(−p_y) is −inf or, clamped, a constant with no gradient; in logits this one's gradient is p_y at y and
    −p_v·p_y/(1 − p_y) at v ≠ y, each at most 1 in size."""
    logp = logprobs.gather(1, targets[:, None])[:, 0]
    p = logp.exp()
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(p.device, p.dtype)
    on = mask.to(p.device) & (p.detach() > threshold)
    rows = on.nonzero()[:, 0]
    term = -others_logsumexp(logprobs[rows], targets[rows])
    if odds:
        term = term + logp[rows]
    return term.sum(), int(rows.numel())


def unlikelihood(objective, params, theta: torch.Tensor, batch: dict, mask: torch.Tensor, threshold: float):
    """(Σ_{t ∈ mask, p_t > τ} −log(1 − p_t), how many tokens entered it) for one collated batch at Θ (with grad)."""
    return bounded_unlikelihood(output_logprobs(objective, params, theta, batch), batch["targets"], mask, threshold)


def replaced_values(problem: Problem, request: EditRequest, settings: UnlearnSettings) -> dict:
    """{id of each correct_response edit: (its encoded old record, the indices among its response tokens that
    repair_old pushes)}: the tokens of its marked private parts (every response token without them; with
    reset_target 'capped', only those the kept records do not predict: support.capped_positions) from the first
    token at which the old and new responses' token ids differ (reset.first_difference). Why not before it: there the
    new answer has the same token after the same context, which its own loss in J trains up. Why that token itself,
    where reset.past_shared_prefix starts after it: its context is the new answer's too, and a pull toward a whole
    distribution there would fight the new token, but the unlikelihood lowers only the old token's probability."""
    new = problem.sets(request).new_by_id
    capped = (capped_positions(problem, request, settings.capped_chars, settings.capped_words)
              if settings.reset_target == "capped" else None)
    out = {}
    for e in request.edits:
        if e.op != "correct_response":
            continue
        x, y = problem.examples[e.index], new[e.id]
        start = first_difference(x, y)
        if capped is not None:
            at = capped[e.id]
        else:
            at = (problem.part_positions(e.old, e.private) if e.private else None) or range(x.n_response)
        out[e.id] = (x, sorted(k for k in at if k >= start))
    return out


def form_weights(items: list, parts: dict) -> torch.Tensor:
    """Over a batch's response tokens, in collate's order: 1/|F_r| at each token of F_r (an item's response tokens
    outside the positions `parts` lists for it), 0 at its parts and at every token of an item `parts` omits.
    F_r is the complement of pulled_tokens' mask, which covers the whole of an omitted item."""
    free = (~pulled_tokens(items, parts)).float().split([e.n_response for e in items])
    return torch.cat([f / max(float(f.sum()), 1.0) for f in free])


class GradientRepair:
    """Rounds of Adam steps on J above from a given Θ, one round per `round()` (module docstring)."""

    def __init__(self, problem: Problem, request: EditRequest, settings: UnlearnSettings):
        self.p, self.s = problem, settings
        sets = problem.sets(request)
        self.kept, self.new = sets.kept, sets.new
        # id -> (encoded removed record, indices of its private parts' tokens or None: every response token); with
        # reset_target 'capped', of those the kept records do not predict (support.py), a list for every record
        self.removed = {e.id: (problem.examples[e.index], problem.part_positions(e.old, e.private) if e.private else None)
                        for e in request.edits if e.op == "remove"}
        if settings.reset_target == "capped":
            at = capped_positions(problem, request, settings.capped_chars, settings.capped_words)
            self.removed = {i: (x, sorted(at[i])) for i, (x, _) in self.removed.items()}
        # with repair_old, the corrections' old records and their replaced values' tokens (replaced_values)
        self.replaced = replaced_values(problem, request, settings) if settings.repair_old else {}
        self._replaced_ids = {id(x) for x, _ in self.replaced.values()}
        self.request = request
        self._floors = None  # {id(encoded removed record): each response token's τ_t}, on first use (floors())
        self._targets = {}  # with repair_fit, {id(encoded removed record): (capped indices, log q* there [k, vocab])}
        self.rng = random.Random(settings.seed)
        self.order: list = []
        self.m1 = self.m2 = None
        self.t = 0  # Adam steps taken

    def _next_kept(self) -> list:
        """The next batch of the shuffled kept records; a new shuffle when a pass ends."""
        out = []
        while len(out) < min(self.s.repair_batch, len(self.kept)):
            if not self.order:
                self.order = list(range(len(self.kept)))
                self.rng.shuffle(self.order)
            out.append(self.kept[self.order.pop()])
        return out

    def floors(self) -> dict:
        """{id(encoded pushed record: removed, or with repair_old a correction's old one): τ_t over its response tokens}:
        τ = repair_threshold at each, and with repair_follow q*_t at its capped (and pushed) ones: softmax of
        support.capped_target (at Θ̂, cap τ, capped_own φ) at the record's own token, the probability OutputReset's
        target gives it. Computed once, every rank for every pushed record (a few teacher-forced passes), as the
        reset's targets are fixed at Θ̂."""
        if self._floors is None:
            p, s = self.p, self.s
            at = capped_positions(p, self.request, s.capped_chars, s.capped_words) if s.repair_follow else {}
            self._floors = {}
            for rid, (x, pos) in self.pushed().items():
                floor = torch.full((x.n_response,), float(s.repair_threshold), dtype=torch.float64)
                ks = sorted(set(at.get(rid, ())) & set(pos or ()))  # a replaced value: from where the answers differ
                if ks:
                    batch = p.objective.collate([x], p.device)
                    with torch.no_grad(), fused_attention(p.model):
                        z = wide(p.objective.outputs(p.params.unflatten(p.theta_hat), batch))
                    rows = torch.tensor(ks, device=z.device)
                    y = batch["targets"][rows]
                    target = capped_target(z[rows], y, [at[rid][k] for k in ks], s.repair_threshold, s.capped_own)
                    logq = torch.log_softmax(target, -1)
                    floor[ks] = logq.gather(1, y[:, None])[:, 0].exp().double().cpu()
                    if s.repair_fit:
                        self._targets[id(x)] = (ks, logq.float())
                self._floors[id(x)] = floor
        return self._floors

    def pushed(self) -> dict:
        """id -> (encoded record, positions or None) over every record whose tokens the rounds push: the removed
        ones and, with repair_old, the corrections' old ones."""
        return {**self.removed, **self.replaced}

    def _fit_loss(self, chunk: list, logprobs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(Σ over the chunk's capped tokens of −Σ_v q*_t(v) log p_t(v), how many tokens) from output_logprobs' rows."""
        self.floors()
        rows, logq, offset = [], [], 0
        for x in chunk:
            ks, lq = self._targets.get(id(x), ([], None))
            rows += [offset + k for k in ks]
            if ks:
                logq.append(lq)
            offset += x.n_response
        if not rows:
            return logprobs.sum() * 0.0, 0
        q = torch.cat(logq).to(logprobs.device, logprobs.dtype).exp()
        return -(q * logprobs[rows]).sum(), len(rows)

    def _floor(self, chunk: list) -> torch.Tensor:
        """τ_t over a chunk's response tokens, in collate's order."""
        floors = self.floors()
        return torch.cat([floors[id(x)] for x in chunk])

    def _batches(self, pushed: list):
        """(encoded records, their collated batch, {id: positions pushed}) over this rank's share of `pushed`
        ((encoded removed record, positions or None) pairs), batch_size records at a time."""
        p = self.p
        items = distributed.shard(pushed)
        parts = {id(x): at for x, at in items if at is not None}
        examples = [x for x, _ in items]
        for i in range(0, len(examples), p.batch_size):
            chunk = examples[i:i + p.batch_size]
            yield chunk, p.objective.collate(chunk, p.device), parts

    def _removed_grad(self, theta: torch.Tensor, pushed: list) -> tuple[torch.Tensor, int]:
        """(∇ of J's removed-record terms, (w/|R|)·unlikelihood + (v/|R_F|)·form, the unlikelihood's token count),
        every rank's share summed."""
        p, s, out, tokens = self.p, self.s, torch.zeros_like(theta), 0
        # the form term is the removed records' alone (a replaced value's new answer trains its words)
        with_form = sum(at is not None and id(x) not in self._replaced_ids for x, at in pushed) if s.repair_form else 0
        for chunk, batch, parts in self._batches(pushed):
            with torch.enable_grad(), fused_attention(p.model):
                th = theta.detach().clone().requires_grad_(True)
                logprobs = output_logprobs(p.objective, p.params, th, batch)
                logp = logprobs.gather(1, batch["targets"][:, None])[:, 0]
                if s.repair_fit:
                    loss, k = self._fit_loss(chunk, logprobs)
                else:
                    loss, k = bounded_unlikelihood(logprobs, batch["targets"], pulled_tokens(chunk, parts),
                                                   self._floor(chunk), s.repair_follow)
                loss = s.repair_unlikelihood * loss / len(pushed)
                if with_form:
                    removed = {i: at for i, at in parts.items() if i not in self._replaced_ids}
                    loss = loss - s.repair_form * (form_weights(chunk, removed).to(logp.device) * logp).sum() / with_form
                if k or with_form:
                    (g,) = torch.autograd.grad(loss, th)
                    out += g
            tokens += k
        return distributed.all_sum(out), int(distributed.all_sum_float(float(tokens)))

    def above(self, theta: torch.Tensor, multiple: float) -> int:
        """How many pushed tokens of the removed records (and with repair_old the replaced values: T_r) have
        p_t(Θ) > m·τ_t (floors(): τ, or q*_t with repair_follow), by one teacher-forced pass, every rank's share
        summed: verify_capped's count (api.verify_edit)."""
        p, count = self.p, 0
        for chunk, batch, parts in self._batches(list(self.pushed().values())):
            with torch.no_grad(), fused_attention(p.model):
                logp = target_logp(p.objective, p.params, theta, batch)
            bound = (multiple * self._floor(chunk)).to(logp.device, logp.dtype)
            count += int((pulled_tokens(chunk, parts).to(logp.device) & (logp.exp() > bound)).sum())
        return int(distributed.all_sum_float(float(count)))

    def gradient(self, theta: torch.Tensor, pushed: list, restore: list = ()) -> tuple[torch.Tensor, int]:
        """(∇J(Θ) before clipping, the unlikelihood's token count) on the next kept batch plus `restore`."""
        p = self.p
        kept = list(restore) + self._next_kept()
        g = p.grad_sum(kept, theta, "repair: kept", False) / max(len(kept), 1) if kept else torch.zeros_like(theta)
        if self.new:
            g = g + p.grad_sum(self.new, theta, "repair: new", False) / len(self.new)
        tokens = 0
        if pushed and (self.s.repair_unlikelihood or self.s.repair_form):
            u, tokens = self._removed_grad(theta, pushed)
            g = g + u
        return g, tokens

    def round(self, theta: torch.Tensor, restore: list = ()) -> tuple[torch.Tensor, dict]:
        """(Θ after `repair_steps` Adam steps, the round's record); `restore`: encoded kept records whose answers are
        uncertain at Θ (Unlearner.uncertain_kept), of which the first `repair_batch` join every step."""
        s = self.s
        pushed = list(self.pushed().values())
        restore = list(restore)[:s.repair_batch]
        if self.m1 is None:
            self.m1, self.m2 = torch.zeros_like(theta), torch.zeros_like(theta)
        (b1, b2), norms, tokens = BETAS, [], []
        for _ in range(s.repair_steps):
            g, k = self.gradient(theta, pushed, restore)
            norm = float(g.norm())
            if not norm < float("inf"):
                break  # the caller's check sees the last finite Θ
            if norm > CLIP:
                g = g * (CLIP / norm)
            self.t += 1
            self.m1.mul_(b1).add_(g, alpha=1 - b1)
            self.m2.mul_(b2).addcmul_(g, g, value=1 - b2)
            # Θ ← Θ − lr · m̂ / (√v̂ + ε), m̂ and v̂ the bias-corrected moments
            theta = theta - s.repair_lr * (self.m1 / (1 - b1 ** self.t)) / ((self.m2 / (1 - b2 ** self.t)).sqrt() + EPS)
            norms.append(norm)
            tokens.append(k)
        record = {"repair": "gradient", "optimizer_steps": len(norms), "adam_steps_total": self.t, "lr": s.repair_lr,
                  "grad_norm_first": norms[0] if norms else None, "grad_norm_last": norms[-1] if norms else None,
                  "unlikelihood_tokens_first": tokens[0] if tokens else 0, "unlikelihood_tokens_last": tokens[-1] if tokens else 0,
                  "kept_batch": min(s.repair_batch, len(self.kept)), "restored_kept": len(restore), "new": len(self.new),
                  "replaced_values": len(self.replaced), "form_weight": s.repair_form}
        return theta, record
