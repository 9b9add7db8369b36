"""
The device agent: takes destination tokens from MQTT and runs destination sessions for them.

  - L{tunnelkit.agent.core}: notifications and the agent's bookkeeping (L{Agent}); it starts
    sessions only through the L{IDestinationStarter} seam;
  - L{tunnelkit.agent.starter}: the local proxy's destination sessions, run in this process;
  - L{tunnelkit.agent.tap}: C{twistd tunnelkit --mode agent}, its C{Options} and C{makeService}.

The names of L{tunnelkit.agent.core} are importable from here.
"""

from tunnelkit.agent.core import (
    DEFAULT_TARGETS,
    MAX_NOTIFICATION_SIZE,
    Agent,
    BadNotification,
    IDestinationSession,
    IDestinationStarter,
    Notification,
    data_endpoint_for_region,
    notify_topic,
    parse_notification,
)

from tunnelkit.agent.core import __all__  # noqa: E402,F811 - the same names, listed once
