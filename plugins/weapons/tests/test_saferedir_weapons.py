"""The pack's own tests: the SDK's pack checks (saferedir_sdk.testing.PackChecks), which
pass as generated and keep passing as the pack is curated; add the pack's own tests below."""

from __future__ import annotations

from saferedir_weapons import plugin

from saferedir_sdk.testing import PackChecks


class TestPack(PackChecks):
    plugin = plugin
