# -*- test-case-name: tests.test_notify,tests.test_agent -*-
"""
The MQTT notification that hands a destination token to a device (reference section 4.1): its
topic, its payload, and the names it carries.

Both ends use this module: the service builds the topic and payload (L{tunnelkit.service.notify}),
the agent subscribes to the topic and checks each payload's names (L{tunnelkit.agent.core}).  Sans-IO:
strings in, strings and bytes out.

The name patterns are AWS's (thing name, service, region, tunnel id): the API's checks
(L{tunnelkit.service.operations}), the service's C{--region} and the local proxy's C{-r} use them too.
"""

from __future__ import annotations

import json
import re
from typing import Optional, Sequence

from tunnelkit.errors import TunnelkitError

__all__ = [
    "THING_NAME_RE",
    "SERVICE_RE",
    "REGION_RE",
    "TUNNEL_ID_RE",
    "NotificationError",
    "NotificationFormatError",
    "notify_topic",
    "notification_payload",
]

#: A thing name: 1-128 of C{a-z A-Z 0-9 : _ -}.
THING_NAME_RE = re.compile(r"\A[a-zA-Z0-9:_-]{1,128}\Z")
#: A service name of a notification: 1-128 of C{a-z A-Z 0-9 : _ -}.
SERVICE_RE = re.compile(r"\A[a-zA-Z0-9:_-]{1,128}\Z")
#: A region name: 1-64 of C{a-z 0-9 -}.
REGION_RE = re.compile(r"\A[a-z0-9-]{1,64}\Z")
#: A tunnel id: 1-128 of C{a-z A-Z 0-9 _ - + = :}.
TUNNEL_ID_RE = re.compile(r"\A[a-zA-Z0-9_\-+=:]{1,128}\Z")


class NotificationError(TunnelkitError):
    """A notification cannot be built or queued (bad thing name, services or region; storage)."""


class NotificationFormatError(NotificationError, ValueError):
    """A name or value does not fit the notification's format; the message says which."""


def notify_topic(thing_name: str) -> str:
    """
    C{$aws/things/<thing_name>/tunnels/notify}: the topic a thing's agent listens on.

    @raise NotificationFormatError: if C{thing_name} is not a thing name.
    """
    if not THING_NAME_RE.match(thing_name):
        raise NotificationFormatError(f"thing name {thing_name!r} must be 1-128 of a-z A-Z 0-9 : _ -")
    return f"$aws/things/{thing_name}/tunnels/notify"


def notification_payload(
    access_token: str, services: Sequence[str], region: str, tunnel_id: Optional[str] = None
) -> bytes:
    """
    The JSON payload of reference section 4.1 (C{clientMode} is lower-case C{destination}), plus
    C{tunnelId} when given: an addition to AWS's payload (clients ignore unknown keys) that lets
    tunnelkit's agent replace a tunnel's session when its token is rotated.

    @raise NotificationFormatError: for no token, no services, or a bad service or region name.
    """
    if not access_token:
        raise NotificationFormatError("no destination access token to deliver")
    if not services:
        raise NotificationFormatError("a notification needs at least one service")
    for service in services:
        if not SERVICE_RE.match(service):
            raise NotificationFormatError(f"service {service!r} must be 1-128 of a-z A-Z 0-9 : _ -")
    if not REGION_RE.match(region):
        raise NotificationFormatError(f"region {region!r} must be 1-64 of a-z 0-9 -")
    document = {
        "clientAccessToken": access_token,
        "clientMode": "destination",
        "region": region,
        "services": list(services),
    }
    if tunnel_id is not None:
        document["tunnelId"] = tunnel_id
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
