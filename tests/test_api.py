"""
Tests for the control-plane API (L{tunnelkit.service.api}, L{tunnelkit.service.operations}) through
botocore clients signing for real, in memory, on an injected clock.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport

import json
from typing import Any, Dict

from botocore.exceptions import ClientError
from zope.interface.verify import verifyObject

from tests.test_api_helpers import REGION, RecordingEvents, RecordingNotifier, ServiceTestCase
from tunnelkit.service import tokens
from tunnelkit.service.interfaces import INotifier, ITunnelEvents
from tunnelkit.service.operations import Limits

TARGET = "IoTSecuredTunneling."


class ErrorAssertions:
    def assertApiError(self, error_type: str, call: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """C{call} raises a ClientError of C{error_type}; return its error dict."""
        with self.assertRaises(ClientError) as raised:  # type: ignore[attr-defined]
            call(*args, **kwargs)
        error = raised.exception.response["Error"]
        self.assertEqual(error["Code"], error_type, error)  # type: ignore[attr-defined]
        return error


class RecordersTests(ServiceTestCase):
    def test_interfaces(self) -> None:
        """The recorders used in place of the data plane and notifier provide their interfaces."""
        self.assertTrue(verifyObject(ITunnelEvents, RecordingEvents()))
        self.assertTrue(verifyObject(INotifier, RecordingNotifier()))


class OpenDescribeTests(ServiceTestCase, ErrorAssertions):
    def test_open_minimal(self) -> None:
        """OpenTunnel with no arguments: an OPEN tunnel, both sides DISCONNECTED, 720 minutes, no services."""
        opened = self.api.open_tunnel()
        tunnel_id = opened["tunnelId"]
        self.assertEqual(
            opened["tunnelArn"], f"arn:aws:iot:{REGION}:{self.service.account.account_id}:tunnel/{tunnel_id}"
        )
        for field in ("sourceAccessToken", "destinationAccessToken"):
            self.assertTrue(tokens.is_well_formed(opened[field]))
        self.assertNotEqual(opened["sourceAccessToken"], opened["destinationAccessToken"])
        tunnel = self.api.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        self.assertEqual(tunnel["status"], "OPEN")
        self.assertEqual(tunnel["sourceConnectionState"], {"status": "DISCONNECTED", "lastUpdatedAt": self.clock.seconds()})
        self.assertEqual(tunnel["destinationConnectionState"]["status"], "DISCONNECTED")
        self.assertEqual(tunnel["timeoutConfig"], {"maxLifetimeTimeoutMinutes": 720})
        self.assertNotIn("destinationConfig", tunnel)
        self.assertNotIn("description", tunnel)
        self.assertEqual(tunnel["createdAt"], self.clock.seconds())
        self.assertEqual(self.service.notifier.sent, [])

    def test_open_full(self) -> None:
        """Every field of OpenTunnel is stored and described; the destination is notified."""
        opened = self.api.open_tunnel(
            description="to the lab",
            tags=[{"key": "team", "value": "ops"}, {"key": "empty", "value": ""}],
            destinationConfig={"thingName": "device-1", "services": ["SSH", "HTTP"]},
            timeoutConfig={"maxLifetimeTimeoutMinutes": 30},
        )
        tunnel = self.api.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]
        self.assertEqual(tunnel["description"], "to the lab")
        self.assertEqual(tunnel["destinationConfig"], {"thingName": "device-1", "services": ["SSH", "HTTP"]})
        self.assertEqual(tunnel["timeoutConfig"], {"maxLifetimeTimeoutMinutes": 30})
        self.assertEqual(
            sorted((t["key"], t["value"]) for t in tunnel["tags"]), [("empty", ""), ("team", "ops")]
        )
        self.assertEqual(
            self.service.notifier.sent,
            [(opened["tunnelId"], "device-1", opened["destinationAccessToken"], ("SSH", "HTTP"), REGION)],
        )

    def test_tokens_share_routing_key(self) -> None:
        """Both tokens of a tunnel start with the tunnel's routing key; another tunnel's differ."""
        first = self.api.open_tunnel()
        second = self.api.open_tunnel()
        key = tokens.routing_key_for_tunnel(first["tunnelId"])
        self.assertEqual(tokens.routing_key(first["sourceAccessToken"]), key)
        self.assertEqual(tokens.routing_key(first["destinationAccessToken"]), key)
        self.assertNotEqual(tokens.routing_key(second["sourceAccessToken"]), key)

    def test_only_hashes_stored(self) -> None:
        """The database file never contains a token."""
        opened = self.api.open_tunnel()
        self.service.store.close()
        import glob

        for path in glob.glob(self.state_dir + "/tunnelkit.sqlite3*"):
            with open(path, "rb") as f:
                data = f.read()
            self.assertNotIn(opened["sourceAccessToken"].encode(), data)
            self.assertNotIn(opened["sourceAccessToken"].split(".")[1].encode(), data)
        self.service = self.start_service()

    def test_describe_unknown(self) -> None:
        """An unknown tunnel id is ResourceNotFoundException (404)."""
        error = self.assertApiError(
            "ResourceNotFoundException", self.api.describe_tunnel, tunnelId="00000000-0000-0000-0000-000000000000"
        )
        self.assertIn("00000000-0000-0000-0000-000000000000", error["Message"])

    def test_quota(self) -> None:
        """Past --max-open-tunnels, OpenTunnel is LimitExceededException; closing one makes room."""
        ids = [self.api.open_tunnel()["tunnelId"] for _ in range(self.limits.max_open_tunnels or 0)]
        error = self.assertApiError("LimitExceededException", self.api.open_tunnel)
        self.assertIn("limit of 5 open tunnels", error["Message"])
        self.assertEqual(len(self.api.list_tunnels()["tunnelSummaries"]), 5)
        self.api.close_tunnel(tunnelId=ids[0])
        self.api.open_tunnel()

    def test_quota_per_account(self) -> None:
        """The quota counts each account's tunnels separately."""
        for _ in range(5):
            self.api.open_tunnel()
        _, key = self.service.new_account("other")
        self.service.client(key).open_tunnel()


