"""Vertically partitioned data sets: the same samples, their feature columns split among parties.

  * `make_credit_fraud`: a seeded synthetic credit-card-fraud task (imbalanced) whose features are
    held by a bank, a card network and a merchant acquirer, with a label that needs all three.
  * `load_breast_cancer_vertical`: Wisconsin breast cancer, its 30 features split by what they
    measure across 2 or 4 parties (e.g. hospitals holding different tests of the same patients).

Each returns a `VerticalDataset`: a `Dataset` of the joined columns, party by party, and the size
of each party's group, so that `parties_train()` / `parties_test()` give one array per party.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sljax.data.datasets import Dataset, _standardize, from_arrays
from sljax.data.partition import vertical_split

__all__ = ["VerticalDataset", "load_breast_cancer_vertical", "make_credit_fraud"]


@dataclasses.dataclass(frozen=True, eq=False)
class VerticalDataset:
  """A `Dataset` whose columns are held by several parties.

  Attributes:
    dataset: the joined columns (party by party, in `parties` order) and the labels.
    parties: the parties' names.
    feature_groups: the number of columns each party holds, in order.
    feature_names: the name of every column of `dataset`.
    ids_train, ids_test: a string ID per sample (e.g. a transaction ID), for `sljax.align`.
  """

  dataset: Dataset
  parties: tuple[str, ...]
  feature_groups: tuple[int, ...]
  feature_names: tuple[str, ...]
  ids_train: np.ndarray
  ids_test: np.ndarray

  def parties_train(self) -> tuple[np.ndarray, ...]:
    """The training columns, one array per party, in `parties` order."""
    return tuple(vertical_split(self.dataset.x_train, feature_groups=list(self.feature_groups)))

  def parties_test(self) -> tuple[np.ndarray, ...]:
    """The test columns, one array per party, in `parties` order."""
    return tuple(vertical_split(self.dataset.x_test, feature_groups=list(self.feature_groups)))

  def party_features(self, name: str) -> tuple[str, ...]:
    """The names of party `name`'s columns."""
    if name not in self.parties:
      raise ValueError(f"name: expected one of the parties {self.parties}, got {name!r}")
    start = sum(self.feature_groups[: self.parties.index(name)])
    return self.feature_names[start : start + self.feature_groups[self.parties.index(name)]]

  def __repr__(self) -> str:
    groups = ", ".join(f"{p}: {g}" for p, g in zip(self.parties, self.feature_groups, strict=True))
    return f"VerticalDataset({self.dataset!r}, columns {{{groups}}})"


_FRAUD_FEATURES = {
    "bank": ("account_age_years", "log_credit_limit", "balance_to_limit", "customer_age", "prior_disputes",
             "days_since_address_change"),
    "network": ("log_amount", "amount_zscore", "txns_last_hour", "log_distance_from_home", "foreign",
                "card_present", "hour_sin", "hour_cos"),
    "merchant": ("merchant_risk", "log_merchant_age", "chargeback_rate", "category_grocery",
                 "category_electronics", "category_travel", "category_gaming"),
}


