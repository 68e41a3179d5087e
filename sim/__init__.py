"""Bench tools: replay recorded drives into a pty, generate routes, run the demo."""
