"""Private alignment for vertical split learning: the parties find the samples they share by ID.

Vertical split learning needs every party's rows in one common order, but the parties' customer
lists differ, and a party must not learn the IDs the others hold and it does not. `align` finds the
shared IDs with private set intersection (PSI): the ECDH-based protocol of `openmined-psi`
(Diffie-Hellman PSI, Meadows 1986, Huberman et al. 1999; the library of OpenMined, with the
server's blinded set in a Golomb-compressed set). Nothing but PSI messages crosses between the
parties; no ID, shared or not, is sent in the clear.

The protocol, with one party as the leader (the label party, by default) and the others members:

  1. For each member m: PSI with the leader as the PSI client and m as the PSI server. The leader
     learns which of its IDs m holds (and the size of m's list); m learns the size of the leader's
     list and nothing else.
  2. The leader intersects these: the IDs every party holds, C (as rows of its own list).
  3. For each member m: PSI with the leader as the PSI server on C only, and m as the PSI client.
     m learns which of its rows are in C (and |C|); the leader learns the size of m's list again.
  4. Every party orders its shared rows by ID (the shared IDs are the same strings everywhere), so
     row k of every party is the same sample, with no message at all.

Threat model: semi-honest parties (they follow the protocol and try to learn from what they
see). Every party learns the intersection (which of its own IDs are shared) and the size of the
others' lists; the leader also learns, per member, which of its IDs that member holds (step 1),
before the intersection over all members. A malicious party can lie about its set (as in any
PSI); the ECDH blinding rests on the decisional Diffie-Hellman assumption over P-256.

Each role is written once, as pure functions from its state and a message to its new state and
the message it sends: the leader's `leader_init`, `leader_query` and `leader_learn` (steps 1-2),
`leader_answer` (3) and `leader_rows` (4); a member's `member_init`, `member_answer` (1),
`member_query` and `member_rows` (3-4). The in-process `align` wires them together and keeps
every message (`AlignedRows.messages`) so that tests can check the bytes; over the network, the
label party's server holds the leader (`sljax.transport.Aligner`) and each member calls it
(`sljax.transport.align`), with the same functions and messages. What a party receives is
checked before the PSI library sees it (payloads that are not well-formed PSI messages raise a
`ValueError` naming the payload).

Example:
  >>> import sljax
  >>> aligned = sljax.align({"bank": ["ann", "bob", "cy"], "shop": ["dee", "cy", "ann"]})
  >>> aligned.size, aligned.rows["bank"].tolist(), aligned.rows["shop"].tolist()
  (2, [0, 2], [2, 1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "AlignedRows", "LeaderState", "MemberState", "PSIMessage", "align", "leader_answer", "leader_init", "leader_learn",
    "leader_query", "leader_rows", "member_answer", "member_init", "member_query", "member_rows",
]


class PSIMessage(NamedTuple):
  """One message of the alignment, as it would cross the network: who sends it to whom, its kind
  (`setup`, `request` or `response` of a PSI run) and its serialized bytes."""

  sender: str
  receiver: str
  kind: str
  payload: bytes


class AlignedRows(NamedTuple):
  """The result of `align`: each party's rows of the shared samples, in one common order.

  Attributes:
    rows: party name -> int64 row indices into that party's ID list (and so its data), one per
      shared sample, in the common order: `x[rows[name]]` for every party lines the samples up.
    size: the number of shared samples.
    sizes: party name -> the number of IDs that party holds.
    leader: the party that ran the PSI client in the first pass.
    messages: every message sent, in order (`PSIMessage`).
  """

  rows: dict[str, np.ndarray]
  size: int
  sizes: dict[str, int]
  leader: str
  messages: tuple[PSIMessage, ...]

  def take(self, name: str, x: Any) -> Any:
    """Party `name`'s shared rows of `x` (its data, one row per ID it gave `align`), in the common order."""
    if name not in self.rows:
      raise ValueError(f"name: expected one of the aligned parties {tuple(self.rows)}, got {name!r}")
    n = np.shape(x)[0] if np.ndim(x) else None
    if n != self.sizes[name]:
      raise ValueError(f"x: party {name!r} gave {self.sizes[name]} IDs, one per row of its data, but x has shape "
                       f"{np.shape(x)}")
    return x[self.rows[name]]


