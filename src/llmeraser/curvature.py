"""Curvature-vector products at a fixed Θ̂, and the damped operator the solvers use.

* ``hessian``: H_B v, H_B = ∇²_Θ (1/|B|) Σ_{i∈B} L_i at Θ̂. Computed by forward-over-reverse
  (``torch.func.jvp`` of ``torch.func.grad``) or by double backprop (Pearlmutter).
* ``ggn``: the Gauss-Newton matrix G_B = Jᵀ (∇²_z ℓ_B) J, with z the model outputs and
  ℓ_B the mean batch loss as a function of z. It drops the term with the second derivative
  of the network, so for a convex loss of z it is positive semi-definite by construction.
* ``ggn-base``: the same with ∇²_z ℓ taken at the *base model's* prediction p⁰ (every lora_B zeroed)
  instead of the adapter's: G⁰_B = Jᵀ F⁰ J, F⁰ = diag(p⁰) − p⁰p⁰ᵀ per response token. At an adapter
  that memorised its data the softmax is saturated (p ≈ one-hot on the trained token), ∇²_z ℓ ≈ 0
  there, and the Newton step that rewrites a memorised answer is as long as the damping allows
  (docs/design.md#ggn-base). The base model's softmax is not saturated on private fields, so F⁰
  measures a step by how far it moves the answers (the second-order expansion of KL(p⁰ ‖ p_Θ)).

Θ̂ is a detached tensor held by the operator; the live model is never written to.
"""

from __future__ import annotations

import logging

import torch
from torch.func import grad as func_grad
from torch.func import jvp

from . import distributed
from .errors import NumericalError
from .memory import MemoryBudget, is_out_of_memory
from .objective import Objective, by_length, wide, wide_softmax
from .params import AdapterParams, zero_adapter

log = logging.getLogger(__name__)

GAUSS_NEWTON = ("ggn", "ggn-base")
CURVATURES = GAUSS_NEWTON + ("hessian",)
HVP_MODES = ("auto", "fwd_rev", "rev_rev")


