"""intern2: the general models of INTERN 2.0 in plain PyTorch.

The public API is imported lazily, so ``import intern2`` stays light (no torch, numba or timm at import).
"""
from importlib import import_module

__version__ = "0.1.0"

_API = {
    "create_model": "intern2.factory",
    "from_pretrained": "intern2.factory",
    "save_pretrained": "intern2.factory",
    "list_models": "intern2.registry",
    "load_checkpoint": "intern2.checkpoint",
    "open_pipeline": "intern2.pipelines",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'intern2' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


from ._timm import install as _install_timm_registration  # noqa: E402

_install_timm_registration()
