"""Draw a digit in the browser and watch a model classify it: the page behind `bnvit demo`.

A local web page with a drawing canvas (mouse, pen or finger), undo and clear, the 28x28
image the model sees (the drawing prepared by `bnvit.data.prepare_digit`, as `bnvit predict`
prepares a picture) and a bar chart of the ten class probabilities for each model served,
updated while the person draws. The server is a Starlette application served by uvicorn; see
`bnvit.app.demo.server`.

Examples:
    >>> import threading, urllib.request, json
    >>> import bnvit
    >>> from bnvit.app.demo import DemoModel, make_server
    >>> model = bnvit.for_inference(bnvit.ViTBNFFN(depth=1))
    >>> server = make_server([DemoModel("untrained", model)], port=0)  # any free port on 127.0.0.1
    >>> threading.Thread(target=server.serve_forever, daemon=True).start()
    >>> json.load(urllib.request.urlopen(server.url + "api/models"))["models"]
    [{'name': 'untrained', 'description': 'ViTBNFFN, depth 1'}]
    >>> server.shutdown(); server.server_close()
"""

from __future__ import annotations

import timm
from torch import nn

from ..._util.checks import first_line
from ...timm import registry as _registry  # noqa: F401  (registers vitbnffn_mnist with timm)
from .drawing import (
    MAX_BODY_BYTES,
    MAX_DRAWING_PIXELS,
    MAX_IMAGE_SIDE,
    DemoModel,
    DrawingError,
    classify_drawing,
    decode_drawing,
)
from .server import DemoServer, make_server

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DRAWING_PIXELS",
    "MAX_IMAGE_SIDE",
    "DemoModel",
    "DemoServer",
    "DrawingError",
    "classify_drawing",
    "decode_drawing",
    "make_server",
    "serve",
    "shipped_model",
]

SHIPPED_MODEL = "vitbnffn_mnist"
"""The model `bnvit demo` shows without `--checkpoint`: bnvit's ViTBNFFN trained on MNIST."""
_ASK_FOR_CHECKPOINT = (
    "pass --checkpoint PATH, e.g. one of the article's checkpoints: $BNVIT_REFERENCE/VITBNFFN_d5_15.pth"
)


def shipped_model() -> nn.Module:
    """The trained weights shipped with bnvit, `timm.create_model("vitbnffn_mnist", pretrained=True)`, in eval mode.

    Raises:
        ValueError: If this build of bnvit has no such weights, or they cannot be read; the
            one-line message says to pass a checkpoint instead.
    """
    try:
        return timm.create_model(SHIPPED_MODEL, pretrained=True).eval()
    except ValueError as err:
        if "not shipped" in str(err):
            raise ValueError(f"this build of bnvit ships no trained weights; {_ASK_FOR_CHECKPOINT}") from err
        problem = err
    except (OSError, RuntimeError) as err:
        problem = err
    raise ValueError(
        f"cannot load the weights shipped with bnvit: {first_line(problem)}; {_ASK_FOR_CHECKPOINT}"
    ) from problem


def serve(server: DemoServer) -> None:
    """Serve until Ctrl+C, then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
