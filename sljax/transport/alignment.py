"""Private alignment between processes: the PSI of `sljax.align` over the `sljax.Split` service.

The label party leads (`sljax.align`'s leader role): its server holds an `Aligner`, built from its
sample IDs, and answers the `Align` method; every other party is a member and calls it through its
transport with `align(transport, ids, client=...)`, which plays the member's role. The messages
are `sljax.align`'s, carried as the bin fields of `Align` calls (docs/protocol.md, "Align"), and
no ID, shared or not, is ever one of them. A member's three calls:

    op "query"      -> the leader's first-pass PSI request (a fresh key per member)
    op "answer"     setup, response: the member's first-pass answer, over all its IDs; the leader
                    learns which of its IDs the member holds
    op "intersect"  request: the member's second-pass PSI request; once every member has answered
                    (the call waits up to `wait` seconds, then answers `ready: false`), the leader
                    answers with the setup and response over the shared IDs C only, and |C|

The server's state changes only when a well-formed answer arrives; a malformed PSI payload gets
INVALID_ARGUMENT and changes nothing. Once every member has answered, C is fixed: a later "query"
answers no request (the first pass is over) and a later "answer" is ignored, so a member that
restarts goes straight to "intersect". Alignment touches no training state, renews no lease and
takes none of the training server's locks.

On the label party, alone (`AlignServer`, a server that only aligns) or beside training (any
sljax server whose `aligner` attribute is set):

    >>> aligner = Aligner(label_ids, members={1: "bank", 2: "network"}, name="merchant")    # doctest: +SKIP
    >>> running = serve(AlignServer(aligner, tokens={"t-bank": 1, "t-network": 2}).handle)  # doctest: +SKIP
    >>> aligner.wait(until="answered")  # every member has its rows                          # doctest: +SKIP
    True
    >>> rows = aligner.rows            # the label party's rows of C, in the common order    # doctest: +SKIP

On the bank:

    >>> aligned = align(GrpcTransport("host:port", token="t-bank"), bank_ids, client=1)    # doctest: +SKIP
    >>> x_bank = aligned.take("bank", bank_x)                                             # doctest: +SKIP

With `VerticalServer` (sljax.transport.vertical), whose clients are the parties' indices in
`sl.model.names`: align first (`members={k: name for k, name in enumerate(names) if name !=
label}`); once `aligner.wait(until="answered")` returns, stop the `AlignServer` and start the
`VerticalServer` with `labels=y[rows]` (and the label party's own columns `x[rows]`) on the same
address, setting `server.aligner = aligner` so that a party that restarts still gets its rows
(no training state is touched); each party trains with `connect_party(..., x=aligned.take(party,
x))`.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from sljax.align import MAX_IDS, AlignedRows, PSIMessage
from sljax.transport import wire
from sljax.transport.client import call
from sljax.transport.server import ServiceBase
from sljax.transport.wire import TransportError

# `sljax.align` is also the name of the in-process function; the module of the roles:
_roles = sys.modules["sljax.align"]

_FAILED = grpc.StatusCode.FAILED_PRECONDITION
# The longest an "intersect" call waits for the other members before answering "not ready".
MAX_WAIT_SECONDS = 30.0
# op -> the PSI payload fields its request carries (the others are nil).
_PAYLOADS = {"query": (), "answer": ("setup", "response"), "intersect": ("request",)}


class Aligner:
  """The leader's role of `sljax.align`, held by the label party's server: it answers `Align` calls.

  Thread-safe; its own lock, held while a call is served (the PSI work included) and released
  while an "intersect" call waits for the other members.

  Args:
    ids: the label party's sample IDs (str or int), one per row of its data, distinct.
    members: every other party: client id -> party name (a sequence: client k is `members[k]`).
      The client id is the one its credentials map to.
    name: the label party's name, told to the members.
    fpr: the false-positive rate of every compressed set (told to the members, which use it too).
    max_ids: the most IDs a member's request may hold.

  Attributes:
    state: the leader's `sljax.align.LeaderState`.

  Example:
    >>> aligner = Aligner(["ann", "bob", "cy"], members={1: "shop"}, name="bank")
    >>> aligner.rows is None   # not aligned yet: the shop has not answered
    True
  """

  def __init__(self, ids: Sequence[Any], *, members: Mapping[int, str] | Sequence[str], name: str = "leader",
               fpr: float = 1e-9, max_ids: int = MAX_IDS):
    self.members = dict(members) if isinstance(members, Mapping) else dict(enumerate(members))
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in self.members):
      raise ValueError(f"members: expected client ids (int) as keys, got {sorted(map(repr, self.members))}")
    if name in self.members.values():
      raise ValueError(f"name: the leader {name!r} is one of the members {sorted(self.members.values())}")
    if isinstance(max_ids, bool) or not isinstance(max_ids, int) or max_ids < 1:
      raise ValueError(f"max_ids: expected a positive int, got {max_ids!r}")
    self.name = name
    self.max_ids = max_ids
    self.state = _roles.leader_init(ids, members=list(self.members.values()), fpr=fpr)
    self._shared: tuple[int, ...] | None = None  # C, fixed once every member has answered
    self._answered: set[str] = set()  # the members whose "intersect" was answered
    self._cond = threading.Condition()

  @property
  def rows(self) -> np.ndarray | None:
    """The label party's rows of the shared samples in the common order, once every member has answered; else None."""
    with self._cond:
      return None if self._shared is None else _roles.leader_rows(self.state)

  def wait(self, timeout: float | None = None, *, until: str = "shared") -> bool:
    """Waits (at most `timeout` seconds; None: no limit) until the shared samples are known (`until="shared"`:
    every member has answered the first pass, and `rows` is set), or until every member has also had
    its rows (`until="answered"`: each one's "intersect" was answered, so a server that only aligns
    can stop). Returns whether that came before the time ran out."""
    if until not in ("shared", "answered"):
      raise ValueError(f"until: expected 'shared' or 'answered', got {until!r}")
    done = ((lambda: self._shared is not None) if until == "shared" else
            (lambda: self._answered == set(self.members.values())))
    with self._cond:
      return self._cond.wait_for(done, timeout)

  @property
  def pending(self) -> list[str]:
    """The members whose "intersect" has not been answered yet (those `wait(until="answered")` waits for)."""
    with self._cond:
      return sorted(set(self.members.values()) - self._answered)

  def result(self) -> AlignedRows | None:
    """The label party's `AlignedRows` (its own rows and size only), once every member has answered; else None."""
    rows = self.rows
    if rows is None:
      return None
    return AlignedRows({self.name: rows}, len(rows), {self.name: len(self.state.ids)}, self.name, ())

  def saved(self) -> dict[str, Any] | None:
    """What a restarted server needs to resume once the shared samples are known (None before): the
    rows of its IDs each member holds (from which the shared samples, their common order and the
    answers to a restarted member follow), its count of IDs and their SHA-256 (to check that the
    restarted server holds the same IDs) and the false-positive rate. No secret key, no ID.

    Example:
      >>> aligner = Aligner(["ann", "bob", "cy"], members={1: "shop"}, name="bank")
      >>> aligner.saved() is None   # the shop has not answered
      True
    """
    with self._cond:
      if self._shared is None:
        return None
      return {"ids": len(self.state.ids), "digest": _digest(self.state.ids), "fpr": self.state.fpr,
              "held": {member: np.asarray(rows, np.int64) for member, rows in self.state.held.items()}}

  def resume(self, saved: Mapping[str, Any]) -> None:
    """Takes up what `saved()` gave (a restarted server's aligner, of the same IDs and members): the
    shared samples are known again, `rows` is set, and a member that calls again gets its rows.

    Raises:
      ValueError: `saved` is of other IDs, members or false-positive rate than this aligner's.
    """
    with self._cond:
      ids, members = self.state.ids, set(self.state.members)
      if saved["ids"] != len(ids) or saved["digest"] != _digest(ids):
        raise ValueError(f"saved: the alignment saved was of other IDs ({saved['ids']}, SHA-256 "
                         f"{saved['digest'][:12]}...) than the aligner's ({len(ids)}, SHA-256 {_digest(ids)[:12]}...): "
                         "give it the IDs, in their order, that were aligned")
      if set(saved["held"]) != members or float(saved["fpr"]) != self.state.fpr:
        raise ValueError(f"saved: the alignment saved was with the members {sorted(saved['held'])} at fpr "
                         f"{float(saved['fpr']):g}, the aligner's {sorted(members)} at fpr {self.state.fpr:g}")
      held = {member: tuple(int(r) for r in np.asarray(rows)) for member, rows in saved["held"].items()}
      self.state = self.state._replace(held=held)
      self._shared = self.state.shared
      self._cond.notify_all()

  def serve(self, client: int, req: Mapping[str, Any]) -> bytes:
    """Serves one `Align` call of `client` (authenticated, its request decoded by `wire.decode`).

    Returns:
      The response's bytes.

    Raises:
      TransportError: FAILED_PRECONDITION for a client that is not a member, an "answer" with
        no "query" before it, or parties that share no sample; INVALID_ARGUMENT for a request
        that is not well-formed (an unknown op, a payload where none belongs or none where one
        does, a negative wait, a malformed PSI payload). Nothing changes then.
    """
    member = self.members.get(client)
    if member is None:
      raise TransportError(_FAILED, f"Align: client {client} is not one of the members to align "
                                    f"({sorted(self.members)})")
    op = req["op"]
    if op not in _PAYLOADS:
      raise wire.invalid(f"Align request: field 'op' must be 'query', 'answer' or 'intersect', got {op!r:.40}")
    for field in ("request", "setup", "response"):
      if (req[field] is None) == (field in _PAYLOADS[op]):
        want = "the bytes of a PSI " + field if field in _PAYLOADS[op] else "nil"
        raise wire.invalid(f"Align {op}: field {field!r} must be {want}, got {type(req[field]).__name__}")
    wait = req["wait"]
    if not (math.isfinite(wait) and wait >= 0):
      raise wire.invalid(f"Align {op}: field 'wait' must be a number of seconds >= 0, got {wait}")
    with self._cond:
      if op == "query":
        if self._shared is not None:  # the first pass is over: go on to "intersect"
          return self._answer(member)
        self.state, request = _roles.leader_query(self.state, member)
        return self._answer(member, request=request)
      if op == "answer":
        if self._shared is not None:  # a retry, or a restarted member: C is fixed
          return self._answer(member)
        if member not in self.state.keys:
          raise TransportError(_FAILED, f"Align answer: no query was sent to {member!r} (client {client}) to answer; "
                                        "call op 'query' first")
        try:
          self.state = _roles.leader_learn(self.state, member, req["setup"], req["response"])
        except (ValueError, TypeError) as e:
          raise wire.invalid(f"Align answer: {e}") from None
        if self.state.shared is not None:
          self._shared = self.state.shared
          self._cond.notify_all()
        return self._answer(member)
      deadline = time.monotonic() + min(wait, MAX_WAIT_SECONDS)
      while self._shared is None and (left := deadline - time.monotonic()) > 0:
        self._cond.wait(left)
      if self._shared is None:
        return self._answer(member, ready=False)
      if not self._shared:
        self._answered.add(member)  # with the error: there are no rows to have
        self._cond.notify_all()
        raise TransportError(_FAILED, f"Align intersect: the parties {(self.name, *self.state.members)} share no "
                                      "sample")
      try:
        setup, response = _roles.leader_answer(self.state, member, req["request"], max_ids=self.max_ids)
      except (ValueError, TypeError) as e:
        raise wire.invalid(f"Align intersect: {e}") from None
      self._answered.add(member)
      self._cond.notify_all()
      return self._answer(member, setup=setup, response=response, size=len(self._shared))

  def _answer(self, member: str, *, ready: bool = True, size: int = -1, request: bytes | None = None,
              setup: bytes | None = None, response: bytes | None = None) -> bytes:
    return wire.encode({"ready": ready, "party": member, "leader": self.name, "fpr": self.state.fpr, "size": size,
                        "request": request, "setup": setup, "response": response})


