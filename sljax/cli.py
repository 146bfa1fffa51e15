"""The `sljax` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import jax
import optax

from sljax import data, models, protocol, split, training


def _demo_runs(args) -> list[dict]:
  """Trains the demo MLP and CNN on digits: vanilla and U-shaped split, and centralized."""
  digits_img = data.load_digits(seed=args.seed, image=True)
  digits_flat = data.load_digits(seed=args.seed, image=False)
  setups = [
      ("MLP", digits_flat, models.mlp(hidden=(128, 128)), (1,), (1, 2), args.epochs_mlp),
      ("CNN", digits_img, models.cnn(), (2,), (2, 3), args.epochs_cnn),
  ]
  rows = []
  for name, ds, layers, vanilla_cut, u_cut, epochs in setups:
    runs = [
        ("split", protocol.vanilla, split.cut(layers, *vanilla_cut)),
        ("u-shaped", protocol.u_shaped, split.cut(layers, *u_cut)),
        ("centralized", None, split.cut(layers, *vanilla_cut)),
    ]
    for how, factory, model in runs:
      opt = optax.adam(args.lr)
      if factory is None:
        trainer = protocol.centralized(model, optimizer=opt)
      else:
        trainer = factory(model, client_optimizer=opt, server_optimizer=opt)
      start = time.perf_counter()
      state = trainer.init(jax.random.key(args.seed), ds.x_train[:1])
      state, history = training.fit(
          trainer, state, ds.x_train, ds.y_train, key=jax.random.key(args.seed + 1), epochs=epochs,
          batch_size=args.batch_size, progress=not args.json, description=f"{name} {how}",
      )
      test = training.evaluate(trainer, state, ds.x_test, ds.y_test)
      rows.append({
          "model": name, "training": how, "epochs": epochs, "test_accuracy": test["accuracy"],
          "train_bytes_up": sum(h["bytes_up"] for h in history),
          "train_bytes_down": sum(h["bytes_down"] for h in history),
          "inference_bytes_up": test["bytes_up"], "inference_bytes_down": test["bytes_down"],
          "seconds": time.perf_counter() - start,
      })
  return rows


def _mb(n: int) -> str:
  return f"{n / 1e6:.2f}"


def demo(args) -> int:
  start = time.perf_counter()
  rows = _demo_runs(args)
  total = time.perf_counter() - start
  if args.json:
    print(json.dumps({"runs": rows, "total_seconds": total}))
    return 0
  print(f"sljax demo: digits (scikit-learn), 1 client + 1 server, {jax.device_count()} {jax.default_backend()} device(s)")
  print(f"{'model':5} {'training':12} {'epochs':>6} {'test acc':>8} {'train MB up':>11} {'train MB down':>13} "
        f"{'infer MB up':>11} {'infer MB down':>13} {'seconds':>7}")
  for r in rows:
    print(f"{r['model']:5} {r['training']:12} {r['epochs']:6d} {r['test_accuracy']:8.4f} {_mb(r['train_bytes_up']):>11} "
          f"{_mb(r['train_bytes_down']):>13} {_mb(r['inference_bytes_up']):>11} {_mb(r['inference_bytes_down']):>13} "
          f"{r['seconds']:7.1f}")
  print(f"total {total:.1f} s (compilation included). Bytes are exact wire bytes of the messages; "
        "inference sends no labels.")
  return 0


def _hidden(text: str) -> tuple[int, ...]:
  return tuple(int(h) for h in text.split(",") if h)


def _read(path: str | None) -> bytes | None:
  if path is None:
    return None
  with open(path, "rb") as f:
    return f.read()


def default_compilation_cache() -> str:
  """Where `sljax serve` and `sljax client` keep compiled programs: `$XDG_CACHE_HOME/sljax/xla`,
  else `~/.cache/sljax/xla`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sljax", "xla")


def _use_compilation_cache(args) -> None:
  """JAX's persistent compilation cache for `serve` and `client`, set here and never in the library.

  A server compiles its steps when it starts, a client its legs when it connects: a few seconds
  unloaded, tens on a busy machine. With the cache, a restart loads them from disk. Every program
  is cached (XLA:CPU too), however fast it compiled; the cache key covers the program, the jax
  version, the backend and the compiler flags, so a stale entry is never loaded.
  `--no-compilation-cache` turns the cache off, also one set through JAX_COMPILATION_CACHE_DIR.
  """
  if args.no_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  directory = args.compilation_cache or jax.config.jax_compilation_cache_dir or default_compilation_cache()
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor, none imposed by jax
  logging.getLogger("sljax").info("compilation cache: %s", directory)


def _add_cache_args(p) -> None:
  p.add_argument("--compilation-cache", metavar="DIR",
                 help="JAX's persistent compilation cache: a restart loads its compiled steps from here "
                      "(default: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/sljax/xla or ~/.cache/sljax/xla)")
  p.add_argument("--no-compilation-cache", action="store_true", help="compile everything afresh; write no cache")


