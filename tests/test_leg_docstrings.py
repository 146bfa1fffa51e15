"""Every leg of the vanilla and U-shaped protocols says what it takes and what it returns (`help(sl.server_step)`)."""

import optax
import pytest

import sljax

OPT = optax.sgd(0.1)
LEGS = {
    "vanilla": ("init", "client_forward", "server_step", "client_backward", "step", "client_infer", "server_infer"),
    "u_shaped": ("init", "client_forward", "server_forward", "client_tail_step", "server_backward", "client_backward",
                 "step", "client_infer", "server_infer", "client_tail_infer"),
}


@pytest.mark.parametrize("kind", sorted(LEGS))
def test_every_leg_has_args_and_returns(kind):
  layers = sljax.models.mlp(hidden=(8, 8))
  model = sljax.cut(layers, 1) if kind == "vanilla" else sljax.cut(layers, 1, 2)
  sl = getattr(sljax, kind)(model, client_optimizer=OPT, server_optimizer=OPT)
  # every function field of the protocol is a leg listed here, or predict (a one-line composition)
  assert {name for name, value in sl._asdict().items() if callable(value) and name.islower()
          and name not in ("model", "loss", "client_loss", "cut_gradient_transform")} >= set(LEGS[kind])
  for name in LEGS[kind]:
    doc = getattr(sl, name).__doc__ or ""
    assert "Args:" in doc and "Returns:" in doc, f"{kind}.{name}: {doc!r}"
  assert sl.predict.__doc__
