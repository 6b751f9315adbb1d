"""Exceptions raised for bad input.

Every error a user can cause (a missing file, a corrupt checkpoint, an unreadable image, a bad data
row, an offline hub id) is a :class:`RadialogError` subclass whose message says what was wrong and
what to do. The CLI prints such errors as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class RadialogError(Exception):
    """Base class of every error caused by user input or files on disk."""


class CheckpointError(RadialogError):
    """A weight file is missing, unsafe, corrupt, or its keys/shapes do not match the model."""


class OfflineError(RadialogError):
    """A hub id was given but the files are not available locally and cannot be downloaded."""


class ConfigError(RadialogError):
    """A configuration (model config, YAML config, argument combination) is invalid."""


class DataError(RadialogError):
    """An input row, image or prompt is unusable (the message names the row or file)."""


class ImageError(DataError):
    """An image file cannot be read or decoded."""
