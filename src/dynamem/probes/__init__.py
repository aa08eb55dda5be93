"""What a resize costs: guest memory state (parsed and derived) and the host's view."""
