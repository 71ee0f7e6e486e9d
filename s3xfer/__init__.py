"""s3xfer: fast, verified, resumable bulk transfers of datasets to and from S3.

The library API, async first: `survey` a tree, `make_plan` for a destination, `upload` it,
and read files back with `Dataset` (or `SyncDataset` from synchronous code).
"""

from __future__ import annotations

from .config import PriceTable, TransferConfig
from .errors import (
    AccessDeniedError,
    EndpointError,
    IntegrityError,
    NoSuchBucketError,
    NoSuchKeyError,
    NotInDatasetError,
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

__all__ = (
    "AccessDeniedError",
    "Connection",
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
