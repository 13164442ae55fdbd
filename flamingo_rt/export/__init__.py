"""Ahead-of-time export of Flamingo models for C++ hosts (AOTInductor packages), and a
Python runner of an export that mirrors the C API host."""
from .modules import MediaEncoderStep, TokenStep
from .package import export_model
from .runner import ExportedModel, ExportedSession

__all__ = ["MediaEncoderStep", "TokenStep", "export_model", "ExportedModel", "ExportedSession"]
