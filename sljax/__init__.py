"""sljax: split learning for JAX."""

from sljax import algorithms, codecs, data, execution, models, network, simulation
from sljax.messages import (
    BodyOutput,
    CutGradient,
    MessageError,
    ModelWeights,
    Prediction,
    SmashedData,
    TailGradient,
    from_bytes,
    to_bytes,
    wire_size,
)
from sljax.protocol import (
    ArraySpec,
    Metrics,
    PartyState,
    SplitState,
    accuracy,
    centralized,
    softmax_cross_entropy,
    u_shaped,
    vanilla,
)
from sljax.split import (
    SplitModel,
    Stage,
    cut,
    function_stage,
    linen_stage,
    nnx_stage,
    sequential,
    split_model,
)
from sljax.training import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "ArraySpec",
    "BodyOutput",
    "CutGradient",
    "MessageError",
    "Metrics",
    "ModelWeights",
    "PartyState",
    "Prediction",
    "SmashedData",
    "SplitModel",
    "SplitState",
    "Stage",
    "TailGradient",
    "accuracy",
    "algorithms",
    "centralized",
    "codecs",
    "cut",
    "data",
    "evaluate",
    "execution",
    "fit",
    "from_bytes",
    "function_stage",
    "linen_stage",
    "models",
    "network",
    "nnx_stage",
    "sequential",
    "simulation",
    "softmax_cross_entropy",
    "split_model",
    "to_bytes",
    "u_shaped",
    "vanilla",
    "wire_size",
]
