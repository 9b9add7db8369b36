"""
tunnelkit: a self-hostable secure tunneling system, wire-compatible with AWS IoT Secure Tunneling.
"""

__version__ = "0.1.0"
