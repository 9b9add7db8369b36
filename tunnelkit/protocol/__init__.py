"""
The tunneling protocol, sans-IO: messages, framing, rules and session state machines.

Nothing in this package imports the reactor, Twisted's networking or autobahn.
"""
