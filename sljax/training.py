"""A thin driver for one client and one server: epochs of jitted steps, evaluation, inference.

The logic lives in the protocol's pure `step`; this module only shuffles, batches and loops. One
epoch is one jitted program (`lax.scan` over its steps), so Python dispatch never sits on the hot
path; the same driver trains `vanilla`, `u_shaped` and `centralized` trainers. `evaluate` also
tests the models of a multi-client algorithm (`sljax.algorithms`), as `simulation.run` does.
"""

from __future__ import annotations

import functools
import logging
import numbers
import weakref
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sljax._progress import progress_bar
from sljax.algorithms import Algorithm
from sljax.algorithms._common import _host
from sljax.data.checks import check_finite, check_label_values
from sljax.data.clients import ClientData
from sljax.protocol import ArraySpec, PartyState, softmax_cross_entropy

logger = logging.getLogger(__name__)

# Programs built by `reuse_program`: per function (held weakly), per static options.
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reuse_program(fn: Callable, options: tuple[Hashable, ...], build: Callable[[Callable], Callable]) -> Callable:
  """`build(fn)` (a jitted program calling `fn`), built once per `fn` and `options`, then reused.

  The drivers (`fit`, `evaluate`, `simulation.run`) get their programs here, so that calling a
  driver again with the same trainer or algorithm (a notebook cell run twice) neither traces nor
  compiles again: `jax.jit` keeps its compiled executables on the jitted object, and a new
  object would start empty. The cache holds `fn` weakly and the program calls `fn` through a
  weak reference, so a trainer that goes away takes its programs with it. A function that cannot
  be held weakly gets a fresh program.

  Args:
    fn: the pure function the program runs (`trainer.step`, `algorithm.round`); keep a reference
      to it while the program runs.
    options: the static options `build` depends on (e.g. `("epoch", batch_size)`).
    build: makes the jitted program from a function standing for `fn`.
  """
  try:
    programs = _PROGRAMS.setdefault(fn, {})
  except TypeError:  # not weakly referenceable, or not hashable
    return build(fn)
  if options not in programs:
    ref = weakref.ref(fn)

    def call(*args, **kwargs):
      return ref()(*args, **kwargs)

    call.__name__ = call.__qualname__ = getattr(fn, "__name__", "fn")
    programs[options] = build(call)
  return programs[options]


def _check_labels(x, y) -> None:
  """Raises a ValueError unless `y` holds one label per sample (row) of `x`.

  `x` may be a pytree of arrays (vertical SL: one array per party, a tuple or a dict by party
  name): every leaf must hold the same samples; the error names the leaf by its path.
  """
  leaves = jax.tree_util.tree_leaves_with_path(x)
  for path, leaf in leaves:
    if leaf.ndim == 0:
      raise ValueError(f"x{jax.tree_util.keystr(path)}: expected samples along a leading axis, got shape {leaf.shape}")
  path0, first = leaves[0]
  for path, leaf in leaves[1:]:
    if leaf.shape[0] != first.shape[0]:
      raise ValueError(f"x{jax.tree_util.keystr(path)}: expected the same {first.shape[0]} samples as "
                       f"x{jax.tree_util.keystr(path0)}, got shape {leaf.shape}")
  if y.ndim == 0 or y.shape[0] != first.shape[0]:
    got = y.shape[0] if y.ndim else f"shape {y.shape}"
    raise ValueError(f"y: expected {first.shape[0]} labels, one per sample of x, got {got}")


def _num_classes(trainer: Any, state: Any, x: Any) -> int | None:
  """The width of the trainer's outputs (its classes) where `predict` gives (B, C) logits; None else."""
  predict = getattr(trainer, "predict", None)
  if predict is None:
    return None
  try:  # a program reused across calls (see reuse_program): its abstract evaluation is traced once per shape
    outputs = reuse_program(predict, ("outputs",), lambda f: jax.jit(lambda s, x: f(s, x)[0]))
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), x)
    out = outputs.eval_shape(state, one)
  except Exception:  # noqa: BLE001 -- a trainer without a (state, x) predict: the labels' range is left unchecked
    return None
  return int(out.shape[-1]) if getattr(out, "ndim", 0) == 2 else None


