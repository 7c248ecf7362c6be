"""Load a Mask R-CNN teacher from a checkpoint file.

Accepted: maskedge's own checkpoints (``{"format": "maskedge-checkpoint", "arch": ...,
"state_dict": ...}``) and plain torchvision state_dicts of the architectures in
:mod:`pipeline.models`, possibly wrapped (``model``, ``state_dict``, ``model_state_dict``,
``ema``) and prefixed (``module.``, ``_orig_mod.``). Loading is weights-only; weights are loaded
strictly after the wrapper prefixes are stripped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CheckpointError
from pipeline.models import ArchSpec, build_model

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model_ema", "ema", "state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: ArchSpec
    class_names: list[str]
    category_ids: list[int]
    path: Path
    metadata: dict[str, Any]


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(
            f"{path}: cannot load as a weights-only checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if key is None:
                raise CheckpointError(
                    f"{path}: a dict without a state_dict in it (keys: {sorted(obj)[:8]}); "
                    f"expected tensors, or one of {WRAPPER_KEYS}"
                )
            log.info("%s: using the weights under %r", path, key)
            obj = obj[key]
    state = dict(obj)
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            log.info("%s: stripping the %r prefix from every key", path, prefix)
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint(path: Path | str) -> LoadedModel:
    """Read ``path`` and return the model (float32, eval mode, on CPU) with its metadata."""
    path = Path(path)
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == "maskedge-checkpoint":
        spec = ArchSpec.from_dict(obj["arch"])
        state = obj["state_dict"]
        class_names = list(obj["class_names"])
        category_ids = list(obj["category_ids"])
        metadata = dict(obj.get("metadata", {}))
    else:
        raise CheckpointError(
            f"{path}: not a maskedge checkpoint; plain torchvision state_dicts are read by "
            "--arch/--num-classes (see issue on real inputs)"
        )
    model = build_model(spec)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit {spec.backbone}: {err}") from err
    model.eval()
    return LoadedModel(model, spec, class_names, category_ids, path, metadata)
