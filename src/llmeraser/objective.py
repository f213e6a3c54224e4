"""The training objective, split as loss(outputs(Θ)) so both curvatures can use it.

Per-sample loss L(z; Θ) = mean token NLL over the response tokens of z (prompt tokens
masked); empirical risk R = mean over samples. Every caller reduces per-sample losses itself
(sum for b, mean for H), so there is no hidden normalisation.
"""

from __future__ import annotations

import contextlib
import logging
import re
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .items import inserting
from .render import Example
from .vision import vision_of

log = logging.getLogger(__name__)


HALF = (torch.float16, torch.bfloat16)


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 when it is half precision, else as it is: every loss, output-space curvature and distance is
    taken in at least float32, so a bfloat16 base changes only the network's own rounding (docs/design.md#dtype)."""
    return t.float() if t.dtype in HALF else t


def wide_softmax(z: torch.Tensor) -> torch.Tensor:
    """softmax(z) computed in float64 (float32 on MPS, which has no float64), returned in `wide(z)`'s dtype.

    A saturated softmax (a memorised token) needs the extra digits for 1 − p, which the Fisher's diagonal holds."""
    work = torch.float32 if z.device.type == "mps" else torch.float64
    return torch.softmax(z.to(work), -1).to(wide(z).dtype)


def by_length(items: list) -> list:
    """`items` in order of token count (stable), so fixed batches of them pad little; others as given.

    Every caller reduces over all its batches (a sum, or a mean weighted by batch size), so the grouping
    changes only the padding; the more the lengths vary, the more it saves (docs/design.md#length-grouping)."""
    if not items or not all(hasattr(x, "input_ids") for x in items):
        return items
    return sorted(items, key=lambda x: len(x.input_ids))


