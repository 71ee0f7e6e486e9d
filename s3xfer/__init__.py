"""s3xfer: fast, verified, resumable bulk transfers of datasets to and from S3.

The library API, async first: `survey` a tree, `make_plan` for a destination, `upload` it,
and read files back with `Dataset` (or `SyncDataset` from synchronous code).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PriceTable, TransferConfig
    from .dataset.keys import S3Url
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
    from .limits import RunLimits
    from .planning.plan import Estimate, FileUnit, Kind, Plan, ShardUnit, make_plan
    from .planning.planfile import load_plan, save_plan
    from .planning.survey import FileEntry, Problem, Survey, survey
    from .read.reader import Dataset
    from .read.sync import SyncDataset
    from .transport.session import Connection
    from .write.upload import UploadReport, upload

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
    "S3Url": "dataset.keys",
    "RunLimits": "limits",
    "Estimate": "planning.plan",
    "FileUnit": "planning.plan",
    "Kind": "planning.plan",
    "Plan": "planning.plan",
    "ShardUnit": "planning.plan",
    "make_plan": "planning.plan",
    "load_plan": "planning.planfile",
    "save_plan": "planning.planfile",
    "Dataset": "read.reader",
    "SyncDataset": "read.sync",
    "Connection": "transport.session",
    "FileEntry": "planning.survey",
    "Problem": "planning.survey",
    "Survey": "planning.survey",
    "survey": "planning.survey",
    "UploadReport": "write.upload",
    "upload": "write.upload",
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
    "RunLimits",
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
    "load_plan",
    "make_plan",
    "save_plan",
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
