# -*- test-case-name: tests.test_auth -*-
"""
Who is calling the API: AWS Signature Version 4 verification, and the accounts' access keys.

Verification recomputes the signature of the received request with botocore's own SigV4 signer
(L{botocore.auth.SigV4Auth}: canonical request, string to sign, key derivation) over exactly the headers
the client listed in C{SignedHeaders}, the raw path and query, and the SHA-256 of the received body;
then compares with L{hmac.compare_digest}.  The credential scope must name this service's region and
the signing name C{IoTSecuredTunneling}; C{X-Amz-Date} must be within 15 minutes of the service's clock.

Failures are AWS's error types with HTTP 403, and the request is not executed:

  - no C{Authorization} header: C{MissingAuthenticationTokenException}
  - a malformed one: C{IncompleteSignatureException}
  - unknown or revoked key id, or a session token: C{UnrecognizedClientException}
  - wrong signature, wrong scope, clock skew, or one of L{MUST_SIGN} (C{Host}, C{X-Amz-Target},
    C{Content-Type}) present but not in C{SignedHeaders}: C{InvalidSignatureException}

Access keys live in the store (the secret is kept: SigV4 verification needs it).  With no usable key, the
service's first start creates account C{default} and one key, and writes it to C{<state>/credentials} in
the AWS shared-credentials format (see L{ensure_initial_credentials}).
"""

from __future__ import annotations

import base64
import calendar
import configparser
import hashlib
import hmac
import io
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tunnelkit.service.errors import ApiError
from tunnelkit.service.statefiles import write_atomically
from tunnelkit.service.dbrunner import Blocking, resolved
from tunnelkit.service.store import AccessKey, Account, IControlStore, NoSuchAccount

SIGNING_NAME = "IoTSecuredTunneling"
ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_SECONDS = 15 * 60
CREDENTIALS_FILE = "credentials"
DEFAULT_ACCOUNT_NAME = "default"
_AMZ_DATE = "%Y%m%dT%H%M%SZ"

#: Headers that must be in C{SignedHeaders} whenever the request has them (host always), and why:
#: an unsigned one could be replaced in a captured request to make it mean something else.
MUST_SIGN = {
    "host": "it names the service the request is for",
    "x-amz-target": "it selects the operation",
    "content-type": "it says how the body is read",
}
_HEADER_SPELLING = {"host": "Host", "x-amz-target": "X-Amz-Target", "content-type": "Content-Type"}
_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

log = Logger()


