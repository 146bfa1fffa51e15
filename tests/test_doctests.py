"""The examples in the docstrings of every sljax module run and print what they say.

Docstring examples that another test file already runs, next to the tests of what they show, are
left to it (`COVERED`); this file runs all the others, one test per module.
"""

import doctest
import importlib
import pkgutil

import pytest

import sljax

# Run by the tests of their own module: whole modules, and single objects (with what they define).
COVERED = {
    # tests/test_codecs.py, test_align.py, test_models.py, test_network.py, test_plots.py,
    # test_vertical_data.py, test_maintenance_data.py, test_vertical_model.py
    "sljax.codecs", "sljax.align", "sljax.models.layers", "sljax.models.resnet", "sljax.models.vit",
    "sljax.models.sensor", "sljax.network", "sljax.plots", "sljax.data.vertical", "sljax.data.maintenance",
    "sljax.merges", "sljax.split.vertical_model", "sljax.vertical.vertical_sl",
    # tests/test_algorithms.py, test_parallel_u.py
    "sljax.algorithms._common.ScheduleConfig", "sljax.algorithms.parallel.parallel_sl",
    "sljax.algorithms.parallel.local_loss_sl", "sljax.algorithms.splitfed.splitfed",
    "sljax.algorithms.sequential.sequential_sl", "sljax.algorithms.baselines.fedavg",
    "sljax.algorithms.baselines.centralized_baseline", "sljax.algorithms.heterogeneous.heterogeneous_parallel_sl",
    "sljax.algorithms.parallel_u.u_shaped_parallel_sl",
    # tests/test_evaluation.py, test_fit.py, test_extension_points.py
    "sljax.training.evaluate", "sljax.training.fit", "sljax.simulation.run", "sljax.protocol.vanilla",
    "sljax.protocol.u_shaped",
}

MODULES = sorted(info.name for info in pkgutil.walk_packages(sljax.__path__, "sljax."))


def _covered(name: str) -> bool:
  return any(name == c or name.startswith(c + ".") for c in COVERED)


def _examples(module_name: str) -> list[doctest.DocTest]:
  module = importlib.import_module(module_name)
  tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
  return sorted((t for t in tests if t.examples and not _covered(t.name)), key=lambda t: t.name)


def test_every_public_module_is_searched():
  for name in ("sljax.protocol", "sljax.split", "sljax.messages", "sljax.simulation", "sljax.data.partition",
               "sljax.privacy.defenses", "sljax.transport.concurrent", "sljax.analysis", "sljax.export"):
    assert name in MODULES, name


@pytest.mark.parametrize("module_name", [m for m in MODULES if not _covered(m) and _examples(m)])
def test_docstring_examples_run(module_name):
  tests = _examples(module_name)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  failed = []
  for test in tests:
    runner.run(test, out=failed.append)
  assert runner.failures == 0, "".join(failed)
