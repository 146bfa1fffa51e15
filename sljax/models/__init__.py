"""Small splittable models, as stacks of layers to `cut`.

Each factory returns a list of layers (Stages). A layer is a block that makes a sensible cut:
`cut(mlp(...), 1)` puts the first hidden block on the client.
"""

from sljax.models.layers import cnn, cnn1d, mlp

__all__ = ["cnn", "cnn1d", "mlp"]
