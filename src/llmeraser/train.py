"""LoRA fine-tuning with the same loss as `unlearn`: response-token mean NLL, mean over samples.

Weight decay here is an explicit L2 term (wd/2)·‖Θ‖² added to the loss (coupled, not AdamW's
decoupled decay), so the trained adapter is a stationary point of R(Θ) + (wd/2)‖Θ‖² and the
Hessian of that objective is H + wd·I: `unlearn` reads wd from train.json and adds it to the
damping.

Several processes (torchrun) train data-parallel: every rank draws the same global batch B from the seeded
order, takes its share S_r of it, and back-propagates Σ_{S_r} L_i / |B| (plus the L2 term on rank 0 alone);
the gradients are summed over ranks before each update, so

    Σ_r ∇[Σ_{S_r} L_i / |B|] + wd·Θ = ∇[(1/|B|) Σ_B L_i + (wd/2)‖Θ‖²],

the single process's gradient on the same global batch up to the order of summation, and Adam takes the
same step on every rank.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import Record
from .errors import InputError, NumericalError
from .modeling import fused_attention, peft_quietly, widen_trained_modules
from .objective import CausalLMObjective
from .render import encode, model_inputs, resolve_template
from .vision import PROJECTOR, language_targets, vision_of


@dataclass
class TrainSettings:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha / r)"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "module names to adapt"})
    modules_to_save: tuple[str, ...] = field(default=(), metadata={"help": "modules trained in full and saved with the adapter (e.g. lm_head); part of Θ"})
    layers: tuple[int, ...] = field(default=(), metadata={"help": "indices of the transformer layers to adapt (PEFT's layers_to_transform; "
                                                          "default: all). Adapting only the top layers ends every backward pass, in "
                                                          "training and in unlearn's curvature products, at the lowest adapted layer"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the data"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate: linear warm-up over 5% of updates, then linear decay to 0"})
    batch_size: int = field(default=8, metadata={"help": "samples per step"})
    grad_accum: int = field(default=1, metadata={"help": "steps accumulated per optimiser update"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 coefficient wd in (wd/2)‖Θ‖² (enters unlearn's damping)"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "scale each update's gradient down to this global L2 norm when it is "
                                                         "longer (0: never); 1 steadies a high --lr"})
    max_length: int = field(default=512, metadata={"help": "tokens per sample"})
    template: str = field(default="auto", metadata={"help": "'chat', 'plain' or 'auto'"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init and shuffling"})

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        self.modules_to_save = tuple(self.modules_to_save)
        try:
            self.layers = tuple(sorted({int(x) for x in self.layers}))
        except (TypeError, ValueError):
            raise InputError(f"--layers {list(self.layers)}: give layer indices as integers, e.g. --layers 15 16 17") from None
        if any(i < 0 for i in self.layers):
            raise InputError(f"--layers {list(self.layers)}: layer indices start at 0")
        if self.rank < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 2:
            raise InputError("--rank, --batch-size, --grad-accum must be >= 1 and --max-length >= 2")
        for name in ("epochs", "lr", "alpha"):
            if not 0 < getattr(self, name) < math.inf:
                raise InputError(f"--{name} {getattr(self, name)}: give a finite number > 0")
        for name in ("weight_decay", "max_grad_norm"):
            if not 0 <= getattr(self, name) < math.inf:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: give a finite number >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["modules_to_save"] = list(self.modules_to_save)
        d["layers"] = list(self.layers)
        return d


def add_lora(base_model, settings: TrainSettings):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    targets, to_save, layers = list(settings.target_modules), list(settings.modules_to_save) or None, list(settings.layers) or None
    if vision_of(base_model) is not None:
        # LoRA on the language model only (the vision tower has modules of the same names and stays frozen); the
        # multimodal projector trained in full and saved with the adapter, so it is part of Θ (vision.py)
        targets, layers = language_targets(base_model, settings.target_modules, settings.layers), None
        to_save = list(to_save or []) + ([PROJECTOR] if PROJECTOR not in (to_save or []) else [])
    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=targets,
                     task_type="CAUSAL_LM", modules_to_save=to_save, layers_to_transform=layers)
    n_layers = getattr(getattr(base_model, "config", None), "num_hidden_layers", None)
    n_layers = n_layers or getattr(getattr(getattr(base_model, "config", None), "text_config", None), "num_hidden_layers", None)
    if settings.layers and n_layers is not None and max(settings.layers) >= n_layers:
        raise InputError(f"--layers {list(settings.layers)}: the base model has layers 0 to {n_layers - 1}")
    try:
        with peft_quietly():
            model = get_peft_model(base_model, cfg)
        widen_trained_modules(model)  # Θ's fully trained modules train in float32 on a half-precision base
        return model
    except ValueError as e:
        raise InputError(f"--target-modules {list(settings.target_modules)}"
                         + (f" --layers {list(settings.layers)}" if settings.layers else "") + f": {str(e).splitlines()[0]}") from None


def train_lora(model, tokenizer, records: list[Record], settings: TrainSettings, progress: bool = True,
               max_steps: int | None = None, ascent: bool = False, desc: str = "train") -> list[float]:
    """Train the trainable tensors of a PEFT `model` in place; return the loss of each update.

    `max_steps` overrides the step count from `epochs`; `ascent` maximises the loss instead
    (the gradient-ascent baseline), without weight decay.

    Deterministic for a seed on CPU: the order comes from a seeded generator and the model
    runs in eval mode (LoRA dropout is 0 and the base has no dropout in eval).
    """
    progress = progress and distributed.is_main()
    template = resolve_template(tokenizer, settings.template)
    examples = [encode(r, tokenizer, template, settings.max_length, **model_inputs(model)) for r in records]
    objective = CausalLMObjective(model, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr)
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total_steps = max_steps if max_steps is not None else max(1, round(settings.epochs * steps_per_epoch))
    updates = math.ceil(total_steps / settings.grad_accum)
    warmup = max(1, updates // 20)
    # decaying to 0 lets Adam settle at a stationary point, which the influence update assumes
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda u: min((u + 1) / warmup, max(0.0, (updates - u) / max(1, updates - warmup))))
    rng = random.Random(settings.seed)
    model.eval()
    _same_start(params)
    order: list[int] = []
    history, running = [], 0.0
    bar = tqdm(total=total_steps, desc=desc, disable=not progress)
    with fused_attention(model):  # first-order passes only, so the fused kernel may run (docs/design.md#fused-attention)
        for step in range(total_steps):
            if len(order) < settings.batch_size:
                perm = list(range(len(examples)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[: settings.batch_size], order[settings.batch_size:]
            loss = _batch_loss(objective, [examples[i] for i in idx], device)
            if ascent:
                loss = -loss
            elif settings.weight_decay and distributed.is_main():  # once, not once per rank
                loss = loss + 0.5 * settings.weight_decay * sum((p.float() ** 2).sum() for p in params)
            value = distributed.all_sum_float(float(loss.detach()))  # the global batch's, on every rank
            if value != value or abs(value) == math.inf:
                bar.close()
                raise NumericalError(f"{desc}: the loss became {value} at step {step + 1} of {total_steps} (lr "
                                     f"{settings.lr:g}): training diverged and nothing was written; lower --lr")
            if loss.requires_grad:  # a rank whose share of a small batch is empty has nothing to back-propagate
                (loss / settings.grad_accum).backward()
            running += value / settings.grad_accum
            if (step + 1) % settings.grad_accum == 0 or step + 1 == total_steps:
                _sum_grads(params)
                if settings.max_grad_norm:  # g <- g·min(1, c/‖g‖), on the summed gradient, so every rank clips alike
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                history.append(running)
                bar.set_postfix(loss=f"{running:.4f}")
                running = 0.0
            bar.update(1)
    bar.close()
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise NumericalError(f"{desc}: the last update made the adapter non-finite (lr {settings.lr:g}): training "
                             "diverged and nothing was written; lower --lr")
    return history


def _batch_loss(objective: CausalLMObjective, items: list, device) -> torch.Tensor:
    """The mean loss over the global batch `items`; with several processes this rank's part of it,
    Σ_{its share} L_i / |items| (0 without a graph for an empty share)."""
    if not distributed.active():
        batch = objective.collate(items, device)
        return objective.losses(objective.outputs({}, batch), batch).mean()
    mine = distributed.shard(items)
    if not mine:
        return torch.zeros((), device=device)
    batch = objective.collate(mine, device)
    return objective.losses(objective.outputs({}, batch), batch).sum() / len(items)


def _same_start(params: list[torch.Tensor]) -> None:
    """Rank 0's initial adapter on every rank (the seeded initialisation already agrees; this makes it certain)."""
    if distributed.active():
        with torch.no_grad():
            for p in params:
                distributed.broadcast_(p.data)


def _sum_grads(params: list[torch.Tensor]) -> None:
    """Each gradient summed over ranks (one collective over all of them; a missing gradient counts as 0)."""
    if not distributed.active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = distributed.all_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def mean_loss(model, tokenizer, records: list[Record], settings: TrainSettings) -> float:
    """The training objective at the adapter as it is: mean response NLL over `records` plus (wd/2)‖Θ‖².

    What `final_loss` in train.json reports: the loss history holds each update's loss *before* it."""
    template = resolve_template(tokenizer, settings.template)
    examples = [encode(r, tokenizer, template, settings.max_length, **model_inputs(model)) for r in records]
    objective = CausalLMObjective(model, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, mine = 0.0, distributed.shard(examples)  # each rank its share, summed over ranks
    with torch.no_grad(), fused_attention(model):
        for i in range(0, len(mine), settings.batch_size):
            batch = objective.collate(mine[i:i + settings.batch_size], device)
            total += float(objective.losses(objective.outputs({}, batch), batch).sum())
    total = distributed.all_sum_float(total)
    l2 = sum(float((p.detach().float() ** 2).sum()) for p in model.parameters() if p.requires_grad)
    return total / len(examples) + 0.5 * settings.weight_decay * l2