class ValidationTests(ServiceTestCase, ErrorAssertions):
    """Each constraint of reference section 3.2 gets a 400 naming the field; nothing is created."""

    def invalid(self, operation: str, body: Any, field: str, error_type: str = "ValidationException") -> str:
        before = self.service.store.list_tunnels(self.service.account.account_id, None, 100, None)[0]
        status, error = self.call_raw(TARGET + operation, body)
        self.assertEqual((status, error.get("__type")), (400, error_type), error)
        self.assertIn(field, error["message"])
        after = self.service.store.list_tunnels(self.service.account.account_id, None, 100, None)[0]
        self.assertEqual(len(before), len(after))
        return error["message"]

    def test_description(self) -> None:
        self.invalid("OpenTunnel", {"description": ""}, "description")
        self.invalid("OpenTunnel", {"description": "x" * 2049}, "description")
        self.invalid("OpenTunnel", {"description": "line\nbreak"}, "description")
        self.invalid("OpenTunnel", {"description": 5}, "description", "SerializationException")
        self.api.open_tunnel(description="x" * 2048)
        self.api.open_tunnel(description="ünïcødé and spaces")

    def test_timeout(self) -> None:
        self.invalid("OpenTunnel", {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 0}}, "maxLifetimeTimeoutMinutes")
        message = self.invalid(
            "OpenTunnel", {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 721}}, "timeoutConfig.maxLifetimeTimeoutMinutes"
        )
        self.assertIn("less than or equal to 720", message)
        self.invalid(
            "OpenTunnel", {"timeoutConfig": {"maxLifetimeTimeoutMinutes": "5"}}, "maxLifetimeTimeoutMinutes",
            "SerializationException",
        )
        self.invalid("OpenTunnel", {"timeoutConfig": []}, "timeoutConfig", "SerializationException")
        self.api.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 1})
        self.api.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 720})

    def test_destination_config(self) -> None:
        self.invalid("OpenTunnel", {"destinationConfig": {"thingName": "t"}}, "destinationConfig.services")
        self.invalid("OpenTunnel", {"destinationConfig": {"services": []}}, "destinationConfig.services")
        self.invalid("OpenTunnel", {"destinationConfig": {"services": ["A", "B", "C", "D"]}}, "destinationConfig.services")
        self.invalid("OpenTunnel", {"destinationConfig": {"services": ["SSH", "SSH"]}}, "destinationConfig.services")
        self.invalid("OpenTunnel", {"destinationConfig": {"services": ["bad service"]}}, "destinationConfig.services.1")
        self.invalid("OpenTunnel", {"destinationConfig": {"services": ["x" * 129]}}, "destinationConfig.services.1")
        self.invalid("OpenTunnel", {"destinationConfig": {"thingName": "", "services": ["SSH"]}}, "destinationConfig.thingName")
        self.invalid(
            "OpenTunnel", {"destinationConfig": {"thingName": "a/b", "services": ["SSH"]}}, "destinationConfig.thingName"
        )
        self.invalid(
            "OpenTunnel", {"destinationConfig": {"thingName": "t" * 129, "services": ["SSH"]}}, "destinationConfig.thingName"
        )
        self.api.open_tunnel(destinationConfig={"thingName": "a:b_c-d", "services": ["S:1", "s_2", "x" * 128]})

    def test_tags(self) -> None:
        self.invalid("OpenTunnel", {"tags": []}, "tags")
        self.invalid("OpenTunnel", {"tags": [{"key": "k", "value": "v"}] * 201}, "tags")
        self.invalid("OpenTunnel", {"tags": [{"key": "", "value": "v"}]}, "tags.1.member.key")
        self.invalid("OpenTunnel", {"tags": [{"key": "k" * 129, "value": "v"}]}, "tags.1.member.key")
        self.invalid("OpenTunnel", {"tags": [{"key": "k", "value": "v" * 257}]}, "tags.1.member.value")
        self.invalid("OpenTunnel", {"tags": [{"key": "k", "value": "a\u0000b"}]}, "tags.1.member.value")
        self.invalid("OpenTunnel", {"tags": [{"key": "k#", "value": "v"}]}, "tags.1.member.key")
        self.invalid("OpenTunnel", {"tags": [{"key": "k"}]}, "tags.1.member.value")
        self.invalid("OpenTunnel", {"tags": [{"key": "k", "value": "1"}, {"key": "k", "value": "2"}]}, "tags.2.member.key")
        self.api.open_tunnel(tags=[{"key": "é _.:/=+-@ 9", "value": ""}])

    def test_tunnel_id(self) -> None:
        self.invalid("DescribeTunnel", {}, "tunnelId")
        self.invalid("DescribeTunnel", {"tunnelId": ""}, "tunnelId")
        self.invalid("DescribeTunnel", {"tunnelId": "x" * 129}, "tunnelId")
        self.invalid("DescribeTunnel", {"tunnelId": "a/b"}, "tunnelId")
        self.invalid("CloseTunnel", {"tunnelId": "a b"}, "tunnelId")
        self.invalid("CloseTunnel", {"tunnelId": "abc", "delete": "yes"}, "delete", "SerializationException")
        self.invalid("RotateTunnelAccessToken", {"tunnelId": "a?", "clientMode": "ALL"}, "tunnelId")

    def test_list_parameters(self) -> None:
        self.invalid("ListTunnels", {"maxResults": 0}, "maxResults")
        self.invalid("ListTunnels", {"maxResults": 101}, "maxResults")
        self.invalid("ListTunnels", {"maxResults": "5"}, "maxResults", "SerializationException")
        self.invalid("ListTunnels", {"thingName": "a b"}, "thingName")
        self.invalid("ListTunnels", {"nextToken": "not valid!"}, "nextToken")
        self.invalid("ListTunnels", {"nextToken": "Zm9vYmFy"}, "nextToken")

    def test_rotate_parameters(self) -> None:
        tunnel_id = self.api.open_tunnel()["tunnelId"]
        self.invalid("RotateTunnelAccessToken", {"tunnelId": tunnel_id}, "clientMode")
        self.invalid("RotateTunnelAccessToken", {"tunnelId": tunnel_id, "clientMode": "BOTH"}, "clientMode")
        self.invalid(
            "RotateTunnelAccessToken",
            {"tunnelId": tunnel_id, "clientMode": "SOURCE", "destinationConfig": {"services": ["SSH"]}},
            "destinationConfig",
        )
        self.invalid(
            "RotateTunnelAccessToken",
            {"tunnelId": tunnel_id, "clientMode": "ALL", "destinationConfig": {"services": []}},
            "destinationConfig.services",
        )

    def test_tag_parameters(self) -> None:
        arn = self.api.open_tunnel()["tunnelArn"]
        self.invalid("TagResource", {"resourceArn": arn}, "tags")
        self.invalid("TagResource", {"resourceArn": arn, "tags": []}, "tags")
        self.invalid("TagResource", {"resourceArn": "", "tags": [{"key": "a", "value": "b"}]}, "resourceArn")
        self.invalid("TagResource", {"resourceArn": "a" * 1012, "tags": [{"key": "a", "value": "b"}]}, "resourceArn")
        self.invalid("UntagResource", {"resourceArn": arn}, "tagKeys")
        self.invalid("UntagResource", {"resourceArn": arn, "tagKeys": [""]}, "tagKeys.1")
        self.invalid("UntagResource", {"resourceArn": arn, "tagKeys": ["k"] * 201}, "tagKeys")
        self.invalid("ListTagsForResource", {}, "resourceArn")

    def test_malformed_json(self) -> None:
        for body in (b"{", b"[1, 2]", b'{"description": NaN}', b"\xff\xfe", b"[" * 100000):
            status, error = self.call_raw(TARGET + "OpenTunnel", body)
            self.assertEqual((status, error["__type"]), (400, "SerializationException"), body[:10])
        self.assertIn("Malformed JSON", self.call_raw(TARGET + "OpenTunnel", b'{"a": }')[1]["message"])
        self.assertEqual(self.api.list_tunnels()["tunnelSummaries"], [])

    def test_unknown_operation(self) -> None:
        for target in ("IoTSecuredTunneling.DeleteEverything", "Other.OpenTunnel", None):
            status, error = self.call_raw(target, {})
            self.assertEqual((status, error["__type"]), (400, "UnknownOperationException"))
        self.assertIn("DeleteEverything", self.call_raw("IoTSecuredTunneling.DeleteEverything", {})[1]["message"])

    def test_empty_body_is_empty_request(self) -> None:
        """An empty body reads as {} (what botocore sends for no parameters)."""
        status, body = self.call_raw(TARGET + "ListTunnels", b"")
        self.assertEqual((status, body), (200, {"tunnelSummaries": []}))


