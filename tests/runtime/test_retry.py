"""RetryPolicy: the one place a consumer's attempts and waits are decided (issue 12 item 4)."""

from __future__ import annotations

import math

import pytest

from services.runtime.retry import RetryPolicy
from services.runtime.settings import Delivery


def test_each_retry_waits_its_step_and_the_last_step_repeats() -> None:
    policy = RetryPolicy(attempts=6, delays=(1.0, 2.0, 4.0))
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_requested_wait_longer_than_the_step_wins_and_a_shorter_one_does_not() -> None:
    policy = RetryPolicy(attempts=3, delays=(1.0, 2.0))
    assert policy.delay(1, requested=7.5) == 7.5  # e.g. a server's Retry-After
    assert policy.delay(2, requested=0.5) == 2.0


def test_no_wait_passes_the_cap_not_even_a_requested_one() -> None:
    policy = RetryPolicy(attempts=3, delays=(1.0, 90.0), max_delay=60.0)
    assert policy.delay(1, requested=3600.0) == 60.0
    assert policy.delay(2) == 60.0
    assert policy.delay(1, requested=math.inf) == 60.0


def test_the_last_attempt_is_the_one_whose_failure_dead_letters() -> None:
    policy = RetryPolicy(attempts=3)
    assert [policy.last(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_one_attempt_per_backoff_step_plus_the_first() -> None:
    policy = RetryPolicy.from_backoff((1.0, 2.0, 5.0))
    assert policy.attempts == 4
    assert [policy.delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 5.0]
    assert RetryPolicy.from_backoff(()).attempts == 1


def test_the_egress_settings_give_one_policy_object() -> None:
    settings = Delivery(backoff=(1.0, 2.0))
    assert settings.retry is settings.retry  # the same object for the loop and the sends
    assert settings.retry == RetryPolicy(attempts=3, delays=(1.0, 2.0))


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        pytest.param({"attempts": 0}, "attempts must be >= 1, got 0", id="no-attempts"),
        pytest.param({"delays": ()}, "delays must name at least one wait", id="no-delays"),
        pytest.param({"delays": (1.0, -2.0)}, "finite seconds >= 0, got -2.0", id="negative"),
        pytest.param({"max_delay": math.nan}, "finite seconds >= 0, got nan", id="nan-cap"),
    ],
)
def test_an_invalid_policy_is_refused_with_one_line_naming_the_field(
    kw: dict[str, object], says: str
) -> None:
    with pytest.raises(ValueError, match=r"^RetryPolicy") as info:
        RetryPolicy(**kw)  # type: ignore[arg-type]
    assert says in str(info.value)
    assert "\n" not in str(info.value)
