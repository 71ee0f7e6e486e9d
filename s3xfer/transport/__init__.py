"""The S3 path: every request s3xfer sends, and how.

- `s3.py`: the S3 facade the rest of s3xfer talks to (`Connection`, `S3`, `open_s3`): counts
  and gates every request, for callers that retry them; control requests (List,
  Create/Complete/Abort multipart) go through aiobotocore.
- `session.py`: `Connection`, and botocore's session and client, made on first use.
- `translate.py`: S3's and botocore's errors as s3xfer's, in one place.
- `http.py`, `rawhttp.py`: the data requests (PUT, UploadPart, GET, ranged GET, HEAD) on the
  AWS Common Runtime's HTTP client and SigV4 signer.
- `endpoints.py`, `network.py`: what to send where, botocore's answer for the same environment
  and config (endpoint per bucket, credentials, CA bundle, proxies).
- `retry.py`, `throttle.py`: attempts with backoff, and the gate that backs off on SlowDown.

Submodules are imported where used: importing `transport.retry` must not load awscrt.
"""
