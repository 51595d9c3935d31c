"""What gs:// needs of gcsfs beyond fsspec's defaults: which filesystem class, and one attempt
per request for the readers that retry themselves. Imported by `storage.filesystem` only for
gs:// URLs (gcsfs pulls in google-auth and gRPC).

- The class. gcsfs's default (`gcsfs.GCSFileSystem`, its "extended" class) asks the Storage
  Control gRPC API for every bucket's layout (zonal, hierarchical) before it opens a file,
  and does not keep a failed answer: against an emulator, which serves only the JSON API,
  each open waits 60 s for that answer. With an endpoint of its own (an emulator) the plain
  JSON-API class is used; against Google's endpoint, gcsfs's default.
- One attempt. gcsfs retries every request up to 6 times with its own backoff (~30 s), in a
  decorator fixed on `GCSFileSystem._request` when the class is defined: no option turns it
  off. The single-attempt classes send each request once (`_request` undecorated), so that
  the data reader's retry layer (`data.retry`) is the only one.
"""

from __future__ import annotations

import gcsfs
from gcsfs.core import GCSFileSystem as JsonApiGCS

_ONE_REQUEST = JsonApiGCS._request.__wrapped__  # the request itself, without gcsfs's retry decorator


class OneAttemptJsonApiGCS(JsonApiGCS):
    """The JSON-API class (emulators), each request sent once."""

    _request = _ONE_REQUEST


class OneAttemptGCS(gcsfs.GCSFileSystem):
    """gcsfs's default class (Google's endpoint), each request sent once."""

    _request = _ONE_REQUEST


def filesystem(path: str, options: dict, *, one_attempt: bool) -> tuple[gcsfs.GCSFileSystem, str]:
    """(gcsfs filesystem, bucket/key path) for the gs:// URL `path` with fsspec `options`
    (token, endpoint_url: see `storage.storage_options`). Instances are fsspec's cached ones
    per class and options, so the single-attempt ones are shared only by readers that retry."""
    own_endpoint = bool(options.get("endpoint_url"))
    if one_attempt:
        cls = OneAttemptJsonApiGCS if own_endpoint else OneAttemptGCS
    else:
        cls = JsonApiGCS if own_endpoint else gcsfs.GCSFileSystem
    return cls(**options), cls._strip_protocol(path)
