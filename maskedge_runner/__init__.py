"""maskedge's on-device runner: numpy, Pillow and one runtime, nothing else.

This package is copied verbatim into every bundle. It holds the one preprocessing
(``preprocess``), the host code between the static graphs (``postprocess``: anchors, proposal
decoding, NMS, multi-scale RoIAlign, box decoding, mask pasting, with torchvision's semantics),
the runtime backends (``backends``) and the command line (``python -m maskedge_runner``).
"""

__all__ = ["preprocess"]
