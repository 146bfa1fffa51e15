"""Privacy at the cut: defenses inside the step, the privacy budget, and attacks that measure leakage.

Defenses (`sljax.privacy.defenses`) plug into the protocol's hooks (`client_loss`,
`cut_gradient_transform`) and into the codecs, so they run inside the jitted round and unchanged in
deployment; the privacy budget of the noise codecs (`sljax.privacy.accounting`, needs the `privacy`
extra) is tracked per example and reported by `sljax.simulation.run(..., accountant=...)`. Attacks
(`sljax.privacy.attacks`) are pure functions over recorded messages (`sljax.privacy.transcript`:
`sljax.fit(..., transcript=path)` or a `Recorder`); `privacy_report(path)` (`sljax privacy-report
FILE`) runs those that apply and returns one table (docs/attacks.md).
"""

from sljax.privacy import attacks, defenses, handoff, hijacking, metrics, report, transcript
from sljax.privacy.defenses import (
    gaussian_noise,
    laplace_noise,
    marvell,
    max_norm,
    nopeek,
    randomized_response,
    randomized_response_keep_probability,
)
from sljax.privacy.metrics import distance_correlation
from sljax.privacy.report import privacy_report
from sljax.privacy.transcript import Recorder

_ACCOUNTING = ("accounting", "accountant", "Accountant")

__all__ = [
    "Recorder",
    "attacks",
    "defenses",
    "distance_correlation",
    "gaussian_noise",
    "handoff",
    "hijacking",
    "laplace_noise",
    "marvell",
    "max_norm",
    "metrics",
    "nopeek",
    "privacy_report",
    "randomized_response",
    "randomized_response_keep_probability",
    "report",
    "transcript",
    *_ACCOUNTING,
]


def __getattr__(name: str):
  # The accountant needs dp-accounting (the `privacy` extra): imported when first asked for.
  if name in _ACCOUNTING:
    import importlib  # noqa: PLC0415

    module = importlib.import_module("sljax.privacy.accounting")
    return module if name == "accounting" else getattr(module, name)
  raise AttributeError(f"module 'sljax.privacy' has no attribute {name!r}")
