"""Small helpers shared by every layer: durable file writes and optional-dependency checks.

They depend on the standard library only.
"""
