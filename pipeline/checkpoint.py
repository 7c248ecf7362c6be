"""Load a Mask R-CNN teacher from whatever file its training produced.

Reads one checkpoint file; writes nothing. :func:`load_checkpoint` returns the model in float32,
eval mode, on CPU, with its class names, the category ids its labels stand for and how it was
read (``LoadedModel.metadata["loaded_as"]``).

Accepted files:

- maskedge's own checkpoints (``{"format": "maskedge-checkpoint", "arch": ArchSpec, ...}``);
- torchvision Mask R-CNN state_dicts of any ``num_classes``: ``maskrcnn_resnet50_fpn``,
  ``maskrcnn_resnet50_fpn_v2``, ``MaskRCNN`` on ``resnet_fpn_backbone`` (ResNet-18/34/50/101/
  152, ResNeXt, Wide ResNet, any ``returned_layers``, frozen or trainable BatchNorm) or on
  ``mobilenet_backbone`` (MobileNetV3 Large/Small with FPN), and maskedge's architectures
  (:mod:`pipeline.models`) saved as plain state_dicts;
- those state_dicts wrapped in a training checkpoint (``model``, ``state_dict``,
  ``model_state_dict``, ``net``... next to ``optimizer``, ``epoch``, ``args``) - EMA weights
  (``model_ema``, ``ema``, ``state_dict_ema``) are preferred when present - and prefixed by
  ``DataParallel``/DDP (``module.``), ``torch.compile`` (``_orig_mod.``) or Lightning
  (``model.``): prefixes are stripped (logged) and the weights then load strictly;
- with ``trust=True`` only: a whole pickled model (``torch.save(model)``), a dict holding
  arbitrary Python objects, a TorchScript archive.

Loading is weights-only (``torch.load(weights_only=True)``) unless ``trust=True``; the only
non-tensor types let through are plain data (``argparse.Namespace``, pathlib paths, numpy
scalars and arrays), which is what torchvision's reference training scripts store next to the
weights. A file that needs more names the blocking classes and the opt-in; maskedge never falls
back to full unpickling by itself.

The architecture and class count are read from the weights: ``roi_heads.box_predictor.
cls_score.weight`` gives ``num_classes`` (background included, as in torchvision); the backbone
family and depth, returned layers, FPN width, norm layers, RPN depth, anchors per location, box
and mask head layouts come from key patterns and shapes. ``arch`` / ``num_classes`` check
what was inferred (a mismatch stops with both values) and ``arch`` picks between readings the
weights allow equally (e.g. ``maskedge_resnet18`` and ``maskrcnn_resnet18_fpn``).

Class names come from ``class_names`` (a list, a comma-separated string, a text file with one
name per line, or a COCO annotation file, whose category ids are then kept), else from the
checkpoint, else from ``class_names_fallback`` (a COCO file; ``invoke build`` passes its
validation or training annotations), else are ``class_1..class_K``; predictions map back to
``category_ids``.

Known limits: anchor sizes, RoI budgets and score/NMS thresholds are not stored in weights; for
torchvision layouts they take torchvision's defaults (anchors 32..512, one size per FPN level,
or all five sizes on every level when the RPN has 15 anchors per location, as torchvision's
MobileNet detectors do), which is logged, and a trusted whole model supplies its own anchors and
sizes. Input sizes default to torchvision's ``min_size=800, max_size=1333`` (``min_size`` /
``max_size`` override them). Mask heads with dilation other than 1, RetinaNet-style FPN extra
blocks, and class-agnostic predictors are not read.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import BACKBONES, ArchSpec, build_model

log = logging.getLogger(__name__)

EMA_KEYS = ("model_ema", "ema", "state_dict_ema", "ema_state_dict", "ema_model")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "net", "network", "weights", "module")
PREFIXES = ("module.", "_orig_mod.", "model.")
BOOKKEEPING_KEYS = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel (EMA) counter
CLASS_NAME_KEYS = ("class_names", "classes", "names", "categories", "CLASSES")
TORCHVISION_DEFAULT_SIZE = (800, 1333)
ARCHS = (
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet18_fpn",
    "maskrcnn_resnet34_fpn",
    "maskrcnn_resnet101_fpn",
    "maskrcnn_mobilenet_v3_large_fpn",
    "maskedge_resnet18",
    "maskedge_resnet34",
    "maskedge_mobilenet_v3_large",
)
MASKEDGE_RETURNED = {
    "resnet18": (2, 3, 4),
    "resnet34": (2, 3, 4),
    "mobilenet_v3_large": (6, 12, 16),
}


@dataclass(frozen=True)
class LoadedModel:
    """A teacher ready to run: ``model`` (eval, float32, CPU) and what its outputs mean.

    ``spec`` is the :class:`ArchSpec` when the architecture is one of maskedge's, else None;
    ``arch`` names the architecture either way; ``image_size`` is the square input size the
    model is meant to see (letterboxed); label ``i`` (1..K-1) is class ``class_names[i-1]``,
    category id ``category_ids[i-1]`` in the user's data.
    """

    model: nn.Module
    spec: ArchSpec | None
    class_names: list[str]
    category_ids: list[int]
    path: Path
    metadata: dict[str, Any]
    arch: str
    image_size: int

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision counts them."""
        return len(self.class_names) + 1

    @property
    def label_to_cat(self) -> dict[int, int]:
        return {i + 1: c for i, c in enumerate(self.category_ids)}


