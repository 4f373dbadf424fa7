"""Reading a saved PaCA adapter directory, with errors that name the file and the tensor."""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .selection import check_indices

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # save_pretrained(..., safe_serialization=False)


class AdapterFileError(ValueError):
    """A PaCA adapter directory or file is missing, truncated, corrupted or inconsistent (``missing``: no weights
    file at all)."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def _check_safetensors_header(path: str) -> None:
    """Catch truncation before safetensors does, so the error names the file and what is missing."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: truncated adapter file ({size} bytes, no safetensors header).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise AdapterFileError(
                f"{path}: truncated or corrupted adapter file (header says {header_len} bytes, file has {size})."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdapterFileError(f"{path}: corrupted adapter file (unreadable header: {err}).") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise AdapterFileError(
            f"{path}: corrupted adapter file (the header is not a table of tensors with data_offsets)."
        ) from None
    if 8 + header_len + end > size:
        raise AdapterFileError(
            f"{path}: truncated adapter file: tensors need {8 + header_len + end} bytes, the "
            f"file has {size}. Save it again."
        )


def _read_tensors(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(path, tensors) of the adapter weights: ``adapter_model.safetensors``, else PEFT's ``adapter_model.bin``
    (read with ``weights_only=True``: tensors only, no code)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        _check_safetensors_header(path)
        try:
            return path, load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(f"{path}: cannot read adapter weights: {err}") from None
    pickled = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickled):
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for a damaged file; all mean "unreadable"
            raise AdapterFileError(f"{pickled}: cannot read adapter weights: {type(err).__name__}: {err}") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterFileError(f"{pickled}: not a dict of tensors (a PEFT adapter_model.bin holds one).")
        return pickled, tensors
    raise AdapterFileError(
        f"{path}: adapter weights not found (expected {WEIGHTS_NAME} or {PICKLE_WEIGHTS_NAME} in {directory}).",
        missing=True,
    )


def load_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``'s adapter weights (``adapter_model.safetensors`` or ``.bin``), checked for
    consistency.

    Raises:
        AdapterFileError: missing or unreadable file, truncation, or PaCA entries whose delta and
            indices disagree (count, order, duplicates).
    """
    path, tensors = _read_tensors(directory)
    for key, delta in tensors.items():
        module, marker, projection = key.rpartition(".paca_delta")
        if not marker or (projection and not projection.startswith(".")):
            continue
        # <module>.paca_delta (a layer) or <module>.paca_delta.<projection> (fused experts, one index row per expert)
        idx_key = f"{module}.paca_indices{projection}"
        idx = tensors.get(idx_key)
        if idx is None:
            raise AdapterFileError(f"{path}: '{key}' has no matching '{idx_key}'.")
        experts = bool(projection)
        if delta.dim() < (3 if experts else 2):
            raise AdapterFileError(
                f"{path}: '{key}' must have at least {3 if experts else 2} dimensions, got {tuple(delta.shape)}."
            )
        try:
            if experts:
                if idx.dim() != 2 or idx.shape[0] != delta.shape[0]:
                    raise ValueError(
                        f"{path}: '{idx_key}' must have one row per expert ({delta.shape[0]}), got "
                        f"shape {tuple(idx.shape)}."
                    )
                for e in range(idx.shape[0]):
                    check_indices(idx[e], d_in=None, r=delta.shape[2], where=f"{path}: '{idx_key}' expert {e}")
            else:
                check_indices(idx, d_in=None, r=delta.shape[1], where=f"{path}: '{module}'")
        except ValueError as err:
            raise AdapterFileError(str(err)) from None
        if not torch.isfinite(delta).all():
            raise AdapterFileError(f"{path}: '{key}' holds NaN or Inf values.")
    return tensors


def read_adapter_config(directory: str) -> dict:
    """``adapter_config.json`` of ``directory`` as a dict; AdapterFileError if missing or malformed."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: not found; is '{directory}' a saved adapter directory?")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}.") from None