class BodyLimitTests(ServiceTestCase):
    def test_declared_too_large(self) -> None:
        """A Content-Length over the limit is refused with 413 before any body byte arrives."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: IoTSecuredTunneling.OpenTunnel\r\n"
            b"Content-Length: 10485760\r\n\r\n"
        )
        from tests.test_api_helpers import parse_response

        status, headers, body = parse_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["__type"], "RequestEntityTooLargeException")
        self.assertIn("10485760 bytes", json.loads(body)["message"])
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"x" * 65536)  # the rest is discarded
        protocol.connectionLost(None)
        self.assertEqual(self.api.list_tunnels()["tunnelSummaries"], [])

    def test_chunked_too_large(self) -> None:
        """A chunked body is refused as soon as it grows past the limit."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(17):
            protocol.dataReceived(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        from tests.test_api_helpers import parse_response

        self.assertEqual(parse_response(transport.value())[0], 413)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)

    def test_keeps_serving(self) -> None:
        """After a refused body, other requests work."""
        self.test_declared_too_large()
        self.api.open_tunnel()
        self.assertEqual(len(self.api.list_tunnels()["tunnelSummaries"]), 1)


class ListTests(ServiceTestCase):
    limits = Limits(max_open_tunnels=None)

    def test_newest_first_and_pages(self) -> None:
        """ListTunnels is newest first, paged by maxResults/nextToken, filtered by thingName."""
        ids = []
        for i in range(7):
            config = {"thingName": "t1" if i % 2 else "t2", "services": ["SSH"]}
            ids.append(self.api.open_tunnel(destinationConfig=config, description=f"n{i}")["tunnelId"])
            self.clock.advance(1)
        everything = self.api.list_tunnels()
        self.assertEqual([s["tunnelId"] for s in everything["tunnelSummaries"]], ids[::-1])
        self.assertNotIn("nextToken", everything)
        summary = everything["tunnelSummaries"][0]
        self.assertEqual(sorted(summary), ["createdAt", "description", "lastUpdatedAt", "status", "tunnelArn", "tunnelId"])
        seen = []
        request: Dict[str, Any] = {"maxResults": 3}
        while True:
            page = self.api.list_tunnels(**request)
            self.assertLessEqual(len(page["tunnelSummaries"]), 3)
            seen.extend(s["tunnelId"] for s in page["tunnelSummaries"])
            if "nextToken" not in page:
                break
            request["nextToken"] = page["nextToken"]
        self.assertEqual(seen, ids[::-1])
        t1 = self.api.list_tunnels(thingName="t1")["tunnelSummaries"]
        self.assertEqual([s["tunnelId"] for s in t1], [ids[5], ids[3], ids[1]])
        self.assertEqual(self.api.list_tunnels(thingName="nobody")["tunnelSummaries"], [])

    def test_exact_page(self) -> None:
        """When the last page is full, no nextToken is returned."""
        for _ in range(4):
            self.api.open_tunnel()
        page = self.api.list_tunnels(maxResults=2)
        page = self.api.list_tunnels(maxResults=2, nextToken=page["nextToken"])
        self.assertEqual(len(page["tunnelSummaries"]), 2)
        self.assertNotIn("nextToken", page)