@dataclass(frozen=True)
class TorchvisionLayout:
    """A torchvision-style Mask R-CNN as read from its weights."""

    backbone: str  # resnet50, resnext50_32x4d, mobilenet_v3_large, ...
    family: str  # resnet or mobilenet
    blocks: tuple[int, ...]  # resnet blocks per layer (0 = not in the weights)
    bottleneck: bool
    groups: int
    width_per_group: int
    frozen_bn: bool
    returned_layers: tuple[int, ...]  # resnet layer numbers, or mobilenet feature indices
    fpn_in_channels: tuple[int, ...]
    fpn_channels: int
    fpn_norm: bool
    rpn_conv_depth: int
    anchors_per_location: int
    box_convs: tuple[int, ...]  # conv box head (v2); empty for the two-layer MLP head
    box_fcs: tuple[int, ...]
    box_norm: bool
    box_resolution: int
    mask_layers: tuple[int, ...]
    mask_norm: bool
    mask_dim_reduced: int
    num_classes: int

    @property
    def name(self) -> str:
        return f"maskrcnn_{self.backbone}_fpn" + ("_v2" if self.box_convs else "")

    def maskedge_spec(self, image_size: int) -> ArchSpec | None:
        """The equivalent ArchSpec, if these weights fit one of maskedge's own architectures."""
        fits = (
            self.backbone in BACKBONES
            and MASKEDGE_RETURNED.get(self.backbone) == self.returned_layers
            and not self.frozen_bn
            and not self.fpn_norm
            and self.rpn_conv_depth == 1
            and self.anchors_per_location == 3
            and not self.box_convs
            and len(self.box_fcs) == 2
            and self.box_resolution == 7
            and not self.mask_norm
            and self.mask_dim_reduced == self.mask_layers[-1]
        )
        if not fits:
            return None
        return ArchSpec(
            backbone=self.backbone,
            num_classes=self.num_classes,
            image_size=image_size,
            fpn_channels=self.fpn_channels,
            representation_size=self.box_fcs[-1],
            mask_layers=self.mask_layers,
        )


# -- reading the file ------------------------------------------------------------------------------


def _safe_globals() -> list[Any]:
    """Plain-data classes let through weights-only loading (no code runs to rebuild them)."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Any] = [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        np.ndarray,
        np.dtype,
        multiarray._reconstruct,
        multiarray.scalar,
    ]
    # files written under numpy 1 name the same functions by their old module
    allowed += [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]
    if hasattr(np, "dtypes"):
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def _allowed_names() -> set[str]:
    names = set()
    for item in _safe_globals():
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return names


def _pickle_of(path: Path) -> bytes | None:
    """The pickle inside a zip-format torch file, if it is one."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            return zf.read(name) if name else None
    except Exception:  # a best-effort probe: a damaged archive fails in many ways; that is fine
        return None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except Exception:  # a best-effort probe, as in _pickle_of
        return False


def _top_level_class(path: Path) -> str | None:
    """``module.Class`` of the object at the top of the pickle, None for a dict or unknown."""
    data = _pickle_of(path)
    if data is None:
        return None
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("PROTO", "FRAME"):
                continue
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and len(strings) < 2:
                strings.append(str(arg))  # protocol 4 STACK_GLOBAL takes two strings
                continue
            if op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                continue
            if op.name == "GLOBAL":
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                name = ".".join(strings)
            else:
                return None
            return None if name in ("collections.OrderedDict", "builtins.dict") else name
    except Exception:  # pickletools on damaged bytes: ValueError, EOFError, struct.error...
        return None
    return None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files and corrupt archives cannot be scanned
        return []
    allowed = _allowed_names()
    return [g for g in found if g not in allowed]


def _whole_model_message(path: Path, cls: str, trusted: bool) -> str:
    module, _, name = cls.rpartition(".")
    resave = (
        f'`torch.save(model.state_dict(), "{path.stem}_state_dict.pt")` and pass that file'
        " (it needs no code to load)"
    )
    if module == "__main__":
        return (
            f"{path}: this is a whole pickled model, an object of class {name} that was defined in "
            f"the training script itself (__main__), not a state_dict. Unpickling it needs that "
            f"class, and a script's __main__ cannot be imported from here"
            + (" (it was not found even with --trust-checkpoint)" if trusted else "")
            + f". Open the checkpoint inside that script (or move {name} into an importable "
            f"module) and re-save only its weights: {resave}."
        )
    if trusted:
        return (
            f"{path}: this is a whole pickled model of class {cls}, and {module} cannot be "
            f"imported here. Make it importable, or re-save only its weights: {resave}."
        )
    return (
        f"{path}: this is a whole pickled model, an object of class {cls}, not a state_dict. "
        f"Reading it means importing {module} and running code from the file, which maskedge "
        f"does only when told to. Re-save only its weights: {resave}; or, if you trust the file "
        f"and {module} is importable here, pass --trust-checkpoint (trust=True)."
    )


