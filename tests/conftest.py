"""Settings for the whole suite."""

from hypothesis import settings

# Hypothesis' default 200 ms deadline per example is a timing assertion: on a
# loaded machine it fails tests whose code is correct. Tests that mean to bound
# a parser's time (the fuzz targets against input bombs) set their own.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")