def _ids(ids: Any, *, what: str) -> list[str]:
  """A party's IDs as strings, checked: a 1-D sequence of str or int, no duplicates."""
  if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
    raise TypeError(f"{what}: expected a sequence of IDs (str or int), got {type(ids).__name__}")
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f"{what}: expected a 1-D sequence of IDs, got shape {arr.shape}")
  if len(arr) == 0:
    raise ValueError(f"{what}: expected at least one ID, got none")
  if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype.kind == "U"):
    raise TypeError(f"{what}: expected IDs of type str or int, got {arr.dtype}")
  strs = [str(i) for i in ids]
  seen: dict[str, int] = {}
  for row, i in enumerate(strs):
    if i in seen:
      raise ValueError(f"{what}: ID {i!r} is given twice (rows {seen[i]} and {row}); every sample needs a distinct ID")
    seen[i] = row
  return strs


def _check_fpr(fpr: Any) -> float:
  if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
    raise ValueError(f"fpr: expected a probability in (0, 1), got {fpr!r}")
  return float(fpr)


# ---- one PSI run, as its two roles: the PSI client queries and learns, the PSI server answers --------------------
#
# The payloads are the protocol buffers of `openmined-psi`. What arrives from the other party is parsed and checked
# here before the library's C++ sees it: a request or response of compressed P-256 points (33 bytes each), as many as
# expected; a setup holding a Golomb-compressed set whose parameters cannot make the library abort (a hash range of
# 0 does) or read past its bits (its bits are padded with zero bytes, which decode to nothing).

MAX_IDS = 1 << 22  # the most IDs a party may hold (a request of 4M points is ~150 MB)
_POINT_BYTES = 33  # a compressed P-256 point
_MAX_HASH_RANGE = 1 << 62
_MAX_DIV = 62


def _psi():
  import private_set_intersection.python as psi  # noqa: PLC0415 -- the optional extra `vertical`

  return psi


def _parse(kind: str, data: Any) -> Any:
  from google.protobuf.message import DecodeError  # noqa: PLC0415 -- comes with openmined-psi

  if not isinstance(data, bytes):
    raise TypeError(f"{kind}: expected the bytes of a PSI {kind}, got {type(data).__name__}")
  message = {"request": _psi().Request, "setup": _psi().ServerSetup, "response": _psi().Response}[kind]()
  try:
    message.ParseFromString(data)
  except (DecodeError, RuntimeWarning, ValueError) as e:
    raise ValueError(f"{kind}: not a PSI {kind} ({len(data)} bytes): {e}") from None
  return message


def _points(kind: str, points: Any, *, expected: int | None = None, most: int = MAX_IDS) -> None:
  n = len(points)
  if expected is not None and n != expected:
    raise ValueError(f"{kind}: expected {expected} encrypted IDs (one per ID queried), got {n}")
  if not 1 <= n <= most:
    raise ValueError(f"{kind}: expected 1 to {most} encrypted IDs, got {n}")
  bad = next((len(p) for p in points if len(p) != _POINT_BYTES), None)
  if bad is not None:
    raise ValueError(f"{kind}: expected encrypted IDs of {_POINT_BYTES} bytes (compressed P-256 points), got one of "
                     f"{bad} bytes")


def _query(ids: list[str]) -> tuple[bytes, bytes]:
  """The PSI client's request over `ids`, and the private key it needs to learn from the answer (never sent)."""
  client = _psi().client.CreateWithNewKey(True)
  return client.GetPrivateKeyBytes(), client.CreateRequest(ids).SerializeToString()


def _answer(ids: list[str], request: bytes, *, fpr: float, max_ids: int = MAX_IDS) -> tuple[int, bytes, bytes]:
  """The PSI server's answer to `request`: (the number of IDs queried, setup, response). The setup is the
  compressed set of `ids`, blinded with a fresh key; the response, the request's points blinded again."""
  req = _parse("request", request)
  _points("request", req.encrypted_elements, most=max_ids)
  if not req.reveal_intersection:
    raise ValueError("request: expected a PSI request that reveals the intersection (reveal_intersection), got one "
                     "for its size only")
  server = _psi().server.CreateWithNewKey(True)
  n = len(req.encrypted_elements)
  setup = server.CreateSetupMessage(fpr, n, ids)
  try:
    response = server.ProcessRequest(req)
  except RuntimeError as e:  # a point that does not decode
    raise ValueError(f"request: {e}".splitlines()[0]) from None
  return n, setup.SerializeToString(), response.SerializeToString()