def make_credit_fraud(*, num_samples: int = 5000, fraud_rate: float = 0.05, seed: int = 0,
                      test_fraction: float = 0.25) -> VerticalDataset:
  """A seeded synthetic credit-card-fraud task, its features split across a bank, a card network and a merchant.

  Each sample is a card transaction. The parties and their columns:

    * bank (the cardholder's bank, 6): account age, credit limit (log), balance / limit, the
      customer's age, prior disputes (count), days since the last address change.
    * network (the card network, 8): amount (log), the amount's z-score against the cardholder's
      usual spending, transactions in the last hour, distance from home (log), foreign (0/1),
      card present (0/1), hour of day (sin, cos).
    * merchant (the merchant's acquirer, 7): merchant risk score, merchant age (log), chargeback
      rate, category one-hot (grocery, electronics, travel, gaming).

  The label: fraud with probability sigmoid(logit), where the logit adds terms of each party
  alone and, with larger weights, terms that cross parties, so that no party can score well alone:

    logit = b + 1.0 prior_disputes + 1.5 [address changed < 30 days]                      (bank)
              + 1.0 txns_last_hour + 1.0 [night]                                          (network)
              + 2.0 merchant_risk                                                          (merchant)
              + 4.0 amount_zscore * (1 - card_present) * (electronics or gaming)     (network x merchant)
              + 4.0 foreign * [account younger than a year]                              (network x bank)
              + 3.0 [balance / limit > 0.9] * [distance from home > 100 km]             (bank x network)
              + 3.0 chargeback_rate_z * [address changed < 30 days]                      (merchant x bank)

  with the intercept b set (by bisection on the drawn logits) so that the expected fraud rate is
  `fraud_rate`. Features are standardized with training statistics; the split is stratified.

  Args:
    num_samples: transactions in all (train and test); at least 200.
    fraud_rate: the expected share of frauds, in (0, 0.5).
    seed: seed of the generator and of the split.
    test_fraction: share of the samples held out.

  Returns:
    A 2-class `VerticalDataset` named "credit_fraud", parties ("bank", "network", "merchant").

  Example:
    >>> data = make_credit_fraud(num_samples=1000, seed=0)
    >>> data.parties, data.feature_groups, [x.shape for x in data.parties_train()]
    (('bank', 'network', 'merchant'), (6, 8, 7), [(750, 6), (750, 8), (750, 7)])
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 200:
    raise ValueError(f"num_samples: expected an int >= 200, got {num_samples!r}")
  if not 0 < fraud_rate < 0.5:
    raise ValueError(f"fraud_rate: expected a share in (0, 0.5), got {fraud_rate!r}")
  rng = np.random.default_rng(seed)
  n = num_samples
  # bank
  account_age = rng.gamma(2.0, 3.0, n)
  credit_limit = rng.lognormal(8.5, 0.6, n)
  balance_ratio = rng.beta(2.0, 3.0, n)
  customer_age = rng.normal(45.0, 14.0, n).clip(18, 90)
  prior_disputes = rng.poisson(0.3, n).astype(float)
  days_since_address = rng.exponential(400.0, n)
  # network
  amount_z = rng.standard_t(4, n)
  amount = np.exp(3.5 + 0.8 * amount_z.clip(-3, 6) + 0.3 * rng.normal(size=n))
  txns_hour = rng.poisson(0.6, n).astype(float)
  distance = rng.lognormal(2.0, 1.5, n)
  foreign = (rng.random(n) < 0.08).astype(float)
  card_present = (rng.random(n) < 0.55).astype(float)
  hour = rng.integers(0, 24, n)
  # merchant
  category = rng.choice(4, n, p=[0.4, 0.25, 0.2, 0.15])  # grocery, electronics, travel, gaming
  merchant_risk = rng.normal(0.0, 1.0, n) + 0.5 * (category == 3)
  merchant_age = rng.lognormal(1.5, 0.8, n)
  chargeback_rate = rng.beta(1.0, 60.0, n) * (1 + (category >= 2))

  night = ((hour < 6) | (hour >= 23)).astype(float)
  recent_address = (days_since_address < 30).astype(float)
  risky_category = ((category == 1) | (category == 3)).astype(float)
  chargeback_z = (chargeback_rate - chargeback_rate.mean()) / chargeback_rate.std()
  logit = (1.0 * prior_disputes + 1.5 * recent_address
           + 1.0 * txns_hour + 1.0 * night
           + 2.0 * merchant_risk
           + 4.0 * amount_z.clip(-3, 6) * (1 - card_present) * risky_category
           + 4.0 * foreign * (account_age < 1.0)
           + 3.0 * (balance_ratio > 0.9) * (distance > 100.0)
           + 3.0 * chargeback_z * recent_address)
  lo, hi = -30.0, 30.0
  for _ in range(60):  # the intercept that makes the mean fraud probability `fraud_rate`
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < fraud_rate else (lo, mid)
  y = (rng.random(n) < 1 / (1 + np.exp(-(logit + lo)))).astype(np.int32)

  x = np.stack([
      account_age, np.log(credit_limit), balance_ratio, customer_age, prior_disputes, days_since_address,
      np.log(amount), amount_z, txns_hour, np.log1p(distance), foreign, card_present,
      np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
      merchant_risk, np.log(merchant_age), chargeback_rate, *(category[None] == np.arange(4)[:, None]),
  ], axis=1).astype(np.float64)
  ids = np.array([f"txn-{seed}-{i:07d}" for i in range(n)])
  # the split, with the IDs carried as an extra column through from_arrays' seeded permutation
  index = np.arange(n, dtype=np.float64)[:, None]
  ds = from_arrays(np.concatenate([x, index], axis=1), y, test_fraction=test_fraction, seed=seed, num_classes=2,
                   name="credit_fraud")
  ids_train, ids_test = ids[ds.x_train[:, -1].astype(np.int64)], ids[ds.x_test[:, -1].astype(np.int64)]
  ds = _standardize(dataclasses.replace(ds, x_train=ds.x_train[:, :-1], x_test=ds.x_test[:, :-1]))
  names = tuple(f for p in _FRAUD_FEATURES.values() for f in p)
  return VerticalDataset(ds, tuple(_FRAUD_FEATURES), tuple(len(f) for f in _FRAUD_FEATURES.values()), names,
                         ids_train, ids_test)


# Breast cancer's 30 columns: 10 measurements of the cell nuclei, each as a mean (columns 0-9),
# a standard error (10-19) and a worst value (20-29).
_MEASUREMENTS = ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity",
                 "concave_points", "symmetry", "fractal_dimension")
_BREAST_CANCER_GROUPS = {
    4: {"size": ("radius", "perimeter", "area"), "shape": ("compactness", "concavity", "concave_points"),
        "texture": ("texture", "smoothness"), "symmetry": ("symmetry", "fractal_dimension")},
    2: {"size_texture": ("radius", "perimeter", "area", "texture", "smoothness"),
        "shape_symmetry": ("compactness", "concavity", "concave_points", "symmetry", "fractal_dimension")},
}


def load_breast_cancer_vertical(*, num_parties: int = 2, seed: int = 0, test_fraction: float = 0.2) -> VerticalDataset:
  """Wisconsin breast cancer with its features split by what they measure, across 2 or 4 parties.

  Each of the 10 nucleus measurements comes as a mean, a standard error and a worst value; a party
  holds all three of its measurements. 4 parties: size (radius, perimeter, area: 9 columns), shape
  (compactness, concavity, concave points: 9), texture (texture, smoothness: 6), symmetry
  (symmetry, fractal dimension: 6). 2 parties: size_texture (15) and shape_symmetry (15).

  Args:
    num_parties: 2 or 4.
    seed: seed of the train/test split.
    test_fraction: share of the samples held out.

  Returns:
    A 2-class `VerticalDataset` named "breast_cancer", standardized with training statistics; the
    IDs are the row numbers of scikit-learn's table.

  Example:
    >>> data = load_breast_cancer_vertical(num_parties=4)
    >>> data.parties, data.feature_groups
    (('size', 'shape', 'texture', 'symmetry'), (9, 9, 6, 6))
  """
  from sklearn import datasets  # noqa: PLC0415 -- slow to import

  if num_parties not in _BREAST_CANCER_GROUPS:
    raise ValueError(f"num_parties: expected one of {sorted(_BREAST_CANCER_GROUPS)}, got {num_parties!r}")
  groups = _BREAST_CANCER_GROUPS[num_parties]
  x, y = datasets.load_breast_cancer(return_X_y=True)
  columns, names = [], []
  for measurements in groups.values():
    for m in measurements:
      for offset, kind in ((0, "mean"), (10, "se"), (20, "worst")):
        columns.append(_MEASUREMENTS.index(m) + offset)
        names.append(f"{m}_{kind}")
  index = np.arange(len(y), dtype=np.float64)[:, None]
  ds = from_arrays(np.concatenate([x[:, columns], index], axis=1), y, test_fraction=test_fraction, seed=seed,
                   num_classes=2, name="breast_cancer")
  ids = np.array([f"patient-{i:04d}" for i in range(len(y))])
  ids_train, ids_test = ids[ds.x_train[:, -1].astype(np.int64)], ids[ds.x_test[:, -1].astype(np.int64)]
  ds = _standardize(dataclasses.replace(ds, x_train=ds.x_train[:, :-1], x_test=ds.x_test[:, :-1]))
  return VerticalDataset(ds, tuple(groups), tuple(3 * len(m) for m in groups.values()), tuple(names),
                         ids_train, ids_test)
