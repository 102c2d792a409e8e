"""Weight files in and out: reading, converting, the Hub, calibration; the shipped weights live in this folder."""

from .convert import checkpoint_filter_fn
from .loading import load_model, read_state_dict

__all__ = ["checkpoint_filter_fn", "load_model", "read_state_dict"]
