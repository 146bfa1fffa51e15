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
PSI); the ECDH blinding rests on the decisional Diffie-Hellman assumption over P-256. The
in-process `align` runs every role in one process and keeps every message it would send
(`AlignedRows.messages`) so that tests can check the bytes.

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

__all__ = ["AlignedRows", "PSIMessage", "align"]


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


def _ids(name: str, ids: Any) -> list[str]:
  """A party's IDs as strings, checked: a 1-D sequence of str or int, no duplicates."""
  if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
    raise TypeError(f"ids_by_party[{name!r}]: expected a sequence of IDs (str or int), got {type(ids).__name__}")
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f"ids_by_party[{name!r}]: expected a 1-D sequence of IDs, got shape {arr.shape}")
  if len(arr) == 0:
    raise ValueError(f"ids_by_party[{name!r}]: expected at least one ID, got none")
  if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype.kind == "U"):
    raise TypeError(f"ids_by_party[{name!r}]: expected IDs of type str or int, got {arr.dtype}")
  strs = [str(i) for i in ids]
  seen: dict[str, int] = {}
  for row, i in enumerate(strs):
    if i in seen:
      raise ValueError(f"ids_by_party[{name!r}]: ID {i!r} is given twice (rows {seen[i]} and {row}); every "
                       f"sample needs a distinct ID")
    seen[i] = row
  return strs


def align(ids_by_party: Mapping[str, Sequence[Any]], *, leader: str | None = None, fpr: float = 1e-9) -> AlignedRows:
  """Finds the samples every party holds, by ID, with private set intersection (see the module's docstring).

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
  import private_set_intersection.python as psi  # noqa: PLC0415 -- the optional extra `vertical`

  if not isinstance(ids_by_party, Mapping) or len(ids_by_party) < 2:
    got = f"{len(ids_by_party)} parties" if isinstance(ids_by_party, Mapping) else type(ids_by_party).__name__
    raise ValueError(f"ids_by_party: expected a mapping of at least two party names to their IDs, got {got}")
  names = tuple(ids_by_party)
  if leader is None:
    leader = names[0]
  if leader not in names:
    raise ValueError(f"leader: expected one of the parties {names}, got {leader!r}")
  if not 0 < fpr < 1:
    raise ValueError(f"fpr: expected a probability in (0, 1), got {fpr!r}")
  ids = {name: _ids(name, ids_by_party[name]) for name in names}
  kinds = {name: "int" if np.issubdtype(np.asarray(ids_by_party[name]).dtype, np.integer) else "str" for name in names}
  for name in names:
    if kinds[name] != kinds[leader]:
      raise TypeError(f"ids_by_party[{name!r}]: party {name!r} has IDs of type {kinds[name]}, the leader {leader!r} "
                      f"{kinds[leader]}; IDs of different types never match")
  members = [name for name in names if name != leader]
  messages: list[PSIMessage] = []

  def run(client_name: str, client_ids: list[str], server_name: str, server_ids: list[str]) -> list[int]:
    """One PSI run: the client learns the rows of its IDs that the server holds."""
    client = psi.client.CreateWithNewKey(True)
    server = psi.server.CreateWithNewKey(True)
    request = client.CreateRequest(client_ids)
    messages.append(PSIMessage(client_name, server_name, "request", request.SerializeToString()))
    setup = server.CreateSetupMessage(fpr, len(client_ids), server_ids)
    response = server.ProcessRequest(request)
    messages.append(PSIMessage(server_name, client_name, "setup", setup.SerializeToString()))
    messages.append(PSIMessage(server_name, client_name, "response", response.SerializeToString()))
    return sorted(client.GetIntersection(setup, response))

  # 1-2. The leader learns, per member, which of its IDs the member holds; C is the intersection.
  shared = set(range(len(ids[leader])))
  for member in members:
    shared &= set(run(leader, ids[leader], member, ids[member]))
  if not shared:
    raise ValueError(f"ids_by_party: the parties {names} share no sample (list sizes "
                     f"{ {n: len(ids[n]) for n in names} })")
  shared_ids = [ids[leader][row] for row in sorted(shared)]
  # 3. Each member learns which of its rows are in C, from a PSI run against C alone.
  member_rows = {member: run(member, ids[member], leader, shared_ids) for member in members}
  # 4. The common order: by ID, which every party can sort its own shared rows by.
  rows = {}
  for name in names:
    own = sorted(shared) if name == leader else member_rows[name]
    if len(own) != len(shared):  # a false positive of the compressed set; vanishingly rare at the default fpr
      raise RuntimeError(f"align: party {name!r} found {len(own)} shared samples, the leader {len(shared)}; a PSI "
                         f"false positive: run again or lower fpr")
    rows[name] = np.asarray(sorted(own, key=lambda r, n=name: ids[n][r]), np.int64)
  return AlignedRows(rows, len(shared), {n: len(ids[n]) for n in names}, leader, tuple(messages))
