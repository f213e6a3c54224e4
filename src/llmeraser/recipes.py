"""Named recipes: the settings `unlearn` runs with, chosen by name (`--recipe NAME`).

Each recipe is a small function returning UnlearnSettings; the CLI, the demo and the benchmarks all
take their settings from here (a benchmark or the demo may change sizes, never the method). Flags and
`--config` override a recipe's fields; `unlearn.json` records the recipe's name and every resolved
setting. Why each recipe is what it is: docs/recipes.md.
"""

from __future__ import annotations

from .errors import InputError
from .settings import UnlearnSettings
from .solvers import SolverSettings


def paper() -> UnlearnSettings:
    """The update as the paper states it, for comparison: ΔΘ = (1/n)(H + λI)⁻¹ b with H the Hessian of
    the training loss over the n original samples, found by Algorithm 1 (mini-batch minimisation of
    ½xᵀ(H + λI)x − bᵀx, gradient set to (H_B + λI)x − b), one step, no line search. λ = 0.03: the paper
    states none, and H is indefinite at a real adapter."""
    return UnlearnSettings(curvature="hessian", curvature_data="original", solver="stochastic", damping=0.03,
                           line_search=False)


def default() -> UnlearnSettings:
    """For an ordinary fine-tune: one Newton step from Θ̂ on the retraining objective (Gauss-Newton
    curvature over the edited data, so PSD and without the removed samples' own curvature), CG trying
    λ = 0.003, 0.01 and 0.03 in one multi-shift run, each step backtracked on the retraining objective,
    and the λ whose step lowers it most kept (docs/recipes.md#default)."""
    return UnlearnSettings(curvature="ggn", curvature_data="edited", solver="cg", damping=0.03,
                           damping_grid=(0.003, 0.01), line_search=True)


def memorised() -> UnlearnSettings:
    """For an adapter that memorised its records (private text repeated verbatim): the base model's
    softmax curvature (the adapter's own is ~0 on saturated answers), the removed records' answers pulled (ρ = 10)
    toward an estimate of retraining's (below), and three Newton steps, the later two with CG capped at 5 and the
    first at 10. It runs `--verify until` (the setting its record below was measured with): up to 10 extra steps,
    each a round of 10 Adam steps with the bounded unlikelihood of repair.py (verify_repair 'gradient'), the kept
    records whose answers the round's start made uncertain in every step (verify_restore), and the removed answers'
    unmarked words kept (repair_form 1), so that a removed prompt is answered in its sentence with another value, as
    retraining answers it. That pull and the rounds
    move only the removed tokens the kept records do not predict, toward what they teach there, the rest of the answer
    held (reset_target 'capped', support.py), so that the other value is well formed (an IBAN keeps its "DE"). The
    check also fails while a removed value's capped token keeps p > 2τ (verify_capped 2), so that sampling, not only
    greedy decoding, reads it back far less easily: a run the Newton steps verified leaves them near 1. The rounds push
    a correction's replaced value too, from the first token where the new answer differs, and the check bounds it
    alike (repair_old), so that sampling reads an old value back no more easily than a removed one. Its record on
    the forgetting suite: docs/recipes.md#memorised. The exit status is the checks' verdict (4: not verified), and a
    first solve stopped at its cap above tol does not stop the write (api.judged_by_checks)."""
    return UnlearnSettings(curvature="ggn-base", curvature_data="edited", solver="cg", damping=0.03, reset_removed=10.0,
                           newton_steps=3, refine_iters=5, curvature_samples=0, verify="until", verify_restore=True,
                           verify_steps=10, verify_repair="gradient", repair_form=1.0, reset_target="capped", verify_capped=2.0,
                           repair_old=True,
                           solver_settings=SolverSettings(tol=0.05, max_iters=10))


RECIPES = {"default": default, "memorised": memorised, "paper": paper}


def recipe(name: str, **overrides) -> UnlearnSettings:
    """The named recipe's settings, with `overrides` (setting name -> value) applied."""
    if name not in RECIPES:
        raise InputError(f"--recipe {name!r}: unknown; choose one of {sorted(RECIPES)}")
    base = RECIPES[name]()
    if not overrides:
        return base
    d = base.to_dict()
    solver = overrides.pop("solver_settings", None)
    d.update(overrides)
    _follow_the_user(d, overrides)
    if solver is not None:
        d["solver_settings"] = solver
    return UnlearnSettings.from_dict(d, f"recipe {name!r} with overrides")


