"""Tests of tunnelkit.localproxy.mapping: -s/-d syntax and --config-dir files."""

import os

from twisted.trial.unittest import TestCase

from tunnelkit.errors import ConfigError
from tunnelkit.localproxy.mapping import (
    merge_config_dir,
    parse_destination_endpoint,
    parse_destination_mapping,
    parse_source_mapping,
    read_config_dir,
)


class SourceMappingTests(TestCase):
    def test_bare_port_is_v1(self):
        self.assertEqual(parse_source_mapping("5555"), {"": 5555})

    def test_services(self):
        self.assertEqual(
            parse_source_mapping(" SSH1=5555 , HTTP1=8080,"), {"SSH1": 5555, "HTTP1": 8080}
        )

    def test_zero_is_ephemeral(self):
        self.assertEqual(parse_source_mapping("SSH1=0,SSH2=0"), {"SSH1": 0, "SSH2": 0})

    def test_errors(self):
        for text, fragment in [
            ("", "empty"),
            ("SSH1=abc", "port"),
            ("SSH1=70000", "65535"),
            ("SS H=1", "service id"),
            ("=22", "service id"),
            ("SSH1=", "no endpoint"),
            ("SSH1=1,SSH1=2", "twice"),
            ("SSH1=1,SSH2=1", "same port"),
            ("5555,6666", "no service id"),
            ("A" * 129 + "=1", "service id"),
        ]:
            with self.assertRaises(ConfigError, msg=text) as caught:
                parse_source_mapping(text)
            self.assertIn(fragment, str(caught.exception), text)


class DestinationMappingTests(TestCase):
    def test_forms(self):
        self.assertEqual(parse_destination_endpoint("22"), ("127.0.0.1", 22))
        self.assertEqual(parse_destination_endpoint("22", "::1"), ("::1", 22))
        self.assertEqual(parse_destination_endpoint("example.test:80"), ("example.test", 80))
        self.assertEqual(parse_destination_endpoint("[::1]:2222"), ("::1", 2222))
        self.assertEqual(parse_destination_endpoint("/run/app.sock"), "/run/app.sock")

    def test_mapping(self):
        self.assertEqual(
            parse_destination_mapping("SSH1=22,HTTP1=10.0.0.1:80,APP=./app.sock"),
            {"SSH1": ("127.0.0.1", 22), "HTTP1": ("10.0.0.1", 80), "APP": "./app.sock"},
        )
        self.assertEqual(parse_destination_mapping("2222"), {"": ("127.0.0.1", 2222)})

    def test_errors(self):
        for text in ["0", "host:", "host:x", "[::1]22", "a b:22", "SSH=22,SSH=23", "x=host:99999"]:
            with self.assertRaises(ConfigError, msg=text):
                parse_destination_mapping(text)


class ConfigDirTests(TestCase):
    def write(self, relative, text):
        path = os.path.join(self.dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def test_reads_files_first_wins(self):
        self.write("a.ini", "# comment\n[section]\nSSH1 = 3333\n; other\nSSH2=5555\n")
        self.write("sub/b.ini", "SSH1=9999\nHTTP1=8080\n")
        self.assertEqual(read_config_dir(self.dir), {"SSH1": "3333", "SSH2": "5555", "HTTP1": "8080"})

    def test_bad_line_names_file_and_line(self):
        self.write("a.ini", "SSH1=22\nnonsense\n")
        with self.assertRaises(ConfigError) as caught:
            read_config_dir(self.dir)
        self.assertIn("a.ini:2", str(caught.exception))

    def test_not_a_directory(self):
        with self.assertRaises(ConfigError):
            read_config_dir(os.path.join(self.dir, "missing"))

    def test_merge_command_line_wins(self):
        self.assertEqual(merge_config_dir({"SSH1": 1}, {"SSH1": 2, "X": 3}), {"SSH1": 1, "X": 3})
        with self.assertRaises(ConfigError):
            merge_config_dir({"": 1}, {"X": 3})
