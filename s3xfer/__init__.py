"""s3xfer: fast, verified, resumable bulk transfers of datasets to and from S3.

The library API, async first: `survey` a tree, `make_plan` for a destination, `upload` it,
and read files back with `Dataset` (or `SyncDataset` from synchronous code).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PriceTable, TransferConfig
    from .errors import (
        AccessDeniedError,
        CorruptMetadataError,
        EndpointError,
        IntegrityError,
        NoSuchBucketError,
        NoSuchKeyError,
        NotInDatasetError,
        PartialReadError,
        RemoteError,
        S3XferError,
        SourceError,
        UsageError,
    )
    from .keys import S3Url
    from .plan import Estimate, FileUnit, Kind, Plan, ShardUnit, make_plan
    from .reader import Dataset, SyncDataset
    from .s3 import Connection
    from .survey import FileEntry, Problem, Survey, survey
    from .upload import UploadReport, upload

__version__ = "0.1.0"

# Each public name and the module it lives in. Imported on first use, so that a command
# (or a program) pays only for the modules it needs: `s3xfer cat` never loads the upload
# engine, the planner or botocore.
_HOMES = {
    "PriceTable": "config",
    "TransferConfig": "config",
    "AccessDeniedError": "errors",
    "CorruptMetadataError": "errors",
    "EndpointError": "errors",
    "IntegrityError": "errors",
    "NoSuchBucketError": "errors",
    "NoSuchKeyError": "errors",
    "NotInDatasetError": "errors",
    "PartialReadError": "errors",
    "RemoteError": "errors",
    "S3XferError": "errors",
    "SourceError": "errors",
    "UsageError": "errors",
    "S3Url": "keys",
    "Estimate": "plan",
    "FileUnit": "plan",
    "Kind": "plan",
    "Plan": "plan",
    "ShardUnit": "plan",
    "make_plan": "plan",
    "Dataset": "reader",
    "SyncDataset": "reader",
    "Connection": "s3",
    "FileEntry": "survey",
    "Problem": "survey",
    "Survey": "survey",
    "survey": "survey",
    "UploadReport": "upload",
    "upload": "upload",
}

__all__ = (
    "AccessDeniedError",
    "Connection",
    "CorruptMetadataError",
    "Dataset",
    "EndpointError",
    "Estimate",
    "FileEntry",
    "FileUnit",
    "IntegrityError",
    "Kind",
    "NoSuchBucketError",
    "NoSuchKeyError",
    "NotInDatasetError",
    "PartialReadError",
    "Plan",
    "PriceTable",
    "Problem",
    "RemoteError",
    "S3Url",
    "S3XferError",
    "ShardUnit",
    "SourceError",
    "Survey",
    "SyncDataset",
    "TransferConfig",
    "UploadReport",
    "UsageError",
    "__version__",
    "make_plan",
    "survey",
    "upload",
)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 's3xfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


class _Package(types.ModuleType):
    """`s3xfer.survey` and `s3xfer.upload` name functions, as they did when this package
    imported everything up front: importing the modules of the same name must not rebind them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
