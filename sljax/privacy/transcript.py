"""Transcripts: every message of a run, as the bytes that crossed the cut, in one checked file.

A transcript lets anyone ask after the fact what a party could have learned from a run: the attacks
of `sljax.privacy.attacks` read it back. The file:

    header  magic b"SLJXTRN\\0" | version u16 | 0 u16 | meta length u32 | meta (JSON) | CRC32 of meta u32
    record  payload length u32 | CRC32 u32 | direction u8 | round u32 | step u32 | client u32 | payload
    ...
    end     a record of direction "end" whose payload is {"records": <count>} (JSON)

All integers little-endian. A record's CRC32 covers its direction, round, step, client and payload.
The payload of an "up" or "down" record is the message exactly as sent (`sljax.messages.to_bytes`:
msgpack, never pickle). Two more directions never cross the network: "note" records hold JSON (the
run's configuration, metrics per epoch, the epsilon spent) and "truth" records the batch that was
trained on (msgpack {"x", "labels"}), written only when asked for, so that reconstruction attacks
can be scored. A transcript with truth records holds the raw data: keep it where the data may be.

Reading checks everything: a bad magic or version, a CRC mismatch, a record cut short, or a file
that stops without its end record (a recorder that was never closed, a copy cut at a record
boundary) raises `TranscriptError` naming the byte offset of the first bad record. Records before
it are good; `read` yields them first, `load` returns nothing.

Writing is off the hot path: `Recorder.record` puts the message on a bounded queue and a background
thread serializes, checksums and writes it (a full queue blocks the caller; nothing is dropped).
Recording is off unless asked for: `sljax.fit(..., transcript=path)` records a single-pair run
(`recording_step` returns the messages from the same jitted epoch), `sljax.simulation.run(...,
transcript=path)` a multi-client run of any split-learning algorithm (its round returns its messages
with `record=True`; `RoundRecording` writes them as the network server records the same run);
without it nothing changes.

Example:
  >>> import os, tempfile, sljax
  >>> path = os.path.join(tempfile.mkdtemp(), "run.sljt")
  >>> with Recorder(path, meta={"run": "demo"}) as rec:
  ...   rec.record("up", 0, 0, 0, b"payload")
  >>> [(r.direction, r.payload) for r in read(path)]
  [('up', b'payload')]
"""

from __future__ import annotations

import functools
import json
import os
import queue
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization

from sljax import codecs as codec_lib
from sljax import messages as msgs
from sljax import protocol
from sljax.privacy import handoff

MAGIC = b"SLJXTRN\x00"
VERSION = 1
DIRECTIONS = ("up", "down", "truth", "note")
_END = 255
_HEADER = struct.Struct("<8sHHI")  # magic, version, reserved, meta length
_CRC = struct.Struct("<I")
_RECORD = struct.Struct("<IIBIII")  # payload length, crc32, direction, round, step, client
_U32 = 2**32 - 1


class TranscriptError(ValueError):
  """A transcript that cannot be read whole: bad header, corrupted or truncated record, no end record."""


class Record(NamedTuple):
  """One record: who sent what, when. `offset` is the record's byte offset in the file."""

  direction: str
  round: int
  step: int
  client: int
  payload: bytes
  offset: int = -1


def _check_u32(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _U32:
    raise ValueError(f"{name}: expected an int in [0, 2**32 - 1], got {value!r}")
  return int(value)


def _record_bytes(code: int, round_: int, step: int, client: int, payload: bytes) -> bytes:
  head = struct.pack("<BIII", code, round_, step, client)
  crc = zlib.crc32(payload, zlib.crc32(head))
  return struct.pack("<II", len(payload), crc) + head + payload


def _payload(item: Any) -> bytes:
  """A record's payload: bytes as they are, a message as its wire bytes, a dict as JSON (notes)."""
  if isinstance(item, (bytes, bytearray, memoryview)):
    return bytes(item)
  if isinstance(item, Mapping):
    return json.dumps(item, sort_keys=True, default=_json_default).encode()
  return msgs.to_bytes(item)


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.generic, jax.Array)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  raise TypeError(f"note: a value of type {type(value).__name__} is not JSON")


class _Truth(NamedTuple):
  x: Any
  labels: Any