def _transport_setup(args):
  """The demo setup of `sljax serve` and `sljax client`; with --u-shaped, the model cut in three
  (head | body | tail, as `sljax demo` cuts it) with `u_shaped` legs."""
  from sljax.transport import demo as demo_setup

  setup = demo_setup.digits_setup(model=args.model, hidden=_hidden(args.hidden), dropout=args.dropout, lr=args.lr,
                                  seed=args.data_seed)
  if not args.u_shaped:
    return setup
  if args.model == "mlp":
    model = split.cut(models.mlp(hidden=_hidden(args.hidden), dropout=args.dropout), 1, 2)
  else:
    model = split.cut(models.cnn(dropout=args.dropout), 2, 3)
  opt = optax.adam(args.lr)
  return setup._replace(model=model, sl=protocol.u_shaped(model, client_optimizer=opt, server_optimizer=opt))


def _aggregation(text: str):
  """`--aggregation`: mean, median, trimmed_mean:F or centered_clipping:R, as an aggregator."""
  from sljax.algorithms import aggregation

  name, _, value = text.partition(":")
  try:
    if name in ("mean", "median") and not value:
      return getattr(aggregation, name)()
    if name in ("trimmed_mean", "centered_clipping") and value:
      return getattr(aggregation, name)(float(value))
  except ValueError as e:
    raise SystemExit(f"--aggregation {text}: {e}") from None
  raise SystemExit(f"--aggregation: expected mean, median, trimmed_mean:F or centered_clipping:R, got {text!r}")


def _cuts(args, client: int | None = None):
  """`--cuts` (heterogeneous parallel SL): the algorithm's options and, for a client, the demo model
  cut at its own cut with the demo's optimizers; ({}, the setup) without it."""
  setup = _transport_setup(args)
  if not args.cuts:
    return {}, setup
  cuts = [int(c) for c in args.cuts.split(",")]
  if len(cuts) != args.num_clients:
    raise SystemExit(f"--cuts: expected one cut per client (--num-clients {args.num_clients}), got {args.cuts!r}")
  if client is None:
    return {"cuts": cuts}, setup
  if not 0 <= client < len(cuts):
    raise SystemExit(f"--client-id {client}: expected one of 0..{len(cuts) - 1}")
  layers = setup.model.client.layers + setup.model.server.layers
  model = split.cut(layers, cuts[client])
  sl = protocol.vanilla(model, client_optimizer=setup.sl.client_optimizer, server_optimizer=setup.sl.server_optimizer,
                        loss=setup.sl.loss)
  return {"cuts": cuts}, setup._replace(model=model, sl=sl)


