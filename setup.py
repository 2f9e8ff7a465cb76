"""SocketProxy: fan every TCP source out to several destinations.

The metadata is in pyproject.toml; this file stays as the entry the project's layout names (and for
tools that still call setup.py).
"""
from setuptools import setup

setup()
