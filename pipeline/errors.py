"""maskedge's exception tree.

Every failure a user can cause or meet surfaces as one of these, with a message that says what
failed, with the values involved, and what to do about it::

    MaskedgeError
    ├── InputError          a file, folder or value given to maskedge is unusable
    │   ├── CheckpointError a checkpoint cannot be read or does not fit the architecture
    │   └── DatasetError    images or annotations cannot be read
    ├── ConfigError         an option, profile or target is unknown or inconsistent
    ├── ConversionError     export, quantization or conversion of a graph failed
    └── GateError           validation ran and a parity or latency budget was missed

``PipelineError`` is the name the entry points catch; it is the root of the tree.
"""

from __future__ import annotations


class MaskedgeError(Exception):
    """Root of every error maskedge raises on purpose."""


PipelineError = MaskedgeError


class InputError(MaskedgeError):
    """A file, folder or value given to maskedge is unusable."""


class CheckpointError(InputError):
    """A checkpoint cannot be read, or its weights do not fit the architecture."""


class DatasetError(InputError):
    """Images or annotations cannot be read or are inconsistent."""


class ConfigError(MaskedgeError):
    """An option, hardware profile or target is unknown or inconsistent."""


class ConversionError(MaskedgeError):
    """Export, quantization or conversion of a graph failed."""


class GateError(MaskedgeError):
    """Validation finished and a parity or latency budget was missed."""
