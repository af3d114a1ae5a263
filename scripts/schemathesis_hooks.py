# Schemathesis hooks: sign every request with LABRELAY-HMAC-SHA256.
#
# Load it into the schemathesis CLI with
#     SCHEMATHESIS_HOOKS=scripts/schemathesis_hooks.py schemathesis run ...
# (tested with schemathesis 4.32.5) and name the extra check in --checks:
#     --checks not_a_server_error,status_code_conformance,content_type_conformance,\
#              response_schema_conformance,labrelay_signature_accepted
# Credentials come from the environment:
#     LABRELAY_FUZZ_USER  user name put in the header
#     LABRELAY_FUZZ_KEY   that user's key (HMAC key = its UTF-8 bytes)
#
# The signature is computed by a `requests` auth object, which requests calls on
# the fully prepared request, i.e. after schemathesis has serialised the body and
# requests has percent-encoded the URL. So it signs exactly the path, query and
# body bytes that go on the wire. It is registered with
# `schemathesis.auth.set_from_requests`, so schemathesis treats it as explicit
# auth (it leaves it off when a negative test drops the security parameter, and
# the `ignored_auth` check can strip it to probe the server).
#
# A new timestamp and nonce are made every time requests prepares the request,
# so schemathesis' own retries (--request-retries, resend on a dropped
# keep-alive connection) get fresh signatures. Redirects followed by requests
# are NOT re-signed (they reuse the old header); use --max-redirects 0 if the
# API redirects.
#
# String to sign, joined with "\n":
#   LABRELAY-HMAC-SHA256, METHOD, path as sent (percent-encoded, no query),
#   raw query as sent ("" if none), hex SHA-256 of the body bytes, ts, nonce
# Header:
#   Authorization: LABRELAY-HMAC-SHA256 user=<u>, ts=<unix s>, nonce=<32 hex>, sig=<hex>

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time

import requests

SCHEME = "LABRELAY-HMAC-SHA256"


def body_bytes(body: object) -> bytes:
    """Bytes that requests/urllib3 will put on the wire for a prepared body."""
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        # urllib3 2.x encodes str bodies as UTF-8 (requests only builds str
        # bodies for form data, which is ASCII after urlencoding anyway).
        return body.encode("utf-8")
    raise TypeError(f"cannot sign a streamed request body of type {type(body).__name__}")


def string_to_sign(method: str, path: str, query: str, body: bytes, ts: str, nonce: str) -> str:
    return "\n".join([SCHEME, method.upper(), path, query, hashlib.sha256(body).hexdigest(), ts, nonce])


def signature(key: str, message: str) -> str:
    return hmac.new(key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


class LabrelayHmacAuth(requests.auth.AuthBase):
    """requests auth that signs the prepared request (URL, query and body as sent)."""

    def __init__(self, user: str, key: str) -> None:
        self.user = user
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        # `path_url` is the request target requests sends: encoded path, then "?query" if any.
        path, _, query = request.path_url.partition("?")
        ts = str(int(time.time()))
        nonce = secrets.token_hex(16)
        message = string_to_sign(request.method or "GET", path, query, body_bytes(request.body), ts, nonce)
        request.headers["Authorization"] = (
            f"{SCHEME} user={self.user}, ts={ts}, nonce={nonce}, sig={signature(self.key, message)}"
        )
        return request


def labrelay_signature_accepted(ctx, response, case):  # noqa: ANN001, ANN201
    """Fail when a request that carried our signature was answered 401.

    A documented 401 passes the built-in checks, so without this a wrong key,
    clock skew or a signing bug would give a green run that tested nothing
    beyond the auth layer. Negative tests that drop the Authorization header
    on purpose send no signature and are not affected.
    """
    sent = response.request.headers.get("Authorization") or ""
    if response.status_code == 401 and sent.startswith(SCHEME + " "):
        raise AssertionError(
            f"Signed request rejected with 401 (bad key, clock skew or signing bug): {response.text[:200]!r}"
        )


def _register() -> None:
    import schemathesis

    schemathesis.check(labrelay_signature_accepted)
    user = os.environ.get("LABRELAY_FUZZ_USER")
    key = os.environ.get("LABRELAY_FUZZ_KEY")
    if not user or not key:
        # Fail loudly: an unsigned run would only test the 401 path.
        raise RuntimeError("LABRELAY_FUZZ_USER and LABRELAY_FUZZ_KEY must be set to sign requests")
    schemathesis.auth.set_from_requests(LabrelayHmacAuth(user, key))


_register()
