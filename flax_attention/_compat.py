"""The import paths of the flat layout (before functional/, kernels/, linen/) keep working.

``import flax_attention.flash`` or ``from flax_attention.layers import
TransformerConfig`` in user code: each old module name is registered in
``sys.modules`` as the module that now holds its code (the same object, so
``monkeypatch``/``mock.patch`` on the old path patches the real module). Two
old modules were split in two; their old names are read-only views over both
halves.
"""

from __future__ import annotations

import importlib
import sys
import types

# old name (under flax_attention.) -> the module(s) now holding its contents
MOVED = {
    "attention": ("functional.attention",),
    "masks": ("functional.masks",),
    "context_parallel": ("functional.context_parallel",),
    "ring": ("functional.ring",),
    "ulysses": ("functional.ulysses",),
    "custom_attention": ("functional.custom_attention",),
    "_validation": ("functional._validation",),
    "flash": ("kernels.flash",),
    "_flash_tiles": ("kernels._flash_tiles",),
    "_flash_passes": ("kernels._flash_passes",),
    "_blocks": ("kernels._blocks",),
    "backends": ("kernels.backends",),
    "backend_select": ("kernels.backend_select",),
    "multihead": ("linen.multihead",),
    "layers": ("linen.layers",),
    "transformer": ("linen.transformer",),
    "decoding": ("linen.decoding",),
    "partitioning": ("linen.partitioning",),
    # split: the functions and the linen module(s)
    "additive": ("linen.additive", "functional.additive"),
    "positions": ("functional.positions", "linen.positions"),
    "kv_cache": ("functional.kv_cache", "linen._cache"),
}


def _view(name: str, parts) -> types.ModuleType:
    """A module whose attributes are looked up in ``parts``, first hit wins."""
    view = types.ModuleType(name, f"Old import path; its contents live in {', '.join(p.__name__ for p in parts)}.")

    def __getattr__(attr):
        for part in parts:
            if hasattr(part, attr):
                return getattr(part, attr)
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    view.__getattr__ = __getattr__
    view.__dir__ = lambda: sorted({a for p in parts for a in dir(p)})
    return view


def register(package: str, moved=MOVED) -> None:
    """Registers ``package.<old>`` for every entry of ``moved`` (idempotent)."""
    root = sys.modules[package]
    for old, targets in moved.items():
        name = f"{package}.{old}"
        parts = [importlib.import_module(f"{package}.{t}") for t in targets]
        module = parts[0] if len(parts) == 1 else _view(name, parts)
        sys.modules.setdefault(name, module)
        if not hasattr(root, old):
            setattr(root, old, module)
