"""One exception tree, so the CLI can tell a user's mistake from a bug.

`UserError` (and its children) are printed as one line and exit 2: the input or the
environment is wrong and the user can fix it. Anything else is a bug and keeps its
traceback.
"""


class DynamemError(Exception):
    """Root of every error dynamem raises on purpose."""


class UserError(DynamemError):
    """Bad input or an unusable environment: one line for the user, exit status 2."""


class DeadlineExceeded(UserError):
    """A wait ran out of time; the message names what was awaited."""


class GuestBuildError(UserError):
    """The guest image could not be built or verified."""


class VMError(UserError):
    """QEMU could not be started or the guest did not become usable."""


class GuestCommandError(UserError):
    """A command could not be run in the guest (SSH failed, or it hit its deadline)."""