def _recorder(args):
  """`sljax serve --transcript PATH`: the server's recorder, its header naming the run."""
  if not args.transcript:
    return None
  from sljax.privacy import transcript  # noqa: PLC0415 -- only where a transcript is asked for

  meta = {"algorithm": args.algorithm, "model": args.model, "hidden": args.hidden, "num_clients": args.num_clients,
          "seed": args.seed, "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size}
  return transcript.Recorder(args.transcript, meta=meta)


VERTICAL_TASKS = ("credit_fraud", "breast_cancer_2", "breast_cancer_4")


def _vertical_setup(args):
  """`--vertical TASK`: the task's parties (aligned: the same samples in the same order), and
  `vertical_sl` on an MLP bottom per party (16 hidden units, 8 outputs, --dropout), concat, an MLP
  top (16 hidden units), Adam at --lr everywhere; the first party is the label party, with its own
  columns and bottom."""
  from sljax import merges, vertical  # noqa: PLC0415 -- only for vertical SL

  if args.vertical == "credit_fraud":
    ds = data.make_credit_fraud(seed=args.data_seed)
  else:
    ds = data.load_breast_cancer_vertical(num_parties=int(args.vertical[-1]), seed=args.data_seed)
  bottom = lambda: split.sequential(*models.mlp(hidden=(16,), num_classes=8, dropout=args.dropout))  # noqa: E731
  classes = int(ds.dataset.y_train.max()) + 1
  top = split.sequential(*models.mlp(hidden=(16,), num_classes=classes, dropout=args.dropout))
  model = split.vertical_model([bottom() for _ in ds.parties], merges.concat(), top, names=ds.parties,
                               label_party=ds.parties[0])
  opt = optax.adam(args.lr)
  return ds, vertical.vertical_sl(model, party_optimizers=opt, top_optimizer=opt)


def _check_align(args) -> None:
  if getattr(args, "continue_without", False) and not args.vertical:
    raise SystemExit("--continue-without: vertical split learning's (--vertical)")
  if (args.align or args.overlap != 1.0) and not args.vertical:
    raise SystemExit("--align, --overlap: vertical split learning's (--vertical)")
  if not 0 < args.overlap <= 1:
    raise SystemExit(f"--overlap: expected a share in (0, 1], got {args.overlap}")


def _party_rows(args, ds, p: int):
  """`--vertical --align`: party p's training rows: a seeded share `--overlap` of the task's, in an
  order of its own (from --data-seed and p alone); every row, in order, without --align."""
  import numpy as np  # noqa: PLC0415

  n = len(ds.dataset.y_train)
  if not args.align:
    return np.arange(n)
  return np.random.default_rng([args.data_seed, p]).permutation(n)[: max(1, round(args.overlap * n))]


def _serve_vertical(args, common: dict):
  """`sljax serve --vertical TASK`: the label party's server (the task's first party); with --align,
  it first aligns its rows with the other parties' by PSI over the same service."""
  from sljax.transport import alignment, vertical  # noqa: PLC0415 -- gRPC is imported only where needed

  ds, sl = _vertical_setup(args)
  xs, test = ds.parties_train(), ds.parties_test()
  if common["certificate_names"]:
    common["certificate_names"] = {f"client-{k}": k for k in range(1, len(ds.parties))}
  for name in ("schedule", "input_spec", "max_samples", "recorder"):
    del common[name]
  rows = _party_rows(args, ds, 0)
  aligner = None
  if args.align:
    members = {k: name for k, name in enumerate(ds.parties) if k}
    aligner = alignment.Aligner(list(ds.ids_train[rows]), members=members, name=ds.parties[0])
  return vertical.VerticalServer(
      sl, labels=ds.dataset.y_train[rows], input_specs=tuple(protocol.ArraySpec.of(x) for x in xs), rounds=args.rounds,
      batch_size=args.batch_size, local_steps=args.local_steps, features=xs[0][rows], predict_features=test[0],
      aligner=aligner, continue_without=args.continue_without, **common)


def serve(args) -> int:
  """`sljax serve`: the server of sequential split learning (vanilla with --num-clients 1; U-shaped with
  --u-shaped), or an algorithm whose clients train at once (`--algorithm`), or the label party of
  vertical split learning (`--vertical`), over gRPC."""
  import signal
  import threading

  from sljax import transport
  from sljax.transport import demo as demo_setup

  _check_align(args)
  if args.vertical:
    if args.algorithm != "sequential_sl" or args.u_shaped or args.cuts or args.sealed_handoffs or args.transcript:
      raise SystemExit("--vertical: runs vertical split learning; --algorithm, --u-shaped, --cuts, --sealed-handoffs "
                       "and --transcript are for horizontal split learning")
    args.num_clients = {"credit_fraud": 3, "breast_cancer_2": 2, "breast_cancer_4": 4}[args.vertical]
  elif args.local_steps is None:
    args.local_steps = 20
  if args.u_shaped and args.algorithm not in ("sequential_sl", "parallel_sl_u"):
    raise SystemExit(f"--u-shaped: runs with --algorithm sequential_sl or parallel_sl_u, got {args.algorithm}")
  args.u_shaped = args.u_shaped or args.algorithm == "parallel_sl_u"  # U-shaped legs, whatever the flag says
  if (args.algorithm == "heterogeneous_parallel_sl") != bool(args.cuts):
    raise SystemExit(f"--cuts: given with --algorithm heterogeneous_parallel_sl, and only then; got --algorithm "
                     f"{args.algorithm} and --cuts {args.cuts!r}")
  options, setup = _cuts(args) if not args.vertical else ({}, None)
  if args.sealed_handoffs and args.algorithm != "sequential_sl":
    raise SystemExit(f"--sealed-handoffs: only sequential SL hands client halves over through the server "
                     f"(--algorithm sequential_sl), got --algorithm {args.algorithm}")
  if args.aggregation != "mean":
    if args.algorithm not in ("splitfed_v1", "splitfed_v2"):
      raise SystemExit(f"--aggregation: SplitFed's (--algorithm splitfed_v1 or splitfed_v2), got --algorithm "
                       f"{args.algorithm}")
    options["aggregation"] = _aggregation(args.aggregation)
  tokens = None
  if args.token_file:
    tokens = {token: client for client, token in demo_setup.read_tokens(args.token_file).items()}
  names = {f"client-{k}": k for k in range(args.num_clients)} if args.client_ca else None
  max_bytes = int(args.max_message_mb * 1024 * 1024)
  schedule = transport.Schedule(args.num_clients, args.rounds, args.local_steps or 1, args.batch_size)
  common = dict(schedule=schedule, input_spec=None if args.vertical else protocol.ArraySpec.of(setup.dataset.x_train),
                key=jax.random.key(args.seed), tokens=tokens, certificate_names=names,
                checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                lease_seconds=args.lease_seconds, max_message_bytes=max_bytes,
                max_abs_value=args.max_abs_value if args.max_abs_value > 0 else None, max_samples=args.max_samples,
                recorder=_recorder(args))
  if args.vertical:
    server = _serve_vertical(args, common)
  elif args.algorithm == "sequential_sl":
    server = transport.SplitServer(setup.model, setup.sl, sealed_handoffs=args.sealed_handoffs, **common)
  else:
    server = transport.ConcurrentServer(setup.model, setup.sl, algorithm=args.algorithm, options=options, **common)
  credentials = None
  if args.tls_cert:
    credentials = transport.server_credentials(_read(args.tls_cert), _read(args.tls_key),
                                               client_ca=_read(args.client_ca))
  workers = args.num_clients + 8
  running = transport.serve(server.handle, address=f"{args.host}:{args.port}", credentials=credentials,
                            max_message_bytes=max_bytes, max_workers=workers,
                            maximum_concurrent_rpcs=args.max_concurrent_rpcs or 2 * workers)
  if args.port_file:  # written whole, then renamed: a reader never sees half a number
    with open(args.port_file + ".tmp", "w") as f:
      f.write(str(running.port))
    os.replace(args.port_file + ".tmp", args.port_file)
  # a vertical server that aligns first knows its steps per round (an epoch of the shared rows) once aligned
  local_steps = getattr(getattr(server, "schedule", None), "local_steps", None) or args.local_steps or "an epoch's"
  logging.getLogger("sljax").info("sljax serve: %s on %s:%d, %d %s, %d round(s) of %s step(s)", server.algorithm,
                                  args.host, running.port, args.num_clients,
                                  "parties" if args.vertical else "client(s)", args.rounds, local_steps)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  stop.wait()
  running.stop(grace=1.0)
  server.close()
  return 0


def _client_link(args, token):
  """`sljax client`'s gRPC transport to --target, or None (the error printed) if its options are refused."""
  from sljax import transport  # noqa: PLC0415 -- gRPC is imported only where needed

  try:
    return transport.GrpcTransport(args.target, token=token, root_certificates=_read(args.tls_ca),
                                   private_key=_read(args.tls_key), certificate_chain=_read(args.tls_cert),
                                   server_name=args.server_name, deadline=args.deadline, retries=args.retries,
                                   allow_plaintext_token=args.allow_plaintext_token)
  except ValueError as e:
    print(f"sljax client: {e}", file=sys.stderr)
    return None


def _vertical_client(args, link, ds, sl) -> int:
  """`sljax client --vertical TASK --party NAME`: one party of vertical SL, its columns of the
  task's aligned rows: training, then collaborative inference on its test columns."""
  from sljax import transport  # noqa: PLC0415 -- gRPC is imported only where needed

  p = ds.parties.index(args.party)
  start = time.perf_counter()
  try:
    rows = _party_rows(args, ds, p)
    session = transport.connect_party(link, sl, party=args.party, x=ds.parties_train()[p][rows],
                                      ids=list(ds.ids_train[rows]) if args.align else None)
    result = transport.run_party(session, progress=args.progress, checkpoint_dir=args.checkpoint_dir)
    outputs = transport.predict_party(session, result.state, ds.parties_test()[p])
  except (transport.TransportError, ValueError) as e:
    print(f"sljax client: {e}", file=sys.stderr)
    return 1
  finally:
    link.close()
  history = result.history
  row = {"party": args.party, "aligned": len(session.x), "steps": len(history),
         "applied": sum(h["applied"] for h in history),
         "train_bytes_up": sum(h["bytes_up"] for h in history),
         "train_bytes_down": sum(h["bytes_down"] for h in history), "predictions": len(outputs),
         "seconds": time.perf_counter() - start}
  if args.json:
    print(json.dumps(row))
  else:
    print(f"party {args.party}: {row['aligned']} aligned samples, {row['steps']} steps ({row['applied']} applied), "
          f"train MB up "
          f"{_mb(row['train_bytes_up'])} down {_mb(row['train_bytes_down'])}, {len(outputs)} test rows predicted "
          f"(collaborative inference; the label party holds the labels), {row['seconds']:.1f} s")
  return 0


def client(args) -> int:
  """`sljax client`: one party of the demo, training over gRPC, then collaborative inference."""
  from sljax import transport
  from sljax.transport import demo as demo_setup

  _check_align(args)
  vertical_setup = None
  if args.vertical:
    vertical_setup = _vertical_setup(args)
    parties = vertical_setup[0].parties
    if args.party not in parties[1:]:
      print(f"sljax client: --party: expected one of the parties {parties[1:]} of {args.vertical} (the first, "
            f"{parties[0]!r}, is the label party: sljax serve --vertical), got {args.party!r}", file=sys.stderr)
      return 2
    args.client_id = parties.index(args.party)
  elif args.client_id is None:
    raise SystemExit("--client-id: required (or --vertical TASK --party NAME)")

  from sljax.privacy import handoff

  token = demo_setup.read_tokens(args.token_file)[args.client_id] if args.token_file else None
  if vertical_setup is not None:
    link = _client_link(args, token)
    return 2 if link is None else _vertical_client(args, link, *vertical_setup)
  options, setup = _cuts(args, args.client_id)
  try:
    handoff_key = handoff.read_key(args.handoff_key_file) if args.handoff_key_file else None
  except (OSError, ValueError) as e:
    print(f"sljax client: --handoff-key-file: {e}", file=sys.stderr)
    return 2
  ds = setup.dataset
  part = data.iid(ds.y_train, num_clients=args.num_clients, seed=args.partition_seed)[args.client_id]
  link = _client_link(args, token)
  if link is None:
    return 2
  start = time.perf_counter()
  try:
    session = transport.connect(link, setup.model, setup.sl, client=args.client_id, x=ds.x_train[part],
                                y=ds.y_train[part], options=options, handoff_key=handoff_key)
    if session.schedule.num_clients != args.num_clients:
      raise SystemExit(f"--num-clients {args.num_clients}: the server runs {session.schedule.num_clients} clients")
    result = transport.run(session, progress=args.progress, checkpoint_dir=args.checkpoint_dir)
    logits = transport.predict(session, result.half, ds.x_test)
  except (transport.TransportError, handoff.HandoffError) as e:
    print(f"sljax client: {e}", file=sys.stderr)
    return 1
  finally:
    link.close()
  accuracy = float((logits.argmax(-1) == ds.y_test).mean())
  row = {"client": args.client_id, "steps": len(result.history), "test_accuracy": accuracy,
         "train_bytes_up": sum(h["bytes_up"] for h in result.history),
         "train_bytes_down": sum(h["bytes_down"] for h in result.history),
         "last_loss": result.history[-1]["loss"] if result.history else None,
         "seconds": time.perf_counter() - start}
  if args.json:
    print(json.dumps(row))
  else:
    print(f"client {row['client']}: {row['steps']} steps, last loss {row['last_loss']}, test accuracy "
          f"{accuracy:.4f} (collaborative inference), train MB up {_mb(row['train_bytes_up'])} down "
          f"{_mb(row['train_bytes_down'])}, {row['seconds']:.1f} s")
  return 0


def _read_ids(path: str) -> list[str]:
  """`sljax align --ids`: one ID per line (UTF-8), the line's end stripped; an empty line is refused."""
  with open(path, encoding="utf-8") as f:
    ids = [line.rstrip("\r\n") for line in f]
  empty = next((number for number, i in enumerate(ids, 1) if not i), None)
  if empty is not None:
    raise ValueError(f"{path}:{empty}: an empty line; expected one ID per line")
  return ids


def align_ids(args) -> int:
  """`sljax align`: private set intersection of this party's sample IDs with the other parties'
  (vertical SL): the label party serves (`--serve`, the leader), every other party connects; each
  writes its rows of the shared samples, in the common order, to `--out`."""
  from sljax import transport  # noqa: PLC0415 -- gRPC is imported only where needed
  from sljax.transport import demo as demo_setup  # noqa: PLC0415

  start = time.perf_counter()
  try:
    ids = _read_ids(args.ids)
    tokens = demo_setup.read_tokens(args.token_file) if args.token_file else {}
  except (OSError, ValueError) as e:
    print(f"sljax align: {e}", file=sys.stderr)
    return 2
  if args.serve:
    try:
      members = {int(k): name for k, name in (m.split(":", 1) for m in (args.members or "").split(",") if m)}
    except ValueError:
      members = {}
    if not members:
      print(f"sljax align: --members: expected 'ID:NAME,...' (each other party's client id and name), got "
            f"{args.members!r}", file=sys.stderr)
      return 2
    try:
      aligner = transport.Aligner(ids, members=members, name=args.name, fpr=args.fpr)
      names = {f"client-{k}": k for k in members} if args.client_ca else None
      server = transport.AlignServer(aligner, tokens={t: k for k, t in tokens.items()} or None,
                                     certificate_names=names)
    except (ValueError, TypeError) as e:
      print(f"sljax align: {e}", file=sys.stderr)
      return 2
    credentials = None
    if args.tls_cert:
      credentials = transport.server_credentials(_read(args.tls_cert), _read(args.tls_key),
                                                 client_ca=_read(args.client_ca))
    running = transport.serve(server.handle, address=f"{args.host}:{args.port}", credentials=credentials,
                              max_workers=len(members) + 8)
    if args.port_file:  # written whole, then renamed: a reader never sees half a number
      with open(args.port_file + ".tmp", "w") as f:
        f.write(str(running.port))
      os.replace(args.port_file + ".tmp", args.port_file)
    try:
      if not aligner.wait(args.wait_seconds, until="answered"):
        print(f"sljax align: the parties {aligner.pending} did not align within --wait-seconds "
              f"{args.wait_seconds:g}", file=sys.stderr)
        return 1
    finally:
      running.stop(grace=1.0)
    result = aligner.result()
    if not result.size:
      print(f"sljax align: the parties {(args.name, *members.values())} share no sample", file=sys.stderr)
      return 1
  else:
    if args.client_id is None:
      print("sljax align: --client-id: required without --serve (this party's client id)", file=sys.stderr)
      return 2
    link = _client_link(args, tokens.get(args.client_id))
    if link is None:
      return 2
    try:
      result = transport.align(link, ids, client=args.client_id)
    except (transport.TransportError, ValueError, TypeError, RuntimeError) as e:
      print(f"sljax align: {e}", file=sys.stderr)
      return 1
    finally:
      link.close()
  (party,) = result.rows
  rows = result.rows[party]
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write("".join(f"{r}\n" for r in rows))
  row = {"party": party, "leader": result.leader, "ids": len(ids), "shared": result.size, "out": args.out,
         "seconds": time.perf_counter() - start}
  if args.json:
    print(json.dumps(row))
  else:
    print(f"party {party}: {result.size} of its {len(ids)} IDs shared by every party (leader {result.leader}); "
          f"rows {'in ' + args.out if args.out else 'not written (no --out)'}, {row['seconds']:.1f} s")
  return 0


def _profile_data(model: str, seed: int):
  """The demo data a model of `sljax profile-cuts` takes: digits (flat or 8x8 images) or MNIST-1D."""
  if model == "mlp":
    return data.load_digits(seed=seed, image=False)
  if model in ("cnn1d", "ds_cnn1d"):
    return data.make_mnist1d(seed=seed, num_samples=1000)
  return data.load_digits(seed=seed, image=True)


def profile_cuts(args) -> int:
  """`sljax profile-cuts`: the cut table of a demo model (sljax.analysis), and the best cut."""
  from sljax import analysis

  ds = _profile_data(args.model, args.seed)
  opt = {"adam": optax.adam, "sgd": optax.sgd}[args.optimizer](args.lr)
  cuts = None if not args.cuts else [int(c) if c.isdigit() else c for c in args.cuts.split(",")]
  try:
    table = analysis.profile_cuts(
        getattr(models, args.model)(), example_x=ds.x_train[:1], batch_size=args.batch_size, client_optimizer=opt,
        cuts=cuts, budget=args.budget, memory_options=tuple(o for o in args.memory_options.split(",") if o),
        privacy_sample=ds.x_test[:args.privacy_sample] if args.privacy_sample else None,
        attack_inputs=ds.x_train[:args.attack] if args.attack else None,
        client_profile=None if args.device == "none" else args.device, algorithm=args.algorithm,
        num_clients=args.num_clients, key=jax.random.key(args.seed))
  except ValueError as e:
    print(f"sljax profile-cuts: {e}", file=sys.stderr)
    return 2
  best, no_fit = None, None
  try:
    best = analysis.best_cut(table, minimize=args.minimize, client_memory=args.budget)
  except analysis.NoCutFits as e:
    no_fit = str(e)
  if args.plot:
    analysis.plot_cuts(table, title=f"{args.model}, batch {args.batch_size}").savefig(args.plot, dpi=110)
  if args.json:
    print(json.dumps({"model": args.model, **table.to_dict(), "minimize": args.minimize,
                      "best": None if best is None else best.to_dict(), "no_fit": no_fit}))
  else:
    print(table)
    within = f" within {args.budget}" if args.budget else ""
    print(no_fit or f"best cut for the least {args.minimize}{within}: {best.cut} (after {best.layer!r})")
  return 1 if no_fit else 0


def privacy_report(args) -> int:
  """`sljax privacy-report TRANSCRIPT`: the applicable attacks on a recorded run, as a table or JSON."""
  from sljax.privacy import report, transcript  # noqa: PLC0415 -- the privacy extra, only here

  try:
    table = report.privacy_report(args.transcript, defense=args.defense, epsilon=args.epsilon,
                                  utility_cost=args.utility_cost)
  except (OSError, transcript.TranscriptError) as e:
    print(f"sljax privacy-report: {e}", file=sys.stderr)
    return 1
  print(json.dumps(table.to_dict()) if args.json else str(table))
  return 0


def _add_setup_args(p) -> None:
  """The demo's model and schedule: server and clients must give the same values."""
  p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
  p.add_argument("--hidden", default="128,128", help="MLP hidden sizes, comma-separated")
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--data-seed", type=int, default=0, help="train/test split of digits")
  p.add_argument("--num-clients", type=int, default=1)
  p.add_argument("--u-shaped", action="store_true",
                 help="U-shaped split learning (sequential, or parallel: --algorithm parallel_sl_u): the model cut in "
                      "three, labels stay with the clients")
  p.add_argument("--vertical", choices=VERTICAL_TASKS,
                 help="vertical split learning on this task (the parties' columns of the same samples): serve on "
                      "the label party (the task's first party), sljax client --party NAME on each other party")
  p.add_argument("--align", action="store_true",
                 help="--vertical: each party holds a seeded share --overlap of the samples, in its own order, and "
                      "the parties align them by private set intersection over the service before training")
  p.add_argument("--overlap", type=float, default=1.0, help="--vertical --align: the share of samples each party holds")
  p.add_argument("--cuts", default="",
                 help="heterogeneous parallel SL (--algorithm heterogeneous_parallel_sl): each client's cut into the "
                      "MLP's layers, comma-separated, one per client, e.g. 1,2 with --hidden 128,128")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sljax", description="Split learning for JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("demo", help="train the demo models on digits, split and centralized")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs-mlp", type=int, default=20)
  p.add_argument("--epochs-cnn", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  p.set_defaults(run=demo)

  p = sub.add_parser("serve", help="serve split learning over gRPC (sequential SL; vanilla with one client)")
  _add_setup_args(p)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=50051, help="0 picks a free port (see --port-file)")
  p.add_argument("--port-file", help="write the port listened on to this file once serving")
  p.add_argument("--token-file", help="lines '<client id> <token>'")
  p.add_argument("--tls-cert", help="PEM certificate chain of the server")
  p.add_argument("--tls-key", help="PEM private key of the server")
  p.add_argument("--client-ca", help="PEM CA of client certificates: mutual TLS, client k's certificate named client-k")
  p.add_argument("--checkpoint-dir", help="checkpoint here; resume from here after a restart")
  p.add_argument("--checkpoint-every", type=int, default=20, help="commits between checkpoints")
  p.add_argument("--rounds", type=int, default=10)
  from sljax.transport.concurrent import ALGORITHMS  # noqa: PLC0415 -- gRPC is imported only where needed

  p.add_argument("--algorithm", choices=("sequential_sl", *ALGORITHMS), default="sequential_sl",
                 help="sequential: clients take turns; the others (parallel SL, local-loss SL, SplitFed v1/v2): "
                      "all clients at once")
  p.add_argument("--local-steps", type=int, default=None,
                 help="steps per turn (sequential) or per round; default 20 (vertical: a whole epoch)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0, help="the run key: model init, data order, step keys")
  p.add_argument("--lease-seconds", type=float, default=120.0, help="a client silent this long loses its turn")
  p.add_argument("--max-abs-value", type=float, default=1e6,
                 help="refuse client messages holding a value beyond this magnitude (0: no bound)")
  p.add_argument("--max-samples", type=int, default=2**31 - 1,
                 help="the most training rows a client may declare (SplitFed weighs clients by them)")
  p.add_argument("--aggregation", default="mean",
                 help="SplitFed's average of the client halves: mean (FedAvg), median, trimmed_mean:F (trim the "
                      "share F at each end) or centered_clipping:R (clip to radius R around the median)")
  p.add_argument("--max-message-mb", type=float, default=64.0)
  p.add_argument("--max-concurrent-rpcs", type=int, default=0,
                 help="calls served or queued at once; more are refused (RESOURCE_EXHAUSTED, retried by clients). "
                      "0: twice the worker threads, 2 * (num_clients + 8)")
  p.add_argument("--transcript", metavar="PATH",
                 help="record every training message the server receives and sends into this transcript "
                      "(for sljax privacy-report); written when the server stops")
  p.add_argument("--sealed-handoffs", action="store_true",
                 help="sequential SL: the clients seal the client half among themselves (sljax client "
                      "--handoff-key-file); the server relays what it cannot read")
  p.add_argument("--continue-without", action="store_true",
                 help="--vertical: a party silent for --lease-seconds is absent from the next step on (a zero "
                      "vector in its place) until it is back; inference stands in for a party that sends no rows")
  _add_cache_args(p)
  p.set_defaults(run=serve)

  p = sub.add_parser("client", help="train as one client over gRPC, then run collaborative inference")
  _add_setup_args(p)
  p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
  p.add_argument("--client-id", type=int, help="this client's id (required, except with --vertical)")
  p.add_argument("--party", help="vertical SL (--vertical): this party's name; its token is the line of its index")
  p.add_argument("--token-file", help="lines '<client id> <token>'; the line of --client-id is used")
  p.add_argument("--partition-seed", type=int, default=0, help="seed of the iid split of digits into clients")
  p.add_argument("--tls-ca", help="PEM CA to verify the server with (TLS)")
  p.add_argument("--tls-cert", help="PEM certificate of this client (mutual TLS)")
  p.add_argument("--tls-key", help="PEM private key of this client (mutual TLS)")
  p.add_argument("--server-name", help="the name in the server's certificate, if not the target's host")
  p.add_argument("--allow-plaintext-token", action="store_true",
                 help="send the token without TLS to a host other than this machine (refused otherwise)")
  p.add_argument("--deadline", type=float, default=60.0, help="seconds per call attempt")
  p.add_argument("--retries", type=int, default=10, help="retries of a call while the server is away")
  p.add_argument("--checkpoint-dir", help="checkpoint this client's half here; resume from here after a restart")
  p.add_argument("--handoff-key-file", metavar="PATH",
                 help="sequential SL with sealed hand-offs (sljax serve --sealed-handoffs): the key the clients "
                      "share, 64 hex digits (sljax.privacy.handoff.new_key().hex()); never give it to the server")
  p.add_argument("--progress", action="store_true", help="show a progress bar")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of a sentence")
  _add_cache_args(p)
  p.set_defaults(run=client)

  p = sub.add_parser("align", help="vertical SL: find the samples every party holds by private set intersection of "
                                   "their IDs (the label party serves with --serve, the others connect)")
  p.add_argument("--ids", required=True, help="this party's sample IDs, one per line (UTF-8), one per row of its data")
  p.add_argument("--out", help="write this party's rows of the shared samples here: row indices into --ids, one per "
                               "line, in the common order (every party's k-th line is the same sample)")
  p.add_argument("--serve", action="store_true", help="lead the alignment: serve it (the label party)")
  p.add_argument("--members", help="--serve: the other parties, 'ID:NAME,...' (client id and party name)")
  p.add_argument("--name", default="leader", help="--serve: this party's name")
  p.add_argument("--fpr", type=float, default=1e-9, help="--serve: false-positive rate of the compressed sets")
  p.add_argument("--wait-seconds", type=float, default=600.0,
                 help="--serve: how long to wait for every party to have its rows (exit status 1 after)")
  p.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on")
  p.add_argument("--port", type=int, default=50051, help="--serve: 0 picks a free port (see --port-file)")
  p.add_argument("--port-file", help="--serve: write the port listened on to this file once serving")
  p.add_argument("--token-file", help="lines '<client id> <token>'; a member uses the line of --client-id")
  p.add_argument("--tls-cert", help="PEM certificate chain (--serve: the server's; else this client's, mutual TLS)")
  p.add_argument("--tls-key", help="PEM private key (--serve: the server's; else this client's, mutual TLS)")
  p.add_argument("--client-ca", help="--serve: PEM CA of client certificates: mutual TLS, client k's named client-k")
  p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the label party's align server")
  p.add_argument("--client-id", type=int, help="this party's client id (required without --serve)")
  p.add_argument("--tls-ca", help="PEM CA to verify the server with (TLS)")
  p.add_argument("--server-name", help="the name in the server's certificate, if not the target's host")
  p.add_argument("--allow-plaintext-token", action="store_true",
                 help="send the token without TLS to a host other than this machine (refused otherwise)")
  p.add_argument("--deadline", type=float, default=60.0, help="seconds per call attempt")
  p.add_argument("--retries", type=int, default=10, help="retries of a call while the server is away")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of a sentence")
  p.set_defaults(run=align_ids)

  p = sub.add_parser("profile-cuts", help="profile every cut of a demo model: FLOPs, memory, bytes, dCor, time")
  p.add_argument("--model", choices=("mlp", "cnn", "cnn1d", "resnet", "vit", "ds_cnn1d"), default="cnn")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--budget", help="the client's memory: mcu-256KB, mcu-512KB, phone-2GB or a size such as 1.5MB")
  p.add_argument("--minimize", default="bytes_up",
                 help="bytes_up, bytes_down, bytes, client_flops, client_memory, dcor or time (see sljax.analysis)")
  p.add_argument("--cuts", help="comma-separated cut indices or layer names (default: every cut point)")
  p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--memory-options", default="remat,bf16,small_batch",
                 help="memory options to compile and measure, comma-separated (empty for none)")
  p.add_argument("--privacy-sample", type=int, default=256, help="test images for the dCor proxy (0 skips it)")
  p.add_argument("--attack", type=int, default=0, metavar="N",
                 help="train a black-box inverse network on N training inputs at each cut and score its "
                      "reconstructions of the privacy sample (SSIM); 0 skips it")
  p.add_argument("--device", default="phone_lte", help="client profile for the simulated round time "
                                                       "(sljax.network.PRESETS), or none")
  p.add_argument("--algorithm", default="parallel_sl",
                 help="algorithm of the simulated round: parallel_sl, sequential_sl (the client half is relayed "
                      "between turns), splitfed_v1 or splitfed_v2")
  p.add_argument("--num-clients", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--plot", help="save the plot (one panel per quantity against the cut) to this file")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
  p.set_defaults(run=profile_cuts)

  p = sub.add_parser("privacy-report", help="run the applicable privacy attacks on a recorded transcript")
  p.add_argument("transcript", help="a transcript file (sljax.fit(..., transcript=path) or a Recorder)")
  p.add_argument("--defense", help="the defense's name in the table (default: from the transcript's notes)")
  p.add_argument("--epsilon", type=float, help="the DP epsilon the run spent (default: its 'epsilon' note)")
  p.add_argument("--utility-cost", type=float, help="what the defense cost in utility (default: its note)")
  p.add_argument("--json", action="store_true", help="print the table as one JSON line")
  p.set_defaults(run=privacy_report)

  args = parser.parse_args(argv)
  if args.command in ("serve", "client"):
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("sljax").setLevel(logging.INFO)
    _use_compilation_cache(args)
  else:
    logging.basicConfig(level=logging.WARNING)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
