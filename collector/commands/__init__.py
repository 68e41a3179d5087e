"""Subcommands of ``telematics-collector``."""
