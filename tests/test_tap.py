"""
Tests for L{tunnelkit.tap}: one plugin, modes chosen by --mode, one-line usage errors.
"""

import io
import sys

from twisted.python import usage
from twisted.trial import unittest

import tunnelkit
from tunnelkit import config, tap


class TapTests(unittest.TestCase):
    def run_options(self, args):
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = None
        try:
            tap.Options().parseOptions(args)
        except SystemExit as e:
            code = e.code
        return code, out.getvalue(), err.getvalue()

    def test_general_help(self):
        code, out, _ = self.run_options(["--help"])
        self.assertEqual(code, 0)
        self.assertIn("--mode MODE", out)
        for mode in config.MODES:
            self.assertIn(mode, out)

    def test_version(self):
        code, out, _ = self.run_options(["--version"])
        self.assertEqual(code, 0)
        self.assertEqual(out.strip(), f"tunnelkit {tunnelkit.__version__}")

    def test_no_mode(self):
        code, _, err = self.run_options([])
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("no mode given", err)

    def test_no_mode_config_problem(self):
        """Without --mode, a --config file that cannot name the mode says why, in one line."""
        path = self.mktemp()
        for text, expected in [
            ("source: [\n", "not valid YAML"),
            ("service: {}\nsource: {}\n", "has several sections (service, source): use --mode"),
            ("", "has no mode section: use --mode"),
        ]:
            with open(path, "w") as f:
                f.write(text)
            code, _, err = self.run_options(["--config", path])
            self.assertEqual(code, 1)
            self.assertEqual(err.count("\n"), 1)
            self.assertIn(expected, err)
        code, _, err = self.run_options(["--config", path + ".missing"])
        self.assertIn("cannot read the configuration file", err)

    def test_unknown_mode(self):
        code, _, err = self.run_options(["--mode", "relay"])
        self.assertEqual(code, 1)
        self.assertIn("unknown mode 'relay'", err)
        self.assertIn("(see 'twistd tunnelkit --help')", err)
        self.assertEqual(err.count("\n"), 1)

    def test_mode_not_built(self):
        """A mode whose module does not exist says so and exits non-zero."""
        self.patch(config, "MODES", dict(config.MODES, service="tunnelkit.no_such_mode_module"))
        self.patch(tap, "MODES", config.MODES)
        code, _, err = self.run_options(["--mode", "service"])
        self.assertEqual(code, 1)
        self.assertIn("mode 'service' is not built yet", err)

    def test_load_mode_unknown(self):
        self.assertRaises(usage.UsageError, tap.load_mode, "nope")


class ProcessFilesTests(unittest.TestCase):
    """twistd's pid and log files get per-mode defaults, so modes run side by side in one directory."""

    def server_options(self, *args):
        from twisted.scripts.twistd import ServerOptions

        options = ServerOptions()
        options.parseOptions([*args, "tunnelkit", "--mode", "destination", "-t", "token", "-e", "ws://127.0.0.1:1",
                              "-d", "SSH1=22", "--allow-slow-websocket"])
        return options

    def test_foreground_writes_no_pid_file(self):
        options = self.server_options("-n")
        self.assertEqual(options["pidfile"], "")
        self.assertIsNone(options["logfile"])

    def test_daemon_files_per_mode(self):
        options = self.server_options()
        self.assertTrue(options["pidfile"].endswith("/tunnelkit-destination.pid"), options["pidfile"])
        self.assertEqual(options["logfile"], "tunnelkit-destination.log")

    def test_explicit_files_win(self):
        options = self.server_options("-n", "--pidfile", "mine.pid", "--logfile", "mine.log")
        self.assertTrue(options["pidfile"].endswith("/mine.pid"))
        self.assertEqual(options["logfile"], "mine.log")

    def test_no_parent(self):
        tap.default_process_files(None, "service")  # the plugin's Options used on its own


class ApplicationTests(unittest.TestCase):
    """What twistd does with the plugin (createOrGetApplication): the mode's service in an Application."""

    def test_mode_service_filters_twistds_observer(self):
        """The mode gets twistd's options; its -v filter becomes the application's log observer."""
        from twisted.application.service import Application
        from twisted.logger import ILogObserver, LogLevel
        from twisted.scripts.twistd import ServerOptions

        from tunnelkit.process import ModeService

        server = ServerOptions()
        server.parseOptions(["-n", "--logfile", "-", "tunnelkit", "--mode", "destination", "-t", "token", "-e",
                             "ws://127.0.0.1:1", "-d", "SSH1=22", "--allow-slow-websocket", "-v", "3"])
        self.assertIs(server.subOptions.modeOptions.twistd_options, server)
        service = tap.makeService(server.subOptions)
        self.assertIsInstance(service, ModeService)
        application = Application("tunnelkit")
        out = io.StringIO()
        self.patch(sys, "stdout", out)  # twistd's observer for "-n --logfile -" writes to sys.stdout
        service.setServiceParent(application)
        self.assertTrue(service.in_application)
        observer = application.getComponent(ILogObserver)
        for level, text in ((LogLevel.info, "left out at -v 3"), (LogLevel.warn, "shown at -v 3")):
            observer({"log_level": level, "log_namespace": "t", "log_format": text, "log_time": 0.0, "log_system": "-"})
        self.assertNotIn("left out", out.getvalue())
        self.assertIn("shown at -v 3", out.getvalue())
