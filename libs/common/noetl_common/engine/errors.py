"""Failures the fold discovers itself."""


class StepError(Exception):
    """A step fails because of the fold's own work: a template, a routing rule, an input contract, max_visits."""
