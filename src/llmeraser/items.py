"""Θ beyond the PEFT adapter: trainable modules kept next to it, and prompts that carry item vectors.

**Modules.** An adapter folder may hold, beside PEFT's files, `llmeraser_modules.json`
(``{"format": 1, "modules": {name: {"kind": ..., ...}}}``: the declaration) and
`llmeraser_modules.safetensors` (every module's tensors, keyed ``<name>.<tensor>``: trainable parameters and
frozen buffers). Loaded, the modules hang off the PeftModel as ``llmeraser_modules`` (a ModuleDict), so their
parameters are the model's parameters with ``requires_grad``: `AdapterParams.from_model` puts them into Θ, and b,
every curvature product, the solve, the line search and training treat them exactly like LoRA tensors. They hang
off the PeftModel, never the base, so a base shared by several adapters stays as it was.

**Item slots** (kind ``item_embeddings``; LLaRA's "hybrid" item tokens). A prompt writes an item as
``[[item:ID]]`` (ID a row of the item table), usually after its title. It renders to one existing token of the
tokenizer (the slot token; never an added one, whose embedding row nobody would train or save), and the input
embedding at that position is replaced by

    e = P(T[ID]),   P = Linear(k→d) · GELU · Linear(d→d) (trainable, part of Θ),  T ∈ R^{items×k} frozen,

d the model's hidden width. The markup is the only place an item appears, so an edit of a prompt's text changes
its titles and its vectors together.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import InputError

ATTR = "llmeraser_modules"
MODULES_CONFIG = "llmeraser_modules.json"
MODULES_WEIGHTS = "llmeraser_modules.safetensors"
FORMAT = 1
SLOT = re.compile(r"\[\[item:([^\]]*)\]\]")
ITEM_MODULE = "item_slots"  # the name `train --item-table` gives its module


class ItemEmbeddings(torch.nn.Module):
    """e = P(T[item]) for item rows `items` (see the module docstring); T is a frozen buffer."""

    kind = "item_embeddings"

    def __init__(self, items: int, width: int, hidden: int, slot_token_id: int):
        super().__init__()
        self.register_buffer("table", torch.zeros(items, width))
        self.projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        self.slot_token_id = int(slot_token_id)

    @classmethod
    def from_config(cls, cfg: dict) -> "ItemEmbeddings":
        return cls(int(cfg["items"]), int(cfg["width"]), int(cfg["hidden"]), int(cfg["slot_token_id"]))

    def config(self) -> dict:
        items, width = self.table.shape
        return {"kind": self.kind, "items": items, "width": width, "hidden": self.projector[2].out_features,
                "slot_token_id": self.slot_token_id}

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        w = self.projector[0].weight
        return self.projector(self.table[items].to(w.dtype))

    def check_item(self, item: str, where: str) -> int:
        """The table row named by a slot's ID, or an InputError naming the record."""
        n = self.table.shape[0]
        if not re.fullmatch(r"\d+", item.strip()) or int(item) >= n:
            raise InputError(f"{where}: [[item:{item}]] names no item: the item table has rows 0 to {n - 1}; "
                             "write [[item:ROW]] with a row of the table")
        return int(item)


KINDS = {ItemEmbeddings.kind: ItemEmbeddings}


def modules_of(model) -> torch.nn.ModuleDict | None:
    return getattr(model, "_modules", {}).get(ATTR)


def item_slots(model) -> ItemEmbeddings | None:
    """The model's item embeddings, or None when its prompts carry no vectors."""
    mods = modules_of(model)
    return next((m for m in mods.values() if isinstance(m, ItemEmbeddings)), None) if mods is not None else None


def _build(config: dict, where: str) -> torch.nn.ModuleDict:
    """The declared modules, initialised from the RNG's current state, which is left as it was (a load must not
    move the caller's RNG)."""
    with torch.random.fork_rng(devices=[]):
        return _build_modules(config, where)


def _build_modules(config: dict, where: str) -> torch.nn.ModuleDict:
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("modules"), dict):
        raise InputError(f"{where}: not an llmeraser modules file (expected {{\"format\": {FORMAT}, \"modules\": {{...}}}}); "
                         "write it again with `llmeraser train`")
    out = torch.nn.ModuleDict()
    for name, cfg in config["modules"].items():
        if not str(name).isidentifier() or hasattr(torch.nn.ModuleDict, name):
            raise InputError(f"{where}: {name!r} cannot name a module (give a Python identifier that is not a ModuleDict method)")
        kind = cfg.get("kind") if isinstance(cfg, dict) else None
        if kind not in KINDS:
            raise InputError(f"{where}: module {name!r} has unknown kind {kind!r}; known: {sorted(KINDS)}")
        try:
            out[name] = KINDS[kind].from_config(cfg)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: torch on a size ≤ 0
            raise InputError(f"{where}: module {name!r} is declared incompletely or with impossible sizes "
                             f"({str(e).splitlines()[0]}); write it again with `llmeraser train`") from None
    return out