class CloseTests(ServiceTestCase, ErrorAssertions):
    def test_close(self) -> None:
        """CloseTunnel: CLOSED, visible, the data plane and notifier are told; closing again is fine."""
        tunnel_id = self.api.open_tunnel()["tunnelId"]
        self.clock.advance(5)
        self.assertEqual(self.api.close_tunnel(tunnelId=tunnel_id)["ResponseMetadata"]["HTTPStatusCode"], 200)
        tunnel = self.api.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        self.assertEqual(tunnel["status"], "CLOSED")
        self.assertEqual(tunnel["lastUpdatedAt"], self.clock.seconds())
        self.assertEqual(self.service.events.calls, [("tunnel_closed", tunnel_id, "closed")])
        self.assertEqual(self.service.notifier.closed, [tunnel_id])
        self.assertEqual(self.service.control.lifecycle.pending(), [])
        self.api.close_tunnel(tunnelId=tunnel_id)
        self.assertEqual(len(self.service.events.calls), 1)
        self.assertEqual([s["status"] for s in self.api.list_tunnels()["tunnelSummaries"]], ["CLOSED"])

    def test_closed_tokens_rejected(self) -> None:
        """After CloseTunnel the tokens cannot connect (410)."""
        opened = self.api.open_tunnel()
        self.api.close_tunnel(tunnelId=opened["tunnelId"])
        rejected = self.assertRaises(
            tokens.TokenRejected,
            self.service.store.claim_peer,
            opened["sourceAccessToken"],
            "source",
            None,
            self.clock.seconds(),
        )
        self.assertEqual((rejected.status, rejected.reason), (410, "tunnel-closed"))

    def test_delete(self) -> None:
        """delete=true forgets the tunnel at once, open or already closed."""
        first = self.api.open_tunnel()["tunnelId"]
        second = self.api.open_tunnel()["tunnelId"]
        self.api.close_tunnel(tunnelId=first, delete=True)
        self.assertApiError("ResourceNotFoundException", self.api.describe_tunnel, tunnelId=first)
        self.assertEqual(self.service.events.calls, [("tunnel_closed", first, "closed")])
        self.api.close_tunnel(tunnelId=second)
        self.api.close_tunnel(tunnelId=second, delete=True)
        self.assertEqual(self.api.list_tunnels()["tunnelSummaries"], [])
        self.assertApiError("ResourceNotFoundException", self.api.close_tunnel, tunnelId=second)

    def test_retention(self) -> None:
        """A closed tunnel stays visible for the retention period, then is purged."""
        tunnel_id = self.api.open_tunnel()["tunnelId"]
        self.api.close_tunnel(tunnelId=tunnel_id)
        self.clock.advance(3 * 3600 - 60)
        self.assertEqual(self.api.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["status"], "CLOSED")
        self.clock.advance(120)
        self.assertApiError("ResourceNotFoundException", self.api.describe_tunnel, tunnelId=tunnel_id)