def _learn(key: bytes, ids: list[str], setup: bytes, response: bytes, *, fpr: float) -> list[int]:
  """The PSI client's result: the rows of `ids` (those its request was made of) the server holds, sorted."""
  s = _parse("setup", setup)
  r = _parse("response", response)
  if s.WhichOneof("data_structure") != "gcs":
    raise ValueError(f"setup: expected a Golomb-compressed set (gcs), got {s.WhichOneof('data_structure')}")
  least = max(1, int(len(ids) / fpr))  # the server's hash range is max(its IDs, ours) / fpr
  if not least <= s.gcs.hash_range <= _MAX_HASH_RANGE:
    raise ValueError(f"setup: expected a hash range in [{least}, 2**62] (at least {len(ids)} IDs / fpr {fpr:g}), got "
                     f"{s.gcs.hash_range}")
  if not 0 <= s.gcs.div <= _MAX_DIV:
    raise ValueError(f"setup: expected a Golomb divisor in [0, {_MAX_DIV}], got {s.gcs.div}")
  s.gcs.bits += bytes(8)  # the last remainder is read whole: never past the end
  _points("response", r.encrypted_elements, expected=len(ids))
  client = _psi().client.CreateFromKey(key, True)
  try:
    return sorted(client.GetIntersection(s, r))
  except RuntimeError as e:  # a point that does not decode
    raise ValueError(f"response: {e}".splitlines()[0]) from None


def _in_common_order(ids: Sequence[str], rows: Sequence[int]) -> np.ndarray:
  """Shared rows, sorted by their IDs: every party holds the same shared IDs, so the same order everywhere."""
  return np.asarray(sorted(rows, key=lambda r: ids[r]), np.int64)


# ---- the roles: pure functions from state and message to new state and message ------------------------------------


class LeaderState(NamedTuple):
  """What the leader holds: its IDs, the members, and what it learned from each.

  Attributes:
    ids: the leader's IDs (as str), one per row of its data.
    members: the other parties' names.
    fpr: the false-positive rate of every compressed set (all parties use the leader's).
    keys: member -> the private key of the leader's first-pass query to it (never sent).
    held: member -> the rows of `ids` that member holds (sorted), once it answered the query.
  """

  ids: tuple[str, ...]
  members: tuple[str, ...]
  fpr: float
  keys: dict[str, bytes]
  held: dict[str, tuple[int, ...]]

  @property
  def shared(self) -> tuple[int, ...] | None:
    """The rows of `ids` every member holds (C, sorted by row), once every member answered; else None."""
    if set(self.held) != set(self.members):
      return None
    common = set(range(len(self.ids)))
    for rows in self.held.values():
      common &= set(rows)
    return tuple(sorted(common))

  def __repr__(self) -> str:  # the keys are secret, and the IDs many
    return (f"LeaderState({len(self.ids)} IDs, members={self.members}, fpr={self.fpr:g}, "
            f"answered={sorted(self.held)})")


class MemberState(NamedTuple):
  """What a member holds: its IDs, and what it learned of the leader.

  Attributes:
    ids: the member's IDs (as str), one per row of its data.
    fpr: the false-positive rate of every compressed set (the leader's).
    key: the private key of its second-pass query (never sent); None before it.
    leader_size: the number of IDs the leader holds, from its first-pass query; None before it.
  """

  ids: tuple[str, ...]
  fpr: float
  key: bytes | None = None
  leader_size: int | None = None

  def __repr__(self) -> str:
    return f"MemberState({len(self.ids)} IDs, fpr={self.fpr:g}, leader_size={self.leader_size})"


def leader_init(ids: Sequence[Any], *, members: Sequence[str], fpr: float = 1e-9) -> LeaderState:
  """The leader's role (the label party, usually): its state before any message.

  The leader's side of the protocol (see the module's docstring) is `leader_query` and
  `leader_learn` per member (first pass), then `leader_answer` per member (second pass, once
  `state.shared` is known), and `leader_rows`. Over the network a server holds it
  (`sljax.transport.Aligner`).

  Args:
    ids: the leader's sample IDs (str or int), one per row of its data, distinct.
    members: the other parties' names.
    fpr: the false-positive rate of every compressed set.

  Returns:
    A `LeaderState`.

  Example:
    >>> state = leader_init(["ann", "bob", "cy"], members=["shop"])
    >>> m = member_init(["dee", "cy", "ann"])
    >>> state, request = leader_query(state, "shop")
    >>> m, setup, response = member_answer(m, request)
    >>> state = leader_learn(state, "shop", setup, response)
    >>> state.shared
    (0, 2)
    >>> m, request = member_query(m)
    >>> setup, response = leader_answer(state, "shop", request)
    >>> leader_rows(state).tolist(), member_rows(m, setup, response).tolist()
    ([0, 2], [2, 1])
  """
  names = tuple(members)
  if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"members: expected at least one member, names (str) all distinct, got {names}")
  return LeaderState(tuple(_ids(ids, what="ids")), names, _check_fpr(fpr), {}, {})


