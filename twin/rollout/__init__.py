"""Signed model rollouts from the twin to its edge nodes: manager, NCMD protocol, their database rows."""