class ExpiryTests(ServiceTestCase, ErrorAssertions):
    def test_lifetime(self) -> None:
        """A 1-minute tunnel reads CLOSED once a minute passed on the clock, and the data plane is told."""
        opened = self.api.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 1})
        tunnel_id = opened["tunnelId"]
        self.clock.advance(59)
        self.assertEqual(self.api.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["status"], "OPEN")
        self.assertEqual(self.service.events.calls, [])
        self.clock.advance(1)
        self.assertEqual(self.service.events.calls, [("tunnel_closed", tunnel_id, "expired")])
        self.assertEqual(self.service.notifier.closed, [tunnel_id])
        tunnel = self.api.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        self.assertEqual(tunnel["status"], "CLOSED")
        self.assertEqual(tunnel["lastUpdatedAt"], opened_at_plus(tunnel, 60))
        rejected = self.assertRaises(
            tokens.TokenRejected, self.service.store.claim_peer, opened["sourceAccessToken"], "source", None,
            self.clock.seconds(),
        )
        self.assertEqual(rejected.status, 410)
        self.assertApiError(
            "ResourceNotFoundException", self.api.rotate_tunnel_access_token, tunnelId=tunnel_id, clientMode="ALL"
        )

    def test_across_restart(self) -> None:
        """Deadlines survive a restart: one that passed while down closes at start; others still fire."""
        short = self.api.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 1})["tunnelId"]
        long = self.api.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 10})["tunnelId"]
        self.service.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(120)
        self.service = self.start_service()
        self.api = self.service.client()
        self.assertEqual(self.service.events.calls, [("tunnel_closed", short, "expired")])
        self.assertEqual(self.service.control.lifecycle.pending(), [long])
        self.clock.advance(8 * 60)
        self.assertEqual(self.service.events.calls[-1], ("tunnel_closed", long, "expired"))
        self.assertEqual(
            [s["status"] for s in self.api.list_tunnels()["tunnelSummaries"]], ["CLOSED", "CLOSED"]
        )

    def test_nothing_left_scheduled(self) -> None:
        """Stopping the lifecycle cancels every timer."""
        self.api.open_tunnel()
        self.service.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.service = self.start_service()


def opened_at_plus(tunnel: Dict[str, Any], seconds: float) -> float:
    return tunnel["createdAt"] + seconds


