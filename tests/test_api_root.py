"""
The service's root resource: a WebSocket upgrade to a path other than /tunnel gets 400.
"""

from twisted.trial import unittest
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from tunnelkit.service.api import build_root


class RootTests(unittest.TestCase):
    def render(self, path, headers):
        root = build_root(Resource())
        request = DummyRequest(path.split(b"/")[1:])
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name, [value])
        resource = getChildForRequest(root, request)
        body = resource.render(request)
        if not isinstance(body, bytes):  # written to the request instead
            body = b"".join(request.written)
        return request.responseCode, body

    def test_upgrade_elsewhere_is_400(self):
        code, body = self.render(b"/tunnels", {b"upgrade": b"websocket", b"connection": b"upgrade"})
        self.assertEqual(code, 400)
        self.assertIn(b"/tunnel", body)

    def test_plain_get_elsewhere_is_404(self):
        code, _ = self.render(b"/nothing", {})
        self.assertEqual(code, 404)
