"""UnlearnSettings: every setting of an `unlearn` run, validated once, with one dict schema.

The same schema is read from `--config FILE` (JSON or TOML), written to `unlearn.json` under
"settings", and produced by the named recipes (`recipes.py`), so a past run replays exactly:
`llmeraser unlearn ... --config old/unlearn.json`. Fields marked `flag` are also command-line flags;
the research extensions are set through a recipe or the config only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .curvature import CURVATURES, GAUSS_NEWTON, HVP_MODES
from .errors import InputError
from .modeling import DTYPE_CHOICES, check_device
from .render import TEMPLATES
from .solvers import SOLVERS, SolverSettings

CURVATURE_DATA = ("edited", "original")
VERIFY_MODES = ("off", "check", "until")
VERIFY_RESETS = ("response", "parts")
VERIFY_REPAIRS = ("newton", "gradient")
RESET_TARGETS = ("base", "capped")


def _meta(help: str, flag: bool = False, **kw) -> dict:
    return {"help": help, "flag": flag, **kw}


@dataclass
class UnlearnSettings:
    curvature: str = field(default="ggn", metadata=_meta(
        "curvature C in (C + λI)Δ = b: 'ggn' (Gauss-Newton, PSD), 'ggn-base' (Gauss-Newton with the softmax's "
        "curvature at the base model's prediction, for memorised adapters whose own softmax is saturated) or "
        "'hessian' (indefinite at a real adapter)", choices=CURVATURES))
    damping: float = field(default=0.03, metadata=_meta(
        "λ added to the curvature; the training weight decay from train.json is added to it. Given over a recipe, "
        "it replaces the recipe's damping_grid unless a grid is given too", flag=True))
    damping_grid: tuple[float, ...] = field(default=(), metadata=_meta(
        "more λ tried in the same CG run (multi-shift CG); the line-searched step that lowers the retraining "
        "objective most is kept. Needs solver 'cg'"))
    reset_removed: float = field(default=0.0, metadata=_meta(
        "ρ: add ρ·P to the edited objective, P the removed records' distance to the base model's outputs (for "
        "memorised private data; needs a Gauss-Newton curvature; 0: off)"))
    anchor_kept: float = field(default=0.0, metadata=_meta(
        "κ: add κ·A, A the kept records' distance from their outputs before the edit (adds curvature only; needs "
        "a Gauss-Newton curvature and newton_steps 1; 0: off)"))
    solver: str = field(default="cg", metadata=_meta(
        "inverse-HVP solver: cg (conjugate gradients on fixed batches) or stochastic (the paper's Algorithm 1); "
        "lissa and exact, for comparison; set by the recipe or --config"))
    batch_size: int = field(default=8, metadata=_meta("samples per gradient and curvature mini-batch", flag=True))
    curvature_data: str = field(default="edited", metadata=_meta(
        "data the curvature is taken over: 'edited' (the data after the request: a Newton step on the retraining "
        "objective) or 'original' (the paper's H over the n training samples)", choices=CURVATURE_DATA))
    curvature_samples: int = field(default=128, metadata=_meta(
        "training samples in the fixed batches the solver and its residual use (0: all)"))
    line_search_samples: int = field(default=0, metadata=_meta(
        "kept samples the line search estimates the retraining objective on (0: the curvature sample)"))
    cache_batches: int = field(default=4, metadata=_meta(
        "fixed curvature batches whose Gauss-Newton linearisation may be kept in memory between products "
        "(0: recompute every product, the least memory)"))
    memory_mb: float = field(default=0.0, metadata=_meta(
        "MiB unlearn may keep between passes (kept linearisations, stored hidden states, cached base predictions); "
        "0: half of the memory free at the start (on CUDA counting the caching allocator's unused reserve)"))
    checkpointing: bool = field(default=False, metadata=_meta(
        "activation checkpointing of the decoder layers for b, curvature products and the Newton steps' gradients: "
        "less memory, about one more forward per backward, the same numbers"))
    hvp_mode: str = field(default="auto", metadata=_meta(
        "how a fresh curvature product is taken: fwd_rev (forward mode), rev_rev (double backprop) or auto",
        choices=HVP_MODES))
    max_length: int = field(default=512, metadata=_meta("tokens per sample; longer prompts are cut on the left", flag=True))
    template: str = field(default="auto", metadata=_meta(
        "prompt rendering: the tokenizer's chat template, a plain '### User:' template, or auto (chat when the "
        "tokenizer has one)", flag=True, choices=TEMPLATES))
    newton_steps: int = field(default=1, metadata=_meta(
        "Newton steps on the edited objective; 1 is the paper's single influence update"))
    refine_iters: int = field(default=0, metadata=_meta(
        "solver iteration cap in each Newton step after the first (0: as max_iters); such a step may stop there"))
    line_search: bool = field(default=True, metadata=_meta(
        "scale the step by 1, 1/2, 1/4, … until it lowers the retraining objective (Armijo)"))
    line_search_kept: float = field(default=0.0, metadata=_meta(
        "> 0: the line searches also refuse a scale at which more than this fraction of the kept records whose answers "
        "the original certainly gave turn uncertain (a token's −log p past ln 2), or more than at the step's start "
        "where that is more; every kept record checked by one teacher-forced pass per scale tried (0: off)"))
    seed: int = field(default=0, metadata=_meta("seed for batch sampling"))
    device: str = field(default="auto", metadata=_meta("'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'", flag=True))
    dtype: str = field(default="auto", metadata=_meta(
        "the base model's dtype; the adapter and the maths stay float32 (auto: bfloat16 on CUDA, float32 on CPU/MPS)",
        flag=True, choices=DTYPE_CHOICES))
    verify: str = field(default="check", metadata=_meta(
        "after the update, check by greedy generation that removed answers (or their 'private' parts) are no longer "
        "produced, corrected answers are, and sampled retained answers still are (unlearn.json 'verification'). "
        "'until': take extra steps (Newton steps or gradient rounds, as verify_repair says) until the checks pass or "
        "the budgets verify_steps / verify_seconds (settings of --config) run out; the adapter is written either way, "
        "with exit status 4 when they did not pass (default: 'until' in the memorised recipe, else 'check')",
        flag=True, choices=VERIFY_MODES))
    # a sample of 16 missed a 6% loss of retained answers (docs/benchmarks-history.md#forgetting-n64), and one of 64 a
    # 6% loss on two n = 128 runs (BENCHMARKS.md#forgetting-n128-pec-s2); a teacher-forced pass settles most answers,
    # so checking every kept record up to 512 costs little (the 95% interval of a sample of 512 spans ±2%)
    verify_retained: int = field(default=512, metadata=_meta(
        "retained records the verification samples (seeded; all of them when fewer)"))
    verify_steps: int = field(default=4, metadata=_meta(
        "most extra steps verify 'until' takes, Newton steps or gradient rounds as verify_repair says (default: 4; "
        "the memorised recipe's: 10)"))
    verify_seconds: float = field(default=0.0, metadata=_meta(
        "verify 'until' starts no extra step once this many seconds have passed since the verification began "
        "(the step under way and its check finish; 0: no limit)"))
    verify_restore: bool = field(default=False, metadata=_meta(
        "verify 'until': also fit the kept records whose answer the edit made uncertain (a token's −log p rose past "
        "ln 2, from below it at every token before the edit; all kept records checked): a Newton extra step weights "
        "their loss by ρ (verify_pull's when set), a gradient round puts them in every Adam step"))
    verify_pull: float = field(default=0.0, metadata=_meta(
        "verify 'until': ρ_T, the weight of the loss of the new answers not produced yet (and, with verify_restore, "
        "of the uncertain kept answers) in an extra step (0: reset_removed's ρ). Its curvature ρ_T·Σ_T C_i stays "
        "fixed while the retraining objective's grows with n, so a larger n may need a larger ρ_T (newton.py)"))
    verify_extractable: float = field(default=0.0, metadata=_meta(
        "> 0: a removed record's private part (or answer), or a correction's old one, whose probability after its own "
        "sentence, by one teacher-forced pass, exceeds the base model's by more than this many powers of ten counts as "
        "still produced: sampling, not only greedy decoding, could read it back (0: off; verify.py)"))
    verify_capped: float = field(default=0.0, metadata=_meta(
        "> 0, with reset_target 'capped' and verify_repair 'gradient': a removed record's capped tokens (those the "
        "rounds push; with repair_old, a correction's replaced value's too) whose teacher-forced probability exceeds "
        "this many times repair_threshold fail the check, so "
        "`--verify until` takes rounds until none does; that bounds a removed value's probability after its sentence "
        "by (m·τ)^k over its k capped tokens, where the greedy checks alone may leave them near 1 (0: off; api.py)"))
    verify_reset: str = field(default="response", metadata=_meta(
        "verify 'until': what an extra step pulls toward the base model for a removed record still produced (or "
        "likely): its whole answer ('response'), or only the tokens of its marked 'private' parts, holding the rest "
        "of its answer as the adapter gave it ('parts'; a record without marked parts: its whole answer; a "
        "correction's old value is pulled too, at its parts only; reset.py)", choices=VERIFY_RESETS))
    verify_repair: str = field(default="newton", metadata=_meta(
        "verify 'until': what an extra step is: a Newton step on the edited objective ('newton', with the verify_* "
        "settings above), or a round of repair_steps Adam steps on the edited data plus a bounded unlikelihood of the "
        "removed records' private tokens ('gradient', from the original adapter when it misses fewer checks than the "
        "update; repair.py)", choices=VERIFY_REPAIRS))
    repair_lr: float = field(default=3e-4, metadata=_meta("verify_repair 'gradient': the Adam learning rate"))
    repair_steps: int = field(default=10, metadata=_meta(
        "verify_repair 'gradient': Adam steps between two checks (one extra step of verify_steps)"))
    repair_batch: int = field(default=32, metadata=_meta(
        "verify_repair 'gradient': kept records per Adam step (every new version is in each step too)"))
    repair_unlikelihood: float = field(default=0.05, metadata=_meta(
        "verify_repair 'gradient': w, the weight of −log(1 − p) over the removed records' private tokens"))
    repair_threshold: float = field(default=0.02, metadata=_meta(
        "verify_repair 'gradient': τ, a removed token enters the unlikelihood while its probability exceeds τ (and, "
        "with reset_target 'capped', the cap of its pull)"))
    reset_target: str = field(default="base", metadata=_meta(
        "what a removed record's tokens are pulled to: the base model's outputs ('base'), or, at the tokens the kept "
        "records do not predict (support.py) of its marked private parts (else of its whole answer), the adapter's own "
        "prediction mixed with what the kept records write after the same context, that token's probability capped at "
        "repair_threshold, held at Θ̂'s elsewhere ('capped', the memorised recipe's); "
        "under 'capped' the gradient rounds push only those tokens too (reset.py, repair.py)", choices=RESET_TARGETS))
    capped_chars: int = field(default=0, metadata=_meta(
        "reset_target 'capped': > 0 also reads the kept continuations after the last this many characters, every "
        "letter and digit written x, so a capped target counts a value's characters whatever the tokens that spell "
        "them (0: off; support.py)"))
    capped_words: bool = field(default=False, metadata=_meta(
        "reset_target 'capped': a token that completes a small-letter word the kept answers spell, every time they "
        "hold its start (one is enough), counts as predicted by the kept records and is not capped: \"x\" after "
        "\"@gm\" where one kept address is at gmx.net (off: such a token needs its context twice; support.py)"))
    capped_own: float = field(default=0.0, metadata=_meta(
        "reset_target 'capped': φ > 0 bounds the adapter's own share of a capped token's target at probability φ, so "
        "the memorised token's target, min(0.9·K + 0.1·min(p, φ), repair_threshold), follows K, the share of kept "
        "records that write it after the same context, down to 0.1·φ where none does (0: off, the target stays at "
        "repair_threshold while the adapter still memorises the token; off in every recipe; support.py)"))
    repair_follow: bool = field(default=False, metadata=_meta(
        "verify_repair 'gradient' with reset_target 'capped': a round pushes each capped token by its log-odds, "
        "log p − log(1 − p), while p exceeds that token's own capped target q* at the original adapter (the reset's; "
        "down to 0.1·capped_own where no kept record writes it), instead of by −log(1 − p) while p > repair_threshold, "
        "and verify_capped counts the tokens above m·q* instead of m·repair_threshold (off in every recipe; repair.py)"))
    repair_fit: bool = field(default=False, metadata=_meta(
        "with repair_follow: a round fits each capped token's whole capped target by its cross-entropy, "
        "−Σ_v q*(v) log p(v), raising what the kept records write there as it lowers the removed token, instead of "
        "pushing the removed token alone (off in every recipe; repair.py)"))
    repair_form: float = field(default=0.0, metadata=_meta(
        "verify_repair 'gradient': v, the weight of the removed records' own answer outside their marked private "
        "parts (its mean token NLL, each record with parts): the answer keeps the record's sentence while its values "
        "are pushed out, as retraining's does (0: off)"))
    repair_old: bool = field(default=False, metadata=_meta(
        "verify_repair 'gradient': a round also pushes each response correction's old value (its marked private "
        "parts, or its whole old answer, from the first token where the new answer differs; under reset_target "
        "'capped', only the tokens the kept records do not predict) by the same bounded unlikelihood as a removed "
        "value, and verify_capped bounds those tokens too, so that sampling reads the old value back no more easily "
        "than a removed one; the unlikelihood's mean then runs over removed and replaced records together (off: only "
        "the new answer's loss lowers an old value; repair.py)"))
    solver_settings: SolverSettings = field(default_factory=SolverSettings)

    @property
    def dampings(self) -> tuple[float, ...]:
        """Every λ to try, smallest first: damping and damping_grid."""
        return tuple(sorted({self.damping, *self.damping_grid}))

    def __post_init__(self):
        for name, allowed in (("curvature", CURVATURES), ("solver", tuple(sorted(SOLVERS))), ("hvp_mode", HVP_MODES),
                              ("curvature_data", CURVATURE_DATA), ("template", TEMPLATES), ("verify", VERIFY_MODES),
                              ("dtype", DTYPE_CHOICES), ("verify_reset", VERIFY_RESETS),
                              ("verify_repair", VERIFY_REPAIRS), ("reset_target", RESET_TARGETS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} {getattr(self, name)!r}: must be one of {list(allowed)}")
        check_device(self.device)
        for name in ("line_search", "checkpointing", "verify_restore", "repair_old"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} {getattr(self, name)!r}: give true or false")
        if self.checkpointing and self.curvature == "hessian" and self.hvp_mode == "fwd_rev":
            raise InputError("checkpointing with curvature 'hessian' needs hvp_mode 'rev_rev' or 'auto': torch.func's "
                             "forward-over-reverse product does not support checkpointed layers")
        if isinstance(self.verify_seconds, bool) or not isinstance(self.verify_seconds, (int, float)) \
                or not 0 <= self.verify_seconds < math.inf:
            raise InputError(f"verify_seconds {self.verify_seconds!r}: give a number of seconds >= 0 (0: no limit)")
        if isinstance(self.line_search_kept, bool) or not isinstance(self.line_search_kept, (int, float)) \
                or not 0 <= self.line_search_kept < 1:
            raise InputError(f"line_search_kept {self.line_search_kept!r}: give a fraction in [0, 1) (0: off)")
        if self.line_search_kept and not self.line_search:
            raise InputError("line_search_kept guards the line search: turn line_search on, or set line_search_kept 0")
        if isinstance(self.verify_extractable, bool) or not isinstance(self.verify_extractable, (int, float)) \
                or not 0 <= self.verify_extractable < math.inf:
            raise InputError(f"verify_extractable {self.verify_extractable!r}: give a number of powers of ten >= 0 (0: off)")
        if isinstance(self.verify_capped, bool) or not isinstance(self.verify_capped, (int, float)) \
                or not 0 <= self.verify_capped < math.inf:
            raise InputError(f"verify_capped {self.verify_capped!r}: give a multiple of repair_threshold >= 0 (0: off)")
        if isinstance(self.verify_pull, bool) or not isinstance(self.verify_pull, (int, float)) \
                or not 0 <= self.verify_pull < math.inf:
            raise InputError(f"verify_pull {self.verify_pull!r}: give a weight >= 0 (0: reset_removed's ρ)")
        for name, ok, what in (("repair_lr", lambda x: 0 < x < math.inf, "a learning rate > 0"),
                               ("repair_unlikelihood", lambda x: 0 <= x < math.inf, "a weight >= 0 (0: off)"),
                               ("repair_form", lambda x: 0 <= x < math.inf, "a weight >= 0 (0: off)"),
                               ("repair_threshold", lambda x: 0 <= x < 1, "a probability in [0, 1)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise InputError(f"{name} {value!r}: give {what}")
        if isinstance(self.capped_chars, bool) or not isinstance(self.capped_chars, int) or self.capped_chars < 0:
            raise InputError(f"capped_chars {self.capped_chars!r}: give a number of characters >= 0 (0: off)")
        if self.capped_chars and self.reset_target != "capped":
            raise InputError("capped_chars shapes the targets of reset_target 'capped': set reset_target 'capped' (as "
                             "the memorised recipe does), or leave capped_chars 0")
        if not isinstance(self.capped_words, bool):
            raise InputError(f"capped_words {self.capped_words!r}: give true or false")
        if self.capped_words and self.reset_target != "capped":
            raise InputError("capped_words chooses the tokens of reset_target 'capped': set reset_target 'capped' (as "
                             "the memorised recipe does), or leave capped_words off")
        if isinstance(self.capped_own, bool) or not isinstance(self.capped_own, (int, float)) \
                or not 0 <= self.capped_own < 1:
            raise InputError(f"capped_own {self.capped_own!r}: give a probability in [0, 1) (0: off)")
        if self.reset_target == "capped" and not self.repair_threshold > 0:
            # the cap enters as log(τ/(1 − τ)) (support.capped_logits)
            raise InputError("repair_threshold 0 with reset_target 'capped': the capped targets need a cap above 0; give "
                             "repair_threshold > 0 (the memorised recipe's is 0.02)")
        if self.capped_own and self.reset_target != "capped":
            raise InputError("capped_own bounds the targets of reset_target 'capped': set reset_target 'capped' (as "
                             "the memorised recipe does), or leave capped_own 0")
        if not isinstance(self.repair_follow, bool):
            raise InputError(f"repair_follow {self.repair_follow!r}: give true or false")
        if not isinstance(self.repair_fit, bool):
            raise InputError(f"repair_fit {self.repair_fit!r}: give true or false")
        if self.repair_fit and not self.repair_follow:
            raise InputError("repair_fit fits the capped targets that repair_follow makes the rounds follow: set "
                             "repair_follow true too, or leave repair_fit off")
        if self.repair_follow and not (self.reset_target == "capped" and self.verify_repair == "gradient"):
            raise InputError("repair_follow makes the gradient rounds follow the targets of reset_target 'capped': set "
                             "reset_target 'capped' and verify_repair 'gradient' (as the memorised recipe does), or "
                             "leave repair_follow off")
        if isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, (int, float)) \
                or not 0 <= self.memory_mb < math.inf:
            raise InputError(f"memory_mb {self.memory_mb!r}: give a number of MiB >= 0 (0: automatic)")
        if not 0 <= self.damping < math.inf:
            raise InputError(f"damping {self.damping}: give a finite number >= 0")
        try:
            self.damping_grid = tuple(float(x) for x in self.damping_grid)
        except (TypeError, ValueError):
            raise InputError(f"damping_grid {self.damping_grid!r}: give numbers, e.g. [0.003, 0.01]") from None
        if any(not 0 <= x < math.inf for x in self.damping_grid):
            raise InputError(f"damping_grid {list(self.damping_grid)}: every λ must be a finite number >= 0")
        if len(self.dampings) > 1 and self.solver != "cg":
            raise InputError("damping_grid needs solver 'cg' (its shifted systems share one CG run); "
                             f"with solver {self.solver!r} give one damping")
        for name in ("reset_removed", "anchor_kept"):
            if not 0 <= getattr(self, name) < math.inf:
                raise InputError(f"{name} {getattr(self, name)}: give a finite number >= 0")
        gauss_newton = self.curvature in GAUSS_NEWTON
        if self.reset_removed and not gauss_newton:
            raise InputError("reset_removed needs curvature 'ggn' or 'ggn-base'")
        if self.verify_reset != "response" and not self.reset_removed:
            raise InputError(f"verify_reset {self.verify_reset!r} chooses what reset_removed pulls, which is 0 here: set "
                             "reset_removed (the memorised recipe's is 10) or leave verify_reset 'response'")
        if self.verify_repair == "gradient" and (self.verify_reset != "response" or self.verify_pull):
            # a gradient round has no reset and no pull weight (repair.py): these would be silently ignored
            raise InputError("verify_reset and verify_pull shape the Newton extra steps of --verify until; verify_repair "
                             "'gradient' (the memorised recipe's) takes rounds of Adam steps that use neither: set "
                             "verify_repair 'newton' to use them, or leave them unset")
        if self.reset_target == "capped" and not (self.reset_removed or self.verify_repair == "gradient"):
            raise InputError("reset_target 'capped' chooses what reset_removed and the gradient rounds pull, and neither "
                             "is on here: set reset_removed (the memorised recipe's is 10) or verify_repair 'gradient', "
                             "or leave reset_target 'base'")
        if self.verify_capped and not (self.reset_target == "capped" and self.verify_repair == "gradient"):
            raise InputError("verify_capped checks the tokens that reset_target 'capped' lists and the gradient rounds "
                             "push: set reset_target 'capped' and verify_repair 'gradient' (as the memorised recipe "
                             "does), or leave verify_capped 0")
        if self.repair_old and self.verify_repair != "gradient":
            raise InputError("repair_old adds the corrections' old values to what the gradient rounds push: set "
                             "verify_repair 'gradient' (as the memorised recipe does), or leave repair_old off")
        if self.reset_target == "capped" and self.verify_reset != "response":
            raise InputError("reset_target 'capped' and verify_reset 'parts' both choose which tokens an extra step "
                             "pulls: leave verify_reset 'response' (under 'capped' the marked parts are used already)")
        if self.verify_repair == "newton" and self.verify_restore and not (self.verify_pull or self.reset_removed):
            raise InputError("verify_restore weights the kept records by reset_removed's ρ in a Newton extra step, which "
                             "is 0 here: set reset_removed (the memorised recipe's is 10) or verify_pull, set "
                             "verify_repair 'gradient', or leave verify_restore off")
        if self.anchor_kept and (not gauss_newton or self.newton_steps > 1):
            raise InputError("anchor_kept needs curvature 'ggn' or 'ggn-base', and newton_steps 1")
        for name, least in (("batch_size", 1), ("newton_steps", 1), ("max_length", 2), ("curvature_samples", 0),
                            ("line_search_samples", 0), ("cache_batches", 0), ("refine_iters", 0), ("seed", 0),
                            ("verify_retained", 0), ("verify_steps", 0), ("repair_steps", 1),
                            ("repair_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} {value!r}: give an integer >= {least}")

    def to_dict(self) -> dict:
        """The schema: plain JSON values, the solver's settings nested under "solver_settings"."""
        d = asdict(self)
        d["damping_grid"] = list(self.damping_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "settings") -> "UnlearnSettings":
        """The inverse of `to_dict`; an unknown key is an InputError naming it (a typo must not pass silently)."""
        kw = _known_fields(cls, d, where)
        solver = kw.pop("solver_settings", None)
        try:
            if solver is not None and not isinstance(solver, SolverSettings):
                solver = SolverSettings(**_known_fields(SolverSettings, solver, f"{where}.solver_settings"))
            if solver is not None:
                kw["solver_settings"] = solver
            return cls(**kw)
        except TypeError as e:  # a value of the wrong type (a string where a number belongs)
            raise InputError(f"{where}: a value has the wrong type ({e}); see `llmeraser unlearn --help`") from None


def _known_fields(cls, d, where: str) -> dict:
    """`d` as keyword arguments of dataclass `cls`, refusing a non-mapping or an unknown name."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: must be an object of setting names and values")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InputError(f"{where}: unknown settings {unknown}; known: {sorted(f.name for f in dataclasses.fields(cls))}")
    return dict(d)


def read_config(path: str | Path) -> dict:
    """A settings dict from a JSON or TOML file. An `unlearn.json` is accepted as it is: its "settings"
    (and "recipe") are what replay that run. Returns {"recipe": name or None, "settings": dict}."""
    from .fileio import loads_json, read_text

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    text = read_text(path, "--config")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise InputError(f"--config {path}: TOML needs Python 3.11 or later; give the settings as JSON") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"--config {path}: malformed TOML ({e})") from None
    else:
        try:
            raw = loads_json(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--config {path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise InputError(f"--config {path}: must hold an object of settings")
    if "settings" in raw:  # an unlearn.json, or a file written in its shape
        return {"recipe": raw.get("recipe"), "settings": raw["settings"]}
    recipe = raw.pop("recipe", None)
    return {"recipe": recipe, "settings": raw}
