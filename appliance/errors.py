"""Typed errors for every stage, and the one place that turns them into a one-line message."""

from __future__ import annotations


class BankllmError(Exception):
    """Base of every error bankllm raises on purpose; `fix` tells the user what to do."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


class ConfigError(BankllmError):
    """A setting, flag or configuration file is invalid."""


class InputError(BankllmError):
    """A file or directory given as input is missing, corrupt or of the wrong kind."""


class ChecksumError(InputError):
    """Bytes do not match the sha256 they were pinned to."""


# --- intake: archives and downloads (issue 11) ---
class UnsafeArchiveError(InputError):
    """An archive holds a member bankllm will not unpack (a link, a device, a name outside its directory...)."""


class ArchiveTooLargeError(UnsafeArchiveError):
    """An archive declares or expands to more bytes or members than the configured cap."""


class SignatureError(ChecksumError):
    """A signature is missing, malformed, made with another key, or does not cover these bytes."""


class AdapterMismatchError(InputError):
    """An adapter was made for another base model."""


class UnsupportedModelError(InputError):
    """The base model's architecture or tokenizer is not supported."""


class DiskSpaceError(BankllmError):
    """Not enough free disk for the next step."""


class StageError(BankllmError):
    """A pipeline stage (merge, convert, quantize, gate) failed."""


class GateRefusedError(BankllmError):
    """The quantized model is too far from its 16-bit self to ship."""

    exit_code = 3


class DataError(BankllmError):
    """Training or evaluation data failed validation."""


class LabelsError(InputError, DataError):
    """A label file is missing, malformed or repeats a label (an input to build and serve, data to training)."""


class FetchError(BankllmError):
    """A URL could not be fetched."""


class ServiceError(BankllmError):
    """The service could not start or answer."""


class InstallError(BankllmError):
    """Installing, upgrading or removing the appliance failed."""


class LockedError(InstallError):
    """Another bankllm process holds the lock."""


class AuditChainError(BankllmError):
    """An audit log's hash chain is broken: a line was edited, removed, inserted or reordered."""

    exit_code = 1


# --- fleet: HAProxy in front of several appliances (issue 12) ---
class FleetError(BankllmError):
    """A fleet operation failed: HAProxy's runtime API, a node that is unreachable, or a node's upgrade."""


def format_error(err: BaseException) -> str:
    """One line: what went wrong, then how to fix it."""
    if isinstance(err, BankllmError):
        line = f"error: {err.message}"
        if err.fix:
            line += f" -- fix: {err.fix}"
    else:
        line = f"error: unexpected {type(err).__name__}: {err} -- fix: rerun with BANKLLM_DEBUG=1 and report the traceback"
    return " ".join(line.split())
