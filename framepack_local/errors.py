"""Typed errors. Each carries one sentence that tells the user what to do."""

from __future__ import annotations


class FramePackError(Exception):
    """Base for every error the engine raises on purpose; str(err) is the user-facing sentence."""


class InputError(FramePackError):
    """A parameter or an input file is unusable."""


class ModelFolderError(FramePackError):
    """The model folder is missing, incomplete or holds a broken file."""


class OutputFolderError(FramePackError):
    """The outputs folder cannot be created or written."""


class DownloadError(FramePackError):
    """Fetching the weights failed."""


class Cancelled(FramePackError):
    """The job was stopped through its cancel token; finished sections were kept."""


class GpuMemoryError(FramePackError):
    """The GPU ran out of memory even with the memory plan; the sentence names the setting to change."""