def attach(model, config: dict, tensors: dict[str, torch.Tensor] | None = None, seed: int = 0,
           where: str = MODULES_CONFIG, complete: bool = False) -> torch.nn.ModuleDict:
    """Build the declared modules on the model's device, load `tensors` (all of them, or some: the rest keep a
    seeded initialisation; `complete` requires all), mark their parameters trainable, and hang them off
    `model` as `llmeraser_modules`. Returns them. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # the CPU's alone: fork_rng restores no CUDA generator here
        mods = _build(config, where)
    if tensors is not None:
        own = mods.state_dict()
        missing = sorted(set(own) - set(tensors))
        if complete and missing:  # a lost tensor would silently keep its initial value (a zero item table)
            raise InputError(f"{where}: {MODULES_WEIGHTS} lacks {len(missing)} of the {len(own)} tensors its declaration "
                             f"asks for (e.g. {missing[0]}); the file is incomplete: copy or write the adapter again")
        extra = sorted(set(tensors) - set(own))
        wrong = sorted(k for k in tensors if k in own and tuple(tensors[k].shape) != tuple(own[k].shape))
        if extra or wrong:
            raise InputError(f"{where}: its tensors do not match its declaration ("
                             + (f"{extra[0]} has no place" if extra else f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, "
                                f"the declaration says {tuple(own[wrong[0]].shape)}") + "); write the adapter again")
        mods.load_state_dict({**own, **tensors})
    hidden = _hidden(model)
    for name, m in mods.items():
        if isinstance(m, ItemEmbeddings) and hidden is not None and m.config()["hidden"] != hidden:
            raise InputError(f"{where}: module {name!r} projects to width {m.config()['hidden']}, but the base model's "
                             f"embeddings have width {hidden}; use the base model the adapter was trained on")
    device = next(model.parameters()).device
    mods.to(device)
    for p in mods.parameters():
        p.requires_grad_(True)
    model.add_module(ATTR, mods)
    return mods


def _hidden(model) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.weight.shape[1]) if emb is not None else None


def read_modules(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(declaration, tensors) of an adapter folder's modules, None when it has none; damaged files are an
    InputError naming them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    cfg_path, w_path = folder / MODULES_CONFIG, folder / MODULES_WEIGHTS
    if not cfg_path.is_file() and not w_path.is_file():
        return None
    if not cfg_path.is_file() or not w_path.is_file():
        missing = cfg_path if not cfg_path.is_file() else w_path
        raise InputError(f"--adapter {folder}: {missing.name} is missing beside {MODULES_CONFIG if missing == w_path else MODULES_WEIGHTS}; "
                         "copy the whole adapter folder or write it again")
    try:
        config = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"--adapter {cfg_path}: not valid JSON ({e}); write the adapter again") from None
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"--adapter {w_path} is not a readable safetensors file ({str(e).splitlines()[0]}); copy or "
                         "write it again") from None
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise InputError(f"--adapter {w_path}: {len(bad)} tensors are not finite (e.g. {bad[0]}); retrain the adapter")
    _build(config, str(cfg_path))  # the declaration is checked before any model is loaded
    return config, tensors


def attach_saved(model, adapter_dir: str | Path) -> torch.nn.ModuleDict | None:
    """The adapter folder's modules, attached to `model` with their saved tensors (None: the folder has none)."""
    saved = read_modules(adapter_dir)
    if saved is None:
        return None
    config, tensors = saved
    return attach(model, config, tensors, where=str(Path(adapter_dir) / MODULES_CONFIG), complete=True)