class AuthError(ApiError):
    """The request is not authenticated: HTTP 403 with one of AWS's authentication error types."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(error_type, message, status=403)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    account: Account
    access_key_id: str


def new_access_key_id() -> str:
    """A fresh access key id: C{TKIA} and 16 characters of A-Z2-7 (the shape of AWS's)."""
    return "TKIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16))


def new_secret_access_key() -> str:
    """A fresh secret access key: 40 base64 characters (240 bits)."""
    return base64.b64encode(secrets.token_bytes(30)).decode("ascii")


def new_account_id() -> str:
    """A fresh 12-digit account id (as in ARNs)."""
    return str(secrets.randbelow(9 * 10**11) + 10**11)


_ACCOUNT_ID_RE = re.compile(r"\A[0-9]{12}\Z")


def check_account_id(text: str) -> str:
    """Coerce: a 12-digit account id."""
    if not _ACCOUNT_ID_RE.match(text):
        raise ValueError(f"an account id is 12 digits, got {text!r}")
    return text


def create_access_key(store: IControlStore, account: Account, now: float) -> "Deferred[AccessKey]":
    """Create and store a new key of C{account}; a Deferred of it once stored."""
    key = AccessKey(new_access_key_id(), account.account_id, new_secret_access_key(), now)
    return store.add_access_key(key).addCallback(lambda _: key)


def write_credentials_file(path: str, key: AccessKey, profile: str = "default") -> None:
    """
    Write (or update) C{profile} in the AWS shared-credentials file C{path}, private to the user.
    Other profiles in the file are kept.
    """
    parser = configparser.RawConfigParser()
    if os.path.exists(path):
        parser.read(path)
    if not parser.has_section(profile):
        parser.add_section(profile)
    parser.set(profile, "aws_access_key_id", key.access_key_id)
    parser.set(profile, "aws_secret_access_key", key.secret_access_key)
    text = io.StringIO()
    parser.write(text)
    write_atomically(path, text.getvalue().encode("utf-8"), 0o600)


def ensure_initial_credentials(
    store: IControlStore, state_dir: str, account_id: Optional[str], now: float
) -> Tuple[Account, Optional[AccessKey]]:
    """
    Make sure the service can be used: the C{default} account exists (with C{account_id}, or a random
    id), and if no account has any unrevoked key, create one for it and write C{<state_dir>/credentials}.

    Synchronous, for the service's start-up before the reactor runs: C{store} is on a
    L{SynchronousRunner} (L{tunnelkit.service.dbrunner}).

    @return: the default account, and the key created now (None if keys existed already).
    """
    blocking = Blocking(store)
    try:
        account = blocking.get_account(DEFAULT_ACCOUNT_NAME)
        if account_id is not None and account.account_id != account_id:
            log.warn(
                "--account-id {wanted} ignored: account {name!r} was created with id {account_id}; "
                "use 'tunnelkit admin create-account' for another account",
                wanted=account_id,
                name=account.name,
                account_id=account.account_id,
            )
    except NoSuchAccount:
        account = blocking.create_account(DEFAULT_ACCOUNT_NAME, account_id or new_account_id(), now)
    if any(key.revoked_at is None for key in blocking.list_access_keys()):
        return account, None
    key = resolved(create_access_key(store, account, now))
    write_credentials_file(os.path.join(state_dir, CREDENTIALS_FILE), key)
    return account, key


# --- verification ---


class _SignedHeaders:
    """
    The headers a client signed, in the two ways botocore's signer reads them (iteration over the
    lower-case names, and C{get_all}); lighter than botocore's email-based C{HTTPHeaders}.
    """

    def __init__(self, values: Dict[str, List[str]]) -> None:
        self._values = values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def get_all(self, name: str) -> List[str]:
        return self._values[name]


class _ReceivedRequestSigner(SigV4Auth):
    """botocore's SigV4 signer, restricted to the headers the client says it signed."""

    def __init__(self, credentials: Credentials, region: str, signed: _SignedHeaders) -> None:
        super().__init__(credentials, SIGNING_NAME, region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> _SignedHeaders:  # type: ignore[override]
        return self._signed


def _parse_authorization(value: str) -> Dict[str, str]:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AuthError(
            "IncompleteSignatureException",
            f"Unsupported authorization type {algorithm!r}: sign requests with {ALGORITHM} (Signature Version 4)",
        )
    fields: Dict[str, str] = {}
    for part in rest.split(","):
        name, sep, item = part.strip().partition("=")
        if not sep:
            raise AuthError("IncompleteSignatureException", f"Authorization header has a malformed part {part.strip()!r}")
        fields[name] = item
    for required in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(required):
            raise AuthError(
                "IncompleteSignatureException",
                f"Authorization header requires '{required}' parameter. Authorization={value}",
            )
    return fields


class SigV4Verifier:
    """Authenticates API requests against the store's access keys."""

    def __init__(self, store: IControlStore, region: str, now: Callable[[], float] = time.time) -> None:
        self._store = store
        self._region = region
        self._now = now

    async def authenticate(
        self,
        method: str,
        raw_path: str,
        headers: Sequence[Tuple[str, Sequence[str]]],
        body: bytes,
    ) -> Caller:
        """
        Check the request's signature (a coroutine: the key is looked up in the store).

        @param raw_path: the request target as received (path and query, still percent-encoded).
        @param headers: (name, values) pairs as received.
        @raise AuthError: if the request is not correctly signed by a usable key.
        """
        received: Dict[str, List[str]] = {}
        for name, values in headers:
            received.setdefault(name.lower(), []).extend(values)
        authorization = received.get("authorization")
        if not authorization:
            raise AuthError("MissingAuthenticationTokenException", "Missing Authentication Token")
        if len(authorization) > 1:
            raise AuthError("IncompleteSignatureException", "The request has more than one Authorization header")
        fields = _parse_authorization(authorization[0])

        scope = fields["Credential"].split("/")
        if len(scope) != 5:
            raise AuthError(
                "IncompleteSignatureException",
                f"Credential must have the form <key id>/<date>/<region>/{SIGNING_NAME}/aws4_request, "
                f"got {fields['Credential']!r}",
            )
        key_id, scope_date, scope_region, scope_service, terminator = scope
        signed_names = fields["SignedHeaders"].split(";")
        for name in MUST_SIGN:
            if name not in signed_names and (name in received or name == "host"):
                raise AuthError(
                    "InvalidSignatureException",
                    f"The {_HEADER_SPELLING[name]} header must be signed (SignedHeaders lacks {name}): "
                    f"{MUST_SIGN[name]}; sign the request with botocore, the AWS CLI or an AWS SDK, "
                    "which sign it",
                )

        amz_date = received.get("x-amz-date")
        if not amz_date:
            raise AuthError(
                "IncompleteSignatureException",
                "Authorization header requires existence of a 'X-Amz-Date' header",
            )
        if "x-amz-date" not in signed_names:
            raise AuthError("InvalidSignatureException", "The X-Amz-Date header must be signed")
        timestamp = amz_date[0]
        try:
            signed_at = calendar.timegm(time.strptime(timestamp, _AMZ_DATE))
        except ValueError:
            raise AuthError(
                "IncompleteSignatureException", f"X-Amz-Date {timestamp!r} is not of the form YYYYMMDDTHHMMSSZ"
            ) from None
        now = self._now()
        if signed_at < now - MAX_SKEW_SECONDS:
            raise AuthError(
                "InvalidSignatureException",
                f"Signature expired: {timestamp} is now earlier than "
                f"{time.strftime(_AMZ_DATE, time.gmtime(now - MAX_SKEW_SECONDS))} "
                f"({time.strftime(_AMZ_DATE, time.gmtime(now))} - 15 min.)",
            )
        if signed_at > now + MAX_SKEW_SECONDS:
            raise AuthError(
                "InvalidSignatureException",
                f"Signature not yet current: {timestamp} is still later than "
                f"{time.strftime(_AMZ_DATE, time.gmtime(now + MAX_SKEW_SECONDS))} "
                f"({time.strftime(_AMZ_DATE, time.gmtime(now))} + 15 min.)",
            )
        if scope_date != timestamp[:8]:
            raise AuthError(
                "InvalidSignatureException",
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                f"'{scope_date}' != '{timestamp[:8]}'",
            )
        if scope_region != self._region:
            raise AuthError(
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region, not '{scope_region}' "
                f"(this service's region is '{self._region}')",
            )
        if scope_service != SIGNING_NAME:
            raise AuthError(
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{SIGNING_NAME}', not '{scope_service}'",
            )
        if terminator != "aws4_request":
            raise AuthError(
                "InvalidSignatureException",
                f"Credential should be scoped with a valid terminator: 'aws4_request', not '{terminator}'",
            )
        if received.get("x-amz-security-token"):
            raise AuthError(
                "UnrecognizedClientException",
                "The security token included in the request is invalid (this service issues no session tokens)",
            )

        key = await self._store.get_access_key(key_id)
        if key is None or key.revoked_at is not None:
            raise AuthError("UnrecognizedClientException", "The security token included in the request is invalid.")

        body_hash = hashlib.sha256(body).hexdigest()
        claimed = received.get("x-amz-content-sha256")
        if claimed and claimed[0] != body_hash:
            raise AuthError(
                "InvalidSignatureException",
                "The provided 'x-amz-content-sha256' header does not match what was computed "
                "(this service requires a signed payload)",
            )

        signed: Dict[str, List[str]] = {}
        for name in signed_names:
            signed_values = received.get(name)
            if signed_values is None:
                raise AuthError("InvalidSignatureException", f"Signed header {name!r} is not in the request")
            signed[name] = signed_values
        host = received["host"][0]
        request = AWSRequest(method=method, url=f"https://{host}{raw_path}", data=body)
        if claimed:
            request.headers["X-Amz-Content-SHA256"] = claimed[0]
        request.context["timestamp"] = timestamp
        signer = _ReceivedRequestSigner(
            Credentials(key.access_key_id, key.secret_access_key), self._region, _SignedHeaders(signed)
        )
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected, fields["Signature"]):
            raise AuthError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.",
            )
        account = await self._store.get_account(key.account_id)
        return Caller(account=account, access_key_id=key.access_key_id)
