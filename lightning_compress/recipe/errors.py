"""The error raised for bad recipes and bad modifier settings."""

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe or modifier setting is invalid; the message names the place and the fix."""
