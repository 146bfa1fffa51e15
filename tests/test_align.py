"""Private alignment (sljax.align): PSI finds the shared samples, and no non-shared ID crosses in the clear."""

import doctest

import numpy as np
import pytest

import sljax
from sljax import align as align_lib


def _ids():
  """Three parties' customer lists over 300 customers: each holds a different subset, in its own order."""
  rng = np.random.default_rng(0)
  everyone = np.array([f"cust-{i:05d}" for i in range(300)])
  held = {"bank": rng.random(300) < 0.8, "network": rng.random(300) < 0.7, "merchant": rng.random(300) < 0.9}
  return {name: list(rng.permutation(everyone[mask])) for name, mask in held.items()}, everyone


def test_psi_equals_the_plain_intersection():
  ids, _ = _ids()
  aligned = sljax.align(ids, leader="merchant")
  plain = set(ids["bank"]) & set(ids["network"]) & set(ids["merchant"])
  assert 0 < aligned.size == len(plain) < min(len(v) for v in ids.values())  # a partial overlap
  assert aligned.sizes == {name: len(v) for name, v in ids.items()}
  for name, party_ids in ids.items():
    got = [party_ids[r] for r in aligned.rows[name]]
    assert got == sorted(plain)  # the same samples, in one common order, for every party
  x = np.arange(len(ids["bank"]) * 2).reshape(-1, 2)
  np.testing.assert_array_equal(aligned.take("bank", x), x[aligned.rows["bank"]])


def test_no_id_crosses_in_the_clear():
  """The bytes of every message: no party's IDs in them, neither non-shared nor shared, as text."""
  ids, everyone = _ids()
  aligned = sljax.align(ids)
  shared = set(ids["bank"]) & set(ids["network"]) & set(ids["merchant"])
  wire = b"".join(m.payload for m in aligned.messages)
  assert len(aligned.messages) == 3 * 2 * 2  # two PSI runs per member (request, setup, response each)
  assert {(m.sender, m.receiver) for m in aligned.messages} == {("bank", "network"), ("network", "bank"),
                                                                 ("bank", "merchant"), ("merchant", "bank")}
  for name, party_ids in ids.items():
    for i in party_ids:
      assert i.encode() not in wire, (name, i)
  # The check can fail: a message holding the IDs in the clear is caught.
  naive = "\n".join(i for i in ids["network"] if i not in shared).encode()
  assert any(i.encode() in naive for i in everyone if i not in shared)


def test_bad_ids_name_the_party():
  with pytest.raises(ValueError, match=r"^ids_by_party\['shop'\]: ID 'b' is given twice \(rows 1 and 2\); every "
                                       r"sample needs a distinct ID$"):
    sljax.align({"bank": ["a", "b"], "shop": ["a", "b", "b"]})
  with pytest.raises(TypeError, match=r"^ids_by_party\['shop'\]: party 'shop' has IDs of type int, the leader 'bank' "
                                      r"str; IDs of different types never match$"):
    sljax.align({"bank": ["1", "2"], "shop": [1, 2]})
  with pytest.raises(ValueError, match=r"^ids_by_party: the parties \('bank', 'shop'\) share no sample"):
    sljax.align({"bank": ["a", "b"], "shop": ["c"]})
  with pytest.raises(ValueError, match=r"^ids_by_party\['shop'\]: expected a 1-D sequence of IDs, got shape \(1, 2\)$"):
    sljax.align({"bank": ["a"], "shop": [["a", "b"]]})
  with pytest.raises(ValueError, match=r"^ids_by_party: expected a mapping of at least two party names to their IDs, "
                                       r"got 1 parties$"):
    sljax.align({"bank": ["a"]})
  with pytest.raises(ValueError, match=r"^leader: expected one of the parties \('bank', 'shop'\), got 'x'$"):
    sljax.align({"bank": ["a"], "shop": ["a"]}, leader="x")
  aligned = sljax.align({"bank": ["a", "b"], "shop": ["b"]})
  with pytest.raises(ValueError, match=r"^x: party 'bank' gave 2 IDs, one per row of its data, but x has shape "
                                       r"\(3, 4\)$"):
    aligned.take("bank", np.zeros((3, 4)))


def test_docstring_examples_run():
  runner = doctest.DocTestRunner()
  for test in doctest.DocTestFinder().find(align_lib):
    runner.run(test)
  assert runner.failures == 0 and runner.tries > 0