def _read(path: Path, trust: bool) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass the checkpoint file inside it")
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be opened ({err.strerror})") from err
    if len(head) >= 9 and head[8:9] == b"{":
        raise CheckpointError(
            f"{path}: looks like a safetensors file; maskedge reads torch.save files: "
            "re-save with `torch.save(safetensors.torch.load_file(path), 'weights.pt')`"
        )
    _check_container(path, head)

    if _is_torchscript(path):
        if not trust:
            raise CheckpointError(
                f"{path}: is a TorchScript archive (torch.jit.save), which carries code. Pass "
                "--trust-checkpoint (trust=True) to read its weights, or save a state_dict "
                "with `torch.save(model.state_dict(), 'weights.pt')`"
            )
        log.warning("%s: reading a TorchScript archive (--trust-checkpoint)", path)
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as err:  # torch.jit raises RuntimeError and its own error types
            raise CheckpointError(f"{path}: cannot read the TorchScript archive ({err})") from err

    if trust:
        log.warning(
            "%s: loading with full unpickling (--trust-checkpoint): code in the file runs", path
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ImportError) as err:
            cls = _top_level_class(path)
            if cls is not None:
                raise CheckpointError(_whole_model_message(path, cls, trusted=True)) from err
            raise CheckpointError(
                f"{path}: unpickling needs a class that cannot be imported here ({err}); make "
                "its module importable, or re-save only the weights as a state_dict"
            ) from err
        except Exception as err:  # torch.load raises many kinds for a file it cannot parse
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint "
                f"({type(err).__name__}: {_first_line(err)})"
            ) from err

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _unsafe_globals(path)
        cls = _top_level_class(path)
        if cls is not None and cls in blocked:
            raise CheckpointError(_whole_model_message(path, cls, trusted=False)) from err
        if blocked:
            raise CheckpointError(
                f"{path}: weights-only loading stopped at Python objects that are not weights: "
                f"{', '.join(blocked)}. maskedge does not unpickle arbitrary objects unless told "
                "to: if you trust the file, pass --trust-checkpoint (trust=True); or re-save "
                'only the weights, e.g. `torch.save(ckpt["model"], "weights.pt")`'
            ) from err
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: truncated or damaged, or its pickle "
            f"was not written by torch.save. {RESAVE}"
        ) from err
    except Exception as err:  # RuntimeError, EOFError, zip errors... for a truncated/other file
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: truncated or damaged, or not written "
            f"by torch.save ({type(err).__name__}: {_first_line(err)}). {RESAVE}"
        ) from err


RESAVE = (
    "Copy or download it again (compare its size with the original), or re-save the weights "
    'from the training run with `torch.save(model.state_dict(), "weights.pt")`'
)
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL = b"\x80"


def _check_container(path: Path, head: bytes) -> None:
    """Refuse, with what to do, files that cannot be a ``torch.save`` file at all.

    ``torch.save`` writes a zip archive (legacy files: a pickle, starting with its protocol
    byte). An empty file, a text file (a Git LFS pointer, an HTML error page saved under the
    checkpoint's name) or a zip archive cut short would otherwise surface as torch's own
    ``EOFError`` / ``weights_only`` / miniz messages, which suggest the wrong remedies.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path}: is empty (0 bytes), so it holds no weights; the save or the copy was "
            f"interrupted. {RESAVE}"
        )
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise CheckpointError(
                f"{path}: a zip archive (as torch.save writes) that is truncated or damaged "
                f"({size} bytes; {err}). {RESAVE}"
            ) from err
        if not any(n.endswith(("data.pkl", "constants.pkl")) for n in names):
            raise CheckpointError(
                f"{path}: a zip archive, but not one torch.save wrote (no data.pkl among "
                f"{len(names)} entries, e.g. {names[:3]}); unpack it and pass the .pt/.pth "
                "file inside"
            )
        return
    if head.startswith(PICKLE_PROTOCOL):
        return
    with path.open("rb") as f:
        sample = f.read(512)
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\0" not in text and text.strip():
        first = text.strip().splitlines()[0][:80]
        if text.startswith("version https://git-lfs"):
            what = "a Git LFS pointer"
            todo = "fetch the real file with `git lfs pull` in the repository it came from"
        elif text.lstrip().lower().startswith(("<!doctype", "<html", "<?xml")):
            what = "a web page (an error or login page saved by a failed download)"
            todo = "download the checkpoint again"
        else:
            what = "a text file"
            todo = RESAVE[0].lower() + RESAVE[1:]
        raise CheckpointError(
            f"{path}: is {what} ({size} bytes, starting {first!r}), not a PyTorch "
            f"checkpoint; {todo}"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


# -- finding the weights in it ---------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _scalars(obj: Mapping[Any, Any]) -> dict[str, Any]:
    plain = (bool, int, float, str)
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(k, str) and (isinstance(v, plain) or v is None):
            out[k] = v
        elif isinstance(k, str) and isinstance(v, argparse.Namespace):
            out[k] = {a: b for a, b in vars(v).items() if isinstance(b, plain) or b is None}
    return out


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model weights in a loaded checkpoint object, and what else it said.

    Returns ``(state_dict, info)`` with ``info`` holding ``weights_key`` (where the weights
    were), ``fields`` (plain values found next to them, e.g. ``epoch``), ``prefixes`` (stripped)
    and, when present, ``class_names``/``category_ids``/``min_size``/``max_size``/``anchors``.
    """
    info: dict[str, Any] = {"weights_key": None, "fields": {}, "prefixes": []}
    trail: list[str] = []
    for _ in range(4):
        if isinstance(obj, nn.Module):
            _harvest_module(obj, info)
            obj = obj.state_dict()
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{path}: holds a {type(obj).__name__}"
                + (f" under {'/'.join(trail)}" if trail else "")
                + ", expected a state_dict (a dict of tensors) or a dict holding one"
            )
        info["fields"].update(_scalars(obj))
        _harvest_classes(obj, info)
        key = _weights_key(obj)
        if key is None:
            tensors = {
                k: v
                for k, v in obj.items()
                if isinstance(k, str) and "." in k and isinstance(v, torch.Tensor)
            }
            if tensors:
                obj = tensors
                break
            raise CheckpointError(
                f"{path}: a dict without model weights in it (keys: {sorted(map(str, obj))[:10]});"
                f" expected tensors, or weights under one of {EMA_KEYS + WRAPPER_KEYS}"
            )
        others = [k for k in EMA_KEYS + WRAPPER_KEYS if k != key and _holds_weights(obj.get(k))]
        log.info(
            "%s: using the weights under %r%s",
            path,
            key,
            f" (also present: {', '.join(others)})" if others else "",
        )
        trail.append(key)
        obj = obj[key]
    else:
        raise CheckpointError(f"{path}: no state_dict found within {'/'.join(trail)}")
    info["weights_key"] = "/".join(trail) or None

    state = {k: v for k, v in obj.items() if k not in BOOKKEEPING_KEYS}
    while not _is_model_key(state):
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            # a user's wrapper module (self.detector = maskrcnn(...)): one shared first name
            heads = {k.split(".", 1)[0] for k in state}
            rest = {k.split(".", 1)[-1] for k in state}
            if len(heads) != 1 or not _is_model_key(dict.fromkeys(rest)):
                break
            prefix = heads.pop() + "."
        log.info("%s: stripping the %r prefix from every key", path, prefix)
        state = {k[len(prefix) :]: v for k, v in state.items()}
        info["prefixes"].append(prefix)
    return state, info