def _check_values(trainer: Any, state: Any, x: Any, y: Any) -> None:
  """Raises a ValueError on a non-finite feature or a label outside the model's classes."""
  check_finite("x", x)
  check_label_values("y", y, _num_classes(trainer, state, x))


def _check_batch_size(n: int, batch_size: int) -> None:
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size: expected at least 1 and at most the {n} training samples, got {batch_size}")


def make_epoch(step: Callable, *, batch_size: int) -> Callable:
  """A jitted function running one shuffled epoch of `step` over (x, y).

  `epoch(state, x, y, key) -> (state, metrics)` where `metrics` stacks the per-step metrics. The
  data order and the step keys derive from `key` alone. The last partial batch is dropped (the
  `n % batch_size` samples left after the shuffle, different ones each epoch), so every step has
  the same shape and nothing recompiles.
  """

  @jax.jit
  def epoch(state, x, y, key):
    n = jax.tree.leaves(x)[0].shape[0]
    _check_batch_size(n, batch_size)
    steps = n // batch_size
    k_perm, k_steps = jax.random.split(key)
    order = jax.random.permutation(k_perm, n)[: steps * batch_size].reshape(steps, batch_size)

    def body(state, inputs):
      idx, k = inputs
      return step(state, (jax.tree.map(lambda a: a[idx], x), y[idx]), k)

    return jax.lax.scan(body, state, (order, jax.random.split(k_steps, steps)))

  return epoch


