"""Attacks at the cut: pure functions over recorded messages plus what the attacker knows.

Each attack takes the decoded steps of a run (`Transcript.exchanges()`, or `Exchange`s built from
arrays) and a small frozen dataclass stating the attacker's knowledge, and returns its result with
the success metric. Ground truth (the labels sent up in vanilla SL, or the "truth" records a
recorder was asked for) is used only to score an attack, never by it.

Label leakage from the cut gradient; the attacker is the party that receives the cut gradient and
wants the labels of the party that computes the loss (Li et al., "Label Leakage and Protection in
Two-party Split Learning", ICLR 2022):

- `norm_scoring`: the gradient's norm is the score. In an imbalanced binary task the model is
  confident on the majority class, so minority examples get larger gradients. No knowledge needed.
- `direction_scoring`: the cosine between each example's gradient and a reference gradient. For a
  binary task with a shared prediction head, same-class gradients point the same way. The
  reference is a known positive of the batch, or, knowing nothing, the batch's first example,
  oriented so that the smaller of the two groups scores high (positives are the minority).
- `model_completion` (Fu et al., "Label Inference Attacks Against Vertical Federated Learning",
  USENIX Security 2022): with the labels of a few examples, train a small head on their smashed
  data and apply it to the rest (the semi-supervised refinement of the paper is not done).

Input reconstruction; the attacker is the server, which sees the smashed data (He et al., "Model
Inversion Attacks against Collaborative Inference", ACSAC 2019):

- `inverse_network`: black-box. From (auxiliary input, smashed) pairs, e.g. by querying the client
  half, train a decoder smashed -> input, then decode the recorded smashed data.
- `white_box_inversion`: knowing the client half (sequential SL hands it through the server), find
  inputs whose smashed data match the recorded ones, with a total-variation prior.

Feature-space hijacking by a malicious server (Pasquini et al., CCS 2021) is not a function of a
recorded honest run: it runs as the server, against the client's legs (`sljax.privacy.hijacking`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sljax.privacy import metrics
from sljax.privacy.transcript import Exchange, Transcript

# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class LabelLeakage:
  """A label attack's scores and AUC: per batch, and summarised over the run (Li et al.'s p95 leak).

  Attributes:
    attack: the attack's name.
    aucs: per-batch AUC of the scores against the true labels (NaN where a batch has one class).
    auc_mean: the mean of the per-batch AUCs.
    leak_p95: the 95th percentile over the batches of |AUC - 0.5| (0: nothing leaks; 0.5: everything).
    scores: per-example scores, the batches concatenated.
    accuracy: for attacks that predict labels (model completion), the share predicted right; else None.
  """

  attack: str
  aucs: np.ndarray
  auc_mean: float
  leak_p95: float
  scores: np.ndarray
  accuracy: float | None = None


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """An input-reconstruction attack's output and its quality against the true inputs.

  Attributes:
    attack: the attack's name.
    reconstructions: (N, ...) the attack's guesses of the inputs.
    mse, psnr: mean squared error and peak signal-to-noise ratio (dB) against the true inputs (NaN
      when no truth was given); ssim: structural similarity (for images (N, H, W, C); else NaN).
  """

  attack: str
  reconstructions: np.ndarray
  mse: float = float("nan")
  psnr: float = float("nan")
  ssim: float = float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Knowledge


@dataclasses.dataclass(frozen=True)
class DirectionKnowledge:
  """What direction scoring knows: nothing (the default), or one positive example per batch.

  Attributes:
    known_positive: per batch, the row of an example the attacker knows to be positive (-1 where it
      knows none, then the minority rule); None for no known positive in any batch.
  """

  known_positive: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class CompletionKnowledge:
  """What model completion knows: the labels of a few examples, and how it trains its head.

  Attributes:
    known_per_class: the number of examples per class whose labels the attacker knows, drawn with
      `seed` among the examples of the last recorded round (used when `known_rows` is None).
    known_rows: or exactly which rows (indices into the last round's examples, in order) it knows.
    hidden: the head's hidden layer sizes (() for logistic regression).
    steps, learning_rate: full-batch Adam on the known examples.
    seed: for the draw of the known rows and the head's initialisation.
  """

  known_per_class: int = 4
  known_rows: Sequence[int] | None = None
  hidden: tuple[int, ...] = (32,)
  steps: int = 300
  learning_rate: float = 1e-2
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class InverseNetworkKnowledge:
  """What the black-box inverse network knows: auxiliary inputs and their smashed data (He et al.).

  Attributes:
    aux_inputs: (M, ...) inputs from the data's distribution.
    aux_smashed: (M, ...) the client half's outputs on them (queried, or seen with them).
    hidden: the decoder's hidden layer sizes.
    steps, learning_rate, batch_size: Adam on random minibatches of the pairs.
    seed: initialisation and minibatch order.
  """

  aux_inputs: Any
  aux_smashed: Any
  hidden: tuple[int, ...] = (256,)
  steps: int = 1000
  learning_rate: float = 1e-3
  batch_size: int = 64
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class WhiteBoxKnowledge:
  """What the white-box inversion knows: the client half as a function, the input's shape and range.

  Attributes:
    client_apply: `smashed = client_apply(x)` for a batch x, e.g.
      `lambda x: model.client.apply(params, model_state, x, key=None, train=False)[0]`.
    input_shape: one example's shape (without the batch axis).
    bounds: the inputs' (low, high) range, kept by clipping after every step; None for unbounded.
    tv_weight: the weight of the total-variation prior (images: rank >= 2 per example).
    steps, learning_rate: Adam on the inputs, from the middle of `bounds` (zeros if unbounded).
  """

  client_apply: Callable[[jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  bounds: tuple[float, float] | None = (0.0, 1.0)
  tv_weight: float = 1e-3
  steps: int = 500
  learning_rate: float = 0.05


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def exchanges_of(run: Transcript | Sequence[Exchange]) -> list[Exchange]:
  """The steps of `run`: a loaded transcript's exchanges, or a sequence of `Exchange`s as it is."""
  if isinstance(run, Transcript):
    return run.exchanges()
  run = list(run)
  if not run or not all(isinstance(e, Exchange) for e in run):
    kinds = sorted({type(e).__name__ for e in run}) or ["nothing"]
    raise TypeError(f"run: expected a Transcript or a non-empty sequence of Exchange, got {', '.join(kinds)}")
  return run


def _truth_labels(e: Exchange) -> np.ndarray:
  labels = e.true_labels if e.true_labels is not None else e.labels
  if labels is None:
    raise ValueError(f"run: step (round {e.round}, step {e.step}, client {e.client}) carries no labels to score "
                     "against (U-shaped SL sends none): record with Recorder(truth=True)")
  return np.asarray(labels)


def _binary(labels: np.ndarray, attack: str) -> np.ndarray:
  values = np.unique(labels)
  if not np.isin(values, (0, 1)).all():
    raise ValueError(f"{attack}: labels must be binary (0/1) to score label leakage from the cut gradient; got values "
                     f"{values.tolist()[:8]}")
  return labels.astype(np.int32)


def _rows(a: np.ndarray) -> np.ndarray:
  return np.asarray(a, np.float64).reshape(a.shape[0], -1)


def _gradients(run, attack: str) -> list[tuple[np.ndarray, np.ndarray]]:
  out = []
  for e in exchanges_of(run):
    if e.grad is None:
      raise ValueError(f"{attack}: step (round {e.round}, step {e.step}, client {e.client}) has no cut gradient "
                       "recorded")
    out.append((_rows(e.grad), _binary(_truth_labels(e), attack)))
  return out


def _leakage(attack: str, scored: list[tuple[np.ndarray, np.ndarray]], accuracy: float | None = None) -> LabelLeakage:
  aucs = np.array([metrics.leak_auc(labels, scores) for scores, labels in scored])
  summary = metrics.leak_auc_summary(aucs)
  return LabelLeakage(attack, aucs, summary["auc_mean"], summary["leak_p95"],
                      np.concatenate([s for s, _ in scored]), accuracy)


# ----------------------------------------------------------------------------------------------------------------
# Label leakage


def norm_scoring(run: Transcript | Sequence[Exchange]) -> LabelLeakage:
  """Li et al.'s norm attack: each example's score is the L2 norm of its cut gradient.

  Args:
    run: the recorded steps, with the cut gradients and (for scoring) binary labels.

  Raises:
    ValueError: a step has no cut gradient or no labels, or the labels are not binary.

  Example:
    >>> import numpy as np
    >>> from sljax.privacy.transcript import Exchange
    >>> g = np.array([[3.0, 0.0], [0.1, 0.0], [0.2, 0.1], [2.5, 1.0]])
    >>> step = Exchange(0, 0, 0, smashed=np.zeros((4, 2)), labels=np.array([1, 0, 0, 1]), grad=g)
    >>> norm_scoring([step]).auc_mean
    1.0
  """
  scored = [(np.linalg.norm(g, axis=1), labels) for g, labels in _gradients(run, "norm_scoring")]
  return _leakage("norm_scoring", scored)


def _cosines(g: np.ndarray, reference: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(g, axis=1) * np.linalg.norm(reference)
  return np.where(norms > 0, g @ reference / np.where(norms > 0, norms, 1.0), 0.0)


def direction_scoring(run: Transcript | Sequence[Exchange], knowledge: DirectionKnowledge = DirectionKnowledge()
                      ) -> LabelLeakage:
  """Li et al.'s direction attack: the cosine of each example's cut gradient with a reference.

  With a known positive in a batch, the reference is its gradient. Knowing none, it is the batch's
  first example's, and the sign is chosen so that the smaller of the two groups (cosine > 0 and
  <= 0) scores high: in an imbalanced task the positives are the minority.

  Raises:
    ValueError: as `norm_scoring`; or `knowledge.known_positive` has not one entry per step.
  """
  pairs = _gradients(run, "direction_scoring")
  known = knowledge.known_positive
  if known is not None and len(known) != len(pairs):
    raise ValueError(f"knowledge.known_positive: expected one row per step ({len(pairs)}), got {len(known)}")
  scored = []
  for i, (g, labels) in enumerate(pairs):
    row = -1 if known is None else int(known[i])
    if row >= 0:
      scores = _cosines(g, g[row])
    else:
      scores = _cosines(g, g[0])
      if np.sum(scores > 0) > g.shape[0] / 2:  # example 0 is in the majority: the other side is positive
        scores = -scores
    scored.append((scores, labels))
  return _leakage("direction_scoring", scored)


def _mlp_init(key, sizes: Sequence[int]) -> list[tuple[jax.Array, jax.Array]]:
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append((jax.random.normal(k, (m, n), jnp.float32) * jnp.sqrt(2.0 / m), jnp.zeros((1, n), jnp.float32)))
  return params


def _mlp_apply(params, h):
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return h @ w + b


def _head_loss(params, data, idx):
  """Cross-entropy of the head on the rows `idx` of (features, labels)."""
  z, y = data
  return optax.softmax_cross_entropy_with_integer_labels(_mlp_apply(params, z[idx]), y[idx]).mean()


def _decoder_loss(params, data, idx):
  """Squared error of the decoder on the rows `idx` of (smashed, inputs), both flattened."""
  z, x = data
  return jnp.mean(jnp.square(_mlp_apply(params, z[idx]) - x[idx]))


@functools.partial(jax.jit, static_argnames=("sizes", "loss_fn", "learning_rate"))
def _fit_apply(key, data, batches_SxB, queries, *, sizes: tuple[int, ...], loss_fn, learning_rate: float):
  """An MLP of `sizes` initialised from `key`, trained by Adam on `loss_fn(params, data, batch)` over the
  rows of each batch of indices, then applied to `queries`: one jitted program.

  Module-level and jitted by shape, so a second attack of the same shapes compiles nothing new.
  """
  opt = optax.adam(learning_rate)
  params = _mlp_init(key, sizes)

  def body(carry, idx):
    params, state = carry
    updates, state = opt.update(jax.grad(loss_fn)(params, data, idx), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), batches_SxB)
  return _mlp_apply(params, queries)


def model_completion(run: Transcript | Sequence[Exchange], knowledge: CompletionKnowledge = CompletionKnowledge()
                     ) -> LabelLeakage:
  """Fu et al.'s model completion: a head trained on the smashed data of a few known labels labels the rest.

  The attacker holds the smashed data of the last recorded round (its own outputs, or what it
  received), knows the labels of `knowledge.known_per_class` examples per class (or of
  `knowledge.known_rows`), trains a small MLP head on them (features standardised with the mean and
  spread of all its rows, which needs no labels) and predicts the others. Scored on the examples
  whose labels it did not know: `accuracy`, and for binary labels the AUC per batch of the positive
  class's probability.

  Raises:
    ValueError: no labels to score against, or a known row out of range, or too few examples of a class.
  """
  steps = exchanges_of(run)
  last = max(e.round for e in steps)
  steps = [e for e in steps if e.round == last]
  z = np.concatenate([_rows(e.smashed) for e in steps]).astype(np.float32)
  y = np.concatenate([_truth_labels(e) for e in steps]).astype(np.int32)
  batch_of = np.concatenate([np.full(e.smashed.shape[0], i) for i, e in enumerate(steps)])
  rng = np.random.default_rng(knowledge.seed)
  if knowledge.known_rows is not None:
    known = np.asarray(knowledge.known_rows, np.int64)
    if known.size == 0 or known.min() < 0 or known.max() >= len(y):
      raise ValueError(f"knowledge.known_rows: expected indices in [0, {len(y)}), got {known.tolist()[:8]}")
  else:
    known = []
    for c in np.unique(y):
      members = np.flatnonzero(y == c)
      if len(members) <= knowledge.known_per_class:
        raise ValueError(f"knowledge.known_per_class: class {int(c)} has {len(members)} examples in the last round, "
                         f"not more than {knowledge.known_per_class}")
      known.append(rng.choice(members, knowledge.known_per_class, replace=False))
    known = np.concatenate(known)
  unknown = np.setdiff1d(np.arange(len(y)), known)
  num_classes = int(y.max()) + 1
  z = (z - z.mean(0)) / (z.std() + 1e-6)  # one scale: dead units stay at 0
  full_batch = np.broadcast_to(known.astype(np.int32), (knowledge.steps, len(known)))
  logits = _fit_apply(jax.random.key(knowledge.seed), (z, y), full_batch, z,
                      sizes=(z.shape[1], *knowledge.hidden, num_classes), loss_fn=_head_loss,
                      learning_rate=knowledge.learning_rate)
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  accuracy = float(np.mean(probs[unknown].argmax(1) == y[unknown]))
  scored = [(probs[unknown][batch_of[unknown] == i, -1], y[unknown][batch_of[unknown] == i]) for i in range(len(steps))]
  if num_classes == 2:
    return _leakage("model_completion", scored, accuracy)
  return LabelLeakage("model_completion", np.array([]), float("nan"), float("nan"), probs[unknown], accuracy)


# ----------------------------------------------------------------------------------------------------------------
# Input reconstruction


def _score(attack: str, reconstructions: np.ndarray, inputs: Any) -> Reconstruction:
  if inputs is None:
    return Reconstruction(attack, reconstructions)
  inputs = np.asarray(inputs)
  if inputs.shape != reconstructions.shape:
    raise ValueError(f"inputs: expected the shape of the reconstructions {reconstructions.shape}, got {inputs.shape}")
  found = metrics.reconstruction_metrics(inputs, reconstructions)
  return Reconstruction(attack, reconstructions, found["mse"], found["psnr"], found.get("ssim", float("nan")))


def inverse_network(smashed: Any, knowledge: InverseNetworkKnowledge, *, inputs: Any = None) -> Reconstruction:
  """He et al.'s black-box attack: a decoder smashed -> input trained on auxiliary pairs, applied to `smashed`.

  Args:
    smashed: (N, ...) the smashed data to invert (e.g. from `Transcript.exchanges()`).
    knowledge: the auxiliary pairs and the decoder's training.
    inputs: (N, ...) the true inputs, to score the reconstructions; None to skip scoring.

  Raises:
    ValueError: the auxiliary pairs do not pair up, or their smashed data differ in shape from `smashed`.

  Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).uniform(size=(256, 4)).astype(np.float32)
    >>> z = x @ np.eye(4, 6, dtype=np.float32)  # an invertible client half
    >>> k = InverseNetworkKnowledge(aux_inputs=x[:200], aux_smashed=z[:200], steps=500)
    >>> inverse_network(z[200:], k, inputs=x[200:]).mse < 0.01  # the inputs' variance: 0.083
    True
  """
  aux_x, aux_z = np.asarray(knowledge.aux_inputs, np.float32), np.asarray(knowledge.aux_smashed, np.float32)
  smashed = np.asarray(smashed, np.float32)
  if aux_x.ndim == 0 or aux_z.ndim == 0 or aux_x.shape[0] != aux_z.shape[0]:
    raise ValueError(f"knowledge.aux_inputs, knowledge.aux_smashed: expected pairs with the same leading axis, got "
                     f"shapes {aux_x.shape} and {aux_z.shape}")
  if smashed.shape[1:] != aux_z.shape[1:]:
    raise ValueError(f"smashed: expected shape (N, {', '.join(map(str, aux_z.shape[1:]))}) like "
                     f"knowledge.aux_smashed, got {smashed.shape}")
  m = aux_x.shape[0]
  batch = min(knowledge.batch_size, m)
  zs, xs = aux_z.reshape(m, -1), aux_x.reshape(m, -1)
  mean, std = zs.mean(0, keepdims=True), zs.std() + 1e-6  # one scale: dead units stay at 0
  order = np.random.default_rng(knowledge.seed).integers(0, m, (knowledge.steps, batch)).astype(np.int32)
  flat = _fit_apply(jax.random.key(knowledge.seed), ((zs - mean) / std, xs), order,
                    (smashed.reshape(smashed.shape[0], -1) - mean) / std, sizes=(zs.shape[1], *knowledge.hidden,
                                                                                 xs.shape[1]),
                    loss_fn=_decoder_loss, learning_rate=knowledge.learning_rate)
  return _score("inverse_network", np.asarray(flat).reshape(smashed.shape[0], *aux_x.shape[1:]), inputs)


def total_variation(x: jax.Array) -> jax.Array:
  """Mean absolute difference of neighbours along each example's first two axes (H and W of an image)."""
  tv = jnp.zeros((), x.dtype)
  for axis in (1, 2)[: max(0, x.ndim - 1)]:
    tv = tv + jnp.mean(jnp.abs(jnp.diff(x, axis=axis)))
  return tv


def white_box_inversion(smashed: Any, knowledge: WhiteBoxKnowledge, *, inputs: Any = None) -> Reconstruction:
  """The white-box optimisation attack: inputs whose smashed data match, under a total-variation prior.

  Minimises `mean((client_apply(x) - smashed)**2) + tv_weight * total_variation(x)` over `x` with
  Adam, clipping `x` to `bounds` after every step (He et al.'s regularised maximum likelihood). One
  jitted program per shape.

  Args:
    smashed: (N, ...) the smashed data to invert.
    knowledge: the client half and the optimisation.
    inputs: (N, ...) the true inputs, to score; None to skip scoring.

  Raises:
    ValueError: `client_apply` does not map inputs of `input_shape` to the smashed data's shape.
  """
  smashed = jnp.asarray(smashed, jnp.float32)
  shape = (smashed.shape[0], *knowledge.input_shape)
  out = jax.eval_shape(knowledge.client_apply, jax.ShapeDtypeStruct(shape, jnp.float32))
  if getattr(out, "shape", None) != smashed.shape:
    raise ValueError(f"knowledge.client_apply: maps inputs {shape} to {getattr(out, 'shape', out)}, expected the "
                     f"smashed data's shape {smashed.shape}")
  return _score("white_box_inversion", np.asarray(_inversion_program(knowledge)(smashed)), inputs)


@functools.lru_cache(maxsize=16)
def _inversion_program(knowledge: WhiteBoxKnowledge) -> Callable[[jax.Array], jax.Array]:
  """The jitted inversion for one knowledge (cached: a second attack with it compiles nothing new)."""
  low, high = knowledge.bounds if knowledge.bounds is not None else (-jnp.inf, jnp.inf)
  start = 0.5 * (low + high) if knowledge.bounds is not None else 0.0
  opt = optax.adam(knowledge.learning_rate)

  @jax.jit
  def invert(smashed):
    def objective(x):
      return jnp.mean(jnp.square(knowledge.client_apply(x) - smashed)) + knowledge.tv_weight * total_variation(x)

    def body(carry, _):
      x, state = carry
      updates, state = opt.update(jax.grad(objective)(x), state, x)
      return (jnp.clip(optax.apply_updates(x, updates), low, high), state), None

    x0 = jnp.full((smashed.shape[0], *knowledge.input_shape), start, jnp.float32)
    (x, _), _ = jax.lax.scan(body, (x0, opt.init(x0)), None, length=knowledge.steps)
    return x

  return invert


# ----------------------------------------------------------------------------------------------------------------
# Relayed weights


@dataclasses.dataclass(frozen=True)
class LabelInference:
  """A label attack that names each example's class.

  Attributes:
    attack: the attack's name.
    labels: (N,) the predicted labels.
    accuracy: the share predicted right (NaN when no true labels were given).
  """

  attack: str
  labels: np.ndarray
  accuracy: float = float("nan")


@dataclasses.dataclass(frozen=True)
class RelayedWeightsKnowledge:
  """What a server that relays the client halves of U-shaped sequential SL holds: the tail.

  Attributes:
    tail_apply: `logits = tail_apply(params, body_output)` for a batch, e.g.
      `lambda p, h: model.tail.apply(p, model_state["tail"], h, key=None, train=False)[0]`.
    tail_params: the tail's params as relayed (`ClientHalf.params["tail"]` of the hand-off before
      the steps attacked; a few local steps later they are stale, which the inversion tolerates).
  """

  tail_apply: Callable[[Any, jax.Array], jax.Array]
  tail_params: Any


def relayed_weights_labels(body_outputs: Any, tail_grads: Any, knowledge: RelayedWeightsKnowledge, *,
                           labels: Any = None) -> LabelInference:
  """The labels of U-shaped SL from the relayed tail and the tail gradient: a least-squares inversion.

  In U-shaped SL the labels stay on the client, but the server sees the tail gradient
  `g = d loss / d body output` the client sends back, and the body output it computed itself; in
  sequential SL it also relays the client half, tail included. For softmax cross-entropy,
  `g_i = J_i^T (softmax(logits_i) - onehot(y_i)) / B` with `J_i` the tail's Jacobian at example i.
  Knowing the tail, the server computes `J_i`, solves `J_i^T e_i = g_i` for `e_i` by least squares,
  and reads the label off as `argmin(e_i)`: the only negative entry of `softmax - onehot` is at the
  true class. It needs the tail's input at least as wide as the number of classes.

  Args:
    body_outputs: (N, ...) the body's outputs the server sent (decoded).
    tail_grads: (N, ...) the tail gradients the client sent back (decoded), of the same shape.
    knowledge: the tail, as relayed.
    labels: (N,) the true labels, to score; None to skip scoring.

  Raises:
    ValueError: the body outputs and the tail gradients differ in shape.

  Example:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)  # a linear tail, 3 classes
    >>> h, y = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32), np.array([0, 2, 1, 1, 0])
    >>> p = np.exp(h @ w) / np.exp(h @ w).sum(1, keepdims=True)
    >>> g = (p - np.eye(3)[y]) @ w.T / 5  # what the client sends back
    >>> k = RelayedWeightsKnowledge(tail_apply=lambda w, h: h @ w, tail_params=w)
    >>> relayed_weights_labels(h, g, k, labels=y).accuracy
    1.0
  """
  h, g = np.asarray(body_outputs, np.float32), np.asarray(tail_grads, np.float32)
  if h.shape != g.shape:
    raise ValueError(f"body_outputs, tail_grads: expected the same shape, got {h.shape} and {g.shape}")
  jacobians = np.asarray(_tail_jacobians(knowledge.tail_apply, knowledge.tail_params, h), np.float64)  # (N, C, D)
  rows = g.reshape(g.shape[0], -1).astype(np.float64)
  errors = np.stack([np.linalg.lstsq(j.T, r, rcond=None)[0] for j, r in zip(jacobians, rows)])
  predicted = errors.argmin(1).astype(np.int32)
  accuracy = float("nan") if labels is None else float(np.mean(predicted == np.asarray(labels)))
  return LabelInference("relayed_weights_labels", predicted, accuracy)


def _tail_jacobians(tail_apply, params, h) -> jax.Array:
  """Per example, d logits / d input of the tail, flattened: (N, C, D)."""

  def one(row):
    jac = jax.jacrev(lambda r: tail_apply(params, r[None])[0])(row)
    return jac.reshape(jac.shape[0], -1)

  return jax.jit(jax.vmap(one))(jnp.asarray(h))