def _is_model_key(state: Mapping[str, Any]) -> bool:
    """Whether the keys already start where a Mask R-CNN's do (so ``model.`` is not a prefix)."""
    return any(k.startswith(("backbone.", "rpn.", "roi_heads.")) for k in state)


def _holds_weights(value: Any) -> bool:
    return isinstance(value, nn.Module) or (
        isinstance(value, Mapping)
        and bool(value)
        and any(isinstance(v, (torch.Tensor, Mapping, nn.Module)) for v in value.values())
    )


def _weights_key(obj: Mapping[Any, Any]) -> str | None:
    return next((k for k in EMA_KEYS + WRAPPER_KEYS if _holds_weights(obj.get(k))), None)


def _harvest_classes(obj: Mapping[Any, Any], info: dict[str, Any]) -> None:
    for key in CLASS_NAME_KEYS:
        value = obj.get(key)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            info.setdefault("class_names", list(value))
        elif (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, Mapping) and "name" in v and "id" in v for v in value)
        ):
            cats = sorted((int(v["id"]), str(v["name"])) for v in value)
            info.setdefault("class_names", [n for _, n in cats])
            info.setdefault("category_ids", [c for c, _ in cats])
        elif (
            isinstance(value, Mapping) and value and all(isinstance(v, str) for v in value.values())
        ):
            info.setdefault("class_names", [value[k] for k in sorted(value)])
    ids = obj.get("category_ids")
    if isinstance(ids, (list, tuple)) and all(isinstance(c, int) for c in ids):
        info.setdefault("category_ids", [int(c) for c in ids])


def _harvest_module(module: nn.Module, info: dict[str, Any]) -> None:
    """A trusted whole model knows its own input sizes and anchors; keep them."""
    transform = getattr(module, "transform", None)
    if transform is not None and hasattr(transform, "min_size"):
        info.setdefault("min_size", int(transform.min_size[0]))
        info.setdefault("max_size", int(transform.max_size))
    generator = getattr(getattr(module, "rpn", None), "anchor_generator", None)
    if generator is not None and hasattr(generator, "sizes"):
        info.setdefault(
            "anchors",
            (
                tuple(tuple(s) for s in generator.sizes),
                tuple(tuple(r) for r in generator.aspect_ratios),
            ),
        )


_LEGACY_KEYS = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
)
_LEGACY_MASK = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")


def _modern_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys of older torchvision releases (before Conv2dNormActivation) to today's."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _LEGACY_KEYS:
            new = pattern.sub(repl, new)
        m = _LEGACY_MASK.match(new)
        if m:
            new = f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
        out[new] = value
    return out


# -- reading the architecture from the weights -----------------------------------------------------


