"""The package version, recorded in every output's config.json and report."""

__version__ = "0.1.0"