class RotateTests(ServiceTestCase, ErrorAssertions):
    def test_rotate_source(self) -> None:
        """SOURCE: only a new source token; the old one is revoked, the destination token still works."""
        opened = self.api.open_tunnel()
        rotated = self.api.rotate_tunnel_access_token(tunnelId=opened["tunnelId"], clientMode="SOURCE")
        self.assertEqual(rotated["tunnelArn"], opened["tunnelArn"])
        self.assertNotIn("destinationAccessToken", rotated)
        self.assertEqual(tokens.routing_key(rotated["sourceAccessToken"]), tokens.routing_key(opened["sourceAccessToken"]))
        now = self.clock.seconds()
        rejected = self.assertRaises(
            tokens.TokenRejected, self.service.store.claim_peer, opened["sourceAccessToken"], "source", None, now
        )
        self.assertEqual(rejected.reason, "token-rotated")
        grant = self.service.store.claim_peer(rotated["sourceAccessToken"], "source", None, now)
        self.assertEqual(grant.token_generation, 1)
        self.assertEqual(self.service.store.claim_peer(opened["destinationAccessToken"], "destination", None, now).token_generation, 0)
        self.assertEqual(self.service.events.calls, [("token_rotated", opened["tunnelId"], "source")])
        self.assertEqual(self.service.notifier.sent, [])

    def test_rotate_destination_with_config(self) -> None:
        """DESTINATION with a destinationConfig: new token, delivered to the thing (tutorial step 3)."""
        opened = self.api.open_tunnel(destinationConfig={"services": ["SSH"]})
        rotated = self.api.rotate_tunnel_access_token(
            tunnelId=opened["tunnelId"],
            clientMode="DESTINATION",
            destinationConfig={"thingName": "RemoteDeviceA", "services": ["SSH"]},
        )
        self.assertEqual(sorted(rotated), ["ResponseMetadata", "destinationAccessToken", "tunnelArn"])
        self.assertEqual(
            self.service.notifier.sent,
            [(opened["tunnelId"], "RemoteDeviceA", rotated["destinationAccessToken"], ("SSH",), REGION)],
        )
        tunnel = self.api.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]
        self.assertEqual(tunnel["destinationConfig"], {"thingName": "RemoteDeviceA", "services": ["SSH"]})
        grant = self.service.store.claim_peer(rotated["destinationAccessToken"], "destination", None, self.clock.seconds())
        self.assertEqual(grant.services, ("SSH",))
        self.assertEqual(self.service.events.calls, [("token_rotated", opened["tunnelId"], "destination")])

    def test_rotate_with_other_services_refused(self) -> None:
        """Rotation never changes a tunnel's services silently (issue 11 item 3): it says so and changes nothing."""
        opened = self.api.open_tunnel(destinationConfig={"thingName": "RemoteThing1", "services": ["SSH1"]})
        sent_before = list(self.service.notifier.sent)
        with self.assertRaises(ClientError) as raised:
            self.api.rotate_tunnel_access_token(
                tunnelId=opened["tunnelId"],
                clientMode="DESTINATION",
                destinationConfig={"thingName": "RemoteThing1", "services": ["SSH"]},
            )
        error = raised.exception.response["Error"]
        self.assertEqual(error["Code"], "ValidationException")
        self.assertIn("does not match the services of tunnel", error["Message"])
        self.assertIn("(SSH1)", error["Message"])
        self.assertIn("Rotate with services=SSH1", error["Message"])
        self.assertEqual(self.service.notifier.sent, sent_before)
        self.assertEqual(self.service.events.calls, [])
        grant = self.service.store.claim_peer(opened["destinationAccessToken"], "destination", None, self.clock.seconds())
        self.assertEqual(grant.services, ("SSH1",))  # the old token still works: nothing was rotated

    def test_rotate_services_in_another_order(self) -> None:
        opened = self.api.open_tunnel(destinationConfig={"thingName": "T", "services": ["SSH", "HTTP"]})
        self.api.rotate_tunnel_access_token(
            tunnelId=opened["tunnelId"], clientMode="ALL", destinationConfig={"thingName": "T", "services": ["HTTP", "SSH"]}
        )
        self.assertEqual(self.service.notifier.sent[-1][3], ("SSH", "HTTP"))

    def test_rotate_gives_a_tunnel_without_config_its_first(self) -> None:
        """A tunnel opened without destinationConfig takes the rotation's (its first; nothing changes)."""
        opened = self.api.open_tunnel()
        self.api.rotate_tunnel_access_token(
            tunnelId=opened["tunnelId"], clientMode="DESTINATION", destinationConfig={"thingName": "T", "services": ["SSH"]}
        )
        tunnel = self.api.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]
        self.assertEqual(tunnel["destinationConfig"], {"thingName": "T", "services": ["SSH"]})

    def test_rotate_all(self) -> None:
        """ALL: both tokens; the lifetime is not extended."""
        opened = self.api.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 2})
        self.clock.advance(90)
        rotated = self.api.rotate_tunnel_access_token(tunnelId=opened["tunnelId"], clientMode="ALL")
        self.assertIn("sourceAccessToken", rotated)
        self.assertIn("destinationAccessToken", rotated)
        self.assertEqual(
            sorted(self.service.events.calls),
            [("token_rotated", opened["tunnelId"], "destination"), ("token_rotated", opened["tunnelId"], "source")],
        )
        grant = self.service.store.claim_peer(rotated["sourceAccessToken"], "source", None, self.clock.seconds())
        self.assertEqual(grant.expires_at, self.clock.seconds() + 30)
        self.clock.advance(30)
        self.assertEqual(self.api.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]["status"], "CLOSED")

    def test_rotate_closed_or_unknown(self) -> None:
        opened = self.api.open_tunnel()
        self.api.close_tunnel(tunnelId=opened["tunnelId"])
        error = self.assertApiError(
            "ResourceNotFoundException", self.api.rotate_tunnel_access_token, tunnelId=opened["tunnelId"], clientMode="ALL"
        )
        self.assertIn("CLOSED", error["Message"])
        self.assertApiError(
            "ResourceNotFoundException", self.api.rotate_tunnel_access_token, tunnelId="nope", clientMode="ALL"
        )


class TagTests(ServiceTestCase, ErrorAssertions):
    def test_tags(self) -> None:
        opened = self.api.open_tunnel(tags=[{"key": "a", "value": "1"}])
        arn = opened["tunnelArn"]
        self.api.tag_resource(resourceArn=arn, tags=[{"key": "b", "value": "2"}, {"key": "a", "value": "3"}])
        self.assertEqual(
            self.api.list_tags_for_resource(resourceArn=arn)["tags"], [{"key": "a", "value": "3"}, {"key": "b", "value": "2"}]
        )
        self.api.untag_resource(resourceArn=arn, tagKeys=["a", "missing"])
        self.assertEqual(self.api.list_tags_for_resource(resourceArn=arn)["tags"], [{"key": "b", "value": "2"}])
        self.api.untag_resource(resourceArn=arn, tagKeys=["b"])
        self.assertEqual(self.api.list_tags_for_resource(resourceArn=arn)["tags"], [])

    def test_unknown_arns(self) -> None:
        arn = self.api.open_tunnel()["tunnelArn"]
        for bad in (
            arn.replace("us-east-1", "eu-west-1"),
            arn.replace(":tunnel/", ":thing/"),
            arn[:-4] + "0000",
            "arn:aws:iot:us-east-1:000000000000:tunnel/" + arn.rsplit("/", 1)[1],
        ):
            self.assertApiError("ResourceNotFoundException", self.api.list_tags_for_resource, resourceArn=bad)
            self.assertApiError(
                "ResourceNotFoundException", self.api.tag_resource, resourceArn=bad, tags=[{"key": "k", "value": "v"}]
            )
            self.assertApiError("ResourceNotFoundException", self.api.untag_resource, resourceArn=bad, tagKeys=["k"])


