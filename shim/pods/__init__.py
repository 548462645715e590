"""Pods without pause containers: the Sandbox service, the holder it runs, the pod's files."""
