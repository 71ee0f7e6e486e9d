"""s3xfer: fast, verified, resumable bulk transfers of datasets to and from S3."""

__version__ = "0.1.0"
