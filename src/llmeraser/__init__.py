"""llmeraser: make a LoRA adapter forget or correct training samples without retraining.

ΔΘ = (1/n)(C + λI)⁻¹ Σ_S [∇L(old) − ∇L(new)]  (LLMEraser, Ding et al., ICLR 2025).
"""

__version__ = "0.1.0"

from .api import UnlearnResult, unlearn, unlearn_model  # noqa: E402
from .data import EditRequest, Record, apply_request, load_records, load_request  # noqa: E402
from .errors import InputError, LLMEraserError, NotConvergedError, NumericalError  # noqa: E402
from .recipes import RECIPES, recipe  # noqa: E402
from .report import UnlearnReport  # noqa: E402
from .settings import UnlearnSettings  # noqa: E402
from .solvers import SolverSettings  # noqa: E402
from .trainrecord import TrainRecord  # noqa: E402
from .unlearner import Unlearner  # noqa: E402

__all__ = [
    "RECIPES", "EditRequest", "InputError", "LLMEraserError", "NotConvergedError", "NumericalError", "Record",
    "SolverSettings", "TrainRecord", "UnlearnReport", "UnlearnResult", "UnlearnSettings", "Unlearner", "__version__",
    "apply_request", "load_records", "load_request", "recipe", "unlearn", "unlearn_model",
]