class IsolationTests(ServiceTestCase, ErrorAssertions):
    def test_other_account_invisible(self) -> None:
        """Another account's tunnels are absent from ListTunnels and ResourceNotFoundException elsewhere."""
        mine = self.api.open_tunnel(destinationConfig={"thingName": "shared", "services": ["SSH"]})
        account, key = self.service.new_account("tenant-b")
        other = self.service.client(key)
        theirs = other.open_tunnel(destinationConfig={"thingName": "shared", "services": ["SSH"]})
        self.assertIn(account.account_id, theirs["tunnelArn"])
        self.assertEqual([s["tunnelId"] for s in other.list_tunnels()["tunnelSummaries"]], [theirs["tunnelId"]])
        self.assertEqual([s["tunnelId"] for s in self.api.list_tunnels(thingName="shared")["tunnelSummaries"]], [mine["tunnelId"]])
        tunnel_id = mine["tunnelId"]
        self.assertApiError("ResourceNotFoundException", other.describe_tunnel, tunnelId=tunnel_id)
        self.assertApiError("ResourceNotFoundException", other.close_tunnel, tunnelId=tunnel_id)
        self.assertApiError("ResourceNotFoundException", other.close_tunnel, tunnelId=tunnel_id, delete=True)
        self.assertApiError(
            "ResourceNotFoundException", other.rotate_tunnel_access_token, tunnelId=tunnel_id, clientMode="ALL"
        )
        self.assertApiError("ResourceNotFoundException", other.list_tags_for_resource, resourceArn=mine["tunnelArn"])
        self.assertApiError(
            "ResourceNotFoundException", other.tag_resource, resourceArn=mine["tunnelArn"], tags=[{"key": "k", "value": "v"}]
        )
        # Their own ARN form for my tunnel id does not reach it either.
        forged = theirs["tunnelArn"].rsplit("/", 1)[0] + "/" + tunnel_id
        self.assertApiError("ResourceNotFoundException", other.list_tags_for_resource, resourceArn=forged)
        tunnel = self.api.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        self.assertEqual((tunnel["status"], tunnel.get("tags")), ("OPEN", None))
        self.assertEqual(self.service.events.calls, [])


class ExpectContinueTests(ServiceTestCase):
    def test_no_continue_after_refusal(self) -> None:
        """A too-large body announced with Expect: 100-continue gets only the 413, never a 100."""
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 10485760\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertNotIn(b"100 Continue", transport.value())
        protocol.connectionLost(None)


