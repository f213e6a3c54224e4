"""Command line: parse flags into the library's dataclasses, call the library, say where outputs went.

Flags for settings are generated from the dataclass fields and their help text, so each flag
is defined once and its default cannot drift from the library's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from .errors import LLMEraserError


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        help_text = f.metadata["help"] + (f" (default: {default})" if default is not None else "")
        if isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", default=default, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            typ = int if "int" in hint else float if "float" in hint else str
            parser.add_argument(flag, type=typ, default=default, choices=f.metadata.get("choices"),
                                metavar=f.name.upper() if "choices" not in f.metadata else None,
                                help=help_text.replace("%", "%%"))


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(extra)
    return cls(**kw)


def _unlearn_parser(sub):
    from .solvers import SolverSettings
    from .unlearner import UnlearnSettings

    p = sub.add_parser(
        "unlearn",
        help="apply an edit request to a LoRA adapter by the influence update ΔΘ = (1/n)(C+λI)⁻¹b",
        description="Write a new PEFT adapter Θ̂ + ΔΘ that forgets (remove) or corrects (modify_query, "
                    "correct_response) training samples, with ΔΘ = (1/n)(C + λI)⁻¹ Σ_S[∇L(old) − ∇L(new)] "
                    "(LLMEraser, ICLR 2025). The input adapter and data are never modified.",
    )
    g = p.add_argument_group("inputs and output")
    g.add_argument("--base", required=True, help="base model: a Hugging Face model folder, a .gguf file, or 'smollm2' (embedded SmolLM2-135M-Instruct)")
    g.add_argument("--adapter", required=True, help="the PEFT LoRA adapter folder trained on --data (read only)")
    g.add_argument("--data", required=True, help="the training data the adapter was trained on: JSONL or a JSON array of records")
    g.add_argument("--request", required=True, help="edit request JSONL: one {op, id, new} per line")
    g.add_argument("--out", required=True, help="folder for the new adapter and unlearn.json (written atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_flags(p.add_argument_group("method"), UnlearnSettings, skip=("solver_settings",))
    add_dataclass_flags(p.add_argument_group("solver"), SolverSettings)
    p.set_defaults(func=_run_unlearn)


def _run_unlearn(args) -> int:
    from .solvers import SolverSettings
    from .unlearner import UnlearnSettings, unlearn

    try:
        solver_settings = dataclass_from_args(SolverSettings, args)
    except ValueError as e:
        raise LLMEraserError(f"solver flags: {e}") from None
    settings = dataclass_from_args(UnlearnSettings, args, solver_settings=solver_settings)
    res = unlearn(args.base, args.adapter, args.data, args.request, args.out, settings, args.overwrite,
                  progress=not args.quiet)
    m = res.meta
    s = m["seconds"]
    print(f"wrote {res.out}  (solver {m['solver']['name']}: {m['solver']['iterations']} iterations, "
          f"residual {m['solver']['final_residual']:.3g}, converged={m['solver']['converged']}; "
          f"b {s['b']:.1f}s, solve {s['solve']:.1f}s, save {s['save']:.1f}s; |ΔΘ|/|Θ̂| = "
          f"{m['delta_norm'] / max(m['theta_norm'], 1e-30):.3g})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="llmeraser", description="Make a LoRA adapter forget or correct training samples without retraining.")
    parser.add_argument("--version", action="version", version=f"llmeraser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _unlearn_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="llmeraser: %(message)s")
    try:
        return args.func(args)
    except LLMEraserError as e:
        print(f"llmeraser: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
