"""Sealed hand-offs: client halves relayed through a server that cannot read them.

In sequential (relay) SL the clients hand their half to the next client through the server, so a
curious server holds the client half, and in U-shaped SL the tail with it: with the relayed tail
and the tail gradients it recovers the labels (`sljax.privacy.attacks.relayed_weights_labels`).
Sealing the half among the clients, with a key they share out of band, leaves the server
ciphertext to relay and nothing to learn from it.

A sealed message is AES-256-GCM (`cryptography`) over the message's wire bytes
(`sljax.messages.to_bytes`), with the run, the round and the sending client bound in as
associated data: a half sealed for another run, round or sender, or changed by one bit on the
way, fails to open with `HandoffError`. The format:

    magic b"SLJXSEAL" | version u8 | round u32 | client u32 | nonce (12 random bytes) | ciphertext with its tag

The round and the sending client travel in the clear (`sender(data)` reads them: a receiver that
does not know who handed the half over last, e.g. after a dropped turn, learns it there), and
are authenticated with the rest: the associated data is the magic and version followed by the
JSON of {"client", "kind", "round", "run"}; the run and the kind are not sent, both ends know them.
The size is `sealed_size(template)`: the message's wire size and 45 bytes, whatever the values.
A random 96-bit nonce per seal keeps AES-GCM safe for far more hand-offs than a run makes (NIST
SP 800-38D's bound: 2**32 messages per key).

What it does not hide: the size of the half and when it is handed over. The server still sees the
smashed data, the gradients and (in vanilla SL) the labels of every step. Over the network
(`sljax.transport.connect(..., handoff_key=key)`, `SplitServer(..., sealed_handoffs=True)`) the
clients seal the half before `Handover put` and open it after `Handover get`; the server stores
and relays the sealed bytes (docs/privacy.md).

Example:
  >>> import numpy as np
  >>> from sljax import messages
  >>> key = new_key()
  >>> half = messages.ModelWeights(params={"w": np.ones((2, 3), np.float32)})
  >>> sealed = seal(half, key, run="demo", round=1, client=0)
  >>> opened = unseal(messages.ModelWeights(params={"w": np.zeros((2, 3), np.float32)}), sealed, key, run="demo",
  ...                 round=1, client=0)
  >>> float(opened.params["w"].sum())
  6.0
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, TypeVar

from sljax import messages as msgs

MAGIC = b"SLJXSEAL"
VERSION = 2
NONCE_BYTES = 12
TAG_BYTES = 16
_HEAD = struct.Struct("<8sB")
_SENDER = struct.Struct("<II")  # round, client
M = TypeVar("M")


class HandoffError(ValueError):
  """A sealed hand-off that cannot be opened: not sealed, another version, the wrong key or context, or changed."""


def new_key() -> bytes:
  """A fresh 256-bit key for the clients to share out of band (never through the server)."""
  from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415 -- optional dependency

  return AESGCM.generate_key(bit_length=256)


def read_key(path: str | os.PathLike) -> bytes:
  """A hand-off key from a file: 64 hex digits (e.g. written as `new_key().hex()`), or its 32 raw bytes.

  Raises:
    ValueError: naming the path, if the file holds neither.
  """
  with open(path, "rb") as f:
    data = f.read(1024)
  if len(data) == 32:
    return data
  try:
    key = bytes.fromhex(data.decode("ascii").strip())
  except (UnicodeDecodeError, ValueError):
    key = b""
  if len(key) != 32:
    raise ValueError(f"{os.fspath(path)}: expected a hand-off key, 64 hex digits or 32 bytes "
                     f"(e.g. new_key().hex()), got {len(data)} bytes of something else")
  return key


def _context(kind: str, run: str, round_: int, client: int) -> bytes:
  for name, value in (("round", round_), ("client", client)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
  if not isinstance(run, str):
    raise ValueError(f"run: expected a str naming the run, got {type(run).__name__}")
  meta = {"client": client, "kind": kind, "round": round_, "run": run}
  return _HEAD.pack(MAGIC, VERSION) + json.dumps(meta, sort_keys=True).encode()


def _aead(key: bytes):
  from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415 -- optional dependency

  if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
    got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
    raise ValueError(f"key: expected 32 bytes (AES-256, e.g. new_key()), got {got}")
  return AESGCM(bytes(key))


def seal(message: Any, key: bytes, *, run: str, round: int, client: int) -> bytes:  # noqa: A002
  """The message's wire bytes encrypted and authenticated for the clients that hold `key`.

  Args:
    message: a message of `sljax.messages` (e.g. `ClientHalf`, `ModelWeights`).
    key: the clients' shared 32-byte key.
    run: the run's name, round: the round of the hand-off, client: the sending client; bound to
      the ciphertext (the receiver passes the same to `unseal`).

  Returns:
    The sealed bytes, for the server to relay.

  Raises:
    ValueError: a bad key, round or client.
  """
  aead = _aead(key)
  context = _context(type(message).__name__, run, round, client)
  nonce = os.urandom(NONCE_BYTES)
  return (_HEAD.pack(MAGIC, VERSION) + _SENDER.pack(round, client) + nonce
          + aead.encrypt(nonce, msgs.to_bytes(message), context))


def sealed_size(template: Any) -> int:
  """The exact size of `seal(message, ...)` for a message shaped like `template` (arrays or shape structs).

  Example:
    >>> import jax, numpy as np
    >>> from sljax import messages
    >>> half = messages.ModelWeights(params={"w": jax.ShapeDtypeStruct((2, 3), np.float32)})
    >>> sealed_size(half) - messages.wire_size(half)
    45
  """
  return _HEAD.size + _SENDER.size + NONCE_BYTES + msgs.wire_size(template) + TAG_BYTES


def sender(data: bytes) -> tuple[int, int]:
  """The (round, client) a sealed hand-off says it was sealed for, read from its clear header.

  Not yet authenticated: `unseal` with that round and client checks it (a changed header does not open).

  Raises:
    HandoffError: the data are not a sealed hand-off of this version.
  """
  _check_head(data)
  return _SENDER.unpack_from(data, _HEAD.size)


def _check_head(data: bytes) -> None:
  if len(data) < _HEAD.size + _SENDER.size + NONCE_BYTES + TAG_BYTES or data[:len(MAGIC)] != MAGIC:
    raise HandoffError(f"data: not a sealed hand-off (expected it to start with {MAGIC!r}, {len(data)} bytes)")
  version = data[len(MAGIC)]
  if version != VERSION:
    raise HandoffError(f"data: sealed hand-off version {version} is not supported; expected {VERSION}")


def unseal(template: M, data: bytes, key: bytes, *, run: str, round: int, client: int,  # noqa: A002
           max_bytes: int | None = None) -> M:
  """Opens a sealed hand-off and restores the message, checked against `template` (`messages.from_bytes`).

  Args:
    template: a message of the expected kind, shapes and dtypes.
    data: the sealed bytes as relayed.
    key: the clients' shared key.
    run, round, client: the run, the round and the sending client the half was sealed for.
    max_bytes: reject larger sealed data before decrypting.

  Raises:
    HandoffError: the data are not a sealed hand-off of this version, or they were changed, or
      sealed with another key or for another run, round, sender or kind of message.
    sljax.messages.MessageError: the opened message is not what `template` expects.
  """
  aead = _aead(key)
  if max_bytes is not None and len(data) > max_bytes:
    raise HandoffError(f"data: sealed hand-off of {len(data)} bytes exceeds the maximum of {max_bytes} bytes")
  _check_head(data)
  from cryptography.exceptions import InvalidTag  # noqa: PLC0415 -- optional dependency

  start = _HEAD.size + _SENDER.size
  nonce, body = data[start:start + NONCE_BYTES], data[start + NONCE_BYTES:]
  kind = type(template).__name__
  context = _context(kind, run, round, client)
  try:
    if sender(data) != (round, client):  # the clear header names another hand-off
      raise InvalidTag
    plain = aead.decrypt(nonce, body, context)
  except InvalidTag:
    raise HandoffError(f"data: the sealed {kind} does not open for run {run!r}, round {round}, client {client}: "
                       "changed on the way, or sealed with another key or for another run, round, sender or kind"
                       ) from None
  return msgs.from_bytes(template, plain)
