"""Images in prompts: LLaVA-style vision-language models (transformers' image-text-to-text classes).

A record's optional ``"image"`` (a path, relative to the data file's folder) renders as `tokens_per_image` copies
of the model's image token at the start of its first user turn; the model writes its projected vision features
over their embeddings. The loss masks them like every prompt token, so a sample's loss is still the mean NLL of
its response tokens. The vision tower stays frozen; LoRA adapts the language model only, and the multimodal
projector is trained in full and saved with the adapter (PEFT's modules_to_save), so Θ = LoRA ∪ projector.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError

IMAGE_MARK = "[[image]]"  # where a record's image goes in its rendered prompt (never written by users)
PROJECTOR = "multi_modal_projector"
ATTR = "llmeraser_vision"
CACHE_MB = 1024.0  # the pixel cache's bound (Vision.pixels)
SUPPORTED = {"llava"}  # config.json model_type of the vision-language families whose layout this module knows


@dataclass
class Vision:
    """What rendering and batching need from a vision-language model: its image processor, its image token,
    and how many of them stand for one image."""

    processor: object
    image_token_id: int
    tokens_per_image: int
    cache_mb: float = CACHE_MB
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _cached_bytes: int = field(default=0, repr=False)

    def pixels(self, path: str) -> torch.Tensor:
        """The image at `path` as the model's pixel tensor [channels, height, width].

        Kept in a least-recently-used cache of at most `cache_mb` MiB: every pass over the data (b, each curvature
        batch, the line search) asks for the same images again, and a 336-pixel image is 1.3 MiB of float32."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        from PIL import Image

        with Image.open(path) as im:
            pixels = self.processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        self._cache[path] = pixels
        self._cached_bytes += pixels.numel() * pixels.element_size()
        while self._cached_bytes > self.cache_mb * 2**20 and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()
        return pixels


def vision_of(model) -> Vision | None:
    """The model's Vision (set by `load_vision`), through a PeftModel too; None for a text model."""
    try:
        return getattr(model, ATTR)
    except AttributeError:
        return None


def is_vision_folder(folder: str) -> bool:
    """Whether a model folder holds a vision-language model (its config has a vision_config)."""
    try:
        cfg = json.loads(Path(folder, "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "vision_config" in cfg


def tokens_per_image(config) -> int:
    """Image tokens per image: one per patch, plus the CLS feature when the model keeps it ("full")."""
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    return patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


def load_vision(folder: str, dtype, kw: dict):
    """(model, tokenizer) of a vision-language folder, with eager attention; the model carries its Vision."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model_type = json.loads(Path(folder, "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED:
        # the image-token count (tokens_per_image) and the projector's name are LLaVA's; another family would fail
        # mid-run with "image features and image tokens do not match"
        raise InputError(f"--base {folder}: a {model_type!r} vision-language model; llmeraser supports {sorted(SUPPORTED)} "
                         "(LLaVA-style: a CLIP-like tower, a multi_modal_projector, one image token per patch) so far")
    use_safetensors = kw.pop("use_safetensors", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    processor = AutoImageProcessor.from_pretrained(folder, **kw)
    if use_safetensors is not None:
        kw["use_safetensors"] = use_safetensors
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager", dtype=dtype, **kw)
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = getattr(model.config, "image_token_index", None)
    if token is None:
        raise InputError(f"--base {folder}: the vision-language config names no image token (image_token_id)")
    setattr(model, ATTR, Vision(processor, int(token), tokens_per_image(model.config)))
    for name, module in model.named_modules():
        if name.split(".")[-1] == PROJECTOR:
            bridge_precision(module)
    return model, tokenizer


def bridge_precision(projector: torch.nn.Module) -> None:
    """Let the projector run in its weights' dtype whatever its input's: each of its layers with a weight casts
    its input to that weight's dtype, and the projector casts its output back to its input's dtype.

    Why: Θ holds the projector's tensors in float32 (the adapter's maths is float32, docs/design.md#dtype), while a
    bfloat16 base hands it bfloat16 vision features. No-ops when the dtypes agree. The hooks go with PEFT's
    modules_to_save copy (a deepcopy keeps a module's hooks)."""
    for module in projector.modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            module.register_forward_pre_hook(input_in_weight_dtype)
    projector.register_forward_hook(_output_in_input_dtype)


def input_in_weight_dtype(module, args):
    """Forward pre-hook: floating inputs in the module's weight dtype."""
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_in_input_dtype(module, args, out):
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and torch.is_tensor(out):
        return out.to(args[0].dtype)
    return out


def language_targets(model, target_modules, layers=()) -> list[str]:
    """Full names of the language model's modules named in `target_modules` (in `layers`, when given): LoRA's
    targets in a vision-language model, where the same names also occur in the frozen vision tower."""
    import re

    out = []
    for name, _ in model.named_modules():
        if ".language_model." not in f".{name}." or name.split(".")[-1] not in target_modules:
            continue
        m = re.search(r"\.layers\.(\d+)\.", name)
        if layers and (m is None or int(m.group(1)) not in layers):
            continue
        out.append(name)
    if not out:
        raise InputError(f"--target-modules {list(target_modules)}: no such module in the language model of this "
                         "vision-language base")
    return out


def image_path(value, root: str, where: str) -> str:
    """A record's "image" as an absolute path, checked to be a readable image (an InputError naming the record)."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: 'image' must be a path to an image file (relative to the data file's folder)")
    path = value if os.path.isabs(value) else os.path.join(root or ".", value)
    if not os.path.isfile(path):
        raise InputError(f"{where}: image {value!r} not found (looked for {path}); image paths are relative to the "
                         "data file's folder")
    problem = _unreadable(os.path.abspath(path))
    if problem:
        raise InputError(f"{where}: image {path} is not a readable image ({problem})")
    return os.path.abspath(path)


@functools.lru_cache(maxsize=None)
def _unreadable(path: str) -> str:
    """Why Pillow cannot read the image at `path` ('' when it can); once per file, as every encode asks again."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
        return str(e).splitlines()[0]
    return ""