class Recorder:
  """Writes a transcript off the hot path: a bounded queue and one writer thread.

  `record(direction, round, step, client, payload)` returns once the record is queued; the writer
  thread turns messages into their wire bytes, checksums and appends them. When the queue is full,
  `record` waits (recording never drops a message). `close()` (or leaving the `with` block) drains
  the queue, writes the end record and closes the file; an error in the writer thread is raised by
  the next `record` or by `close`.

  Args:
    path: the file to create; an existing file is refused unless `overwrite`.
    meta: JSON-able dict written in the header (e.g. {"run": "digits-cut1"}).
    queue_size: records that may wait for the writer.
    overwrite: replace an existing file.
    truth: ask the drivers that record into this recorder (`sljax.fit`, `sljax.simulation.run`) to
      record each trained batch too ("truth" records), so that reconstruction attacks can be scored.
      The transcript then holds the raw data.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.sljt")
    >>> with Recorder(path) as rec:
    ...   rec.record("up", 0, 0, 0, b"\\x01\\x02")
    ...   rec.note({"epsilon": 1.5})
    >>> load(path).notes
    {'epsilon': 1.5}
  """

  def __init__(self, path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None, queue_size: int = 256,
               overwrite: bool = False, truth: bool = False):
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
      raise ValueError(f"queue_size: expected a positive int, got {queue_size!r}")
    if meta is not None and not isinstance(meta, Mapping):
      raise TypeError(f"meta: expected a dict or None, got {type(meta).__name__}")
    meta_bytes = json.dumps(dict(meta or {}), sort_keys=True, default=_json_default).encode()
    self.path = os.fspath(path)
    self.truth = bool(truth)
    self._file = open(self.path, "wb" if overwrite else "xb")  # noqa: SIM115 -- closed by close()
    self._file.write(_HEADER.pack(MAGIC, VERSION, 0, len(meta_bytes)) + meta_bytes + _CRC.pack(zlib.crc32(meta_bytes)))
    self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
    self._count = 0
    self._error: BaseException | None = None
    self._closed = False
    self._thread = threading.Thread(target=self._write_loop, name="sljax-transcript", daemon=True)
    self._thread.start()

  def record(self, direction: str, round: int, step: int, client: int, payload: Any) -> None:  # noqa: A002
    """Queues one message: `payload` is its wire bytes, or a message (serialized by the writer).

    Args:
      direction: "up" (client to server) or "down" (server to client); "truth" and "note" are
        local records (see the module docstring).
      round, step, client: where the message belongs, ints in [0, 2**32 - 1].
      payload: bytes as sent, or a message of `sljax.messages` (its `to_bytes` is what is stored),
        or a function of no arguments returning either, called by the writer thread (so that
        slicing a message out of a batch of them costs the caller nothing).
    """
    if direction not in ("up", "down"):
      raise ValueError(f"direction: expected 'up' or 'down' (notes: `note`, batches: `record_truth`), got "
                       f"{direction!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)) and not callable(payload) and (
        type(payload).__name__ not in msgs.MESSAGE_TYPES):
      raise TypeError(f"payload: expected bytes, a message of sljax.messages or a function returning one, got "
                      f"{type(payload).__name__}")
    self._put(direction, round, step, client, payload)

  def note(self, note: Mapping[str, Any], *, round: int = 0, step: int = 0, client: int = 0) -> None:  # noqa: A002
    """Queues a JSON note (configuration, metrics, the epsilon spent); later notes override earlier keys."""
    if not isinstance(note, Mapping):
      raise TypeError(f"note: expected a dict, got {type(note).__name__}")
    json.dumps(dict(note), default=_json_default)  # refuse what the writer could not write, here
    self._put("note", round, step, client, dict(note))

  def record_truth(self, round: int, step: int, client: int, x: Any, labels: Any = None) -> None:  # noqa: A002
    """Queues the batch a step trained on (never sent; for scoring attacks only)."""
    self._put("truth", round, step, client, _Truth(x, labels))

  def _put(self, direction: str, round_: int, step: int, client: int, payload: Any) -> None:
    key = (_check_u32("round", round_), _check_u32("step", step), _check_u32("client", client))
    if self._closed:
      raise ValueError(f"Recorder({self.path!r}): record after close")
    self._raise_writer_error()
    self._queue.put((DIRECTIONS.index(direction), *key, payload))

  def _raise_writer_error(self) -> None:
    if self._error is not None:
      raise TranscriptError(f"{self.path}: the transcript writer failed: {self._error!r}") from self._error

  def _write_loop(self) -> None:
    while True:
      item = self._queue.get()
      if item is None:
        return
      if self._error is not None:
        continue  # drain, so that a blocked `record` returns and raises
      try:
        code, round_, step, client, payload = item
        if callable(payload):
          payload = payload()
        if isinstance(payload, _Truth):
          payload = serialization.msgpack_serialize({"x": np.asarray(payload.x), "labels": None if payload.labels
                                                     is None else np.asarray(payload.labels)})
        payload = _payload(payload)
        if len(payload) > _U32:
          raise ValueError(f"payload: {len(payload)} bytes exceed the record limit of {_U32} bytes")
        self._file.write(_record_bytes(code, round_, step, client, payload))
        self._count += 1
      except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
        self._error = e

  def close(self) -> None:
    """Drains the queue, writes the end record and closes the file (idempotent)."""
    if self._closed:
      return
    self._closed = True
    self._queue.put(None)
    self._thread.join()
    try:
      if self._error is None:
        self._file.write(_record_bytes(_END, 0, 0, 0, json.dumps({"records": self._count}).encode()))
    finally:
      self._file.close()
    self._raise_writer_error()

  def __enter__(self) -> Recorder:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_header(f, path: str = "transcript") -> dict[str, Any]:
  """Reads and checks the header of an open transcript; returns its meta."""
  head = f.read(_HEADER.size)
  if len(head) < _HEADER.size:
    raise TranscriptError(f"{path}: truncated header at byte offset 0: {len(head)} of {_HEADER.size} bytes")
  magic, version, _, meta_len = _HEADER.unpack(head)
  if magic != MAGIC:
    raise TranscriptError(f"{path}: not an sljax transcript at byte offset 0: magic {magic!r}, expected {MAGIC!r}")
  if version != VERSION:
    raise TranscriptError(f"{path}: transcript version {version} is not supported; expected {VERSION}")
  meta = f.read(meta_len)
  crc = f.read(_CRC.size)
  if len(meta) < meta_len or len(crc) < _CRC.size:
    raise TranscriptError(f"{path}: truncated header at byte offset {_HEADER.size}")
  if _CRC.unpack(crc)[0] != zlib.crc32(meta):
    raise TranscriptError(f"{path}: corrupted header at byte offset {_HEADER.size}: CRC32 mismatch")
  return json.loads(meta)


