"""Weight files in and out: reading and verifying, converting foreign layouts, the Hub, calibration.

The weights shipped with bnvit (`*.safetensors` with a `*.json` record each) live in this folder.
"""

from .convert import checkpoint_filter_fn
from .loading import load_model, read_state_dict

__all__ = ["checkpoint_filter_fn", "load_model", "read_state_dict"]
