"""Small splittable models, as stacks of layers to `cut`.

Each factory returns a list of layers (Stages). A layer is a block that makes a sensible cut:
`cut(mlp(...), 1)` puts the first hidden block on the client. `cut_points(layers)` lists the
cuts of a stack with the name of the last client layer at each (docs/models.md).

- `mlp`, `cnn`, `cnn1d`: a dense stack, a 2-D and a 1-D CNN for the demo and the tests.
- `resnet`: a ResNet-style CNN with batch norm for images.
- `vit`: a small Vision Transformer for images.
- `ds_cnn1d`: a depthwise-separable 1-D CNN for sensor signals (keyword spotting, activity recognition).
"""

from sljax.models.layers import CutPoint, cnn, cnn1d, cut_points, mlp
from sljax.models.resnet import resnet
from sljax.models.sensor import ds_cnn1d
from sljax.models.vit import vit

__all__ = ["CutPoint", "cnn", "cnn1d", "cut_points", "ds_cnn1d", "mlp", "resnet", "vit"]
