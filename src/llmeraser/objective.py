"""The training objective, split as loss(outputs(Θ)) so both curvatures can use it.

Per-sample loss L(z; Θ) = mean token NLL over the response tokens of z (prompt tokens
masked); empirical risk R = mean over samples. Every caller reduces per-sample losses itself
(sum for b, mean for H), so there is no hidden normalisation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .render import Example


def by_length(items: list) -> list:
    """`items` in order of token count (stable), so fixed batches of them pad little; others as given.

    Every caller reduces over all its batches (a sum, or a mean weighted by batch size), so the grouping
    changes only the padding: on the demo's edited set it cut the tokens a pass computes by 4%; the more
    the lengths vary, the more it saves (not measured on TALLRec yet)."""
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


class CausalLMObjective(Objective):
    """A (PEFT) causal LM; outputs are the logits at the positions that predict response tokens."""

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.keeps_logits = True

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
        # in a double backward) were most of an HVP's memory
        keep, where = torch.unique(cols_t, return_inverse=True)
        return {
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
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if self.keeps_logits:
            try:
                out = functional_call(self.model, params, args=(), kwargs={**kwargs, "logits_to_keep": batch["keep"]}, strict=False)
                return out.logits[batch["rows"], batch["where"]]  # [response tokens in batch, vocab]
            except TypeError:  # a model without `logits_to_keep`: project every position
                self.keeps_logits = False
        out = functional_call(self.model, params, args=(), kwargs=kwargs, strict=False)
        return out.logits[batch["rows"], batch["cols"]]

    def losses(self, outputs, batch):
        nll = F.cross_entropy(outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs,
                              batch["targets"], reduction="none")
        per_sample = torch.zeros(batch["n"], dtype=nll.dtype, device=nll.device).index_add(0, batch["rows"], nll)
        return per_sample / batch["counts"].to(nll.dtype)
