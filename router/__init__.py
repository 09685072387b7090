"""Grayroute: a gray-release (canary) HTTP router.

The hot path's modules may be compiled (router/native.py): the finder installed here
imports them as the build and GRAYROUTE_PURE say, and never a stale compiled one.
"""

from router.native import install_finder

install_finder()
