"""Split learning over a network: the same legs and the same message bytes as the simulation.

A client reaches the server through a transport, `call(method, request, *, timeout) -> response`
on bytes. `InProcessTransport` hands the bytes to the server's handler in the same process;
`GrpcTransport` carries them over gRPC (TLS, tokens or client certificates, retries). The servers
(`ConcurrentServer`, a shell around a pure coordinator of `sljax.transport.coordinators`, for every
split-learning algorithm: `SplitServer` is it for sequential SL, clients taking turns, with vanilla
or U-shaped legs; `ALGORITHMS` names those whose clients train all at once: parallel SL (vanilla,
U-shaped, a cut per client), local-loss SL, SplitFed v1 and v2)
and the client driver
(`connect`, `run`, `predict`, which follows the algorithm the handshake names; vertical SL:
`VerticalServer` on the label party, `connect_party`, `run_party`, `predict_party` on the others)
do not know which
transport they use, so a run over gRPC is tested against the same run in process, bit for bit,
and against the fused simulation (`sljax.algorithms`). The wire protocol is specified in docs/protocol.md.
Before vertical SL, the parties align their samples by private set intersection: `Aligner` (the
label party's, served by `AlignServer` or any server whose `aligner` is set) and `align` (each
other party), the roles of `sljax.align` over the `Align` method.

Example (one process; over the network the server runs `serve(server.handle, ...)` and each
client uses `GrpcTransport("host:port", token=...)`):

    >>> schedule = Schedule(num_clients=1, rounds=5, local_steps=10, batch_size=32)
    >>> server = SplitServer(model, sl, schedule=schedule, input_spec=ArraySpec((64,), "float32"),
    ...                      key=jax.random.key(0), tokens={"t": 0})                              # doctest: +SKIP
    >>> session = connect(InProcessTransport(server.handle, token="t"), model, sl, client=0, x=x, y=y)  # doctest: +SKIP
    >>> result = run(session)                                                                     # doctest: +SKIP
    >>> logits = predict(session, result.half, x_test)                                            # doctest: +SKIP
"""

from sljax.transport.alignment import Aligner, AlignServer, align
from sljax.transport.client import (
    Result,
    Session,
    connect,
    fetch_half,
    hand_over,
    predict,
    run,
    run_turn,
    status,
    train_step,
)
from sljax.transport.concurrent import ALGORITHMS, ConcurrentServer, ConcurrentState, SplitServer
from sljax.transport.coordinators import ServerState
from sljax.transport.rpc import GrpcTransport, RunningServer, serve, server_credentials
from sljax.transport.schedule import Schedule
from sljax.transport.vertical import (
    PartyResult,
    PartySession,
    VerticalServer,
    connect_party,
    predict_party,
    run_party,
    vertical_schedule,
)
from sljax.transport.wire import METHODS, SERVICE, InProcessTransport, Transport, TransportError

__all__ = [
    "ALGORITHMS",
    "AlignServer",
    "Aligner",
    "ConcurrentServer",
    "ConcurrentState",
    "METHODS",
    "SERVICE",
    "GrpcTransport",
    "InProcessTransport",
    "PartyResult",
    "PartySession",
    "Result",
    "RunningServer",
    "Schedule",
    "ServerState",
    "Session",
    "SplitServer",
    "Transport",
    "TransportError",
    "VerticalServer",
    "align",
    "connect",
    "connect_party",
    "fetch_half",
    "hand_over",
    "predict",
    "predict_party",
    "run",
    "run_party",
    "run_turn",
    "serve",
    "server_credentials",
    "status",
    "train_step",
    "vertical_schedule",
]
