"""Coordination: what differs between one server process and several."""