def fit(
    trainer: Any,
    state: Any,
    x: Any,
    y: Any,
    *,
    key: jax.Array,
    epochs: int,
    batch_size: int,
    test: tuple[Any, Any] | None = None,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    eval_every: int = 1,
    progress: bool = False,
    description: str = "training",
    transcript: Any = None,
) -> tuple[Any, list[dict[str, float]]]:
  """Trains for `epochs` shuffled epochs and returns the state and one record of figures per epoch.

  Every epoch takes `len(x) // batch_size` full batches of a fresh shuffle; the
  `len(x) % batch_size` samples left over (different ones each epoch) are dropped, so that every
  step has one shape. Each record says how many (`dropped_samples`), and a log message too.

  The history is a list of flat dicts of Python numbers, every one with the same keys, so
  `pandas.DataFrame(history)` or `sljax.plots` take it as it is: `epoch`, the training `loss` and
  `accuracy` (means over the epoch's batches, measured during the steps), `bytes_up`,
  `bytes_down`, `dropped_samples`; with `test`, `test_accuracy`, `test_loss` (and `test_auc` for a
  vertical model with two classes) and the test's inference traffic `test_bytes_up`,
  `test_bytes_down`; and what `evaluate` returns. An epoch that is not tested holds NaN for those.

  Calling `fit` again with the same `trainer` and data shapes reuses the compiled epoch.

  Args:
    trainer: anything with a pure `step(state, (x, y), key) -> (state, metrics)`
      (`vanilla`, `u_shaped`, `centralized`, `vertical_sl`).
    state: the trainer's state (from `trainer.init`).
    x, y: the training data; `x` may be a pytree of arrays with the same samples (vertical SL:
      one array per party, a tuple or a dict by party name).
    key: PRNG key; epoch `e` uses `fold_in(key, e)` for its order and step keys.
    epochs: number of passes.
    batch_size: samples per step.
    test: held-out data `(x_test, y_test)`, with the structure and per-sample shapes of `x`,
      tested after every `eval_every`-th epoch and after the last by `sljax.evaluate` (or
      `sljax.vertical_evaluate` when `x` is a pytree of party columns), whose figures the records
      hold prefixed `test_` (softmax cross-entropy for the loss). Checked before the first epoch.
    evaluate: `evaluate(state) -> dict` of figures (Python or numpy numbers) merged into the
      records of the tested epochs, e.g. `sljax.evaluate` with another loss or other data; its
      names must differ from the record's own.
    eval_every: test (and call `evaluate`) after every `eval_every`-th epoch and after the last.
    progress: show a progress bar: the widget in a notebook with ipywidgets, text in a notebook
      without it or in a terminal, one line per update (at most one a second) in a log.
    description: the progress bar's label.
    transcript: None (the default: nothing recorded, nothing changes), or a path or a
      `sljax.privacy.transcript.Recorder` to record every message of the run into (round = epoch,
      step = step in the epoch, client 0), with notes on the configuration and the training figures.
      The recorded epoch is one jitted program too, reused by later calls like the plain one; a
      path's recorder is closed at the end, a given recorder is left open.

  Returns:
    The final state and the records, one per epoch (see above): the mean loss and accuracy, the
    total bytes up and down (Python ints, exact past 2**31), the number of samples the epoch
    dropped, and the test figures.

  Example:
    >>> import math, optax, numpy as np, jax, sljax
    >>> x = np.random.default_rng(0).normal(size=(80, 12)).astype(np.float32)
    >>> y = np.argmax(x[:, :10], 1).astype(np.int32)
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.sgd(0.1),
    ...                    server_optimizer=optax.sgd(0.1))
    >>> state, history = sljax.fit(sl, sl.init(jax.random.key(0), x[:1]), x[:64], y[:64], key=jax.random.key(1),
    ...                            epochs=3, batch_size=8, test=(x[64:], y[64:]), eval_every=2)
    >>> [not math.isnan(h["test_accuracy"]) for h in history]  # tested: epochs 2 and 3 (the last)
    [False, True, True]
    >>> history[-1]["test_accuracy"] == sljax.evaluate(sl, state, x[64:], y[64:])["accuracy"]
    True
  """
  if isinstance(eval_every, bool) or not isinstance(eval_every, numbers.Integral) or eval_every < 1:
    raise ValueError(f"eval_every: expected a positive int (test every that many epochs), got {eval_every!r}")
  if evaluate is not None and not callable(evaluate):
    raise TypeError(f"evaluate: expected a function of the state returning a dict, got {type(evaluate).__name__}")
  if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
    raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
  x, y = jax.tree.map(jnp.asarray, x), jnp.asarray(y)
  _check_labels(x, y)
  _check_values(trainer, state, x, y)
  n = y.shape[0]
  _check_batch_size(n, batch_size)
  test_fn = None if test is None else _fit_tester(trainer, x, test)
  dropped = n % batch_size
  if dropped:
    logger.info("fit: %d samples make %d batches of %d; each epoch drops the %d left over (different ones each epoch)",
                n, n // batch_size, batch_size, dropped)
  step = trainer.step  # held for as long as the program runs (see reuse_program)
  epoch_fn = reuse_program(step, ("epoch", batch_size), lambda f: make_epoch(f, batch_size=batch_size))
  recording = None
  if transcript is not None:
    from sljax.privacy.transcript import FitRecording  # noqa: PLC0415 -- only when recording

    recording = FitRecording(trainer, transcript, batch_size=batch_size, state=state)
    epoch_fn = recording.epoch
  history = []
  with progress_bar(range(epochs), desc=description, disable=not progress) as bar:
    for e in bar:
      state, metrics = epoch_fn(state, x, y, jax.random.fold_in(key, e))
      metrics = recording.write(e, metrics) if recording is not None else jax.device_get(metrics)
      steps = len(metrics["loss"])
      record = {
          "epoch": e + 1,
          "loss": float(np.mean(metrics["loss"])),
          "accuracy": float(np.mean(metrics["accuracy"])),
          # static per-step counts (see protocol.Metrics) or per-step arrays alike
          "bytes_up": int(np.sum(np.broadcast_to(np.asarray(metrics["bytes_up"], np.int64), (steps,)))),
          "bytes_down": int(np.sum(np.broadcast_to(np.asarray(metrics["bytes_down"], np.int64), (steps,)))),
          "dropped_samples": dropped,
      }
      if (e + 1) % eval_every == 0 or e + 1 == epochs:
        if test_fn is not None:
          record.update(test_fn(state))
        if evaluate is not None:
          record.update(_figures(evaluate(state), record))
      history.append(record)
      bar.set_postfix(loss=f"{record['loss']:.4f}")
      logger.debug("epoch %d: %s", e + 1, record)
  if recording is not None:
    recording.finish(history)
  return state, _same_keys(history)


def _fit_tester(trainer: Any, x: Any, test: Any) -> Callable[[Any], dict[str, Any]]:
  """`fit`'s `test` checked against the training features `x`: the function of the state that tests it."""
  if not isinstance(test, (tuple, list)) or len(test) != 2:
    raise ValueError(f"test: expected a test set (x, y), got {type(test).__name__}"
                     f"{f' of length {len(test)}' if isinstance(test, (tuple, list)) else ''}")
  x_test, y_test = jax.tree.map(np.asarray, test[0]), test[1]
  if jax.tree.structure(x_test) != jax.tree.structure(x):
    raise ValueError(f"test[0]: expected the structure of x, {jax.tree.structure(x)}, got "
                     f"{jax.tree.structure(x_test)}")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(x_test), strict=True):
    if b.ndim != a.ndim or b.shape[1:] != a.shape[1:]:
      raise ValueError(f"test[0]{jax.tree_util.keystr(path)}: expected samples of shape {tuple(a.shape[1:])} as in "
                       f"x, got shape {b.shape}")
  y_test = np.asarray(y_test)
  n = jax.tree.leaves(x_test)[0].shape[0]
  if y_test.shape != (n,) or not np.issubdtype(y_test.dtype, np.integer):
    raise ValueError(f"test[1]: expected {n} integer labels, one per sample of test[0], got shape {y_test.shape} "
                     f"{y_test.dtype}")
  if isinstance(x, jax.Array):
    return lambda state: {f"test_{k}": v for k, v in evaluate(trainer, state, x_test, y_test).items()}
  from sljax.vertical import vertical_evaluate  # noqa: PLC0415 -- vertical imports this module

  return lambda state: {f"test_{k}": v for k, v in vertical_evaluate(trainer, state, x_test, y_test).items()}


