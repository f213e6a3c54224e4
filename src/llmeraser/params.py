"""Θ made explicit: an ordered name -> slice map over the adapter's trainable tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class AdapterParams:
    """The tensors that make up Θ, in a fixed order, and their place in one flat vector.

    Everything that moves between the solver and the model goes through `flatten` and
    `unflatten`, so which tensors are Θ and in what order is decided here and only here
    (never by ``model.parameters()`` order or by ``.grad is not None``).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "AdapterParams":
        names = tuple(sorted(tensors))
        return cls(names, tuple(tensors[n].shape for n in names))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "AdapterParams":
        """Θ = the parameters PEFT marks trainable: LoRA A/B, plus modules_to_save if any."""
        return cls.from_tensors({n: p for n, p in model.named_parameters() if p.requires_grad})

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(s.numel() for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` shaped like each tensor; gradients flow back to `flat`."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} entries, Θ has {self.numel}")
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def summary(self) -> str:
        """One line per group (lora_A, lora_B, other), as nanoGPT prints its parameter counts."""
        groups: dict[str, list[int]] = {}
        for n, k in zip(self.names, self.numels):
            g = ("lora_A" if ".lora_A." in n else "lora_B" if ".lora_B." in n else "modules_to_save" if "modules_to_save" in n
                 else "llmeraser_modules" if n.startswith("llmeraser_modules.") else "other")
            groups.setdefault(g, []).append(k)
        parts = [f"{g}: {len(v)} tensors, {sum(v):,} params" for g, v in sorted(groups.items())]
        return f"Θ = {len(self.names)} tensors, {self.numel:,} params ({'; '.join(parts)})"


def zero_adapter(params: AdapterParams, theta: torch.Tensor) -> torch.Tensor:
    """Θ₀: Θ with every LoRA B matrix zeroed, which makes every LoRA layer a no-op.

    Tensors of Θ beyond LoRA (a trained multimodal projector, an item projector, modules_to_save) keep their
    values: a projector trained from scratch has no base value, and zeroing it would blank every image or item
    vector. So on such adapters the "base model" of ggn-base, reset_removed and anchor_kept is the base with the
    adapter's own projector."""
    parts = params.unflatten(theta.clone())
    names = [n for n in params.names if ".lora_B." in n or n.endswith("lora_B.weight")]
    if not names:
        raise InputError("reset_removed, anchor_kept and curvature 'ggn-base' need a LoRA adapter "
                         "(no lora_B tensors found in Θ)")
    for n in names:
        parts[n].zero_()
    return params.flatten(parts)
