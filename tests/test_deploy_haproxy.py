"""
The shipped HAProxy configuration (C{deploy/haproxy.cfg}): HAProxy itself accepts it, and
L{tunnelkit.testing.haproxy.render_config} changes nothing in it but the server lines.
"""

import os
import shutil
import subprocess
import tempfile

from twisted.trial import unittest

from tunnelkit.testing.haproxy import DEPLOY_CONFIG, HAPROXY, Backend, render_config, shared_certificate


class RenderTests(unittest.TestCase):
    def test_servers_replaced_options_kept(self) -> None:
        rendered = render_config([Backend("a", 1001, 2001), Backend("b", 1002, 2002)])
        with open(DEPLOY_CONFIG) as f:
            shipped = f.read().splitlines()
        kept = [line for line in shipped if not line.strip().startswith("server ")]
        self.assertEqual([line for line in rendered.splitlines() if not line.strip().startswith("server ")], kept)
        servers = [line.split() for line in rendered.splitlines() if line.strip().startswith("server ")]
        # Three backends (API, data plane, pass-through), two nodes each, in order.
        self.assertEqual([s[1:3] for s in servers], [
            ["a", "127.0.0.1:1001"], ["b", "127.0.0.1:1002"],
            ["a", "127.0.0.1:1001"], ["b", "127.0.0.1:1002"],
            ["a", "127.0.0.1:2001"], ["b", "127.0.0.1:2002"],
        ])
        self.assertIn("send-proxy-v2", servers[0])
        self.assertIn("check-ssl", servers[4])

    def test_reencrypting_variant(self) -> None:
        """The variant the file describes: TLS to the nodes' ssl: port, verified, instead of a PROXY header."""
        rendered = render_config([Backend("a", 1001, 2001)], reencrypt_ca="/x/ca.pem")
        servers = [line.split() for line in rendered.splitlines() if line.strip().startswith("server ")]
        self.assertEqual([s[2] for s in servers], ["127.0.0.1:2001"] * 3)
        self.assertEqual(servers[0][3:], ["ssl", "verify", "required", "ca-file", "/x/ca.pem"])
        self.assertFalse([s for s in servers if "send-proxy-v2" in s])


class ShippedFileTests(unittest.TestCase):
    skip = None if os.access(HAPROXY, os.X_OK) else "haproxy is not installed (apt-get install haproxy)"

    def check(self, config: str, env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([HAPROXY, "-c", "-f", config], env={**os.environ, **env}, capture_output=True, text=True)

    def test_haproxy_accepts_it(self) -> None:
        """haproxy -c: the shipped file as is, with a certificate where it expects one."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        certificate = shared_certificate(directory)
        env = {"TUNNELKIT_HAPROXY_CERT": certificate.haproxy_pem, "TUNNELKIT_HAPROXY_STATS": os.path.join(directory, "s")}
        result = self.check(DEPLOY_CONFIG, env)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNotIn("WARNING", result.stdout + result.stderr)
        variant = os.path.join(directory, "reencrypt.cfg")
        with open(variant, "w") as f:
            f.write(render_config([Backend("a", 1001, 2001)], reencrypt_ca=certificate.ca_cert))
        result = self.check(variant, env)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # And it can fail: without the certificate HAProxy refuses to start.
        env["TUNNELKIT_HAPROXY_CERT"] = os.path.join(directory, "missing.pem")
        self.assertNotEqual(self.check(DEPLOY_CONFIG, env).returncode, 0)
