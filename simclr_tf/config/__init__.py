"""Flags to a validated Config: definitions, the dataclasses, protocol
defaults per train mode, validation, and reading flags or config.json.
"""