def read(path: str | os.PathLike) -> Iterator[Record]:
  """Yields the records of a transcript in order, checking each; the end record is not yielded.

  Raises:
    TranscriptError: at the first bad record, with its byte offset: a CRC32 mismatch (corrupted),
      a record cut short (truncated), an unknown direction, or the file ending without its end
      record. The records before it have been yielded.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    read_header(f, path)
    count = 0
    while True:
      offset = f.tell()
      head = f.read(_RECORD.size)
      if not head:
        raise TranscriptError(f"{path}: no end record at byte offset {offset}: the transcript was cut at a record "
                              "boundary or its recorder was never closed")
      if len(head) < _RECORD.size:
        raise TranscriptError(f"{path}: truncated record at byte offset {offset}: {len(head)} of {_RECORD.size} "
                              "header bytes")
      length, crc, code, round_, step, client = _RECORD.unpack(head)
      payload = f.read(length)
      if len(payload) < length:
        raise TranscriptError(f"{path}: truncated record at byte offset {offset}: {len(payload)} of {length} "
                              "payload bytes")
      if zlib.crc32(payload, zlib.crc32(head[8:])) != crc:
        raise TranscriptError(f"{path}: corrupted record at byte offset {offset}: CRC32 mismatch")
      if code == _END:
        if f.read(1):
          raise TranscriptError(f"{path}: data after the end record at byte offset {f.tell() - 1}")
        expected = json.loads(payload)["records"]
        if expected != count:
          raise TranscriptError(f"{path}: corrupted end record at byte offset {offset}: it counts {expected} "
                                f"records, the file holds {count}")
        return
      if code >= len(DIRECTIONS):
        raise TranscriptError(f"{path}: corrupted record at byte offset {offset}: unknown direction {code}")
      count += 1
      yield Record(DIRECTIONS[code], round_, step, client, payload, offset)


def decode(payload: bytes) -> tuple[str, dict[str, Any]]:
  """A message's wire bytes as (kind, body): the body's fields as numpy arrays (or None), no template needed.

  A field sent through a codec holds the codec's payload as a nested dict; `Transcript.exchanges`
  decodes those given the codec.

  Raises:
    TranscriptError: the bytes are not an sljax message of a known kind and protocol version.
  """
  try:
    envelope = serialization.msgpack_restore(payload)
  except Exception as e:  # noqa: BLE001 -- msgpack raises several kinds
    raise TranscriptError(f"payload: not a msgpack message ({len(payload)} bytes): {e}") from None
  if not isinstance(envelope, dict) or set(envelope) != {"sljax", "kind", "body"}:
    raise TranscriptError("payload: expected an sljax message, a map with keys sljax, kind, body")
  if envelope["sljax"] != msgs.PROTOCOL_VERSION or envelope["kind"] not in msgs.MESSAGE_TYPES:
    raise TranscriptError(f"payload: protocol version {envelope['sljax']!r}, kind {envelope['kind']!r} is not "
                          f"supported; expected version {msgs.PROTOCOL_VERSION} and one of "
                          f"{sorted(msgs.MESSAGE_TYPES)}")
  return envelope["kind"], envelope["body"]


class Exchange(NamedTuple):
  """One step's traffic at the first cut, decoded: what the server saw and what the client got back.

  `smashed` (B, ...) the activations sent up; `labels` (B,) the labels sent up with them (vanilla
  SL; None in U-shaped SL); `grad` (B, ...) the cut gradient sent down (None if not recorded).
  `inputs`, `true_labels`: the batch itself, from a truth record (None without one): never on the
  wire, only for scoring attacks.
  """

  round: int
  step: int
  client: int
  smashed: np.ndarray
  labels: np.ndarray | None
  grad: np.ndarray | None
  inputs: np.ndarray | None = None
  true_labels: np.ndarray | None = None


class Transcript(NamedTuple):
  """A whole transcript, read and checked by `load`."""

  path: str
  meta: dict[str, Any]
  records: tuple[Record, ...]

  @property
  def notes(self) -> dict[str, Any]:
    """The note records merged in order (a later note's keys override an earlier one's)."""
    merged: dict[str, Any] = {}
    for r in self.records:
      if r.direction == "note":
        merged.update(json.loads(r.payload))
    return merged

  def exchanges(self, *, uplink: codec_lib.Codec | None = None, downlink: codec_lib.Codec | None = None,
                cut: jax.ShapeDtypeStruct | None = None) -> list[Exchange]:
    """The steps of the run in order: each step's first uplink SmashedData and first downlink CutGradient.

    Args:
      uplink, downlink: the codecs the messages were sent through, needed to decode their payloads
        (the receiving party knows them); None for messages sent as they are.
      cut: the shape and dtype of one batch of smashed data, to rebuild a codec's payload; by default
        from the "cut" note `sljax.fit` writes.

    Raises:
      TranscriptError: a field holds a codec payload and no codec was given.
    """
    if cut is None and "cut" in self.notes:
      cut = jax.ShapeDtypeStruct(tuple(self.notes["cut"]["shape"]), np.dtype(self.notes["cut"]["dtype"]))
    steps: dict[tuple[int, int, int], dict[str, Any]] = {}
    for r in self.records:
      if r.direction == "note":
        continue
      entry = steps.setdefault((r.round, r.step, r.client), {})
      if r.direction == "truth":
        truth = serialization.msgpack_restore(r.payload)
        entry["inputs"], entry["true_labels"] = truth["x"], truth["labels"]
        continue
      if r.payload[:len(handoff.MAGIC)] == handoff.MAGIC:  # a sealed hand-off: ciphertext, nothing to decode
        continue
      kind, body = decode(r.payload)
      if r.direction == "up" and kind == "SmashedData" and "smashed" not in entry:
        entry["smashed"] = _field(body["activations"], uplink, cut, "SmashedData.activations", "uplink")
        entry["labels"] = body.get("labels")
      elif r.direction == "down" and kind == "CutGradient" and "grad" not in entry:
        entry["grad"] = _field(body["grad"], downlink, cut, "CutGradient.grad", "downlink")
    return [Exchange(*key, e["smashed"], e.get("labels"), e.get("grad"), e.get("inputs"), e.get("true_labels"))
            for key, e in steps.items() if "smashed" in e]


def _field(value: Any, codec: codec_lib.Codec | None, cut: Any, name: str, argument: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value if codec is None else np.asarray(codec.decode(value))
  if codec is None or cut is None:
    raise TranscriptError(f"{name}: the message holds a codec's payload; pass {argument}=<the codec> (and cut= "
                          "the smashed data's shape and dtype, unless the transcript has a 'cut' note)")
  template = jax.eval_shape(lambda t: codec.encode(t, codec.init(t), jax.random.key(0))[0], cut)
  return np.asarray(codec.decode(serialization.from_state_dict(template, value)))


def load(path: str | os.PathLike) -> Transcript:
  """Reads a whole transcript, checked; raises `TranscriptError` (with the offset) before returning anything."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    meta = read_header(f, path)
  return Transcript(path, meta, tuple(read(path)))