def _known(state: LeaderState, member_name: str) -> None:
  if member_name not in state.members:
    raise ValueError(f"member: expected one of the members {state.members}, got {member_name!r}")


def leader_query(state: LeaderState, member_name: str) -> tuple[LeaderState, bytes]:
  """First pass, the leader as PSI client: its request to `member_name` (a fresh key per query).

  Returns:
    The new state (holding the query's key) and the request's bytes, for the member's `member_answer`.
  """
  _known(state, member_name)
  key, request = _query(list(state.ids))
  return state._replace(keys={**state.keys, member_name: key}), request


def leader_learn(state: LeaderState, member_name: str, setup: bytes, response: bytes) -> LeaderState:
  """First pass: the leader learns from the member's answer which of its IDs the member holds.

  Raises:
    ValueError: naming the member or the payload: no query was sent to it, or a payload that is
      not a well-formed PSI setup or response to the query. The state is then unchanged.
  """
  _known(state, member_name)
  if member_name not in state.keys:
    raise ValueError(f"member: no query was sent to {member_name!r} to answer (leader_query first)")
  rows = _learn(state.keys[member_name], list(state.ids), setup, response, fpr=state.fpr)
  return state._replace(held={**state.held, member_name: tuple(rows)})


def leader_answer(state: LeaderState, member_name: str, request: bytes, *, max_ids: int = MAX_IDS
                  ) -> tuple[bytes, bytes]:
  """Second pass, the leader as PSI server over the shared IDs C only: its answer to the member's query.

  Returns:
    The setup and response bytes, for the member's `member_rows`.

  Raises:
    ValueError: not every member has answered the first pass yet (`state.shared` is None), no
      shared sample at all, or a request that is not a well-formed PSI request (of at most `max_ids` IDs).
  """
  _known(state, member_name)
  shared = state.shared
  if shared is None:
    raise ValueError(f"state: the members {sorted(set(state.members) - set(state.held))} have not answered the first "
                     f"pass yet; the shared IDs are not known")
  if not shared:
    raise ValueError(f"state: the leader and its members {state.members} share no sample")
  _, setup, response = _answer([state.ids[r] for r in shared], request, fpr=state.fpr, max_ids=max_ids)
  return setup, response


def leader_rows(state: LeaderState) -> np.ndarray:
  """The leader's rows of the shared samples, in the common order (by ID)."""
  if state.shared is None:
    raise ValueError("state: not every member has answered the first pass yet")
  return _in_common_order(state.ids, state.shared)


def member_init(ids: Sequence[Any], *, fpr: float = 1e-9) -> MemberState:
  """A member's role: its state before any message.

  A member's side of the protocol is `member_answer` (first pass), `member_query` and
  `member_rows` (second pass); see `leader_init` for an example. Over the network,
  `sljax.transport.align` plays it.

  Args:
    ids: the member's sample IDs (str or int), one per row of its data, distinct.
    fpr: the false-positive rate of the compressed set it sends (the leader's).

  Returns:
    A `MemberState`.
  """
  return MemberState(tuple(_ids(ids, what="ids")), _check_fpr(fpr))


def member_answer(state: MemberState, request: bytes, *, max_ids: int = MAX_IDS
                  ) -> tuple[MemberState, bytes, bytes]:
  """First pass, the member as PSI server over all its IDs: its answer to the leader's query.

  Returns:
    The new state (knowing the leader's list size) and the setup and response bytes, for the leader's `leader_learn`.

  Raises:
    ValueError: a request that is not a well-formed PSI request (of at most `max_ids` IDs).
  """
  n, setup, response = _answer(list(state.ids), request, fpr=state.fpr, max_ids=max_ids)
  return state._replace(leader_size=n), setup, response


def member_query(state: MemberState) -> tuple[MemberState, bytes]:
  """Second pass, the member as PSI client: its request to the leader (a fresh key).

  Returns:
    The new state (holding the query's key) and the request's bytes, for the leader's `leader_answer`.
  """
  key, request = _query(list(state.ids))
  return state._replace(key=key), request


