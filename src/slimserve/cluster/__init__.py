"""Replicas of the server: several processes on one machine (more machines: later, on Ray)."""
