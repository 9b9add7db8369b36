"""
The one twistd plugin of tunnelkit: C{twistd tunnelkit --mode service|source|destination|agent}.
"""

from twisted.application.service import ServiceMaker

tunnelkit = ServiceMaker(
    "tunnelkit",
    "tunnelkit.tap",
    "Secure tunneling service, local proxy and device agent (AWS IoT Secure Tunneling compatible)",
    "tunnelkit",
)
