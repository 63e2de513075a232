"""Placeholder."""
from ._base import Model


class SupportDeskSimulator(Model):
    pass
