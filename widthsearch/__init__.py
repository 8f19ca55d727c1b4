"""widthsearch: find the best per-layer widths of a trained CNN.

    import widthsearch as ws
    run = ws.Search(model="small_cnn", data="digits", budget=0.5, num_samples=16)   # the workflow: widthsearch.app
    run.fit()
    from widthsearch import load_model, load_data, build_space, CostModel, prune, load_exported   # building blocks

Every name here is imported on first use (PEP 562), so `import widthsearch`, or a plug-in's
`import widthsearch.space`, loads neither the application (`widthsearch.app`) nor anything it does not use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # name -> the module that defines it
    "CRITERIA": "widthsearch.importance",
    "ChannelGroup": "widthsearch.space",
    "CostModel": "widthsearch.cost",
    "DataSplits": "widthsearch.data",
    "Search": "widthsearch.app.api",
    "SearchConfig": "widthsearch.app.config",
    "WidthSearchError": "widthsearch.errors",
    "WidthSpace": "widthsearch.space",
    "build_space": "widthsearch.space",
    "load_data": "widthsearch.data",
    "load_exported": "widthsearch.export",
    "load_preprocessing": "widthsearch.export",
    "load_model": "widthsearch.models",
    "load_search": "widthsearch.app.api",
    "mask": "widthsearch.surgery",
    "prune": "widthsearch.surgery",
    "save_checkpoint": "widthsearch.models",
    "select_channels": "widthsearch.surgery",
    "train_base": "widthsearch.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'widthsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
