"""Graph passes: find attention in a traced graph and rewrite it into specache ops."""

from .attention import SiteReport, find, rewrite

__all__ = ["SiteReport", "find", "rewrite"]