def module_state(model, theta_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the attached modules keyed ``llmeraser_modules.<name>.<tensor>`` (CPU), parameters taken
    from `theta_tensors` (Θ's tensors by parameter name) where given; {} without modules."""
    mods = modules_of(model)
    if mods is None:
        return {}
    theta_tensors = theta_tensors or {}
    names = _param_names(model)
    out = {}
    for key, t in mods.state_dict().items():
        full = f"{names}{key}"
        out[f"{ATTR}.{key}"] = theta_tensors.get(full, t).detach().cpu().float().contiguous()
    return out


def _param_names(model) -> str:
    """The prefix of the modules' parameter names in `model.named_parameters()`."""
    for n, mod in model.named_modules():
        if mod is modules_of(model):
            return f"{n}." if n else ""
    return f"{ATTR}."


def write_modules(dst: str | Path, config: dict | None, state: dict[str, torch.Tensor]) -> None:
    """Write the declaration (unless None: already there) and `state` (keys ``llmeraser_modules.<name>.<tensor>``)
    into folder `dst`."""
    from safetensors.torch import save_file

    from .fileio import write_json

    dst = Path(dst)
    if config is not None:
        write_json(dst / MODULES_CONFIG, config)
    save_file({k.removeprefix(f"{ATTR}."): v for k, v in state.items()}, str(dst / MODULES_WEIGHTS), metadata={"format": "pt"})


def save_modules(model, dst: str | Path) -> None:
    """The attached modules as they are, into `dst` (nothing without modules)."""
    mods = modules_of(model)
    if mods is not None:
        write_modules(dst, declaration(mods), module_state(model))


def declaration(mods: torch.nn.ModuleDict) -> dict:
    return {"format": FORMAT, "modules": {name: m.config() for name, m in mods.items()}}


def read_item_table(path: str | Path) -> torch.Tensor:
    """The item table of a safetensors file: its tensor "embeddings", or its only tensor; [items, k], float, finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--item-table {path}: no such file; give a safetensors file with one [items, width] tensor")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"--item-table {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    table = tensors.get("embeddings", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if table is None:
        raise InputError(f"--item-table {path}: holds {sorted(tensors)}; name the item vectors 'embeddings' or keep one tensor")
    if table.dim() != 2 or not table.is_floating_point() or table.shape[0] < 1 or table.shape[1] < 1:
        raise InputError(f"--item-table {path}: the table must be a float matrix [items, width], got "
                         f"{table.dtype} {tuple(table.shape)}")
    if not bool(torch.isfinite(table).all()):
        raise InputError(f"--item-table {path}: the table has non-finite entries")
    return table.float()


def slot_token(tokenizer) -> int:
    """The existing token a slot renders to: the tokenizer's unk, else pad, else eos (its embedding is replaced)."""
    for name in ("unk_token_id", "pad_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise InputError("the tokenizer has no unk, pad or eos token to stand for item slots")


def attach_items(model, tokenizer, table_path: str | Path, seed: int = 0) -> ItemEmbeddings:
    """New item embeddings (table from `table_path`, projector initialised with `seed`) on `model`."""
    table = read_item_table(table_path)
    hidden = _hidden(model)
    config = {"format": FORMAT, "modules": {ITEM_MODULE: {"kind": ItemEmbeddings.kind, "items": table.shape[0],
                                                      "width": table.shape[1], "hidden": hidden,
                                                      "slot_token_id": slot_token(tokenizer)}}}
    mods = attach(model, config, {f"{ITEM_MODULE}.table": table}, seed=seed, where=f"--item-table {table_path}")
    return mods[ITEM_MODULE]


def frozen_tensors(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(declaration, frozen buffers) of an adapter folder's modules: what a retraining starts from (the trainable
    parameters are initialised afresh)."""
    saved = read_modules(adapter_dir)
    if saved is None:
        return None
    config, tensors = saved
    buffers = {k for k, _ in _build(config, MODULES_CONFIG).named_buffers()}
    return config, {k: v for k, v in tensors.items() if k in buffers}


def tokens_with_slots(tokenizer, text: str, items: ItemEmbeddings | None, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` with each ``[[item:ID]]`` as the slot token, and (position, table row) of every slot.

    Text without slots is tokenised whole (the ids are those of plain text); with slots, the pieces between
    them are tokenised one by one."""
    pieces = SLOT.split(text)  # text, id, text, id, ..., text
    if len(pieces) == 1:
        return tokenizer(text, add_special_tokens=False)["input_ids"], []
    if items is None:
        raise InputError(f"{where}: the prompt holds item slots ([[item:{pieces[1]}]]) but no item "
                         "embeddings are attached: train it with `llmeraser train --item-table TABLE`, and for an adapter "
                         "trained so, copy its whole folder (llmeraser_modules.json and .safetensors go with it)")
    ids, slots = [], []
    for k, piece in enumerate(pieces):
        if k % 2:
            slots.append((len(ids), items.check_item(piece, where)))
            ids.append(items.slot_token_id)
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids, slots


@contextmanager
def inserting(model, rows: torch.Tensor, cols: torch.Tensor, items: torch.Tensor, first_only: bool = False):
    """Item vectors written over the input embeddings at (rows, cols) in every forward pass of the duration.

    The projector runs inside the pass, so under `functional_call` it uses the Θ being evaluated, and its
    gradient and curvature flow like any other tensor of Θ. With `first_only`, only the first pass is changed
    (generation: the prompt's pass, not the later one-token ones that read the cache)."""
    module = item_slots(model)
    if module is None:
        raise InputError("the batch carries item slots but the model has no item embeddings")

    calls = [0]

    def hook(_emb, _args, out):
        calls[0] += 1
        if first_only and calls[0] > 1:
            return out
        vectors = module(items).to(out.dtype)
        return out.index_put((rows, cols), vectors)

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
