# -*- test-case-name: tests.test_api -*-
"""
The operations of the AWS IoT Secure Tunneling API (reference section 3) over the store.

L{ControlPlane} has one method per operation, taking the caller's account and the decoded JSON request
and returning the JSON response as a dict.  Each validates its input against the shapes and constraints
of reference section 3.2 and raises L{ApiError} naming the field (a wrong JSON type is a
C{SerializationException}, a broken constraint a C{ValidationException}); members the model does not
have are ignored, as a newer SDK may send them.  It never sees HTTP (that is L{tunnelkit.service.api}'s
job) nor signatures (L{tunnelkit.service.auth}).

Side effects beyond the store: the data plane is told when a tunnel closes or a token is rotated
(L{ITunnelEvents}), the notifier delivers destination tokens (L{INotifier}), and the lifecycle timers
(L{tunnelkit.service.lifecycle}) close tunnels whose lifetime ends.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tunnelkit.protocol.notification import THING_NAME_RE, TUNNEL_ID_RE
from tunnelkit.service import tokens
from tunnelkit.service.errors import ApiError, not_found, serialization_error, validation_error
from tunnelkit.service.interfaces import DESTINATION, SOURCE, INotifier, ITunnelEvents, ITunnelStateObserver
from tunnelkit.service.lifecycle import TunnelLifecycle
from tunnelkit.service.statechanges import StateChanges
from tunnelkit.service.store import Account, IControlStore, NewTunnel, Tunnel

log = Logger()

DEFAULT_LIFETIME_MINUTES = 720
MAX_LIFETIME_MINUTES = 720
DEFAULT_MAX_RESULTS = 100


# --- field checks (reference section 3.2) ---

_NEXT_TOKEN_RE = re.compile(r"\A[a-zA-Z0-9_=-]{1,4096}\Z")
_TAG_EXTRA = frozenset("_.:/=+-@")
CLIENT_MODES = ("SOURCE", "DESTINATION", "ALL")


def _string(body: Mapping[str, Any], field: str, path: str, required: bool = False) -> Optional[str]:
    value = body.get(field)
    if value is None:
        if required:
            raise validation_error(path, "null", "Member must not be null")
        return None
    if not isinstance(value, str):
        raise serialization_error(path, "a string", value)
    return value


def _length(path: str, value: str, low: int, high: int) -> str:
    if len(value) < low:
        raise validation_error(path, value, f"Member must have length greater than or equal to {low}")
    if len(value) > high:
        raise validation_error(path, value, f"Member must have length less than or equal to {high}")
    return value


def _pattern(path: str, value: str, regex: "re.Pattern[str]", shown: str) -> str:
    if not regex.match(value):
        raise validation_error(path, value, f"Member must satisfy regular expression pattern: {shown}")
    return value


def check_tunnel_id(value: str, path: str = "tunnelId") -> str:
    """A C{TunnelId}: 1-128 of C{[a-zA-Z0-9_-+=:]}."""
    _length(path, value, 1, 128)
    return _pattern(path, value, TUNNEL_ID_RE, r"[a-zA-Z0-9_\-+=:]{1,128}")


def check_name(value: str, path: str) -> str:
    """A C{ThingName} or C{Service}: 1-128 of C{[a-zA-Z0-9:_-]}."""
    _length(path, value, 1, 128)
    return _pattern(path, value, THING_NAME_RE, "[a-zA-Z0-9:_-]+")  # the same characters as SERVICE_RE


def check_description(value: str, path: str = "description") -> str:
    """A C{Description}: 1-2048 characters, none of Unicode category C (control, format, ...)."""
    _length(path, value, 1, 2048)
    if any(unicodedata.category(c).startswith("C") for c in value):
        raise validation_error(path, value, r"Member must satisfy regular expression pattern: [^\p{C}]{1,2048}")
    return value


def _check_tag_text(path: str, value: str, low: int, high: int) -> str:
    _length(path, value, low, high)
    for c in value:
        if c not in _TAG_EXTRA and unicodedata.category(c)[0] not in "LZN":
            raise validation_error(
                path, value, r"Member must satisfy regular expression pattern: ^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$"
            )
    return value


def check_tags(value: Any, path: str = "tags") -> List[Tuple[str, str]]:
    """A C{TagList}: 1-200 C{{key, value}} with distinct keys."""
    if not isinstance(value, list):
        raise serialization_error(path, "a list", value)
    if not 1 <= len(value) <= 200:
        raise validation_error(
            path, f"list of {len(value)} tags", "Member must have length between 1 and 200"
        )
    tags: List[Tuple[str, str]] = []
    seen = set()
    for i, tag in enumerate(value, 1):
        where = f"{path}.{i}.member"
        if not isinstance(tag, dict):
            raise serialization_error(where, "an object", tag)
        key = _string(tag, "key", f"{where}.key", required=True)
        text = _string(tag, "value", f"{where}.value", required=True)
        assert key is not None and text is not None
        _check_tag_text(f"{where}.key", key, 1, 128)
        _check_tag_text(f"{where}.value", text, 0, 256)
        if key in seen:
            raise ApiError("ValidationException", f"Duplicate tag key {key!r} at '{where}.key'")
        seen.add(key)
        tags.append((key, text))
    return tags


def check_destination_config(
    value: Any, max_services: int, path: str = "destinationConfig"
) -> Tuple[Optional[str], Tuple[str, ...]]:
    """A C{DestinationConfig}: optional thingName, 1 to C{max_services} distinct services."""
    if not isinstance(value, dict):
        raise serialization_error(path, "an object", value)
    thing = _string(value, "thingName", f"{path}.thingName")
    if thing is not None:
        check_name(thing, f"{path}.thingName")
    services = value.get("services")
    if services is None:
        raise validation_error(f"{path}.services", "null", "Member must not be null")
    if not isinstance(services, list):
        raise serialization_error(f"{path}.services", "a list", services)
    if len(services) < 1:
        raise validation_error(f"{path}.services", "[]", "Member must have length greater than or equal to 1")
    if len(services) > max_services:
        raise validation_error(
            f"{path}.services",
            ",".join(str(s) for s in services),
            f"Member must have length less than or equal to {max_services} (services per tunnel)",
        )
    checked: List[str] = []
    for i, service in enumerate(services, 1):
        where = f"{path}.services.{i}.member"
        if not isinstance(service, str):
            raise serialization_error(where, "a string", service)
        check_name(service, where)
        if service in checked:
            raise ApiError("ValidationException", f"Duplicate service {service!r} at '{where}'")
        checked.append(service)
    return thing, tuple(checked)


def check_timeout_config(value: Any, path: str = "timeoutConfig") -> int:
    """A C{TimeoutConfig}: maxLifetimeTimeoutMinutes 1-720, default 720."""
    if not isinstance(value, dict):
        raise serialization_error(path, "an object", value)
    minutes = value.get("maxLifetimeTimeoutMinutes")
    if minutes is None:
        return DEFAULT_LIFETIME_MINUTES
    where = f"{path}.maxLifetimeTimeoutMinutes"
    if isinstance(minutes, bool) or not isinstance(minutes, int):
        if isinstance(minutes, float) and minutes.is_integer():
            minutes = int(minutes)
        else:
            raise serialization_error(where, "a whole number", minutes)
    if minutes < 1:
        raise validation_error(where, minutes, "Member must have value greater than or equal to 1")
    if minutes > MAX_LIFETIME_MINUTES:
        raise validation_error(where, minutes, f"Member must have value less than or equal to {MAX_LIFETIME_MINUTES}")
    return minutes


def tunnel_arn(region: str, account_id: str, tunnel_id: str) -> str:
    """C{arn:aws:iot:<region>:<account-id>:tunnel/<tunnel-id>}."""
    return f"arn:aws:iot:{region}:{account_id}:tunnel/{tunnel_id}"


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"tk1:{seq}".encode()).decode()


def _decode_cursor(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        prefix, seq = text.split(":")
        if prefix != "tk1":
            raise ValueError(prefix)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(
            "ValidationException",
            "nextToken is not valid: pass the nextToken of a previous ListTunnels response unchanged",
        ) from None


def _time(t: float) -> float:
    return round(t, 3)


@dataclass(frozen=True)
class Limits:
    """Per-account and per-tunnel limits of the API."""

    max_open_tunnels: Optional[int] = 1000
    max_services_per_tunnel: int = 3


class ControlPlane:
    """The API's operations, one method each (named as the operation)."""

    OPERATIONS = (
        "OpenTunnel",
        "CloseTunnel",
        "DescribeTunnel",
        "ListTunnels",
        "RotateTunnelAccessToken",
        "TagResource",
        "UntagResource",
        "ListTagsForResource",
    )

    def __init__(
        self,
        store: IControlStore,
        clock: IReactorTime,
        region: str,
        events: Optional[ITunnelEvents],
        notifier: Optional[INotifier],
        limits: Limits = Limits(),
        closed_retention: float = 3 * 3600.0,
        new_token: Callable[[str], str] = tokens.new_access_token,
    ) -> None:
        self.store = store
        self.clock = clock
        self.region = region
        self.events = events
        self.notifier = notifier
        self.limits = limits
        self._new_token = new_token
        self.lifecycle = TunnelLifecycle(store, clock, self._tunnel_ended, closed_retention)
        #: Told when a tunnel is opened, closed, deleted or expires here (the service shares the relay's).
        self.state_changes: ITunnelStateObserver = StateChanges()

    def call(self, operation: str, account: Account, body: Mapping[str, Any]) -> "Deferred[Dict[str, Any]]":
        """Run C{operation} (one of L{OPERATIONS}) for C{account}: a Deferred of the response (or ApiError)."""

        async def run() -> Dict[str, Any]:
            if operation not in self.OPERATIONS:
                raise ApiError("UnknownOperationException", f"Unknown operation {operation!r}")
            await self.lifecycle.expire_due()
            method = getattr(self, "op_" + operation)
            answer: Dict[str, Any] = await method(account, body)
            if operation == "OpenTunnel":
                self.state_changes.tunnel_changed(account.account_id, answer["tunnelId"])
            elif operation == "CloseTunnel":
                self.state_changes.tunnel_changed(account.account_id, self._tunnel_id(body))
            return answer

        return Deferred.fromCoroutine(run())

    # --- effects ---

    def _tunnel_ended(self, tunnel_id: str, reason: str) -> None:
        log.info("Tunnel {tunnel_id} closed ({reason})", tunnel_id=tunnel_id, reason=reason)
        if self.events is not None:
            self.events.tunnel_closed(tunnel_id, reason)
        if self.notifier is not None:
            self.notifier.tunnel_closed(tunnel_id)
        self.state_changes.tunnel_changed(None, tunnel_id)  # expiry included

    def _arn(self, account: Account, tunnel_id: str) -> str:
        return tunnel_arn(self.region, account.account_id, tunnel_id)

    def _resolve_arn(self, account: Account, body: Mapping[str, Any]) -> str:
        arn = _string(body, "resourceArn", "resourceArn", required=True)
        assert arn is not None
        _length("resourceArn", arn, 1, 1011)
        prefix = f"arn:aws:iot:{self.region}:{account.account_id}:tunnel/"
        if not arn.startswith(prefix) or not TUNNEL_ID_RE.match(arn[len(prefix) :]):
            raise ApiError(
                "ResourceNotFoundException",
                f"Resource {arn} does not exist (tunnel ARNs here have the form {prefix}<tunnel-id>)",
                status=404,
            )
        return arn[len(prefix) :]

    # --- operations ---

    async def op_OpenTunnel(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        description = _string(body, "description", "description")
        if description is not None:
            check_description(description)
        tags = check_tags(body["tags"]) if body.get("tags") is not None else []
        thing_name: Optional[str] = None
        services: Optional[Tuple[str, ...]] = None
        if body.get("destinationConfig") is not None:
            thing_name, services = check_destination_config(
                body["destinationConfig"], self.limits.max_services_per_tunnel
            )
        minutes = DEFAULT_LIFETIME_MINUTES
        if body.get("timeoutConfig") is not None:
            minutes = check_timeout_config(body["timeoutConfig"])

        tunnel_id = str(uuid.uuid4())
        source_token = self._new_token(tunnel_id)
        destination_token = self._new_token(tunnel_id)
        now = self.clock.seconds()
        created = await self.store.create_tunnel(
            NewTunnel(
                tunnel_id=tunnel_id,
                account_id=account.account_id,
                description=description,
                thing_name=thing_name,
                services=services,
                max_lifetime_minutes=minutes,
                tags=tuple(tags),
                source_token_hash=tokens.token_hash(source_token),
                destination_token_hash=tokens.token_hash(destination_token),
                created_at=now,
            ),
            self.limits.max_open_tunnels,
        )
        if not created:
            raise ApiError(
                "LimitExceededException",
                f"Too many open tunnels: account {account.account_id} has reached its limit of "
                f"{self.limits.max_open_tunnels} open tunnels; close some with CloseTunnel",
            )
        self.lifecycle.schedule(tunnel_id, now + minutes * 60.0)
        log.info(
            "Opened tunnel {tunnel_id} for account {account_id} (lifetime {minutes} min, services {services})",
            tunnel_id=tunnel_id,
            account_id=account.account_id,
            minutes=minutes,
            services=",".join(services or ()) or "none",
        )
        if thing_name is not None and services is not None:
            await self._notify(tunnel_id, thing_name, destination_token, services)
        return {
            "tunnelId": tunnel_id,
            "tunnelArn": self._arn(account, tunnel_id),
            "sourceAccessToken": source_token,
            "destinationAccessToken": destination_token,
        }

    async def _notify(self, tunnel_id: str, thing_name: str, token: str, services: Tuple[str, ...]) -> None:
        if self.notifier is None:
            log.warn(
                "Tunnel {tunnel_id}: thing {thing_name} not notified: notifications are off (no --mqtt)",
                tunnel_id=tunnel_id,
                thing_name=thing_name,
            )
            return
        # Waited for: the response goes out once the notification is queued durably.
        await maybeDeferred(self.notifier.notify_destination, tunnel_id, thing_name, token, services, self.region)

    def _tunnel_id(self, body: Mapping[str, Any]) -> str:
        tunnel_id = _string(body, "tunnelId", "tunnelId", required=True)
        assert tunnel_id is not None
        return check_tunnel_id(tunnel_id)

    async def op_DescribeTunnel(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        tunnel_id = self._tunnel_id(body)
        tunnel = await self.store.get_tunnel(account.account_id, tunnel_id)
        if tunnel is None:
            raise not_found(tunnel_id)
        return {"tunnel": self._describe(account, tunnel)}

    def _describe(self, account: Account, tunnel: Tunnel) -> Dict[str, Any]:
        described: Dict[str, Any] = {
            "tunnelId": tunnel.tunnel_id,
            "tunnelArn": self._arn(account, tunnel.tunnel_id),
            "status": tunnel.status,
            "sourceConnectionState": {
                "status": tunnel.source.status,
                "lastUpdatedAt": _time(tunnel.source.last_updated_at),
            },
            "destinationConnectionState": {
                "status": tunnel.destination.status,
                "lastUpdatedAt": _time(tunnel.destination.last_updated_at),
            },
        }
        if tunnel.description is not None:
            described["description"] = tunnel.description
        if tunnel.services is not None:
            config: Dict[str, Any] = {"services": list(tunnel.services)}
            if tunnel.thing_name is not None:
                config = {"thingName": tunnel.thing_name, **config}
            described["destinationConfig"] = config
        described["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": tunnel.max_lifetime_minutes}
        if tunnel.tags:
            described["tags"] = [{"key": k, "value": v} for k, v in tunnel.tags]
        described["createdAt"] = _time(tunnel.created_at)
        described["lastUpdatedAt"] = _time(tunnel.last_updated_at)
        return described

    async def op_ListTunnels(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        thing_name = _string(body, "thingName", "thingName")
        if thing_name is not None:
            check_name(thing_name, "thingName")
        limit = DEFAULT_MAX_RESULTS
        if body.get("maxResults") is not None:
            limit = body["maxResults"]
            if isinstance(limit, bool) or not isinstance(limit, int):
                raise serialization_error("maxResults", "a whole number", limit)
            if limit < 1:
                raise validation_error("maxResults", limit, "Member must have value greater than or equal to 1")
            if limit > 100:
                raise validation_error("maxResults", limit, "Member must have value less than or equal to 100")
        after = None
        next_token = _string(body, "nextToken", "nextToken")
        if next_token is not None:
            _pattern("nextToken", next_token, _NEXT_TOKEN_RE, "[a-zA-Z0-9_=-]{1,4096}")
            after = _decode_cursor(next_token)
        tunnels, cursor = await self.store.list_tunnels(account.account_id, thing_name, limit, after)
        summaries = []
        for tunnel in tunnels:
            summary: Dict[str, Any] = {
                "tunnelId": tunnel.tunnel_id,
                "tunnelArn": self._arn(account, tunnel.tunnel_id),
                "status": tunnel.status,
            }
            if tunnel.description is not None:
                summary["description"] = tunnel.description
            summary["createdAt"] = _time(tunnel.created_at)
            summary["lastUpdatedAt"] = _time(tunnel.last_updated_at)
            summaries.append(summary)
        response: Dict[str, Any] = {"tunnelSummaries": summaries}
        if cursor is not None:
            response["nextToken"] = _encode_cursor(cursor)
        return response

    async def op_CloseTunnel(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        tunnel_id = self._tunnel_id(body)
        delete = body.get("delete", False)
        if delete is None:
            delete = False
        if not isinstance(delete, bool):
            raise serialization_error("delete", "true or false", delete)
        now = self.clock.seconds()
        was_open = await self.store.close_tunnel(account.account_id, tunnel_id, now)
        if was_open is None:
            raise not_found(tunnel_id)
        if was_open:
            self.lifecycle.cancel(tunnel_id)
            self._tunnel_ended(tunnel_id, "closed")
        if delete:
            await self.store.delete_tunnel(account.account_id, tunnel_id)
            log.info("Deleted tunnel {tunnel_id}", tunnel_id=tunnel_id)
        return {}

    async def op_RotateTunnelAccessToken(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        tunnel_id = self._tunnel_id(body)
        mode = _string(body, "clientMode", "clientMode", required=True)
        assert mode is not None
        if mode not in CLIENT_MODES:
            raise validation_error("clientMode", mode, "Member must satisfy enum value set: [SOURCE, DESTINATION, ALL]")
        delivery = None
        if body.get("destinationConfig") is not None:
            if mode == "SOURCE":
                raise ApiError(
                    "ValidationException",
                    "destinationConfig cannot be used with clientMode SOURCE (it says where to deliver "
                    "the new destination token): rotate with --client-mode DESTINATION or ALL, or leave "
                    "out --destination-config",
                )
            delivery = check_destination_config(body["destinationConfig"], self.limits.max_services_per_tunnel)
        sides = {"SOURCE": (SOURCE,), "DESTINATION": (DESTINATION,), "ALL": (SOURCE, DESTINATION)}[mode]
        current = await self.store.get_tunnel(account.account_id, tunnel_id)
        if current is None:
            raise not_found(tunnel_id)
        if current.status != "OPEN":
            raise ApiError(
                "ResourceNotFoundException",
                f"Tunnel {tunnel_id} is CLOSED: the tokens of a closed tunnel cannot be rotated; open a new tunnel",
                status=404,
            )
        recorded = None
        if delivery is not None:
            self._check_rotation_services(current, delivery[1])
            services = current.services if current.services is not None else delivery[1]
            recorded = (delivery[0] if delivery[0] is not None else current.thing_name, services)
        new_tokens = {side: self._new_token(tunnel_id) for side in sides}
        now = self.clock.seconds()
        tunnel = await self.store.rotate_tokens(
            account.account_id,
            tunnel_id,
            [(side, tokens.token_hash(token)) for side, token in new_tokens.items()],
            recorded,
            now,
        )
        if tunnel is None:  # closed between the two calls
            raise not_found(tunnel_id)
        thing = delivery[0] if delivery is not None else None
        log.info(
            "Rotated the {mode} token(s) of tunnel {tunnel_id}{delivered}",
            mode=mode,
            tunnel_id=tunnel_id,
            delivered=f"; the new destination token goes to thing {thing}" if thing and DESTINATION in new_tokens else "",
        )
        if self.events is not None:
            for side in sides:
                self.events.token_rotated(tunnel_id, side)
        response: Dict[str, Any] = {"tunnelArn": self._arn(account, tunnel_id)}
        if SOURCE in new_tokens:
            response["sourceAccessToken"] = new_tokens[SOURCE]
        if DESTINATION in new_tokens:
            response["destinationAccessToken"] = new_tokens[DESTINATION]
            if thing is not None:
                await self._notify(tunnel_id, thing, new_tokens[DESTINATION], tunnel.services or ())
        return response

    @staticmethod
    def _check_rotation_services(tunnel: Tunnel, services: Tuple[str, ...]) -> None:
        """
        RotateTunnelAccessToken's destinationConfig says where the new destination token goes (its
        thingName's notify topic, recorded as the tunnel's thing); AWS documents no change of a
        tunnel's services by it (OpenTunnel sets them, and IAM's C{iot:TunnelDestinationService}
        is the tunnel's), so the services given must be the tunnel's: a different list is refused,
        never applied silently.  A tunnel opened without a destinationConfig takes the one given.
        """
        if tunnel.services is None or sorted(services) == sorted(tunnel.services):
            return
        opened = ",".join(tunnel.services)
        given = ",".join(services)
        raise ApiError(
            "ValidationException",
            f"destinationConfig.services ({given}) does not match the services of tunnel {tunnel.tunnel_id} "
            f"({opened}): a tunnel's services are fixed by OpenTunnel, and rotation does not change them "
            f"(the running local proxies keep using {opened}). Rotate with services={opened}, or open a "
            f"new tunnel with services={given}",
        )

    async def op_TagResource(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        tunnel_id = self._resolve_arn(account, body)
        if body.get("tags") is None:
            raise validation_error("tags", "null", "Member must not be null")
        tags = check_tags(body["tags"])
        if not await self.store.tag_tunnel(account.account_id, tunnel_id, tags, self.clock.seconds()):
            raise not_found(tunnel_id)
        return {}

    async def op_UntagResource(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        tunnel_id = self._resolve_arn(account, body)
        keys = body.get("tagKeys")
        if keys is None:
            raise validation_error("tagKeys", "null", "Member must not be null")
        if not isinstance(keys, list):
            raise serialization_error("tagKeys", "a list", keys)
        if len(keys) > 200:
            raise validation_error("tagKeys", f"list of {len(keys)} keys", "Member must have length less than or equal to 200")
        checked: List[str] = []
        for i, key in enumerate(keys, 1):
            where = f"tagKeys.{i}.member"
            if not isinstance(key, str):
                raise serialization_error(where, "a string", key)
            checked.append(_check_tag_text(where, key, 1, 128))
        if not await self.store.untag_tunnel(account.account_id, tunnel_id, checked, self.clock.seconds()):
            raise not_found(tunnel_id)
        return {}

    async def op_ListTagsForResource(self, account: Account, body: Mapping[str, Any]) -> Dict[str, Any]:
        tunnel_id = self._resolve_arn(account, body)
        tunnel = await self.store.get_tunnel(account.account_id, tunnel_id)
        if tunnel is None:
            raise not_found(tunnel_id)
        return {"tags": [{"key": k, "value": v} for k, v in tunnel.tags]}