def _indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    found = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _shape(state: Mapping[str, torch.Tensor], key: str, path: Path, ndim: int) -> tuple[int, ...]:
    """The shape of ``state[key]``, which must be an ``ndim``-dimensional, non-empty tensor."""
    if key not in state:
        raise CheckpointError(
            f"{path}: no {key} in the weights; not a torchvision Mask R-CNN "
            f"layout maskedge reads (first keys: {list(state)[:5]})"
        )
    shape = tuple(state[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(
            f"{path}: {key} has shape {list(shape)}; a Mask R-CNN has a "
            f"non-empty {ndim}-d tensor there"
        )
    return shape


def infer_layout(state: Mapping[str, torch.Tensor], path: Path) -> TorchvisionLayout:
    """Read a torchvision-style Mask R-CNN's layout from its (prefix-free, modern) keys."""
    cls_key = "roi_heads.box_predictor.cls_score.weight"
    if cls_key not in state:
        raise CheckpointError(
            f"{path}: no {cls_key} in the weights, so this is not a Mask R-CNN state_dict "
            f"(first keys: {list(state)[:5]}); pass the detector's weights"
        )
    num_classes = _shape(state, cls_key, path, 2)[0]
    if "roi_heads.mask_predictor.mask_fcn_logits.weight" not in state:
        raise CheckpointError(
            f"{path}: the weights have a box predictor but no mask head: a "
            "Faster R-CNN; maskedge deploys Mask R-CNN (instance masks)"
        )
    for key, rows in (
        ("roi_heads.box_predictor.bbox_pred.weight", 4 * num_classes),
        ("roi_heads.mask_predictor.mask_fcn_logits.weight", num_classes),
    ):
        if _shape(state, key, path, 2 if "bbox" in key else 4)[0] != rows:
            raise CheckpointError(
                f"{path}: {key} has {state[key].shape[0]} rows but {cls_key} says "
                f"{num_classes} classes (expected {rows}); class-agnostic heads are not read"
            )
    if any(k.startswith("backbone.fpn.extra_blocks.") for k in state):
        raise CheckpointError(
            f"{path}: the FPN has learned extra blocks (RetinaNet-style P6/P7);"
            " maskedge reads Mask R-CNN FPNs with a max-pool extra level"
        )

    fpn_levels = _indices(state, "backbone.fpn.inner_blocks.")
    in_channels = tuple(
        _shape(state, f"backbone.fpn.inner_blocks.{i}.0.weight", path, 4)[1] for i in fpn_levels
    )
    fpn_channels = _shape(state, "backbone.fpn.inner_blocks.0.0.weight", path, 4)[0]
    if "backbone.body.conv1.weight" in state:
        body = _read_resnet(state, in_channels, path)
    elif "backbone.body.0.0.weight" in state:
        body = _read_mobilenet(state, in_channels, path)
    else:
        raise CheckpointError(
            f"{path}: cannot tell the backbone from the weights (first backbone keys: "
            f"{[k for k in state if k.startswith('backbone.')][:4]}); maskedge reads ResNet and "
            "MobileNetV3 FPN backbones as torchvision builds them"
        )

    rpn_depth = len(_indices(state, "rpn.head.conv."))
    anchors = _shape(state, "rpn.head.cls_logits.weight", path, 4)[0]
    box_convs: tuple[int, ...] = ()
    if "roi_heads.box_head.fc6.weight" in state:
        fc6 = _shape(state, "roi_heads.box_head.fc6.weight", path, 2)
        box_fcs = (fc6[0], _shape(state, "roi_heads.box_head.fc7.weight", path, 2)[0])
        flat_in, box_norm = fc6[1], False
    else:
        blocks = _indices(state, "roi_heads.box_head.")
        box_convs = tuple(
            _shape(state, f"roi_heads.box_head.{i}.0.weight", path, 4)[0]
            for i in blocks
            if f"roi_heads.box_head.{i}.0.weight" in state
        )
        fcs = [i for i in blocks if f"roi_heads.box_head.{i}.weight" in state]
        if not box_convs or not fcs:
            raise CheckpointError(
                f"{path}: the box head is neither torchvision's two-layer MLP "
                "(fc6/fc7) nor its conv+fc head (v2)"
            )
        box_fcs = tuple(_shape(state, f"roi_heads.box_head.{i}.weight", path, 2)[0] for i in fcs)
        flat_in = (
            _shape(state, f"roi_heads.box_head.{fcs[0]}.weight", path, 2)[1]
            * fpn_channels
            // box_convs[-1]
        )
        box_norm = (
            f"roi_heads.box_head.{_indices(state, 'roi_heads.box_head.')[0]}.1.weight" in state
        )
    resolution = round((flat_in / fpn_channels) ** 0.5)
    if resolution * resolution * fpn_channels != flat_in:
        raise CheckpointError(
            f"{path}: the box head takes {flat_in} inputs, not C*R*R for the "
            f"FPN width C={fpn_channels}"
        )

    mask_blocks = _indices(state, "roi_heads.mask_head.")
    mask_layers = tuple(
        _shape(state, f"roi_heads.mask_head.{i}.0.weight", path, 4)[0] for i in mask_blocks
    )
    if not mask_layers:
        raise CheckpointError(f"{path}: no mask head convolutions (roi_heads.mask_head.*)")
    conv5 = _shape(state, "roi_heads.mask_predictor.conv5_mask.weight", path, 4)
    return TorchvisionLayout(
        **body,
        fpn_in_channels=in_channels,
        fpn_channels=fpn_channels,
        fpn_norm="backbone.fpn.inner_blocks.0.1.weight" in state,
        rpn_conv_depth=rpn_depth,
        anchors_per_location=anchors,
        box_convs=box_convs,
        box_fcs=box_fcs,
        box_norm=box_norm,
        box_resolution=resolution,
        mask_layers=mask_layers,
        mask_norm="roi_heads.mask_head.0.1.weight" in state,
        mask_dim_reduced=conv5[1],
        num_classes=num_classes,
    )


def _read_resnet(
    state: Mapping[str, torch.Tensor], in_channels: tuple[int, ...], path: Path
) -> dict[str, Any]:
    b = "backbone.body."
    bottleneck = f"{b}layer1.0.conv3.weight" in state
    blocks = tuple(len(_indices(state, f"{b}layer{i}.")) for i in range(1, 5))
    conv2 = _shape(state, f"{b}layer1.0.conv2.weight", path, 4)
    groups = conv2[0] // conv2[1]
    width_per_group = conv2[0] // groups if bottleneck else 64
    expansion = 4 if bottleneck else 1
    outputs = {64 * expansion * 2 ** (i - 1): i for i in range(1, 5)}
    if not all(c in outputs for c in in_channels):
        raise CheckpointError(
            f"{path}: FPN inputs of {list(in_channels)} channels do not match "
            f"the ResNet's layer outputs {sorted(outputs)}"
        )
    returned = tuple(outputs[c] for c in in_channels)
    if bottleneck:
        depth = 2 + 3 * sum(blocks)
        if groups == 1 and width_per_group == 64:
            name = f"resnet{depth}"
        elif groups == 1:
            name = f"wide_resnet{depth}_{width_per_group // 64}"
        else:
            name = f"resnext{depth}_{groups}x{width_per_group}d"
    else:
        name = f"resnet{2 + 2 * sum(blocks)}"
    if 0 in blocks[: max(returned)]:
        raise CheckpointError(f"{path}: ResNet layers {blocks} are incomplete")
    if 0 in blocks:
        name += "_partial"
    return {
        "backbone": name,
        "family": "resnet",
        "blocks": blocks,
        "bottleneck": bottleneck,
        "groups": groups,
        "width_per_group": width_per_group,
        "frozen_bn": f"{b}bn1.num_batches_tracked" not in state,
        "returned_layers": returned,
    }


def _mobilenet_features(name: str) -> nn.Sequential:
    from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

    builder = {"mobilenet_v3_large": mobilenet_v3_large, "mobilenet_v3_small": mobilenet_v3_small}
    return builder[name](weights=None, norm_layer=nn.BatchNorm2d).features


def _read_mobilenet(
    state: Mapping[str, torch.Tensor], in_channels: tuple[int, ...], path: Path
) -> dict[str, Any]:
    body = {
        k[len("backbone.body.") :]: v
        for k, v in state.items()
        if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")
    }
    for name in ("mobilenet_v3_large", "mobilenet_v3_small"):
        features = _mobilenet_features(name)
        reference = {
            k: v.shape
            for k, v in features.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        if all(reference.get(k) == v.shape for k, v in body.items()):
            break
    else:
        raise CheckpointError(
            f"{path}: the backbone looks like a MobileNet but matches neither "
            "torchvision's mobilenet_v3_large nor mobilenet_v3_small"
        )
    stages = [0] + [i for i, blk in enumerate(features) if getattr(blk, "_is_cn", False)]
    stages.append(len(features) - 1)
    by_channels = {_out_channels(features[i]): i for i in stages}
    if name == "mobilenet_v3_large" and in_channels == (40, 112, 960):
        returned = MASKEDGE_RETURNED["mobilenet_v3_large"]  # maskedge taps each stage's end
    elif all(c in by_channels for c in in_channels):
        returned = tuple(by_channels[c] for c in in_channels)
    else:
        raise CheckpointError(
            f"{path}: FPN inputs of {list(in_channels)} channels match no "
            f"{name} stage outputs {sorted(by_channels)}"
        )
    return {
        "backbone": name,
        "family": "mobilenet",
        "blocks": (),
        "bottleneck": False,
        "groups": 1,
        "width_per_group": 64,
        "frozen_bn": "backbone.body.0.1.num_batches_tracked" not in state,
        "returned_layers": returned,
    }


def _out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return int(block.out_channels)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


def _default_anchors(
    layout: TorchvisionLayout, path: Path
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    levels = len(layout.returned_layers) + 1  # plus the max-pooled level
    per_location = layout.anchors_per_location
    if per_location % 3:
        raise CheckpointError(
            f"{path}: the RPN has {per_location} anchors per location, not a multiple of the 3 "
            "aspect ratios torchvision uses; anchors are not stored in weights, so save the "
            "whole model and pass --trust-checkpoint, or re-create it with torchvision defaults"
        )
    sizes_per_level = per_location // 3
    if sizes_per_level == 1:
        sizes = tuple((32 * 2**i,) for i in range(levels))
        standard = levels == 5
    else:
        sizes = (tuple(32 * 2**j for j in range(sizes_per_level)),) * levels
        standard = sizes_per_level == 5 and layout.family == "mobilenet"
    ratios = ((0.5, 1.0, 2.0),) * levels
    (log.info if standard else log.warning)(
        "%s: anchors are not stored in weights; using torchvision's %s anchor sizes %s with "
        "aspect ratios (0.5, 1, 2) for %d anchors per location",
        path,
        "default" if standard else "assumed",
        sizes,
        per_location,
    )
    return sizes, ratios


def build_torchvision(
    layout: TorchvisionLayout, *, min_size: int, max_size: int, anchors: tuple[Any, Any]
) -> nn.Module:
    """A randomly initialised torchvision ``MaskRCNN`` with exactly ``layout``'s modules."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import (
        FastRCNNConvFCHead,
        FastRCNNPredictor,
        TwoMLPHead,
    )
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    norm = FrozenBatchNorm2d if layout.frozen_bn else nn.BatchNorm2d
    if layout.family == "resnet":
        blocks = [n or 1 for n in layout.blocks]
        body: nn.Module = ResNet(
            Bottleneck if layout.bottleneck else BasicBlock,
            blocks,
            groups=layout.groups,
            width_per_group=layout.width_per_group,
            norm_layer=norm,
        )
        return_layers = {f"layer{k}": str(v) for v, k in enumerate(layout.returned_layers)}
    else:
        from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

        builder = mobilenet_v3_large if layout.backbone.endswith("large") else mobilenet_v3_small
        body = builder(weights=None, norm_layer=norm).features
        return_layers = {str(k): str(v) for v, k in enumerate(layout.returned_layers)}
    c = layout.fpn_channels
    backbone = BackboneWithFPN(
        body,
        return_layers,
        list(layout.fpn_in_channels),
        c,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d if layout.fpn_norm else None,
    )
    res = layout.box_resolution
    if layout.box_convs:
        box_head: nn.Module = FastRCNNConvFCHead(
            (c, res, res),
            list(layout.box_convs),
            list(layout.box_fcs),
            norm_layer=nn.BatchNorm2d if layout.box_norm else None,
        )
    else:
        box_head = TwoMLPHead(c * res * res, layout.box_fcs[-1])
    k = layout.num_classes
    sizes, ratios = anchors
    names = ["0", "1", "2", "3"]  # torchvision's default RoI levels (missing ones are skipped)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=AnchorGenerator(sizes, ratios),
        rpn_head=RPNHead(c, layout.anchors_per_location, conv_depth=layout.rpn_conv_depth),
        box_roi_pool=MultiScaleRoIAlign(names, output_size=res, sampling_ratio=2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(layout.box_fcs[-1], k),
        mask_head=MaskRCNNHeads(
            c, list(layout.mask_layers), 1, norm_layer=nn.BatchNorm2d if layout.mask_norm else None
        ),
        mask_predictor=MaskRCNNPredictor(layout.mask_layers[-1], layout.mask_dim_reduced, k),
    )
    return model


# -- class names -----------------------------------------------------------------------------------


def _names_from_option(
    value: Sequence[str] | str | Path, num_labels: int
) -> tuple[list[str], list[int] | None, str]:
    """(names, category ids or None, where from) for the ``class_names`` option."""
    if isinstance(value, (str, Path)) and Path(value).is_file():
        file = Path(value)
        if file.suffix.lower() == ".json":
            from pipeline.datasets import read_categories

            cats = read_categories(file)
            return _labels_for_categories(cats, num_labels, file)
        names = [
            line.strip()
            for line in file.read_text(encoding="utf-8-sig").splitlines()
            if line.strip()
        ]
        return names, None, str(file)
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()], None, "class_names"
    return [str(n) for n in value], None, "class_names"


def _labels_for_categories(
    cats: list[tuple[int, str]], num_labels: int, file: Path
) -> tuple[list[str], list[int], str]:
    """Labels 1..K of a model for a COCO file's categories.

    K categories: label i is the i-th by id (maskedge's and most fine-tuning scripts' mapping).
    Fewer categories, all ids <= K: label i is category id i (torchvision's COCO models).
    """
    if len(cats) == num_labels:
        return [n for _, n in cats], [c for c, _ in cats], str(file)
    if (
        cats
        and len(cats) < num_labels
        and max(c for c, _ in cats) <= num_labels
        and min(c for c, _ in cats) >= 1
    ):
        names = dict(cats)
        log.info(
            "%s: %d categories for %d labels; label i is category id i (torchvision's COCO "
            "convention), unused labels are 'N/A'",
            file,
            len(cats),
            num_labels,
        )
        ids = list(range(1, num_labels + 1))
        return [names.get(i, "N/A") for i in ids], ids, str(file)
    raise CheckpointError(
        f"{file}: {len(cats)} categories (ids {[c for c, _ in cats][:10]}) but the weights "
        f"predict {num_labels} classes besides background; give the annotation file the model "
        "was trained with"
    )


def _resolve_classes(
    num_classes: int,
    option: Sequence[str] | str | Path | None,
    info: dict[str, Any],
    path: Path,
    fallback: Path | None = None,
) -> tuple[list[str], list[int], str]:
    labels = num_classes - 1
    ids: list[int] | None
    if option is not None:
        names, ids, source = _names_from_option(option, labels)
    elif "class_names" in info:
        names, ids, source = list(info["class_names"]), info.get("category_ids"), "checkpoint"
    elif fallback is not None:
        log.info(
            "%s: no class names in the checkpoint; taking them and their category ids from %s "
            "(--class-names overrides)",
            path,
            fallback,
        )
        try:
            names, ids, source = _names_from_option(Path(fallback), labels)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err} (the checkpoint names no classes, so they were taken from this file; "
                "pass --class-names with the model's classes in label order)"
            ) from err
    else:
        log.info(
            "%s: no class names in the checkpoint; using class_1..class_%d (pass "
            "--class-names or a COCO file to name them)",
            path,
            labels,
        )
        return [f"class_{i}" for i in range(1, labels + 1)], list(range(1, labels + 1)), "default"
    if len(names) == labels + 1 and names[0].lower() in ("__background__", "background", "bg"):
        names = names[1:]
    if len(names) != labels:
        raise CheckpointError(
            f"{path}: {len(names)} class names from {source} but the weights predict {labels} "
            f"classes besides background (num_classes={num_classes}); give one name per class"
        )
    if ids is None or len(ids) != labels:
        ids = list(range(1, labels + 1))
    return names, [int(c) for c in ids], source


# -- the entry point -------------------------------------------------------------------------------


def _check_option(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def load_checkpoint(
    path: Path | str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | Path | None = None,
    trust: bool = False,
    min_size: int | None = None,
    max_size: int | None = None,
    class_names_fallback: Path | str | None = None,
) -> LoadedModel:
    """Read ``path`` and return the model (float32, eval mode, on CPU) with its metadata.

    ``arch`` and ``num_classes`` (background included) check, or choose between, what the
    weights say; ``class_names`` names the classes (see the module docstring), and when neither
    it nor the checkpoint does, the COCO file ``class_names_fallback`` (a build's val or train
    annotations) does; ``trust`` allows full unpickling; ``min_size``/``max_size`` set the
    model's input size.
    """
    path = Path(path)
    _check_option("num_classes", num_classes)
    _check_option("min_size", min_size)
    _check_option("max_size", max_size)
    if arch is not None and not re.fullmatch(r"(maskrcnn|maskedge)_\w+", arch):
        raise ConfigError(f"--arch={arch!r} is not an architecture name; e.g. {', '.join(ARCHS)}")

    obj = _read(path, trust)
    maskedge = isinstance(obj, Mapping) and obj.get("format") == "maskedge-checkpoint"
    state, info = extract_state_dict(obj.get("state_dict") if maskedge else obj, path)
    state = _modern_keys(state)

    min_size = min_size or info.get("min_size")
    max_size = max_size or info.get("max_size")
    layout = None
    if maskedge:
        try:
            spec = ArchSpec.from_dict(obj["arch"])
        except (TypeError, KeyError, ValueError, ConfigError) as err:
            raise CheckpointError(
                f"{path}: its 'arch' entry is not a maskedge ArchSpec ({err})"
            ) from err
        _harvest_classes(obj, info)
        name = f"maskedge_{spec.backbone}"
        inferred = spec.num_classes
    else:
        try:
            layout = infer_layout(state, path)
        except (IndexError, ValueError, ZeroDivisionError) as err:  # shapes no torchvision makes
            raise CheckpointError(
                f"{path}: the weights have shapes no torchvision Mask R-CNN "
                f"has ({type(err).__name__}: {err})"
            ) from err
        inferred = layout.num_classes
        spec = layout.maskedge_spec(256)
        readings = ([f"maskedge_{layout.backbone}"] if spec else []) + [layout.name]
        name = readings[0] if arch is None or arch not in readings else arch
        if arch is not None and arch not in readings:
            raise CheckpointError(
                f"{path}: the weights are a {' / '.join(readings)} ({_describe(layout)}), not "
                f"--arch={arch}; drop --arch or pass the checkpoint of that architecture"
            )
        if not name.startswith("maskedge_"):
            spec = None
    if maskedge and arch is not None and arch != name:
        raise CheckpointError(f"{path}: a maskedge checkpoint of {name}, not --arch={arch}")
    if num_classes is not None and num_classes != inferred:
        hint = (
            " (num_classes counts the background class, as torchvision does)"
            if num_classes == inferred - 1
            else ""
        )
        raise CheckpointError(
            f"{path}: the weights were trained for num_classes={inferred} (background included; "
            f"roi_heads.box_predictor.cls_score.weight has {inferred} rows) but num_classes="
            f"{num_classes} was given{hint}; drop --num-classes to use {inferred}, or pass a "
            f"checkpoint trained for {num_classes}"
        )

    _check_finite(state, path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if spec is not None:
        size = min(s for s in (min_size, max_size) if s) if (min_size or max_size) else None
        if size is not None and size != spec.image_size:
            try:
                spec = spec.with_(image_size=size)
            except ConfigError as err:
                raise ConfigError(f"--min-size/--max-size {size} for {name}: {err}") from err
        model = _build(lambda: build_model(spec), name, path)
        image_size = spec.image_size
    else:
        assert layout is not None
        min_size = min_size or TORCHVISION_DEFAULT_SIZE[0]
        max_size = max_size or TORCHVISION_DEFAULT_SIZE[1]
        anchors = info.get("anchors") or _default_anchors(layout, path)
        model = _build(
            lambda: build_torchvision(
                layout, min_size=min_size, max_size=max_size, anchors=anchors
            ),
            name,
            path,
        )
        image_size = min(min_size, max_size)
    _load_strict(model, state, path, name)
    model.eval()

    fallback = Path(class_names_fallback) if class_names_fallback is not None else None
    names, ids, names_from = _resolve_classes(inferred, class_names, info, path, fallback)
    stored = obj.get("metadata") if maskedge else None
    metadata = dict(stored) if isinstance(stored, Mapping) else {}
    metadata["checkpoint_fields"] = {
        k: v for k, v in info["fields"].items() if k not in ("format", "format_version")
    }
    metadata["loaded_as"] = {
        "format": "maskedge-checkpoint" if maskedge else "state_dict",
        "arch": name,
        "weights_key": info["weights_key"],
        "stripped_prefixes": info["prefixes"],
        "trusted": trust,
        "class_names_from": names_from,
        "image_size": image_size,
        "layout": asdict(layout) if layout else None,
        "min_size": model.transform.min_size[0],
        "max_size": model.transform.max_size,
        "anchor_sizes": [list(s) for s in model.rpn.anchor_generator.sizes],
    }
    log.info(
        "%s: %s, %d classes (%s), input %d px%s",
        path,
        name,
        inferred - 1,
        ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""),
        image_size,
        f", weights under '{info['weights_key']}'" if info["weights_key"] else "",
    )
    return LoadedModel(
        model=model,
        spec=spec,
        class_names=names,
        category_ids=ids,
        path=path,
        metadata=metadata,
        arch=name,
        image_size=image_size,
    )


def _build(make: Callable[[], nn.Module], name: str, path: Path) -> nn.Module:
    try:
        return make()
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as err:
        raise CheckpointError(
            f"{path}: cannot build {name} with the sizes its weights or "
            f"arch entry give ({type(err).__name__}: {err})"
        ) from err


def _check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    # a sum is NaN/inf when any element is (or when it overflows, which the exact check sorts out)
    suspects = [
        k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v.float().sum())
    ]
    bad = [k for k in suspects if not torch.isfinite(state[k]).all()]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensors hold NaN or inf (first: "
            f"{bad[0]}); the training diverged - use an earlier checkpoint"
        )


def _describe(layout: TorchvisionLayout) -> str:
    return (
        f"FPN on {list(layout.fpn_in_channels)} -> {layout.fpn_channels} channels, "
        f"{layout.anchors_per_location} anchors per location, box head "
        f"{'conv ' + str(list(layout.box_convs)) + ' + ' if layout.box_convs else ''}"
        f"fc {list(layout.box_fcs)}, mask head {list(layout.mask_layers)}, "
        f"{layout.num_classes} classes"
    )


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} {state[k].dtype} vs {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in state
        and (state[k].shape != v.shape or state[k].is_floating_point() != v.is_floating_point())
    ]
    # FrozenBatchNorm2d drops num_batches_tracked itself; BatchNorm2d tolerates its absence
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape or type", wrong),
            )
            if keys
        ]
        raise CheckpointError(
            f"{path}: the weights do not fit {name}: {'; '.join(parts)}. "
            f"Pass --arch for the architecture it was trained as (one of {', '.join(ARCHS)})"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the weights do not load into {name}: {_first_line(err)}"
        ) from err
