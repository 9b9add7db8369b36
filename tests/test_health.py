"""Tests for L{tunnelkit.service.health}."""

from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from tunnelkit.service.health import HealthResource


class HealthTests(unittest.TestCase):
    def render(self, resource: HealthResource) -> DummyRequest:
        request = DummyRequest([b""])
        request.method = b"GET"
        body = resource.render(request)
        request.write(body)
        return request

    def test_ok_while_running(self) -> None:
        request = self.render(HealthResource())
        self.assertIn(request.responseCode, (None, 200))  # DummyRequest: None means the default, 200
        self.assertEqual(b"".join(request.written), b"ok\n")

    def test_unavailable_once_stopping(self) -> None:
        """A node that began to stop answers 503, so a balancer takes it out first."""
        resource = HealthResource()
        resource.stopping = True
        request = self.render(resource)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(b"".join(request.written), b"stopping\n")


class AccessLogTests(unittest.TestCase):
    def test_health_checks_not_logged(self) -> None:
        """The service's access log leaves out passing health checks, and only them."""
        from twisted.web.resource import Resource

        from tunnelkit.service.api import ServiceSite

        site = ServiceSite(Resource())
        logged = []
        site._logFormatter = lambda timestamp, request: logged.append(request.path) or "line"
        site.logFile = type("F", (), {"write": lambda self, line: None})()
        for path, code in ((b"/healthz", 200), (b"/healthz", 503), (b"/", 200)):
            request = DummyRequest([b""])
            request.path, request.code = path, code
            request.sentLength = 0
            site.log(request)
        self.assertEqual(logged, [b"/healthz", b"/"])