def _figures(figures: Any, record: dict[str, Any]) -> dict[str, Any]:
  """What `fit`'s `evaluate` returned, checked, as Python numbers where they are numpy's or jax's."""
  if not isinstance(figures, dict):
    raise TypeError(f"evaluate: expected a dict of figures, got {type(figures).__name__}")
  taken = sorted(set(figures) & set(record))
  if taken:
    raise ValueError(f"evaluate: expected names other than the record's own, got {', '.join(map(repr, taken))}")
  return {k: v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v for k, v in figures.items()}


def _same_keys(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The records with the keys of all of them, in order of appearance; NaN where a record lacks one."""
  keys = list(dict.fromkeys(k for record in history for k in record))
  return [{k: record.get(k, float("nan")) for k in keys} for record in history]


def evaluate(trainer: Any, state: Any, x: Any, y: Any = None, *, batch_size: int = 1024,
             loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy) -> dict[str, Any]:
  """Test figures of a trained model, as a dict: a trainer's (one client, one server) or an algorithm's.

  - `evaluate(sl, split_state, x, y)`, for a trainer (`vanilla`, `u_shaped`, `centralized`):
    collaborative inference (client forward, then server) in batches of `batch_size`, every sample
    counted (the last batch may be smaller: one more compile, for its shape). Returns `accuracy`,
    `loss` (the mean `loss` per sample) and the inference traffic `bytes_up`, `bytes_down`.
  - `evaluate(algorithm, sim_state, x, y)` or `evaluate(algorithm, sim_state, test_clients)`, for
    a multi-client algorithm (`sljax.algorithms`), with a test set `x`, `y` or per-client test data
    (a `ClientData`, e.g. `sljax.data.stack_clients` of a held-out split). Where every client ends a
    round with the same model (`algorithm.shared_model`: SplitFed, FedAvg, sequential SL,
    centralized), that model on all the test samples: `test_accuracy` and `test_loss` (the mean
    `loss` per sample). Where each client keeps its own half (parallel, local-loss, heterogeneous
    and U-shaped parallel SL), each client's half on its own test data (row k of `test_clients`),
    or on the whole test set `x`, `y`: `test_accuracy_per_client` (a list), `test_accuracy_mean`,
    `test_accuracy_std` (over the clients, unweighted), `test_loss_mean` and
    `test_loss_per_client`. `simulation.run(..., test=...)` writes these same figures into its
    records. One jitted program per shape (`algorithm.predict` `vmap`ped over the clients,
    batches of about `batch_size` samples in all under a `lax.scan`), compiled once.

  Calling `evaluate` again with the same trainer or algorithm and shapes reuses the compiled programs.

  Args:
    trainer: a trainer (with `predict(state, x) -> (outputs, traffic)`) or an `Algorithm`.
    state: its state (`SplitState`, `PartyState`; a `SimState` for an algorithm).
    x: test features (N, *input shape), or for an algorithm a `ClientData` (then `y` is None).
    y: integer labels (N,).
    batch_size: the samples that go through the model at once (split among the clients when each
      client's half is tested).
    loss: the per-batch mean loss that `loss` (a trainer) or `test_loss` (an algorithm) reports;
      softmax cross-entropy unless given.

  Returns:
    A dict with the keys above: numbers, and lists with one entry per client where each has its own half.

  Example:
    >>> import optax, numpy as np, jax, sljax
    >>> x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    >>> y = np.argmax(x[:, :10], 1).astype(np.int32)
    >>> clients = sljax.data.stack_clients(x, y, sljax.data.iid(y, num_clients=4, seed=0))
    >>> sl = sljax.vanilla(sljax.cut(sljax.models.mlp(hidden=(16,)), 1), client_optimizer=optax.sgd(0.1),
    ...                    server_optimizer=optax.sgd(0.1))
    >>> algo = sljax.algorithms.parallel_sl(sl, sljax.algorithms.ScheduleConfig(num_clients=4, batch_size=8))
    >>> state = algo.init(jax.random.key(0), clients)
    >>> sorted(sljax.evaluate(algo, state, clients))  # each client's half on its own rows
    ['test_accuracy_mean', 'test_accuracy_per_client', 'test_accuracy_std', 'test_loss_mean', 'test_loss_per_client']
    >>> len(sljax.evaluate(algo, state, x, y)["test_accuracy_per_client"])  # every half on one test set
    4
  """
  if isinstance(trainer, Algorithm):
    return algorithm_evaluator(trainer, state, x, y, batch_size=batch_size, loss=loss)(state)
  predict_fn = trainer.predict  # held for as long as the program runs (see reuse_program)
  predict = reuse_program(predict_fn, ("predict", loss), lambda f: jax.jit(functools.partial(_scores, f, loss=loss)))
  if y is None:
    raise ValueError("y: expected one label per sample of x, got None")
  x, y = np.asarray(x), np.asarray(y)
  _check_labels(x, y)
  if len(y) == 0:
    raise ValueError("x, y: expected at least one test sample, got 0")
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
    raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
  _check_values(trainer, state, x, y)
  correct, loss_sum, bytes_up, bytes_down = 0, 0.0, 0, 0
  for start in range(0, len(x), batch_size):
    hits, batch_loss, traffic = predict(state, jnp.asarray(x[start : start + batch_size]),
                                        jnp.asarray(y[start : start + batch_size]))
    correct += int(hits)
    loss_sum += float(batch_loss) * len(y[start : start + batch_size])  # the batch's mean, weighted by its size
    bytes_up += int(traffic["bytes_up"])
    bytes_down += int(traffic["bytes_down"])
  return {"accuracy": correct / len(x), "loss": loss_sum / len(x), "bytes_up": bytes_up, "bytes_down": bytes_down}


def _scores(predict: Callable, state: Any, x: jax.Array, y: jax.Array, *, loss: Callable) -> tuple:
  """A trainer's hits, mean loss and inference traffic on one batch."""
  out, traffic = predict(state, x)
  return jnp.sum(jnp.argmax(out, axis=-1) == y, dtype=jnp.int32), loss(out, y), traffic


def algorithm_evaluator(algorithm: Algorithm, state: Any, x: Any, y: Any = None, *, batch_size: int = 1024,
                        loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
                        names: tuple[str, str] = ("x", "y"), jit: bool = True) -> Callable[[Any], dict[str, Any]]:
  """`evaluate(algorithm, ·, x, y)` as a function of the state: the test data checked and placed once.

  `simulation.run` calls it once per run and the function it returns every few rounds. `state`
  gives the shapes it checks against (the clients, the model's input); `names` are the arguments'
  names in the errors (e.g. `("test[0]", "test[1]")`). See `evaluate` for the figures.

  Raises:
    ValueError: naming the argument, the expected and the given shape, when the features do not fit
      the model's input, the labels do not fit the features, or per-client data has another number
      of clients than the state.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
    raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
  per_client = not algorithm.shared_model
  num_clients = _num_clients(algorithm, state)
  if per_client and num_clients is None:
    raise ValueError(f"algorithm: expected a schedule or a stacked client axis to test each client's half, got "
                     f"neither in {algorithm.name!r} (set shared_model=True if its clients share one model)")
  test = _test_data(x, y, names=names, spec=_input_spec(state), num_clients=num_clients if per_client else None)
  layout = "clients" if isinstance(x, ClientData) else "global"
  slots = test.x.shape[0] if layout == "clients" else (num_clients if per_client else 1)
  n = test.x.shape[1] if layout == "clients" else test.x.shape[0]
  batch = max(1, min(n, int(batch_size) // slots))
  options = ("evaluate", per_client, layout, batch, num_clients if per_client else None, loss)
  predict = algorithm.predict  # held for as long as the program runs (see reuse_program)
  build = functools.partial(_evaluation_program, per_client=per_client, layout=layout, batch=batch,
                            num_clients=num_clients, loss=loss)
  program = reuse_program(predict, options, lambda f: jax.jit(build(f))) if jit else build(predict)
  count = np.asarray(test.count, np.float64) if layout == "clients" else np.full((slots,), n, np.float64)

  def evaluate_state(state) -> dict[str, Any]:
    correct, losses = program(state, test.x, test.y, test.count)
    correct, losses = _host(correct).astype(np.float64), _host(losses).astype(np.float64)
    if not per_client:
      return {"test_accuracy": float(correct.sum() / count.sum()), "test_loss": float(losses.sum() / count.sum())}
    accuracy, mean_loss = correct / count, losses / count
    return {"test_accuracy_mean": float(accuracy.mean()), "test_accuracy_std": float(accuracy.std()),
            "test_loss_mean": float(mean_loss.mean()), "test_accuracy_per_client": accuracy.tolist(),
            "test_loss_per_client": mean_loss.tolist()}

  return evaluate_state


class _TestData(NamedTuple):
  x: jax.Array  # (K, N, ...) per-client rows, or (N, ...) one test set
  y: jax.Array  # (K, N) or (N,)
  count: jax.Array | None  # (K,) real rows of each client; None for one test set


def _num_clients(algorithm: Algorithm, state: Any) -> int | None:
  """The state's number of clients K: the length of its schedule's client keys, else of its
  client-stacked parties."""
  if algorithm.schedule is not None:
    return int(jax.eval_shape(algorithm.schedule.client_keys, state.key, 0, 0).shape[0])
  if algorithm.client_axes.clients:
    return int(jax.tree.leaves(state.clients)[0].shape[0])
  return None


def _input_spec(state: Any) -> ArraySpec | None:
  """The model's input: the spec of the first party in the state (the clients come before the
  server; the centralized baseline's whole model is its server). None if the state holds no party."""
  for node in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, PartyState)):
    if isinstance(node, PartyState):
      return node.input_spec
  return None