def _digest(ids: Sequence[str]) -> str:
  """The SHA-256 of the IDs, in order (each as UTF-8, NUL-separated), as hex: it stays on the label party."""
  h = hashlib.sha256()
  for i in ids:
    h.update(i.encode() + b"\0")
  return h.hexdigest()


class AlignServer(ServiceBase):
  """A server that only aligns: the `Align` method around an `Aligner`, with the identities and
  limits of every sljax server (a bearer token or a client certificate per member; credentials
  checked before the body is read when served by `sljax.transport.serve`). Every other method
  answers UNIMPLEMENTED.

  Args:
    aligner: the label party's `Aligner`.
    tokens: bearer token -> client id (a member's).
    certificate_names: client certificate common name -> client id.
    max_message_bytes: the largest request.

  Example:
    One member, in process (with one member, its answer fixes C, so nothing waits):

    >>> server = AlignServer(Aligner(["ann", "bob", "cy"], members={1: "shop"}, name="bank"), tokens={"t": 1})
    >>> aligned = align(wire.InProcessTransport(server.handle, token="t"), ["dee", "cy", "ann"], client=1)
    >>> aligned.size, aligned.rows["shop"].tolist(), server.aligner.rows.tolist()
    (2, [2, 1], [0, 2])
  """

  algorithm = "align"

  def __init__(self, aligner: Aligner, *, tokens: Mapping[str, int] | None = None,
               certificate_names: Mapping[str, int] | None = None,
               max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES):
    if not isinstance(aligner, Aligner):
      raise TypeError(f"aligner: expected a sljax.transport.Aligner, got {type(aligner).__name__}")
    if not tokens and not certificate_names:
      raise ValueError("tokens, certificate_names: give at least one way to identify clients")
    for what, ids in (("tokens", tokens or {}), ("certificate_names", certificate_names or {})):
      bad = sorted(k for k in ids.values() if k not in aligner.members)
      if bad:
        raise ValueError(f"{what}: client ids must be the members' {sorted(aligner.members)}, got {bad}")
    self.aligner = aligner
    self._tokens = dict(tokens or {})
    self._certificate_names = dict(certificate_names or {})
    self.max_message_bytes = int(max_message_bytes)

  def handle(self, method: str, request: bytes, *, metadata: Mapping[str, str],
             peer_names: Sequence[str] = ()) -> bytes:
    if method in wire.REQUESTS and method != "Align":
      self._authenticate(metadata, peer_names)
      raise TransportError(grpc.StatusCode.UNIMPLEMENTED, f"{method}: this server only aligns sample IDs (Align)")
    return super().handle(method, request, metadata=metadata, peer_names=peer_names)

  def close(self) -> None:
    """Nothing to release (no checkpoints, no transcript)."""