class Objective(ABC):
    """What the maths needs from a model: outputs of Θ, and per-sample losses of outputs.

    The Gauss-Newton curvature differentiates `losses` twice with respect to the outputs,
    so `losses` should be convex in them (cross-entropy, squared error, logistic).
    """

    @abstractmethod
    def collate(self, items: list, device) -> dict:
        """A batch from dataset items."""

    @abstractmethod
    def outputs(self, params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Model outputs (e.g. logits) with Θ replaced by `params`."""

    @abstractmethod
    def losses(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-sample losses, shape [batch size]."""

    def batch_size(self, batch: dict) -> int:
        return int(batch["n"])

    def prepare(self, batch: dict) -> dict:
        """Make a batch that will be evaluated many times cheaper to evaluate (see CausalLMObjective)."""
        return batch


class CausalLMObjective(Objective):
    """A (PEFT) causal LM; outputs are the logits at the positions that predict response tokens."""

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.keeps_logits = True
        self.vision = vision_of(model)  # a vision-language model's image processor and image token, else None
        self._layers, self._prefix = None, 0  # the decoder's layer list, and how many of them Θ leaves frozen
        self._checked = False

    def freeze_prefix(self, names) -> int:
        """Let `prepare` cache the hidden states after the decoder layers that hold no tensor of Θ.

        `names` are Θ's parameter names. When every one lies in a decoder layer (LoRA on the top layers,
        as the suite's and the demo's recipes put it), the layers below the lowest of them compute the
        same hidden states at every Θ, so a batch evaluated many times (CG's fixed batches, the line
        search's sample) runs them once. Returns the number of layers skipped (0: Θ has a tensor outside
        the decoder layers, e.g. embeddings, and nothing is cached)."""
        where = [re.match(r"^(.*\.layers)\.(\d+)\.", n) for n in names]
        containers = {m.group(1) for m in where if m}
        layers = dict(self.model.named_modules()).get(containers.pop()) if len(containers) == 1 and all(where) else None
        if isinstance(layers, torch.nn.ModuleList):
            self._layers, self._prefix = layers, min(int(m.group(2)) for m in where)
        else:
            self._layers, self._prefix = None, 0
        return self._prefix

    def prepare(self, batch: dict) -> dict:
        """Store the frozen layers' output in `batch` (see `freeze_prefix`), so later `outputs` start
        above them. The first prepared batch checks that starting there gives the same logits as the
        whole model; where it does not (an architecture that transforms its input embeddings, say) the
        shortcut is switched off for good and every batch runs the whole model."""
        if not self._prefix or "prefix" in batch or "slot_items" in batch or "pixel_values" in batch:  # they change the input embeddings
            return batch
        with torch.no_grad():
            try:
                batch["prefix"] = self._prefix_states(batch)
                if not self._checked:
                    full, short = self._logits(batch, {}, skip=False), self._logits(batch, {}, skip=True)
                    if full.shape != short.shape or not torch.allclose(full, short, rtol=1e-4, atol=1e-4):
                        raise ValueError(f"logits differ by {float((full - short).abs().max()):.3g}")
                    self._checked = True
            except (ValueError, RuntimeError, TypeError, AttributeError) as e:
                log.info("not caching the frozen layers' hidden states (%s); running the whole model", e)
                self._prefix = 0
                batch.pop("prefix", None)
        return batch

    def _prefix_states(self, batch: dict) -> torch.Tensor:
        """The hidden states entering decoder layer `_prefix`: the model run up to there and stopped."""
        seen = []

        def catch(module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = self._layers[self._prefix].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ValueError("the model never reached its first adapted layer")
        return seen[0].detach()

    @contextlib.contextmanager
    def _skipping(self):
        """The frozen layers replaced by pass-throughs (their outputs are in the batch's "prefix")."""
        kept = [self._layers[i] for i in range(self._prefix)]
        try:
            for i, layer in enumerate(kept):
                self._layers[i] = _PassThrough(layer)
            yield
        finally:
            for i, layer in enumerate(kept):
                self._layers[i] = layer

    def collate(self, items: list[Example], device) -> dict:
        width = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        rows, cols = [], []
        for i, e in enumerate(items):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
            # the logit at position t predicts token t + 1
            for t in range(e.n_prompt, len(e.input_ids)):
                rows.append(i)
                cols.append(t - 1)
        rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
        # only the positions that predict response tokens go through the vocabulary projection: for
        # short responses after long prompts the full [batch, length, vocab] logits (and their graphs
        # in a double backward) dominate an HVP's memory (docs/design.md#response-logits)
        keep, where = torch.unique(cols_t, return_inverse=True)
        slots = [(i, at, item) for i, e in enumerate(items) for at, item in e.slots]
        extra = {} if not slots else {"slot_rows": torch.tensor([s[0] for s in slots], device=device),
                                      "slot_cols": torch.tensor([s[1] for s in slots], device=device),
                                      "slot_items": torch.tensor([s[2] for s in slots], device=device)}
        images = [e.image for e in items if e.image is not None]
        if images:  # the model writes each image's features over its image tokens, in order
            extra["pixel_values"] = torch.stack([self.vision.pixels(p) for p in images]).to(device)
        return {
            **extra,
            "n": len(items),
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "rows": rows_t.to(device),
            "cols": cols_t.to(device),
            "targets": ids[rows_t, cols_t + 1].to(device),
            "counts": torch.tensor([e.n_response for e in items], device=device),
            "keep": keep.to(device),
            "where": where.to(device),
        }

    def outputs(self, params, batch):
        if "slot_items" in batch:  # the item vectors, projected with the Θ in `params`, at their slots (items.py)
            with inserting(self.model, batch["slot_rows"], batch["slot_cols"], batch["slot_items"]):
                return self._logits(batch, params, skip=False)
        return self._logits(batch, params, skip="prefix" in batch and self._prefix > 0)

    def _logits(self, batch, params, skip: bool):
        kwargs = {"attention_mask": batch["attention_mask"], "use_cache": False}
        if "pixel_values" in batch:
            kwargs["pixel_values"] = batch["pixel_values"]
        # above the frozen layers the model starts from their stored output, passed as its input embeddings
        kwargs.update({"inputs_embeds": batch["prefix"]} if skip else {"input_ids": batch["input_ids"]})
        with self._skipping() if skip else contextlib.nullcontext():
            if self.keeps_logits:
                try:
                    out = functional_call(self.model, params, args=(), kwargs={**kwargs, "logits_to_keep": batch["keep"]}, strict=False)
                    return out.logits[batch["rows"], batch["where"]]  # [response tokens in batch, vocab]
                except TypeError:  # a model without `logits_to_keep`: project every position
                    self.keeps_logits = False
            out = functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)
            return out.logits[batch["rows"], batch["cols"]]

    def losses(self, outputs, batch):
        nll = F.cross_entropy(wide(outputs), batch["targets"], reduction="none")
        per_sample = torch.zeros(batch["n"], dtype=nll.dtype, device=nll.device).index_add(0, batch["rows"], nll)
        return per_sample / batch["counts"].to(nll.dtype)

    def worst_token_losses(self, outputs, batch):
        """Per sample, max_t −log p(y_t | prompt, y_<t) over its response tokens: its least likely token."""
        nll = F.cross_entropy(wide(outputs), batch["targets"], reduction="none")
        out = torch.zeros(batch["n"], dtype=nll.dtype, device=nll.device)
        return out.scatter_reduce(0, batch["rows"], nll, reduce="amax", include_self=True)


class _Stop(Exception):
    """Raised by the hook that stops a forward pass at the first adapted layer."""


class _PassThrough(torch.nn.Module):
    """A decoder layer that returns its input: stands in for a frozen layer whose output is cached.

    The layer itself is held outside the module tree (its parameters are not this module's), and other
    attributes the decoder reads from its layers (e.g. `attention_type`) come from it."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.__dict__["_layer"] = layer

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)