def _follow_the_user(merged: dict, given: dict) -> None:
    """Recipe settings that only make sense beside others the user changed follow those changes (below)."""
    _restore_follows_rho(merged, given)
    _target_follows_the_pull(merged, given)
    _capped_check_follows(merged, given)


def _capped_check_follows(merged: dict, given: dict) -> None:
    """A recipe's verify_capped counts the tokens that reset_target 'capped' lists and only gradient rounds push; where
    the user's choices left either out (the target fell back to 'base' above, or the extra steps are Newton steps),
    it turns off instead of refusing them, unless verify_capped was asked for too. So does a recipe's repair_old,
    which only gradient rounds use."""
    if merged.get("verify_capped") and "verify_capped" not in given and \
            (merged.get("reset_target") != "capped" or merged.get("verify_repair", "newton") != "gradient"):
        merged["verify_capped"] = 0.0
    if merged.get("repair_old") and "repair_old" not in given and merged.get("verify_repair", "newton") != "gradient":
        merged["repair_old"] = False


def _target_follows_the_pull(merged: dict, given: dict) -> None:
    """A recipe's reset_target 'capped' chooses which tokens the reset and the gradient rounds pull; where the user
    turned both off (ρ = 0 with Newton extra steps) or chose them with verify_reset 'parts', it falls back to 'base'
    instead of refusing the user's choice, unless reset_target was asked for too."""
    if merged.get("reset_target") != "capped" or "reset_target" in given:
        return
    no_pull = not merged["reset_removed"] and merged.get("verify_repair", "newton") != "gradient"
    if no_pull or merged.get("verify_reset", "response") != "response":
        merged["reset_target"] = "base"


def _restore_follows_rho(merged: dict, given: dict) -> None:
    """A reset weight ρ = 0 the user chose turns off the recipe's verify_restore where the extra steps are Newton
    steps (there it weights by verify_pull, else ρ, and is refused without either), unless verify_restore or
    verify_pull was asked for too. A gradient round needs no weight for it (repair.py) and keeps it."""
    if "reset_removed" in given and not merged["reset_removed"] and not merged.get("verify_pull") \
            and merged.get("verify_repair", "newton") == "newton" and "verify_restore" not in given:
        merged["verify_restore"] = False


# settings that live in SolverSettings but are set like the others (flags, overrides)
SOLVER_KEYS = ("tol", "max_iters")


def resolve(name: str | None = None, config: dict | None = None, overrides: dict | None = None) -> tuple[str, UnlearnSettings]:
    """(recipe name, settings): the recipe, then a config's settings, then `overrides`, each over the last.

    `config` is `settings.read_config`'s {"recipe", "settings"}: its recipe is used when `name` is None;
    its settings are a full or partial schema dict. `overrides` maps setting names (and 'tol',
    'max_iters') to values. When an override sets the damping or another solver than CG (the grid needs
    CG) and nothing but the recipe set a λ grid, the grid is dropped (the recorded settings say so)."""
    config = config or {"recipe": None, "settings": {}}
    if not isinstance(config.get("recipe"), (str, type(None))):
        raise InputError("--config: 'recipe' must be a recipe's name, e.g. \"default\"")
    name = name or config.get("recipe") or "default"
    merged = recipe(name).to_dict()
    if not isinstance(config.get("settings") or {}, dict):
        raise InputError("--config: 'settings' must be an object of setting names and values")
    given = dict(config.get("settings") or {})
    solver_given = given.pop("solver_settings", None) or {}
    if not isinstance(solver_given, dict):
        raise InputError("--config: 'solver_settings' must be an object of solver setting names and values")
    overrides = dict(overrides or {})
    merged.update(given)
    merged["solver_settings"] = {**merged["solver_settings"], **solver_given,
                                 **{k: overrides.pop(k) for k in SOLVER_KEYS if k in overrides}}
    merged.update(overrides)
    _follow_the_user(merged, {**given, **overrides})
    # a λ or a solver the user chose replaces the recipe's grid of λ, unless a grid was asked for too
    if ("damping" in overrides or merged["solver"] != "cg") and "damping_grid" not in given and "damping_grid" not in overrides:
        merged["damping_grid"] = []
    return name, UnlearnSettings.from_dict(merged, "--config" if given else "settings")
