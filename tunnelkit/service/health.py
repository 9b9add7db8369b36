# -*- test-case-name: tests.test_health -*-
"""
C{GET /healthz}: whether this node serves, for a load balancer's health checks (deploy/haproxy.cfg).

It answers C{200 ok} while the node runs and C{503 stopping} once it begins to stop, so a balancer takes
it out before its listeners close.  It says nothing about tunnels or accounts and needs no credentials.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource


class HealthResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self.stopping:
            request.setResponseCode(503)
            return b"stopping\n"
        return b"ok\n"

    render_HEAD = render_GET
