"""What the tests of recompilation share: counting XLA compilations."""

import contextlib

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# tests/conftest.py turns on a persistent compilation cache for the session: a program that another test or
# process compiled already is loaded from it, and XLA does not compile it again. Loaded or compiled, the
# program missed jax's in-memory caches, which is what the tests of recompilation are about.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def count_compiles():
  """Collects one entry per XLA compilation made inside the block, or per program loaded from the
  persistent compilation cache instead."""
  events = []

  def on_duration(event, duration, **kwargs):
    del duration, kwargs
    if event == COMPILE_EVENT:
      events.append(event)

  def on_event(event, **kwargs):
    del kwargs
    if event == CACHE_HIT_EVENT:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