def _describe(shape, dtype) -> str:
  return f"{tuple(shape)} {np.dtype(dtype).name}"


def _test_data(x, y, *, names: tuple[str, str], spec: ArraySpec | None, num_clients: int | None) -> _TestData:
  """Checks test data on the host, before anything is traced, and puts it on the device."""
  name_x, name_y = names
  if isinstance(x, ClientData):
    if y is not None:
      raise ValueError(f"{name_y}: expected None with per-client data (its labels are {name_x}.y), got "
                       f"{type(y).__name__}")
    k = x.x.shape[0] if x.x.ndim else None
    if num_clients is not None and k != num_clients:
      raise ValueError(f"{name_x}: expected per-client data of {num_clients} clients (the state's), got {k} "
                       f"(x of shape {_describe(x.x.shape, x.x.dtype)})")
    lead = f"({num_clients if num_clients is not None else 'K'}, N"
    if spec is not None and (tuple(x.x.shape[2:]) != spec.shape or x.x.ndim != len(spec.shape) + 2
                             or np.dtype(x.x.dtype).name != spec.dtype):
      raise ValueError(f"{name_x}.x: expected shape {spec.describe().replace('(B', lead)} (the model's input per "
                       f"client), got {_describe(x.x.shape, x.x.dtype)}")
    if tuple(x.y.shape) != tuple(x.x.shape[:2]) or not jnp.issubdtype(x.y.dtype, jnp.integer):
      raise ValueError(f"{name_x}.y: expected integer labels of shape {tuple(x.x.shape[:2])}, one per row of "
                       f"{name_x}.x, got {_describe(x.y.shape, x.y.dtype)}")
    if tuple(x.count.shape) != tuple(x.x.shape[:1]):
      raise ValueError(f"{name_x}.count: expected shape {tuple(x.x.shape[:1])}, one count per client, got "
                       f"{tuple(x.count.shape)}")
    return _TestData(jnp.asarray(x.x), jnp.asarray(x.y), jnp.asarray(x.count))
  if y is None:
    raise ValueError(f"{name_y}: expected one integer label per sample of {name_x}, got None")
  x, y = jnp.asarray(x), jnp.asarray(y)
  if spec is not None and (tuple(x.shape[1:]) != spec.shape or x.ndim != len(spec.shape) + 1
                           or np.dtype(x.dtype).name != spec.dtype):
    raise ValueError(f"{name_x}: expected shape {spec.describe().replace('(B', '(N')} (the model's input), got "
                     f"{_describe(x.shape, x.dtype)}")
  if x.ndim == 0 or x.shape[0] == 0:
    raise ValueError(f"{name_x}: expected at least one sample along a leading axis, got shape {tuple(x.shape)}")
  if tuple(y.shape) != tuple(x.shape[:1]) or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"{name_y}: expected {x.shape[0]} integer labels, one per sample of {name_x}, got "
                     f"{_describe(y.shape, y.dtype)}")
  return _TestData(x, y, None)


