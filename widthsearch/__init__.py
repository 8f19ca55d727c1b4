"""widthsearch: find the best per-layer widths of a trained CNN.

    from widthsearch import load_model, load_data, build_space, CostModel, prune, load_exported
"""

from .cost import CostModel
from .data import DataSplits, load_data
from .errors import WidthSearchError
from .export import load_exported, load_preprocessing
from .importance import CRITERIA
from .models import load_model, save_checkpoint
from .space import ChannelGroup, WidthSpace, build_space
from .surgery import mask, prune, select_channels

__all__ = [
    "CRITERIA", "ChannelGroup", "CostModel", "DataSplits", "WidthSearchError", "WidthSpace", "build_space",
    "load_data", "load_exported", "load_model", "load_preprocessing", "mask", "prune", "save_checkpoint", "select_channels",
]
