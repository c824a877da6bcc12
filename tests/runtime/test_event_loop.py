"""The event loop: uvloop by default (in `svc` processes and in-process tests),
asyncio's own with SVC_UVLOOP=off, a bad value refused with one line (ADR 0036)."""

from __future__ import annotations

import pytest

from services.runtime.errors import ConfigError
from services.runtime.lifecycle import loop_factory, loop_name


async def test_in_process_tests_run_on_uvloop_like_svc() -> None:
    assert loop_name() == "uvloop"


def test_uvloop_is_the_default_and_off_means_asyncio() -> None:
    for env, expected in (({}, "uvloop"), ({"SVC_UVLOOP": "on"}, "uvloop")):
        loop = loop_factory(env)()
        try:
            assert loop_name(loop) == expected
        finally:
            loop.close()
    loop = loop_factory({"SVC_UVLOOP": " OFF "})()
    try:
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()


def test_a_bad_svc_uvloop_value_is_one_clear_line() -> None:
    with pytest.raises(ConfigError) as caught:
        loop_factory({"SVC_UVLOOP": "maybe"})
    message = str(caught.value)
    assert "SVC_UVLOOP='maybe' is invalid" in message
    assert "on, off" in message
    assert "\n" not in message
