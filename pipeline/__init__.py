"""maskedge: ship a trained torchvision Mask R-CNN to edge hardware.

The package is split by stage; ``pipeline.build`` is the one module that knows their order.
Importing ``pipeline`` itself is cheap: no torch, no runtime.
"""

__version__ = "0.1.0"