def member_rows(state: MemberState, setup: bytes, response: bytes) -> np.ndarray:
  """Second pass: the member's rows of the shared samples, in the common order (by ID).

  Raises:
    ValueError: no query was made (`member_query` first), or a payload that is not a
      well-formed PSI setup or response to it.
  """
  if state.key is None:
    raise ValueError("state: no query was made to learn from (member_query first)")
  return _in_common_order(state.ids, _learn(state.key, list(state.ids), setup, response, fpr=state.fpr))


# ---- all roles in one process ---------------------------------------------------------------------------------------


def align(ids_by_party: Mapping[str, Sequence[Any]], *, leader: str | None = None, fpr: float = 1e-9) -> AlignedRows:
  """Finds the samples every party holds, by ID, with private set intersection (see the module's docstring).

  The roles (`leader`, `member` and their steps) wired together in one process; over the network,
  `sljax.transport.Aligner` and `sljax.transport.align` play the same roles.

  Args:
    ids_by_party: party name -> that party's sample IDs (str or int, all parties the same kind),
      one per row of its data, distinct. At least two parties.
    leader: the party that runs the PSI client first and intersects (the label party, usually);
      the first party by default.
    fpr: the false-positive rate of the compressed set the PSI server sends (a non-shared ID counted
      as shared with this probability per run); smaller costs a few more bytes.

  Returns:
    An `AlignedRows`: per party, the row indices of the shared samples in the common order (by ID),
    the number of shared samples, each party's list size and every message sent.

  Raises:
    ValueError / TypeError, naming the party: fewer than two parties, IDs that are not a 1-D
    sequence of str or int, a duplicate ID, parties with different kinds of ID (str and int), or
    no shared sample at all.

  Example:
    >>> aligned = align({"bank": [3, 1, 2], "shop": [2, 3, 9]}, leader="shop")
    >>> aligned.size, aligned.sizes
    (2, {'bank': 3, 'shop': 3})
  """
  if not isinstance(ids_by_party, Mapping) or len(ids_by_party) < 2:
    got = f"{len(ids_by_party)} parties" if isinstance(ids_by_party, Mapping) else type(ids_by_party).__name__
    raise ValueError(f"ids_by_party: expected a mapping of at least two party names to their IDs, got {got}")
  names = tuple(ids_by_party)
  head = names[0] if leader is None else leader
  if head not in names:
    raise ValueError(f"leader: expected one of the parties {names}, got {head!r}")
  fpr = _check_fpr(fpr)
  ids = {name: _ids(ids_by_party[name], what=f"ids_by_party[{name!r}]") for name in names}
  kinds = {name: "int" if np.issubdtype(np.asarray(ids_by_party[name]).dtype, np.integer) else "str" for name in names}
  for name in names:
    if kinds[name] != kinds[head]:
      raise TypeError(f"ids_by_party[{name!r}]: party {name!r} has IDs of type {kinds[name]}, the leader {head!r} "
                      f"{kinds[head]}; IDs of different types never match")
  members = [name for name in names if name != head]
  lead = leader_init(ids[head], members=members, fpr=fpr)
  parties = {name: member_init(ids[name], fpr=fpr) for name in members}
  messages: list[PSIMessage] = []
  # 1-2. The leader learns, per member, which of its IDs the member holds; C is the intersection.
  for name in members:
    lead, request = leader_query(lead, name)
    parties[name], setup, response = member_answer(parties[name], request)
    messages += [PSIMessage(head, name, "request", request), PSIMessage(name, head, "setup", setup),
                 PSIMessage(name, head, "response", response)]
    lead = leader_learn(lead, name, setup, response)
  if not lead.shared:
    raise ValueError(f"ids_by_party: the parties {names} share no sample (list sizes "
                     f"{ {n: len(ids[n]) for n in names} })")
  # 3. Each member learns which of its rows are in C, from a PSI run against C alone; 4. the common order, by ID.
  rows = {}
  for name in members:
    parties[name], request = member_query(parties[name])
    setup, response = leader_answer(lead, name, request)
    messages += [PSIMessage(name, head, "request", request), PSIMessage(head, name, "setup", setup),
                 PSIMessage(head, name, "response", response)]
    rows[name] = member_rows(parties[name], setup, response)
  rows[head] = leader_rows(lead)
  for name in names:
    if len(rows[name]) != len(lead.shared):  # a false positive of the compressed set; vanishingly rare at default fpr
      raise RuntimeError(f"align: party {name!r} found {len(rows[name])} shared samples, the leader "
                         f"{len(lead.shared)}; a PSI false positive: run again or lower fpr")
  return AlignedRows({name: rows[name] for name in names}, len(lead.shared), {n: len(ids[n]) for n in names}, head,
                     tuple(messages))
