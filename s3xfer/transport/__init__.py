"""The one way bytes reach S3: PUT, UploadPart, GET (whole, ranged, streamed to a sink) and
HEAD, on the AWS Common Runtime's HTTP client (awscrt) and its SigV4 signer.

What to send where is botocore's answer for the same environment and config: the endpoint of
each bucket (endpoints.py), credentials (refreshed by botocore as they near expiry), the CA
bundle and proxies (network.py). Control requests (List, Create/Complete/Abort multipart)
stay on aiobotocore, in s3.py, which also counts, gates and retries every request.
"""

from .endpoints import BucketAddress, Endpoints
from .http import BodyCheck, Response, Sink, Transport, UnreachableError
from .network import NetworkSettings

__all__ = (
    "BodyCheck",
    "BucketAddress",
    "Endpoints",
    "NetworkSettings",
    "Response",
    "Sink",
    "Transport",
    "UnreachableError",
)
