"""Tests of the operator commands of the tunnelkit CLI (L{tunnelkit.cli_operator})."""

import io
import os

from twisted.trial.unittest import TestCase

from tunnelkit import cli

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExampleConfigTests(TestCase):
    def test_prints_the_shipped_tap_yml(self):
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["example-config"], out, err), 0)
        with open(os.path.join(TOP, "tunnelkit", "tap.yml"), encoding="utf-8") as f:
            self.assertEqual(out.getvalue(), f.read())
        self.assertIn("\nservice:\n", out.getvalue())