# ----------------------------------------------------------------------------------------------------------------
# Recording a single-pair run: the protocol's legs, composed as its fused `step`, with the messages returned.


def recording_step(trainer: Any, *, truth: bool = False) -> tuple[Any, tuple[str, ...]]:
  """`trainer.step` that also returns the messages it exchanged, and their directions.

  The step composes the trainer's legs exactly as its fused `step` does (same keys, same order), so
  a recorded run trains exactly like an unrecorded one (a test holds them bitwise equal). It returns
  `(state, (metrics, messages, batch))`, `batch` the step's (x, labels) when `truth`, else ().

  Args:
    trainer: a `vanilla` or `u_shaped` protocol.
    truth: also return the batch.

  Returns:
    (step, directions): directions[i] is "up" or "down" for messages[i].

  Raises:
    TypeError: the trainer sends no messages (e.g. `centralized`).
  """
  # The legs, not the trainer, are captured: `fit` caches this program under `trainer.step`, held
  # weakly, so nothing here may hold the trainer (see `training.reuse_program`).
  if isinstance(trainer, protocol.Vanilla):
    client_forward, server_step, client_backward = trainer.client_forward, trainer.server_step, trainer.client_backward

    def step(state, batch, key):
      x, labels = batch
      k_client, k_server = jax.random.split(key, 2)
      up, pending = client_forward(state.client, x, labels, k_client)
      server, down, metrics = server_step(state.server, up, k_server)
      client = client_backward(state.client, pending, down)
      metrics = protocol.Metrics({**metrics, **pending.metrics},
                                 {"bytes_up": msgs.wire_size(up), "bytes_down": msgs.wire_size(down)})
      return protocol.SplitState(client, server, state.step + 1), (metrics, (up, down), batch if truth else ())

    return step, ("up", "down")
  if isinstance(trainer, protocol.UShaped):
    legs = (trainer.client_forward, trainer.server_forward, trainer.client_tail_step, trainer.server_backward,
            trainer.client_backward)

    def u_step(state, batch, key):
      head_forward, body_forward, tail_step, body_backward, head_backward = legs
      x, labels = batch
      k_head, k_body, k_tail = jax.random.split(key, 3)
      up1, head_pending = head_forward(state.client, x, k_head)
      down1, server_pending = body_forward(state.server, up1, k_body)
      up2, tail_pending, metrics = tail_step(state.client, head_pending, down1, labels, k_tail)
      server, down2 = body_backward(state.server, server_pending, up2)
      client = head_backward(state.client, tail_pending, down2)
      metrics = protocol.Metrics(metrics, {"bytes_up": msgs.wire_size(up1) + msgs.wire_size(up2),
                                           "bytes_down": msgs.wire_size(down1) + msgs.wire_size(down2)})
      messages = (up1, down1, up2, down2)
      return protocol.SplitState(client, server, state.step + 1), (metrics, messages, batch if truth else ())

    return u_step, ("up", "down", "up", "down")
  raise TypeError(f"trainer: expected a vanilla or u_shaped protocol to record (one that sends messages), got "
                  f"{type(trainer).__name__}")


