"""The devices bucket: where a session transport finds which device an account resumes."""

from __future__ import annotations

import pytest

from contracts.errors import ContractError
from services.channel.devices import DeviceRegistry
from services.runtime.bus import Bus


async def test_a_paired_device_is_found_by_any_host_and_forgotten_on_unlink(bus: Bus) -> None:
    # Given two accounts paired from one host
    here = DeviceRegistry(bus, "whatsapp")
    await here.record("sales", "15550001:7@s.whatsapp.net", by="host-a")
    await here.record("support", "15550002:3@s.whatsapp.net", by="host-a")
    # When another host looks them up
    there = DeviceRegistry(bus, "whatsapp")
    sales = await there.get("sales")
    # Then each account resumes its own device (never "the first device in the store")
    assert sales is not None
    assert (sales.device_id, sales.paired_by) == ("15550001:7@s.whatsapp.net", "host-a")
    assert {r.account: r.device_id for r in await there.all()} == {
        "sales": "15550001:7@s.whatsapp.net",
        "support": "15550002:3@s.whatsapp.net",
    }
    # And once the network unlinked one, it has no device (it must be paired again)
    await there.forget("sales")
    assert await here.get("sales") is None
    assert [r.account for r in await here.all()] == ["support"]
    await there.forget("never-paired")  # forgetting nothing is not an error


async def test_a_bad_device_id_or_account_is_refused_with_one_line(bus: Bus) -> None:
    registry = DeviceRegistry(bus, "whatsapp")
    with pytest.raises(ContractError, match="device id"):
        await registry.record("sales", "")
    with pytest.raises(ContractError, match="account"):
        await registry.record("no spaces", "1@s.whatsapp.net")