def align(transport: wire.Transport, ids: Sequence[Any], *, client: int, wait: float = 10.0,
          timeout: float = 60.0) -> AlignedRows:
  """A member's side of the alignment, against the label party's server (see the module's docstring).

  Args:
    transport: `GrpcTransport` or `InProcessTransport` to the label party's server.
    ids: this party's sample IDs (str or int), one per row of its data, distinct. Compared with
      the other parties' as text (`str(id)`).
    client: this party's client id (its credentials must be that client's).
    wait: seconds the server may hold each "intersect" call while other members have not
      answered; the client calls again until they have.
    timeout: seconds each call may take, beyond `wait`.

  Returns:
    This party's `AlignedRows`: `rows` and `sizes` for this party (and the leader's list size),
    the number of shared samples, the leader's name and every message this party sent or received.
    `aligned.take(party, x)` gives its shared rows of `x` in the common order.

  Raises:
    ValueError / TypeError: bad `ids` (before any call), or a malformed PSI payload from the server.
    TransportError: as the server answered.
    RuntimeError: a PSI false positive (this party found another number of shared samples than the leader).

  Example:
    Not run by the doctests: it needs the label party's server (see the module's docstring).

    >>> aligned = align(GrpcTransport("host:port", token="t-bank"), bank_ids, client=1)  # doctest: +SKIP
    >>> aligned.size, aligned.take("bank", bank_x).shape                               # doctest: +SKIP
    (2700, (2700, 6))
  """
  state = _roles.member_init(ids)
  if not (isinstance(wait, (int, float)) and 0 <= wait <= MAX_WAIT_SECONDS):
    raise ValueError(f"wait: expected seconds in [0, {MAX_WAIT_SECONDS}], got {wait!r}")

  def align_call(op: str, **payloads: bytes) -> dict:
    fields = {"client": client, "op": op, "wait": wait if op == "intersect" else 0.0, "request": None, "setup": None,
              "response": None, **payloads}
    return call(transport, "Align", fields, timeout=timeout + (wait if op == "intersect" else 0.0))

  answer = align_call("query")
  party, head = answer["party"], answer["leader"]
  state = state._replace(fpr=_roles._check_fpr(answer["fpr"]))
  messages = []
  if answer["request"] is not None:  # else the first pass is over (this party answered before it restarted)
    state, setup, response = _roles.member_answer(state, answer["request"])
    messages += [PSIMessage(head, party, "request", answer["request"]), PSIMessage(party, head, "setup", setup),
                 PSIMessage(party, head, "response", response)]
    align_call("answer", setup=setup, response=response)
  state, request = _roles.member_query(state)
  messages.append(PSIMessage(party, head, "request", request))
  answer = align_call("intersect", request=request)
  while not answer["ready"]:
    answer = align_call("intersect", request=request)
  messages += [PSIMessage(head, party, "setup", answer["setup"]),
               PSIMessage(head, party, "response", answer["response"])]
  rows = _roles.member_rows(state, answer["setup"], answer["response"])
  if len(rows) != answer["size"]:  # a false positive of the compressed set; vanishingly rare at the default fpr
    raise RuntimeError(f"align: party {party!r} found {len(rows)} shared samples, the leader {head!r} "
                       f"{answer['size']}; a PSI false positive: run again with a lower fpr")
  sizes = {party: len(state.ids)}
  if state.leader_size is not None:
    sizes[head] = state.leader_size
  return AlignedRows({party: rows}, len(rows), sizes, head, tuple(messages))