def _row(stacked: Any, i: int | tuple[int, ...]) -> Any:
  """Message `i` of a message whose arrays are stacked along a leading step axis (a tuple: along
  the leading axes, e.g. (step, client))."""
  return jax.tree.map(lambda a: a[i], stacked)


def _describe_hook(fn: Any) -> str | None:
  if fn is None:
    return None
  name = getattr(fn, "description", None) or getattr(fn, "__qualname__", None) or type(fn).__name__
  return name.split(".<locals>")[0]  # a factory's closure by its factory's name: "max_norm"


class FitRecording:
  """What `sljax.fit(..., transcript=...)` does to record: its epoch program and the writing of each epoch.

  Not public API: `fit` builds it. The epoch is `training.make_epoch` of `recording_step`, one jitted
  program as without recording, kept like `fit`'s own (`training.reuse_program`: a second recorded
  `fit` of the same trainer compiles nothing); after each epoch the stacked messages come to the
  host in one transfer and go to the recorder's queue step by step.
  """

  def __init__(self, trainer: Any, transcript: str | os.PathLike | Recorder, *, batch_size: int, state: Any):
    from sljax import training  # noqa: PLC0415 -- training imports this module lazily

    if not isinstance(transcript, (Recorder, str, os.PathLike)):
      raise TypeError(f"transcript: expected a path, a Recorder or None, got {type(transcript).__name__}")
    step, self.directions = recording_step(trainer, truth=isinstance(transcript, Recorder) and transcript.truth)
    self.owned = not isinstance(transcript, Recorder)
    self.recorder = Recorder(transcript) if self.owned else transcript
    truth = isinstance(transcript, Recorder) and transcript.truth
    self.epoch = training.reuse_program(trainer.step, ("recording epoch", batch_size, truth),
                                        lambda _: training.make_epoch(step, batch_size=batch_size))
    spec = state.server.input_spec
    self.recorder.note({
        "protocol": "u_shaped" if isinstance(trainer, protocol.UShaped) else "vanilla",
        "uplink": codec_lib.describe(trainer.uplink) if trainer.uplink.config else None,
        "downlink": codec_lib.describe(trainer.downlink) if trainer.downlink.config else None,
        "client_loss": _describe_hook(trainer.client_loss),
        "cut_gradient_transform": _describe_hook(getattr(trainer, "cut_gradient_transform", None)),
        "cut": {"shape": [batch_size, *spec.shape], "dtype": spec.dtype},
    })

  def write(self, epoch: int, outputs: Any) -> Any:
    """Queues an epoch's messages (round = epoch, step = step in the epoch, client 0); returns its metrics."""
    metrics, messages, batches = jax.device_get(outputs)
    steps = len(metrics["loss"])
    for s in range(steps):
      if batches:
        self.recorder.record_truth(epoch, s, 0, batches[0][s], batches[1][s])
      for direction, message in zip(self.directions, messages):
        self.recorder.record(direction, epoch, s, 0, functools.partial(_row, message, s))
    return metrics

  def finish(self, history: list[dict[str, Any]]) -> None:
    if history:
      self.recorder.note({"epochs": len(history), "train_loss": history[-1]["loss"],
                          "train_accuracy": history[-1]["accuracy"]})
    if self.owned:
      self.recorder.close()


