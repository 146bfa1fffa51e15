"""Vertically partitioned data sets (sljax.data.vertical): the fraud generator and breast cancer by feature groups."""

import doctest

import numpy as np
import pytest
from sklearn import datasets

import sljax
from sljax.data import vertical


def test_credit_fraud_is_seeded_imbalanced_and_split_by_party():
  a = sljax.data.make_credit_fraud(num_samples=1000, seed=3)
  b = sljax.data.make_credit_fraud(num_samples=1000, seed=3)
  np.testing.assert_array_equal(a.dataset.x_train, b.dataset.x_train)
  np.testing.assert_array_equal(a.ids_test, b.ids_test)
  assert not np.array_equal(a.dataset.x_train, sljax.data.make_credit_fraud(num_samples=1000, seed=4).dataset.x_train)
  y = np.concatenate([a.dataset.y_train, a.dataset.y_test])
  assert 0.02 < y.mean() < 0.09  # about the default 5%
  assert a.party_features("merchant")[0] == "merchant_risk" and len(a.feature_names) == sum(a.feature_groups) == 21
  xs = a.parties_train()
  np.testing.assert_array_equal(np.concatenate(xs, axis=1), a.dataset.x_train)
  assert len(set(a.ids_train) | set(a.ids_test)) == 1000
  with pytest.raises(ValueError, match=r"^fraud_rate: expected a share in \(0, 0.5\), got 0.7$"):
    sljax.data.make_credit_fraud(fraud_rate=0.7)


@pytest.mark.parametrize("num_parties", [2, 4])
def test_breast_cancer_by_feature_groups(num_parties):
  data = sljax.data.load_breast_cancer_vertical(num_parties=num_parties)
  assert sum(data.feature_groups) == 30 and len(data.parties) == num_parties
  # The columns are sklearn's, regrouped: each party holds the mean, error and worst value of its measurements.
  raw = datasets.load_breast_cancer()
  rows = np.array([int(i.split("-")[1]) for i in data.ids_train])
  for name, column in zip(data.feature_names, data.dataset.x_train.T, strict=True):
    measurement, kind = name.rsplit("_", 1)
    sk_name = {"mean": "mean {}", "se": "{} error", "worst": "worst {}"}[kind].format(measurement.replace("_", " "))
    raw_column = raw.data[rows, list(raw.feature_names).index(sk_name)]
    assert np.corrcoef(column, raw_column)[0, 1] > 0.9999, name  # standardized, the same column
  with pytest.raises(ValueError, match=r"^num_parties: expected one of \[2, 4\], got 3$"):
    sljax.data.load_breast_cancer_vertical(num_parties=3)


def test_docstring_examples_run():
  runner = doctest.DocTestRunner()
  for test in doctest.DocTestFinder().find(vertical):
    runner.run(test)
  assert runner.failures == 0 and runner.tries > 0
