"""The setup shared by `sljax serve` and `sljax client`: the demo models on digits, and token files."""

from __future__ import annotations

import os
from typing import NamedTuple

import optax

from sljax import data, models, protocol, split
from sljax.protocol import Vanilla


class DigitsSetup(NamedTuple):
  """A demo model, its vanilla legs and the digits dataset, built the same way on every party."""

  model: split.SplitModel
  sl: Vanilla
  dataset: data.Dataset


def digits_setup(*, model: str = "mlp", hidden: tuple[int, ...] = (128, 128), dropout: float = 0.0,
                 lr: float = 2e-3, seed: int = 0) -> DigitsSetup:
  """The demo: `cut(mlp(hidden), 1)` on flat digits, or `cut(cnn(), 2)` on 8x8 digit images.

  Both halves train with Adam(`lr`); `dropout` applies after every hidden block (so the step keys
  matter). `seed` picks the train/test split of the dataset.
  """
  if model == "mlp":
    layers = models.mlp(hidden=hidden, dropout=dropout)
    dataset, cut_model = data.load_digits(seed=seed, image=False), split.cut(layers, 1)
  elif model == "cnn":
    dataset, cut_model = data.load_digits(seed=seed, image=True), split.cut(models.cnn(dropout=dropout), 2)
  else:
    raise ValueError(f"model: expected 'mlp' or 'cnn', got {model!r}")
  opt = optax.adam(lr)
  return DigitsSetup(cut_model, protocol.vanilla(cut_model, client_optimizer=opt, server_optimizer=opt), dataset)


def read_tokens(path: str | os.PathLike) -> dict[int, str]:
  """Client id -> bearer token, from a file of lines `<client id> <token>` (`#` starts a comment).

  The server reads every line; a client needs only its own.
  """
  tokens: dict[int, str] = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      fields = line.split()
      if len(fields) != 2 or not fields[0].isdigit():
        raise ValueError(f"{path}:{number}: expected '<client id> <token>', got {line!r}")
      client, token = int(fields[0]), fields[1]
      if client in tokens or token in tokens.values():
        raise ValueError(f"{path}:{number}: client {client} or its token appears twice")
      tokens[client] = token
  if not tokens:
    raise ValueError(f"{path}: no tokens")
  return tokens
