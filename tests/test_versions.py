"""Version ranges (``leafpass.versions.in_range``), read by ``packaging.version``."""

from __future__ import annotations

import unittest



class VersionRangeTest(unittest.TestCase):
    def test_release_numbers_decide(self):
        from leafpass.versions import in_range

        self.assertTrue(in_range("2.13.0+cpu", (2, 13), (2, 15)))
        self.assertTrue(in_range("2.14.0a0+git1234", (2, 13), (2, 15)))
        self.assertFalse(in_range("2.15.0", (2, 13), (2, 15)))
        self.assertTrue(in_range("0.19.8", (0, 19, 0), (0, 20, 0)))
        self.assertTrue(in_range("0.19", (0, 19, 0), (0, 20, 0)))  # missing numbers read as 0
        self.assertFalse(in_range("0.20.0", (0, 19, 0), (0, 20, 0)))
        self.assertFalse(in_range("unknown", (0, 19, 0), (0, 20, 0)))