class Curvature:
    def __init__(self, objective: Objective, params: AdapterParams, theta_hat: torch.Tensor,
                 kind: str = "ggn", mode: str = "auto", base_cache: "BaseProbsCache | None" = None):
        if kind not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {kind!r}")
        if mode not in HVP_MODES:
            raise ValueError(f"hvp mode must be one of {HVP_MODES}, got {mode!r}")
        self.objective, self.params, self.kind, self.mode = objective, params, kind, mode
        self.theta_hat = theta_hat.detach()
        self._theta0 = None
        self.base_cache = base_cache

    @property
    def gauss_newton(self) -> bool:
        return self.kind in GAUSS_NEWTON

    def base_probs(self, batch: dict) -> torch.Tensor:
        """p⁰ at the batch's response positions: the base model's prediction (every lora_B zeroed)."""
        cache = self.base_cache if self.base_cache is not None and self.base_cache.usable(self.params) else None
        if cache is not None and (hit := cache.get(batch)) is not None:
            return hit
        if self._theta0 is None:
            self._theta0 = zero_adapter(self.params, self.theta_hat)
        with torch.no_grad():
            z0 = self.objective.outputs(self.params.unflatten(self._theta0), batch)
        p0 = wide_softmax(z0)
        if cache is not None:
            cache.put(batch, p0)
        return p0

    def loss_gradient(self, batch: dict) -> tuple[torch.Tensor, float]:
        """(Σ_i ∇L_i, Σ_i L_i) over the batch at Θ̂, by one forward and one backward."""
        with torch.enable_grad():
            theta = self.theta_hat.clone().requires_grad_(True)
            losses = self.objective.losses(self.objective.outputs(self.params.unflatten(theta), batch), batch)
            (g,) = torch.autograd.grad(losses.sum(), theta)
        return g, float(losses.detach().sum())

    def mean_loss(self, theta: torch.Tensor, batch: dict) -> torch.Tensor:
        out = self.objective.outputs(self.params.unflatten(theta), batch)
        return self.objective.losses(out, batch).mean()

    def __call__(self, v: torch.Tensor, batch: dict) -> torch.Tensor:
        """C_B v for this batch (C = H or G), undamped.

        Mode "fwd_rev" takes forward mode where it helps: the Hessian as forward-over-reverse, the GGN's
        J v as a forward-mode pass; "rev_rev" only backward passes (double backprop; the GGN's J v by the
        double-vjp trick); "auto" tries the first and falls back to the second."""
        v = v.to(self.theta_hat.dtype)
        fast, slow = (self._ggn_fwd, self._ggn) if self.gauss_newton else (self._fwd_rev, self._rev_rev)
        if self.mode == "rev_rev":
            return slow(v, batch)
        if self.mode == "fwd_rev":
            return fast(v, batch)
        try:  # auto: forward mode is cheaper where every op has a forward-mode rule
            out = fast(v, batch)
            self.mode = "fwd_rev"
            return out
        except (NotImplementedError, RuntimeError) as e:
            if is_out_of_memory(e):  # a full device is not a missing forward-mode rule: the mode stays undecided
                raise
            log.info("forward-mode product unavailable (%s); using backward passes only", str(e).splitlines()[0])
            self.mode = "rev_rev"
            return slow(v, batch)

    def _fwd_rev(self, v, batch):
        return jvp(func_grad(lambda t: self.mean_loss(t, batch)), (self.theta_hat,), (v,))[1]

    def _rev_rev(self, v, batch):
        with torch.enable_grad():
            theta = self.theta_hat.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.mean_loss(theta, batch), theta, create_graph=True)
            (hv,) = torch.autograd.grad(g, theta, grad_outputs=v)
        return hv

    def _ggn(self, v, batch):
        return self.linearise(batch, keep=False)(v)

    def _ggn_fwd(self, v, batch):
        """G_B v with J v from one forward-mode pass (no graph kept) and Jᵀ(∇²_z ℓ J v) from a forward and a
        backward: about a gradient's memory. The double-vjp trick (`_ggn`) holds the graph of u -> Jᵀu
        with create_graph, which takes more memory and less time (docs/design.md#ggn-forward-mode)."""
        def outputs(t):
            return self.objective.outputs(self.params.unflatten(t), batch)

        with torch.no_grad():  # forward mode is not switched off by no_grad; this only keeps no reverse graph
            z, jv = jvp(outputs, (self.theta_hat,), (v,))
        hjv = self._loss_head(z, batch)(jv).to(z.dtype)
        del z, jv
        with torch.enable_grad():
            theta = self.theta_hat.clone().requires_grad_(True)
            (gv,) = torch.autograd.grad(outputs(theta), theta, grad_outputs=hjv)
        return gv

    def _loss_head(self, z: torch.Tensor, batch: dict, keep: bool = False):
        """u -> (∇²_z ℓ_B) u at outputs z, ℓ_B the mean batch loss (at the base model's prediction for ggn-base),
        differentiating only the loss head (cheap: no network pass); `keep` lets it be called more than once."""
        if self.kind == "ggn-base":
            p0, n = self.base_probs(batch), self.objective.batch_size(batch)
            return lambda u: fisher_product(p0, batch, u.to(p0.dtype)) / n  # mean over the batch, as the loss
        with torch.enable_grad():
            zd = wide(z.detach()).requires_grad_(True)
            (gz,) = torch.autograd.grad(self.objective.losses(zd, batch).mean(), zd, create_graph=True)

        def product(u):
            with torch.enable_grad():
                return torch.autograd.grad(gz, zd, grad_outputs=u.to(zd.dtype), retain_graph=keep)[0]
        return product

    def linearise(self, batch: dict, keep: bool = True, head="loss"):
        """v -> G_B v (the GGN) for one batch, with the network's forward pass and the graph of Jᵀ built once.

        head "loss": the loss's Hessian in the outputs (at the base model's prediction for ``ggn-base``);
        or a function (outputs, batch, v) -> M v, the curvature of a squared distance in the outputs
        (`reset.OutputReset`).

        J v comes from the double-vjp trick: u -> Jᵀu is linear in u, so its vjp with v is J v.
        With `keep`, the graphs are retained and every later product costs two backward passes
        instead of a forward and three backwards (the saving CG gets on its fixed batches), at the
        price of holding this batch's activations in memory.
        """
        with torch.enable_grad():
            theta = self.theta_hat.clone().requires_grad_(True)
            z = self.objective.outputs(self.params.unflatten(theta), batch)
            u = torch.zeros_like(z, requires_grad=True)
            (jt_u,) = torch.autograd.grad(z, theta, grad_outputs=u, create_graph=True)
        if callable(head):
            zd = z.detach()
            out_curvature = lambda w: head(zd, batch, w)  # noqa: E731
        else:
            out_curvature = self._loss_head(z, batch, keep)

        def product(v: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                (jv,) = torch.autograd.grad(jt_u, u, grad_outputs=v.to(self.theta_hat.dtype), retain_graph=keep)
                (gv,) = torch.autograd.grad(z, theta, grad_outputs=out_curvature(jv).to(z.dtype), retain_graph=keep)
            return gv

        def loss_gradient() -> tuple[torch.Tensor, float]:
            """(Σ_i ∇L_i, Σ_i L_i) over the batch at Θ̂: one backward through the graph the products use,
            where a separate gradient costs a forward and a backward."""
            with torch.enable_grad():
                zl = z.detach().requires_grad_(True)
                losses = self.objective.losses(zl, batch)
                (gz_sum,) = torch.autograd.grad(losses.sum(), zl)
                (g,) = torch.autograd.grad(z, theta, grad_outputs=gz_sum, retain_graph=keep)
            return g, float(losses.detach().sum())

        product.loss_gradient = loss_gradient
        return product


class BaseProbsCache:
    """p⁰ per batch, shared by the operators of successive Newton steps.

    p⁰ is the base model's prediction, the same at every Θ when Θ holds only LoRA A and B (B = 0 makes A
    irrelevant), so successive Newton steps' operators share one forward per batch
    (docs/design.md#base-probs-cache). With other tensors in Θ (modules_to_save) p⁰ moves with them: no caching.
    Bounded by `max_bytes` and the run's memory budget: long responses make p⁰ large ([response tokens, vocabulary]
    per batch). Held for the whole run."""

    def __init__(self, max_bytes: int = 2**29, memory: MemoryBudget | None = None):
        self.max_bytes, self.used, self._store, self.memory = max_bytes, 0, {}, memory

    @staticmethod
    def usable(params: AdapterParams) -> bool:
        return all(".lora_A." in n or ".lora_B." in n for n in params.names)

    @staticmethod
    def _key(batch: dict) -> tuple:
        return tuple((tuple(batch[k].shape), batch[k].cpu().numpy().tobytes()) for k in ("input_ids", "attention_mask", "rows", "cols"))

    def get(self, batch: dict) -> torch.Tensor | None:
        return self._store.get(self._key(batch))

    def put(self, batch: dict, p0: torch.Tensor) -> None:
        size = p0.numel() * p0.element_size()
        if self.used + size <= self.max_bytes and (self.memory is None or self.memory.hold("base_predictions", size / 2**20)):
            self._store[self._key(batch)] = p0
            self.used += size


def fisher_product(p0: torch.Tensor, batch: dict, v: torch.Tensor) -> torch.Tensor:
    """Per response token, (1/T_i) F⁰ v = (1/T_i)(p⁰ ⊙ v − p⁰ (p⁰ · v)), T_i its record's token count:
    the Hessian in the logits of Σ_i (mean token cross-entropy of record i) at prediction p⁰."""
    w = 1.0 / batch["counts"][batch["rows"]].to(p0.dtype)
    v = v.to(p0.dtype)
    return w[:, None] * (p0 * v - p0 * (p0 * v).sum(-1, keepdim=True))


def seeded_subset(items: list, k: int | None, seed: int) -> list:
    """The first k items of a seeded permutation (all of them, permuted, when k is 0 or None)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[:k or len(items)]]


class HessianOperator:
    """v -> (C_B + λI) v, with mini-batches drawn from the training set at a fixed Θ̂.

    `full(v)` averages over a fixed, seeded sample of training batches (`curvature_samples`
    samples); it is the operator CG and `exact` solve, and the one every solver's stopping
    residual ‖(C+λI)Δ − b‖/‖b‖ is computed with. `sample()` draws a fresh random mini-batch
    for the stochastic solvers. Only training data is ever seen here.

    With several processes the fixed batches are this rank's share of the sample and `full` all-reduces
    Σ_B (|B|/k) C_B v before adding λv, so every rank gets the whole sample's product from ~1/K of the
    passes. `sample()` and `fixed_batch` stay whole on every rank (the same seeded draws: the stochastic
    solvers' steps are replicated, not divided).
    """

    def __init__(self, curvature: Curvature, items: list, batch_size: int, damping: float,
                 curvature_samples: int | None = None, seed: int = 0, device="cpu", cache_batches: int = 0,
                 terms: tuple = (), memory: MemoryBudget | None = None):
        if damping < 0:
            raise ValueError("damping must be >= 0")
        self.curvature, self.items, self.batch_size, self.damping = curvature, items, batch_size, damping
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        chosen = by_length(seeded_subset(items, curvature_samples, seed))
        k = len(chosen)
        collate, prepare = curvature.objective.collate, curvature.objective.prepare
        # what this operator keeps between passes counts against one budget (memory.py), shared by a run's operators
        self.memory = memory if memory is not None else MemoryBudget(device)
        self._held = [0, 0.0]  # the fixed batches whose hidden states are stored, and their MiB
        # every product passes over these batches: `prepare` keeps what does not depend on Θ
        mine = distributed.shard(chosen)
        self.fixed = [self._prepared(prepare, collate(mine[i:i + batch_size], device)) for i in range(0, len(mine), batch_size)]
        self._chosen = chosen  # the whole sample, for `fixed_batch` with several processes
        self.fixed_weights = [curvature.objective.batch_size(b) / k for b in self.fixed]
        self.hvp_count = 0
        # GGN products on the fixed batches reuse one linearisation per batch (built on first use)
        self.cache_batches = cache_batches
        self._linear: dict[int, object] = {}
        self._linear_mb = 0.0  # what the kept linearisations took
        # (w, E): further PSD terms w·E(v) of the objective's curvature that are not averages over
        # training batches (terms.py: the removed records' reset, the kept records' anchor); every product
        # includes them
        self.terms: tuple[tuple[float, object], ...] = tuple(terms)

    @property
    def kept_linearisations(self) -> int:
        """How many fixed batches hold a kept linearisation (decided by free memory)."""
        return len(self._linear)

    def _extra(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for w, product in self.terms:
            out += w * product(v.to(self.curvature.theta_hat.dtype))
        return out

    def _prepared(self, prepare, batch: dict) -> dict:
        """The batch with the frozen layers' hidden states stored (objective.prepare) while the budget holds them."""
        batch = prepare(batch)
        if "prefix" in batch:
            mb = batch["prefix"].numel() * batch["prefix"].element_size() / 2**20
            if self.memory.hold("hidden_states", mb):
                self._held[0] += 1
                self._held[1] += mb
            else:
                del batch["prefix"]
        return batch

    def release(self) -> None:
        """Drop the kept linearisations (each holds a batch's activations); later products rebuild them. Called
        when the operator's solve is done, so its stored hidden states leave the budget too.

        A Newton step's operator is done once its solve is: holding its graphs while the next step builds
        its own doubles the memory, and builds on memory the process has not used before are slow
        (docs/design.md#release-between-steps)."""
        self.memory.free("linearisation", self._linear_mb, len(self._linear))
        self._linear.clear()
        self._linear_mb = 0.0
        self.memory.free("hidden_states", self._held[1], self._held[0])
        self._held = [0, 0.0]

    @property
    def dim(self) -> int:
        return self.curvature.theta_hat.numel()

    def sample(self) -> dict:
        idx = torch.randint(len(self.items), (min(self.batch_size, len(self.items)),), generator=self.generator)
        return self.curvature.objective.collate([self.items[i] for i in idx.tolist()], self.device)

    def __call__(self, v: torch.Tensor, batch: dict) -> torch.Tensor:
        return self._fresh(v, batch) + self.damping * v + self._extra(v)

    def _fresh(self, v: torch.Tensor, batch: dict) -> torch.Tensor:
        """C_B v (undamped) by a fresh product."""
        self.hvp_count += 1
        out = self.curvature(v, batch)
        if not torch.isfinite(out).all():
            raise NumericalError(
                "the Hessian-vector product is not finite; check the adapter for NaN/Inf weights, "
                "or use a larger damping / curvature 'ggn'"
            )
        return out

    def full(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for i, (w, b) in enumerate(zip(self.fixed_weights, self.fixed)):
            out += w * self._fixed_product(i, v)
        distributed.all_sum(out)
        return out + self.damping * v + self._extra(v)

    def fixed_batch(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """(C_B + λI) v for fixed batch i (plus the extra terms). With several processes batch i of the
        whole sample, as one process has it, on every rank (a fresh product: the power iteration's)."""
        if distributed.active():
            chosen, bs, objective = self._chosen, self.batch_size, self.curvature.objective
            batch = objective.prepare(objective.collate(chosen[i * bs:(i + 1) * bs], self.device))
            return self._fresh(v, batch) + self.damping * v + self._extra(v)
        return self._fixed_product(i, v) + self.damping * v + self._extra(v)

    def _kept_linearisation(self, i: int):
        """Fixed batch i's kept linearisation, built now if --cache-batches and the memory budget allow (memory.py:
        within the budget, with a fresh product's room left beside it); None where it is not kept. The first
        refusal stops this operator from trying again (docs/design.md#kept-linearisations)."""
        if i in self._linear:
            return self._linear[i]
        if not self.curvature.gauss_newton or len(self._linear) >= self.cache_batches:
            return None
        built, mb = self.memory.keep("linearisation", lambda: self.curvature.linearise(self.fixed[i]))
        if built is None:
            self.cache_batches = len(self._linear)
            return None
        self._linear[i], self._linear_mb = built, self._linear_mb + mb
        return built

    def loss_gradient(self) -> tuple[torch.Tensor, float]:
        """(Σ ∇L_i, Σ L_i) over every sample of the fixed batches at Θ̂ (sums, not means; over every rank's).

        Through the linearisations the solve's products then reuse, where they are kept: a Newton step
        needs its gradient and its curvature at the same point, on the same batches when they cover the
        edited set. Other batches take a plain gradient (a linearisation built only for it costs more)."""
        grad, loss = torch.zeros_like(self.curvature.theta_hat), 0.0
        for i, batch in enumerate(self.fixed):
            lin = self._kept_linearisation(i)
            g, value = lin.loss_gradient() if lin is not None else self.curvature.loss_gradient(batch)
            grad += g
            loss += value
        distributed.all_sum(grad)
        loss = distributed.all_sum_float(loss)
        if not torch.isfinite(grad).all():
            raise NumericalError("the gradient is not finite; check the adapter weights and the data")
        return grad, loss

    def _fixed_product(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """C_B v (undamped) for fixed batch i, through its cached linearisation when allowed."""
        if self._kept_linearisation(i) is None:
            return self._fresh(v, self.fixed[i])
        self.hvp_count += 1
        out = self._linear[i](v.to(self.curvature.theta_hat.dtype))
        if not torch.isfinite(out).all():
            raise NumericalError("the Gauss-Newton product is not finite; check the adapter for NaN/Inf weights")
        return out

    def residual(self, x: torch.Tensor, b: torch.Tensor) -> float:
        r = float(torch.linalg.vector_norm(self.full(x) - b) / torch.linalg.vector_norm(b))
        if r != r or r == float("inf"):
            raise NumericalError("the solver's residual is not finite; try a larger damping or curvature 'ggn'")
        return r
