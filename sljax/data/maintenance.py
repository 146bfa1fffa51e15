"""A seeded synthetic predictive-maintenance task: factories (the clients) and their machines' signals.

Each sample is a window of `length` readings from one machine, on three channels (channel last):
radial and axial vibration (accelerometers) and temperature. Its label is the machine's health:

  0 healthy: the shaft's rotation (1x) and a weaker 2x harmonic, broadband noise, a flat temperature.
  1 bearing_wear: periodic impacts as a rolling element passes an outer-race defect (the ball-pass
    frequency, 3.2x the shaft's speed); each impact rings the housing's resonance (a decaying burst
    at about 0.3 cycles per reading), mostly on the radial axis; more broadband noise; slightly warm.
  2 imbalance: a larger 1x component on the radial axis (the centrifugal force of an off-centre
    mass), growing with the square of the speed.
  3 overheating: the temperature drifts up across the window (lubrication or cooling failure), with
    a higher level and a slightly noisier vibration.

Every fault has a severity drawn in [0.3, 1], so mild faults look much like a healthy machine.

Factories differ, which makes the natural partition (one client per factory) non-IID:

  * operating conditions: each factory runs its machines in its own speed band and load (each
    machine at its own speed within the band), so the harmonics sit at other frequencies;
  * sensors: a gain and an offset per channel per factory (calibration, mounting), and its own
    noise floor and ambient temperature;
  * fault rates: each factory's class probabilities are drawn from a Dirichlet around a common
    prior (45% healthy, the rest shared by the faults), concentrated by `label_skew`: small values
    give each factory its own dominant faults, large values the same mix everywhere.

Signals are in sensor units of order one (not standardized: the offsets are part of the task).
Generation is vectorized numpy: 4 factories of 500 windows of 128 readings take about 0.1 s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sljax.data.datasets import Dataset

__all__ = ["CLASSES", "CHANNELS", "MaintenanceData", "make_maintenance"]

CLASSES = ("healthy", "bearing_wear", "imbalance", "overheating")
CHANNELS = ("vibration_radial", "vibration_axial", "temperature")
_PRIOR = np.array([0.45, 0.55 / 3, 0.55 / 3, 0.55 / 3])  # the class mix that the factories' mixes scatter around
_BALL_PASS = 3.2  # ball-pass frequency of the outer race, in multiples of the shaft's speed
_RESONANCE = 0.3  # the housing's resonance, in cycles per reading
_RING_DOWN = 2.0  # readings for an impact's ring to decay by e


@dataclasses.dataclass(frozen=True, eq=False)
class MaintenanceData:
  """Machine signals of several factories, each factory's windows split into train and test.

  Attributes:
    xs_train: one float32 array per factory, shape (N_f, length, 3): the factory's training windows.
    ys_train: one int32 array per factory, shape (N_f,): machine health, an index into `classes`.
    xs_test: one float32 array per factory: its held-out windows (same machines and conditions).
    ys_test: one int32 array per factory: their labels.
    class_probs: float64 (num_factories, 4): each factory's probability of each class.
    speeds: float64 (num_factories, machines_per_factory): each machine's shaft speed, in cycles per
      reading.
    factories: the factories' names, "factory_0", ...
    classes: the classes' names (`CLASSES`).
    channels: the channels' names (`CHANNELS`).
  """

  xs_train: tuple[np.ndarray, ...]
  ys_train: tuple[np.ndarray, ...]
  xs_test: tuple[np.ndarray, ...]
  ys_test: tuple[np.ndarray, ...]
  class_probs: np.ndarray
  speeds: np.ndarray
  factories: tuple[str, ...]
  classes: tuple[str, ...] = CLASSES
  channels: tuple[str, ...] = CHANNELS

  @property
  def num_classes(self) -> int:
    """The number of health classes (4)."""
    return len(self.classes)

  @property
  def x_test(self) -> np.ndarray:
    """The held-out windows of all factories, factory by factory."""
    return np.concatenate(self.xs_test)

  @property
  def y_test(self) -> np.ndarray:
    """The labels of `x_test`."""
    return np.concatenate(self.ys_test)

  @property
  def factory_test(self) -> np.ndarray:
    """The factory (an index into `factories`) of each row of `x_test`."""
    return np.repeat(np.arange(len(self.factories)), [len(y) for y in self.ys_test]).astype(np.int32)

  def pooled(self) -> Dataset:
    """All factories' data in one `Dataset` (what a centralized baseline would train on)."""
    return Dataset(np.concatenate(self.xs_train), np.concatenate(self.ys_train), self.x_test, self.y_test,
                   self.num_classes, "maintenance")

  def __repr__(self) -> str:
    sizes = ", ".join(str(len(y)) for y in self.ys_train)
    return (f"MaintenanceData({len(self.factories)} factories, train windows [{sizes}], "
            f"{len(self.y_test)} test windows of shape {self.xs_train[0].shape[1:]})")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_maintenance(
    *,
    num_factories: int = 4,
    samples_per_factory: int | Sequence[int] = 500,
    machines_per_factory: int = 5,
    length: int = 128,
    label_skew: float = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> MaintenanceData:
  """Seeded synthetic machine-health signals of several factories, for predictive maintenance.

  The module docstring describes the classes' signatures and how the factories differ. Every
  factory's windows are split at random into train and test (`round(test_fraction * N_f)` test
  windows), so its test windows come from the same machines and conditions. The same arguments
  always give the same arrays.

  Args:
    num_factories: the factories (clients), >= 1.
    samples_per_factory: windows per factory (train and test), one int for all or one per factory;
      each large enough that train and test are non-empty.
    machines_per_factory: machines per factory, >= 1; each runs at its own speed.
    length: readings per window, >= 32.
    label_skew: concentration of the Dirichlet that draws each factory's class probabilities
      around the common prior, > 0: 0.3 is strongly non-IID, 100 nearly the same mix everywhere.
    test_fraction: the share of each factory's windows held out, in (0, 1).
    seed: seed of the numpy generator.

  Returns:
    A `MaintenanceData`: `xs_train`, `ys_train` go straight into `sljax.data.stack_clients`.

  Example:
    >>> import sljax
    >>> data = sljax.data.make_maintenance(num_factories=3, samples_per_factory=100, length=64, seed=0)
    >>> [x.shape for x in data.xs_train], data.x_test.shape, data.classes[1]
    ([(80, 64, 3), (80, 64, 3), (80, 64, 3)], (60, 64, 3), 'bearing_wear')
    >>> clients = sljax.data.stack_clients(data.xs_train, data.ys_train)
    >>> clients.x.shape
    (3, 80, 64, 3)
  """
  if not _is_int(num_factories) or num_factories < 1:
    raise ValueError(f"num_factories: expected an int >= 1, got {num_factories!r}")
  if not _is_int(machines_per_factory) or machines_per_factory < 1:
    raise ValueError(f"machines_per_factory: expected an int >= 1, got {machines_per_factory!r}")
  if not _is_int(length) or length < 32:
    raise ValueError(f"length: expected an int >= 32, got {length!r}")
  if isinstance(label_skew, bool) or not isinstance(label_skew, (int, float)) or not 0 < label_skew < np.inf:
    raise ValueError(f"label_skew: expected a finite number > 0, got {label_skew!r}")
  if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction: expected a share in (0, 1), got {test_fraction!r}")
  sizes = [samples_per_factory] * num_factories if _is_int(samples_per_factory) else list(samples_per_factory)
  if len(sizes) != num_factories or not all(_is_int(n) for n in sizes):
    raise ValueError(
        f"samples_per_factory: expected an int or {num_factories} ints (one per factory), got "
        f"{samples_per_factory!r}")
  num_test = [round(test_fraction * n) for n in sizes]
  if not all(0 < t < n for t, n in zip(num_test, sizes, strict=True)):
    raise ValueError(
        f"samples_per_factory: expected enough windows per factory for non-empty train and test sets at "
        f"test_fraction={test_fraction}, got {samples_per_factory!r}")

  rng = np.random.default_rng(seed)
  num_f, num_m, big_l = num_factories, machines_per_factory, length
  # Per factory: class mix, speed band and load, sensor calibration, noise floor, ambient temperature.
  class_probs = rng.dirichlet(label_skew * len(CLASSES) * _PRIOR, size=num_f)
  band_low = rng.uniform(0.015, 0.03, num_f)
  speeds = band_low[:, None] * rng.uniform(1.0, 1.5, (num_f, num_m))  # cycles per reading
  load = rng.uniform(0.7, 1.3, num_f)
  gain = rng.uniform(0.8, 1.25, (num_f, len(CHANNELS)))
  offset = rng.normal(0.0, 0.3, (num_f, len(CHANNELS)))
  noise = rng.uniform(0.15, 0.35, num_f)
  ambient = rng.uniform(-1.0, 1.0, num_f)

  # Per window: its factory, machine, class, fault severity and phases; all factories at once.
  factory = np.repeat(np.arange(num_f), sizes)
  n = len(factory)
  y = (rng.random((n, 1)) > np.cumsum(class_probs, axis=1)[factory]).sum(axis=1)  # a draw from each row's mix
  y = np.minimum(y, len(CLASSES) - 1).astype(np.int32)  # cumsum's last entry may round below 1
  machine = rng.integers(0, num_m, n)
  f_rot = speeds[factory, machine] * rng.uniform(0.98, 1.02, n)  # a little speed jitter per window
  severity = rng.uniform(0.3, 1.0, n)
  t = np.arange(big_l, dtype=np.float64)[None, :]  # readings
  phase = rng.uniform(0, 2 * np.pi, (n, 4))
  is_c = [(y == c)[:, None] for c in range(len(CLASSES))]
  s = severity[:, None]
  speed2 = (f_rot / 0.03)[:, None] ** 2  # imbalance force grows with the square of the speed

  def harmonic(k, p):
    return np.sin(2 * np.pi * k * f_rot[:, None] * t + phase[:, p:p + 1])

  # Rotation: 1x and 2x on both axes; imbalance adds to the radial 1x with its severity and the speed squared.
  one_x = load[factory][:, None] * (1.0 + is_c[2] * s * 3.0 * speed2)
  radial = one_x * harmonic(1, 0) + 0.3 * harmonic(2, 1)
  axial = 0.4 * harmonic(1, 2) + 0.25 * harmonic(2, 3)
  # Bearing wear: an impact every 1 / (ball-pass frequency) readings, each ringing the resonance.
  f_bp = (_BALL_PASS * f_rot)[:, None]
  since = np.mod(f_bp * t + rng.random((n, 1)), 1.0) / f_bp  # readings since the last impact
  ring = np.exp(-since / _RING_DOWN) * np.sin(2 * np.pi * _RESONANCE * since)
  impacts = is_c[1] * s * 2.5 * ring
  radial = radial + impacts
  axial = axial + 0.4 * impacts
  # Broadband noise: the factory's floor, raised by bearing wear and by overheating.
  sigma = noise[factory][:, None] * (1.0 + 0.8 * is_c[1] * s + 0.5 * is_c[3] * s)
  radial = radial + sigma * rng.standard_normal((n, big_l))
  axial = axial + sigma * rng.standard_normal((n, big_l))
  # Temperature: ambient plus load, a slow random wander, a drift when overheating.
  ramp = t / (big_l - 1)
  temperature = (ambient[factory][:, None] + 0.5 * load[factory][:, None] + 0.3 * is_c[1] * s
                 + is_c[3] * s * (0.5 + 2.5 * ramp) + rng.normal(0, 0.15, (n, 1)) * ramp
                 + 0.05 * rng.standard_normal((n, big_l)))
  x = np.stack([radial, axial, temperature], axis=-1)
  x = (x * gain[factory][:, None, :] + offset[factory][:, None, :]).astype(np.float32)

  xs_train, ys_train, xs_test, ys_test = [], [], [], []
  for f, start in enumerate(np.cumsum(sizes) - sizes):
    order = start + rng.permutation(sizes[f])
    test, train = order[:num_test[f]], order[num_test[f]:]
    xs_train.append(x[train])
    ys_train.append(y[train])
    xs_test.append(x[test])
    ys_test.append(y[test])
  return MaintenanceData(tuple(xs_train), tuple(ys_train), tuple(xs_test), tuple(ys_test), class_probs, speeds,
                         tuple(f"factory_{f}" for f in range(num_f)))