class TimeoutTests(ServiceTestCase):
    def test_idle_connection_closed(self) -> None:
        """An idle HTTP connection is closed after the idle timeout (on the site's clock)."""
        from tunnelkit.service.api import IDLE_TIMEOUT

        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertIn(b" 405 ", transport.value())
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)

    def test_request_head_deadline(self) -> None:
        """A connection whose request head is not complete 10 s after connecting is reset (issue 11 item 5)."""
        from tunnelkit.service.api import HEAD_TIMEOUT

        protocol, transport = self.connect()
        for _ in range(9):  # one byte a second: the idle timeout would never fire
            protocol.dataReceived(b"G")
            self.clock.advance(1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(HEAD_TIMEOUT - 9)
        self.assertTrue(transport.disconnected)  # aborted (reset), not closed
        protocol.connectionLost(None)
        self.assertEqual(self.service.site.pending, {})

    def test_later_request_head_deadline(self) -> None:
        from tunnelkit.service.api import HEAD_TIMEOUT

        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.clock.advance(HEAD_TIMEOUT * 3)  # idle between requests: the idle timeout's business
        self.assertFalse(transport.disconnected)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(HEAD_TIMEOUT)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(None)

    def test_oversize_header_line_431(self) -> None:
        """A header line over 16 KB, of any size, is answered 431 at once."""
        for size in (16385, 70000, 1_000_000):
            protocol, transport = self.connect()
            protocol.dataReceived(b"POST / HTTP/1.1\r\nX-Big: " + b"a" * size)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:80])
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(None)

    def test_oversize_head_431(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\n" + b"X-Some: " + b"b" * 8000 + b"\r\nX-More: " + b"c" * 9000 + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:80])

    def test_pending_connections_per_address(self) -> None:
        """An address holding 64 connections that are not WebSockets yet gets its next one reset."""
        from tunnelkit.service.api import MAX_PENDING_PER_ADDRESS

        from twisted.internet.address import IPv4Address

        def connect(host: str) -> Any:
            address = IPv4Address("TCP", host, 40000)
            protocol = self.service.site.buildProtocol(address)
            transport = StringTransport(peerAddress=address)
            protocol.makeConnection(transport)
            return protocol, transport

        held = [connect("127.0.0.9") for _ in range(MAX_PENDING_PER_ADDRESS)]
        self.assertEqual(self.service.site.pending, {"127.0.0.9": MAX_PENDING_PER_ADDRESS})
        protocol, transport = connect("127.0.0.9")
        self.assertTrue(transport.disconnected)
        self.assertFalse(connect("127.0.0.8")[1].disconnected)  # another address is not affected
        held[0][0].connectionLost(None)
        self.assertFalse(connect("127.0.0.9")[1].disconnected)

    def test_only_connections_sending_a_head_are_pending(self) -> None:
        """
        Review 1: idle keep-alive connections (and event streams being answered) are not pending: with
        a limit of 3, a 4th connection after three finished requests is served; three connections
        still sending their head do get a 4th one reset.
        """
        from twisted.internet.address import IPv4Address

        self.service.site.max_pending_per_address = 3

        def connect(host: str = "127.0.0.9") -> Any:
            address = IPv4Address("TCP", host, 40000)
            protocol = self.service.site.buildProtocol(address)
            transport = StringTransport(peerAddress=address)
            protocol.makeConnection(transport)
            return protocol, transport

        kept = [connect() for _ in range(3)]
        for protocol, transport in kept:
            protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b" 405 ", transport.value())
        self.assertEqual(self.service.site.pending, {})
        fourth = connect()
        self.assertFalse(fourth[1].disconnected)
        fourth[0].dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 405 ", fourth[1].value())
        # A kept-alive connection starting its next request is pending again until that head is complete.
        kept[0][0].dataReceived(b"GET / HT")
        self.assertEqual(self.service.site.pending, {"127.0.0.9": 1})
        kept[0][0].dataReceived(b"TP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.service.site.pending, {})
        slow = [connect() for _ in range(3)]
        for protocol, _ in slow:
            protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(self.service.site.pending, {"127.0.0.9": 3})
        self.assertTrue(connect()[1].disconnected)
        for protocol, transport in kept + [fourth] + slow:
            protocol.connectionLost(None)
        self.assertEqual(self.service.site.pending, {})

    def test_pending_resets_are_logged_per_address(self) -> None:
        """A reset by the pending limit is a warning naming the address, one line a minute per address."""
        from twisted.internet.address import IPv4Address
        from twisted.logger import capturedLogs

        from tunnelkit.service.api import PENDING_RESET_LOG_INTERVAL

        self.service.site.max_pending_per_address = 1

        def connect(host: str) -> Any:
            address = IPv4Address("TCP", host, 40000)
            protocol = self.service.site.buildProtocol(address)
            transport = StringTransport(peerAddress=address)
            protocol.makeConnection(transport)
            return transport

        connect("192.0.2.1"), connect("192.0.2.2")
        with capturedLogs() as events:
            for _ in range(5):
                self.assertTrue(connect("192.0.2.1").disconnected)
            self.assertTrue(connect("192.0.2.2").disconnected)
            self.clock.advance(PENDING_RESET_LOG_INTERVAL)
            self.assertTrue(connect("192.0.2.1").disconnected)
        lines = [e for e in events if "max-pending-per-address" in e.get("log_format", "")]
        self.assertEqual([(e["address"], e["log_level"].name) for e in lines],
                         [("192.0.2.1", "warn"), ("192.0.2.2", "warn"), ("192.0.2.1", "warn")])
        self.assertIn("4 more reset since the last such line", lines[2]["since"])
        self.assertEqual(self.service.site.refused_pending, 7)

    def test_proxy_protocol_client_address(self) -> None:
        """
        Behind a haproxy: listener the pending count is the PROXY header's client's, not HAProxy's:
        a burst of connections from HAProxy is not reset, one client over its limit is.
        """
        from twisted.internet import endpoints
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactor

        reactor = MemoryReactor()
        endpoints.serverFromString(reactor, "haproxy:tcp:0").listen(self.service.site.proxied())
        factory = reactor.tcpServers[0][1]
        self.service.site.max_pending_per_address = 3
        haproxy = IPv4Address("TCP", "10.0.0.2", 50000)

        def connect() -> Any:
            protocol = factory.buildProtocol(haproxy)
            transport = StringTransport(peerAddress=haproxy)
            protocol.makeConnection(transport)
            return protocol, transport

        burst = [connect() for _ in range(10)]  # accepted before any of them sent its PROXY header
        self.assertFalse(any(transport.disconnected for _, transport in burst))
        for number, (protocol, transport) in enumerate(burst):
            client = f"203.0.113.{1 + number // 3}"
            protocol.dataReceived(f"PROXY TCP4 {client} 10.0.0.1 4000{number} 8443\r\nGET / HT".encode())
        self.assertEqual(self.service.site.pending, {"203.0.113.1": 3, "203.0.113.2": 3, "203.0.113.3": 3,
                                                     "203.0.113.4": 1})
        self.assertEqual([transport.disconnected for _, transport in burst], [False] * 10)
        protocol, transport = connect()
        protocol.dataReceived(b"PROXY TCP4 203.0.113.1 10.0.0.1 41000 8443\r\nGET / HTTP/1.1\r\n")
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        for protocol, _ in burst + [(protocol, transport)]:
            protocol.connectionLost(None)
        self.assertEqual(self.service.site.pending, {})

    def test_taken_over_connection_exempt(self) -> None:
        """A connection a resource took over (a WebSocket upgrade) is not timed out by HTTP."""
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        class TakeOver(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> Any:
                taken.append(request.channel.transport)
                request.channel.transport = None
                return NOT_DONE_YET

        taken: list = []
        self.service.root.putChild(b"takeover", TakeOver())
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /takeover HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(taken, [transport])
        self.clock.advance(24 * 3600)
        self.assertFalse(transport.disconnecting)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if "timeout" in repr(c).lower()], [])