def _evaluation_program(predict: Callable, *, per_client: bool, layout: str, batch: int, num_clients: int | None,
                        loss: Callable) -> Callable:
  """`(state, x, y, count) -> (correct (C,), loss sums (C,))`: the hits and the summed per-sample
  losses of each test slot C (a client's rows, or the one test set), through `predict`."""

  def scores(state, client, x_N, y_N, n):
    """One client's half (`client`) on one set of rows, `n` of them real, in a scan over batches."""
    steps = -(-x_N.shape[0] // batch)
    pad = steps * batch - x_N.shape[0]
    x_SxB = jnp.pad(x_N, [(0, pad)] + [(0, 0)] * (x_N.ndim - 1)).reshape(steps, batch, *x_N.shape[1:])
    y_SxB = jnp.pad(y_N, (0, pad)).reshape(steps, batch)
    real_SxB = (jnp.arange(steps * batch) < n).reshape(steps, batch)

    def body(totals, inputs):
      x_B, y_B, real_B = inputs
      out_B = predict(state, x_B, client=client)
      losses_B = jax.vmap(lambda o, t: loss(o[None], t[None]))(out_B, y_B).astype(jnp.float32)
      hits = jnp.sum((jnp.argmax(out_B, -1) == y_B) & real_B, dtype=jnp.int32)
      return (totals[0] + hits, totals[1] + jnp.sum(jnp.where(real_B, losses_B, 0.0))), None

    totals, _ = jax.lax.scan(body, (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)), (x_SxB, y_SxB, real_SxB))
    return totals

  def program(state, x, y, count):
    if not per_client:  # one model: client 0's half stands for all
      if layout == "global":
        return jax.tree.map(lambda a: a[None], scores(state, 0, x, y, x.shape[0]))
      return jax.vmap(lambda x_N, y_N, n: scores(state, 0, x_N, y_N, n))(x, y, count)
    data_axis = 0 if layout == "clients" else None
    n = count if layout == "clients" else x.shape[0]
    count_axis = 0 if layout == "clients" else None
    one = lambda k, x_N, y_N, n: scores(state, k, x_N, y_N, n)  # noqa: E731
    try:
      return jax.vmap(one, in_axes=(0, data_axis, data_axis, count_axis))(jnp.arange(num_clients), x, y, n)
    except (jax.errors.TracerIntegerConversionError, jax.errors.ConcretizationTypeError):
      # this algorithm's predict takes a concrete client (its halves differ in shape): one call each
      pick = (lambda a, k: a[k]) if layout == "clients" else (lambda a, k: a)
      outs = [one(k, pick(x, k), pick(y, k), pick(n, k)) for k in range(num_clients)]
      return tuple(jnp.stack(parts) for parts in zip(*outs))

  return program