class RoundRecording:
  """`simulation.run(..., transcript=)`: writes the messages the round returns with `record=True`.

  The records are those the network server records for the same run (`sljax.transport`): each
  message of a round that its `RoundMessages` says was sent, under its round, step and client id;
  and what a client fetches outside any round: before the first round, each client's initial half
  (`start`), except in a relay (sequential SL), where the half comes with each turn; after the last
  round of a relay, the final half, to every client (`finish`). A `Recorder(..., truth=True)` also
  gets each step's batch of each client that took the step ("truth" records, first in the step).
  """

  def __init__(self, algorithm: Any, transcript: str | os.PathLike | Recorder):
    import inspect  # noqa: PLC0415

    if algorithm.name in _NO_RECORDING:
      raise ValueError(f"transcript: {algorithm.name} {_NO_RECORDING[algorithm.name]}")
    if "record" not in inspect.signature(algorithm.round).parameters:
      raise ValueError(f"transcript: the round of {algorithm.name} does not return its messages (record=True); "
                       "record it over the network (a server's recorder=) instead")
    self.algorithm = algorithm
    self.owned = not isinstance(transcript, Recorder)
    self.recorder = Recorder(transcript, meta={"algorithm": algorithm.name}) if self.owned else transcript
    self.ran = False

  def start(self, state: Any, data: Any) -> None:
    """Before the first round of a run: at round 0, each client's initial half (a `ClientHalf`
    down, as the network server deals them), unless the halves are relayed with each turn."""
    from sljax.algorithms import _common  # noqa: PLC0415 -- the algorithms import this package lazily

    self.ids = np.asarray(data.client_ids())
    self.batches = None
    if self.recorder.truth:  # a round's batches (S, K, B, ...), read as the round reads them (its round and key)
      steps, batch_size = self.algorithm.local_steps, self.algorithm.config.batch_size
      self.batches = jax.jit(lambda state: jax.vmap(lambda s: _common.batches(
          state, data, s, local_steps=steps, batch_size=batch_size))(np.arange(steps)))
    if int(state.round) == 0 and self.algorithm.client_axes.clients:
      state = state.replace(clients=jax.device_get(state.clients))  # one transfer, then host slices
      for k, client in enumerate(self.ids):
        half = _common.half_message(_common.client_party(self.algorithm, state, k))
        self.recorder.record("down", 0, 0, int(client), half)

  def write(self, round_: int, state: Any, metrics: Any, sent: Any) -> tuple[Any, Any]:
    """Queues a round's messages, sorted by (round, step, client) and, within those, in the order
    of `sent`; returns `(state, metrics)`."""
    self.ran = True
    streams, ids = jax.device_get((sent.sent, sent.ids))
    records, took = [], set()  # took: (step, position) of each client in each step it took part in
    for i, stream in enumerate(streams):
      at = round_ + int(stream.next_round)
      positions = np.arange(len(ids)) if stream.clients is None else np.asarray(stream.clients)
      mask = np.asarray(stream.mask)
      if stream.step is None:  # (S, K): one per step and client
        for s, k in zip(*np.nonzero(mask)):
          took.add((int(s), int(positions[k])))
          records.append((at, int(s), int(ids[positions[k]]), i, stream.direction, functools.partial(
              _row, stream.messages, (s, k))))
      else:
        for (k,) in zip(*np.nonzero(mask)):
          records.append((at, stream.step, int(ids[positions[k]]), i, stream.direction, functools.partial(
              _row, stream.messages, (k,))))
    if self.batches is not None:  # the batch of each step each client took part in, first in the step
      xs, ys = jax.device_get(self.batches(state.replace(clients=(), server=(), round=np.int32(round_))))
      records += [(round_, s, int(ids[k]), -1, "truth", (xs[s, k], ys[s, k])) for s, k in took]
    records.sort(key=lambda r: r[:4])
    for round_at, step, client, _, direction, message in records:
      if direction == "truth":
        self.recorder.record_truth(round_at, step, client, *message)
      else:
        self.recorder.record(direction, round_at, step, client, message)
    return state, metrics

  def finish(self, state: Any = None, *, last: bool = False) -> None:
    """After the run: if it ran its last round (`last`), the final client half of a relay to every
    client, as the network server answers their last fetch; then closes a recorder it opened."""
    try:
      if last and self.ran and not self.algorithm.client_axes.clients:
        from sljax.algorithms import _common  # noqa: PLC0415

        half = _common.half_message(jax.device_get(state.clients))
        for client in self.ids:
          self.recorder.record("down", int(state.round), 0, int(client), half)
    finally:
      if self.owned:
        self.recorder.close()


# Algorithms whose simulated round records nothing, and why.
_NO_RECORDING = {
    "fedavg": "sends no split-learning messages, only whole models, and does not run over the network (no "
              "coordinator in sljax.transport), whose server records what a transcript holds; record a split "
              "algorithm (e.g. splitfed_v1, whose weights are recorded with its messages)",
    "centralized": "sends no messages: the whole model trains in one place",
}
