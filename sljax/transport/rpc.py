"""gRPC for the `sljax.Split` service: a server around any handler, and the client transport.

No protocol buffers: the service is registered with grpcio's generic handlers, whose request and
response (de)serializers are left out, so requests and responses travel as the raw bytes of
sljax's msgpack maps (see `sljax.transport.wire` and docs/protocol.md).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import NamedTuple

import grpc

from sljax.transport import wire
from sljax.transport.wire import TransportError

logger = logging.getLogger(__name__)

# Worth retrying: the server is away (restarting, unreachable) or too slow to answer in time.
# Every method is safe to repeat (see docs/protocol.md, "Retries").
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What grpcio answers (RESOURCE_EXHAUSTED) to a call beyond the server's maximum_concurrent_rpcs: retried too.
CONCURRENCY_LIMIT = "Concurrent RPC limit exceeded!"


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
  return [
      ("grpc.max_send_message_length", max_message_bytes),
      ("grpc.max_receive_message_length", max_message_bytes),
  ]


def generic_handler(handler: wire.Handler) -> grpc.GenericRpcHandler:
  """The `sljax.Split` service as a grpcio generic handler calling `handler` with raw bytes.

  The bearer token comes from the `authorization` metadata; with mutual TLS the client
  certificate's common name(s) come from the call's auth context. A `TransportError` becomes the
  call's status; any other exception is logged and becomes INTERNAL, and the server keeps serving.
  """

  def unary(method: str):
    def serve_one(request: bytes, context: grpc.ServicerContext) -> bytes:
      metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
      names = [n.decode(errors="replace") for n in context.auth_context().get("x509_common_name", [])]
      try:
        return handler(method, request, metadata=metadata, peer_names=names)
      except TransportError as e:
        context.abort(e.code, e.details)
      except Exception:  # noqa: BLE001 -- the server must outlive a bug in one call
        logger.exception("%s from %s failed", method, context.peer())
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal server error (see the server's log)")

    # No request_deserializer / response_serializer: bytes in, bytes out.
    return grpc.unary_unary_rpc_method_handler(serve_one)

  return grpc.method_handlers_generic_handler(wire.SERVICE, {m: unary(m) for m in wire.METHODS})


class _Authenticator(grpc.ServerInterceptor):
  """Checks a call's credentials from its metadata, before its body is read: a refused call is
  answered by a handler that never asks gRPC for the request (a request-streaming one that aborts
  at once), so an unauthenticated client cannot make the server receive or hold its message."""

  def __init__(self, authenticate: Callable[[Mapping[str, str]], None]):
    self._authenticate = authenticate

  def intercept_service(self, continuation, handler_call_details):
    metadata = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
    try:
      self._authenticate(metadata)
    except TransportError as e:
      return _refusal(e.code, e.details)
    return continuation(handler_call_details)


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
  """A handler that answers `code` at once and never reads the request."""

  def refuse(request_iterator, context):
    del request_iterator  # never read
    context.abort(code, details)

  return grpc.stream_unary_rpc_method_handler(refuse)


def server_credentials(certificate_chain: bytes, private_key: bytes, *,
                       client_ca: bytes | None = None) -> grpc.ServerCredentials:
  """TLS for the server: its PEM certificate chain and key; with `client_ca`, mutual TLS.

  With `client_ca` every client must present a certificate signed by it
  (`require_client_auth=True`), and the server can identify clients by the certificate's common
  name (`SplitServer(certificate_names=...)`).

  Args:
    certificate_chain: the server's certificate chain, PEM bytes.
    private_key: the server's private key, PEM bytes.
    client_ca: the PEM certificate of the CA that signs the clients' certificates; None for TLS
      without client certificates.

  Returns:
    The `grpc.ServerCredentials` to pass to `serve(..., credentials=...)`.

  Example:
    Not run by the doctests: it needs certificate files (tests/test_transport.py makes some).

    >>> chain, key = open("server.pem", "rb").read(), open("server.key", "rb").read()  # doctest: +SKIP
    >>> credentials = server_credentials(chain, key)  # doctest: +SKIP
    >>> running = serve(server.handle, address="0.0.0.0:50051", credentials=credentials)  # doctest: +SKIP
  """
  return grpc.ssl_server_credentials([(private_key, certificate_chain)], root_certificates=client_ca,
                                     require_client_auth=client_ca is not None)


class RunningServer(NamedTuple):
  """A started gRPC server and the port it listens on."""

  server: grpc.Server
  port: int

  def stop(self, grace: float | None = 1.0) -> None:
    self.server.stop(grace).wait()


def serve(handler: wire.Handler, *, address: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None,
          max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES, max_workers: int = 16,
          maximum_concurrent_rpcs: int | None = None,
          authenticate: Callable[[Mapping[str, str]], None] | None = None) -> RunningServer:
  """Starts a gRPC server for `handler` (e.g. `SplitServer.handle`) on `address` ("host:port"; port 0 picks one).

  Requests above `max_message_bytes` are refused by gRPC itself with RESOURCE_EXHAUSTED.
  `max_workers` bounds the calls served at once; it must exceed the number of clients, since a
  client waiting (for its turn, at a barrier) holds a worker for up to a lease; each client has at
  most one call waiting at a time (see `ConcurrentServer`). `maximum_concurrent_rpcs` bounds the
  calls served or queued for a worker: gRPC answers any further call at once with
  RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" (which `GrpcTransport` retries); None: no bound.

  `authenticate(metadata)` runs in a server interceptor before a call's body is read and refuses
  it by raising a `TransportError` (UNAUTHENTICATED): unknown tokens never cost the server the
  memory of their requests. By default it is the `authenticate_metadata` of the server whose
  `handle` is `handler`, if it has one.

  Args:
    handler: `handler(method, request, *, metadata, peer_names) -> response` on bytes, e.g.
      `SplitServer.handle`.
    address: "host:port" to listen on; port 0 picks a free one.
    credentials: TLS (`server_credentials`); None listens without TLS.
    max_message_bytes: the largest request or response.
    max_workers: the calls served at once.
    maximum_concurrent_rpcs: the calls served or queued; None for no bound.
    authenticate: `authenticate(metadata)`, raising `TransportError` to refuse a call.

  Returns:
    The `RunningServer`: the started gRPC server and its port (`running.stop()` stops it).

  Example:
    >>> running = serve(server.handle, max_workers=12, maximum_concurrent_rpcs=24)  # doctest: +SKIP
  """
  if authenticate is None:
    authenticate = getattr(getattr(handler, "__self__", None), "authenticate_metadata", None)
  interceptors = () if authenticate is None else (_Authenticator(authenticate),)
  if maximum_concurrent_rpcs is not None and maximum_concurrent_rpcs < 1:
    raise ValueError(f"maximum_concurrent_rpcs: expected a positive int or None, got {maximum_concurrent_rpcs}")
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_channel_options(max_message_bytes),
                       interceptors=interceptors, maximum_concurrent_rpcs=maximum_concurrent_rpcs)
  server.add_generic_rpc_handlers((generic_handler(handler),))
  if credentials is None:
    host = address.rsplit(":", 1)[0].strip("[]")
    if not _is_loopback(host):
      logger.warning("serving without TLS on %s: tokens and data travel in clear", address)
    port = server.add_insecure_port(address)
  else:
    port = server.add_secure_port(address, credentials)
  if port == 0:
    raise OSError(f"cannot listen on {address}")
  server.start()
  logger.info("serving %s on port %d (%s)", wire.SERVICE, port, "TLS" if credentials else "no TLS")
  return RunningServer(server, port)


def _target_host(target: str) -> str | None:
  """The host of a gRPC target ("host:port", "[v6]:port", "dns:///host:port"); None for a Unix socket."""
  if target.startswith(("unix:", "unix-abstract:")):
    return None
  if "://" in target:  # scheme://[authority]/host:port
    rest = target.split("://", 1)[1]
    target = rest.split("/", 1)[1] if "/" in rest else rest
  elif target.startswith("dns:"):
    target = target[len("dns:"):]
  if target.startswith("["):
    return target[1:].split("]", 1)[0]
  return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


class GrpcTransport:
  """The client's side of the `sljax.Split` service over gRPC, with retries.

  Args:
    target: "host:port".
    token: bearer token, sent as `authorization: Bearer <token>` metadata on every call.
    root_certificates: PEM CA certificate(s) to verify the server with; gives a TLS channel.
    private_key, certificate_chain: PEM key and certificate of this client, for mutual TLS.
    server_name: the name the server's certificate must carry, if not the host of `target`.
    max_message_bytes: the largest request and response allowed.
    deadline: seconds each attempt of a call may take, unless `call(timeout=...)` says otherwise.
    retries: attempts after the first when the server is away (UNAVAILABLE), slow
      (DEADLINE_EXCEEDED) or at its limit of concurrent calls (RESOURCE_EXHAUSTED "Concurrent RPC
      limit exceeded!"). Every method is safe to repeat.
    backoff, max_backoff: before attempt n + 1 the client waits up to min(max_backoff, backoff * 2**n)
      seconds (exponential backoff), and less when the server is back sooner: after a random pause
      of at most `backoff` (jitter), it tries again as soon as the channel connects (gRPC reconnects
      every 0.1 to 1 s), so a restarted server is found within about a second of listening. After
      "Concurrent RPC limit exceeded!" it waits between half and all of that bound.
    seed: seeds the jitter (None: from the OS).
    allow_plaintext_token: send `token` over a channel without TLS to a host that is not this
      machine (not a loopback address, `localhost` or a Unix socket). Without it such a transport
      is refused: anyone on the path could read the token and act as this client. On a loopback
      address a token without TLS is sent with a warning.

  Example:
    >>> transport = GrpcTransport("127.0.0.1:50051", token="s3cret")    # doctest: +SKIP
    >>> transport.call("Status", wire.encode({"client": 0}))            # doctest: +SKIP
  """

  def __init__(self, target: str, *, token: str | None = None, root_certificates: bytes | None = None,
               private_key: bytes | None = None, certificate_chain: bytes | None = None,
               server_name: str | None = None, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
               deadline: float = 60.0, retries: int = 8, backoff: float = 0.1, max_backoff: float = 5.0,
               seed: int | None = None, allow_plaintext_token: bool = False):
    if (private_key is None) != (certificate_chain is None):
      raise ValueError("private_key, certificate_chain: give both (mutual TLS) or neither")
    tls = root_certificates is not None or certificate_chain is not None
    if token is not None and not tls:
      host = _target_host(target)
      if host is not None and not _is_loopback(host) and not allow_plaintext_token:
        raise ValueError(f"token: would travel in clear to {target!r}, a host other than this machine, over a channel "
                         "without TLS; give root_certificates (sljax client --tls-ca) to verify the server, or "
                         "allow_plaintext_token=True (--allow-plaintext-token) on a network you trust")
      logger.warning("sending the bearer token to %s without TLS: anyone who can read the traffic can act as this "
                     "client", target)
    options = _channel_options(max_message_bytes) + [
        # Reconnect soon after a server restart; our own retries pace the calls.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if server_name is not None:
      options.append(("grpc.ssl_target_name_override", server_name))
    if tls:
      credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
      self._channel = grpc.secure_channel(target, credentials, options=options)
    else:
      self._channel = grpc.insecure_channel(target, options=options)
    self._stubs = {m: self._channel.unary_unary(wire.method_path(m)) for m in wire.METHODS}
    self._metadata = () if token is None else ((wire.TOKEN_METADATA, f"Bearer {token}"),)
    self.target = target
    self.deadline = deadline
    self.retries = retries
    self.backoff = backoff
    self.max_backoff = max_backoff
    self._random = random.Random(seed)
    self._polled_at = -1.0

  def call(self, method: str, request: bytes, *, timeout: float | None = None) -> bytes:
    """Calls `method` with the request's bytes; retries while the server is away or slow.

    Raises:
      TransportError: the call's status code and details once it fails for good.
    """
    stub = self._stubs.get(method)
    if stub is None:
      raise TransportError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")
    for attempt in range(self.retries + 1):
      try:
        return stub(request, timeout=self.deadline if timeout is None else timeout, metadata=self._metadata)
      except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        retryable = code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == CONCURRENCY_LIMIT)
        if not retryable or attempt == self.retries:
          raise TransportError(code, details) from None
        cap = min(self.max_backoff, self.backoff * 2**attempt)
        logger.info("%s: %s (%s); retry %d of %d within %.2f s", method, code.name, details, attempt + 1,
                    self.retries, cap)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the server is there and busy: back off in full
          time.sleep(self._random.uniform(cap / 2, cap))
        else:
          self._pause(cap)
    raise AssertionError("unreachable")

  def _pause(self, cap: float) -> None:
    """Waits before a retry: a random pause of at most `backoff`, then until the channel is ready
    (the server listens again), `cap` seconds in all at most."""
    start = time.monotonic()
    time.sleep(self._random.uniform(0.0, min(self.backoff, cap)))
    ready = grpc.channel_ready_future(self._channel)
    try:
      ready.result(timeout=max(0.0, cap - (time.monotonic() - start)))
    except grpc.FutureTimeoutError:
      pass
    finally:
      ready.cancel()
      self._polled_at = time.monotonic()

  def close(self) -> None:
    # gRPC's connectivity poller, started by `channel_ready_future`, stops within 0.2 s of its last
    # subscriber; a channel closed under it raises in the poller's thread.
    time.sleep(max(0.0, self._polled_at + 0.3 - time.monotonic()))
    self._channel.close()
