"""llmeraser: make a LoRA adapter forget or correct training samples without retraining.

ΔΘ = (1/n)(C + λI)⁻¹ Σ_S [∇L(old) − ∇L(new)]  (LLMEraser, Ding et al., ICLR 2025).
"""

__version__ = "0.1.0"

from .data import EditRequest, Record, apply_request, load_records, load_request  # noqa: E402
from .errors import InputError, LLMEraserError, NumericalError  # noqa: E402
from .solvers import SolverSettings  # noqa: E402
from .unlearner import UnlearnResult, Unlearner, UnlearnSettings, unlearn  # noqa: E402

__all__ = [
    "EditRequest", "InputError", "LLMEraserError", "NumericalError", "Record", "SolverSettings",
    "UnlearnResult", "UnlearnSettings", "Unlearner", "__version__", "apply_request", "load_records",
    "load_request", "unlearn",
]
