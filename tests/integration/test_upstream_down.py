"""An upstream that is down (issue 13 item 5), on the real broker and both sandboxes: the
circuit opens within its bound, POS commands then fail fast with nothing sent, coupon commands
wait (past their own COMMAND_TIMEOUT_S) and all succeed once the API is back, no more than the
configured rate reaches a sandbox, and every command has exactly one result.

"Refusing connections" is a TCP forwarder in front of the shared sandbox that stops listening
(and drops what it carried) and listens again on the same port: the sandbox keeps its state,
and the service meets what it would meet with the host down, connection refused."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter
from typing import Any

import pytest

from tests.conftest import EpinSandbox, Stack
from voucher_bridge.breaker import BreakerState
from voucher_sandboxes.localstack import CommandProducer, ResultReader, free_port


class Switch:
    """A TCP forwarder on a port of its own in front of `target_port`."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._carried: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", self.port)

    async def down(self) -> None:
        """Connections refused from now on; the ones open are dropped."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._carried):
            writer.transport.abort()
        self._carried.clear()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._carried |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._carried -= {writer, up_writer}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _one_result_each(reader: ResultReader, ids: set[str]) -> dict[str, dict[str, Any]]:
    per_command = Counter(r.data["command_id"] for r in reader.for_commands(ids))
    assert set(per_command) == ids, f"unanswered: {ids - set(per_command)}"
    assert set(per_command.values()) == {1}, per_command
    return {r.data["command_id"]: r.data for r in reader.for_commands(ids)}


# A call paced out at t is logged by the sandbox a moment later, by a varying moment: the
# calls of one window can look one more than the limit lets through (without the limit, all
# of them would arrive within a fraction of a second).
JITTER = 1


def _most_in_a_window(moments: list[float], window_s: float) -> int:
    moments = sorted(moments)
    return max(
        (sum(1 for t in moments[i:] if t < start + window_s) for i, start in enumerate(moments)),
        default=0,
    )


# -- POS: fail fast ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["5xx", "refused"])
async def test_pos_commands_fail_fast_while_the_evoucher_api_is_down(stack: Any, how: str) -> None:
    s: Stack = await stack(partitions=3)
    tills = [s.terminal() for _ in range(4)]
    switch = Switch(_port(s.sandbox.url))
    await switch.up()
    open_s = 8.0

    def injected_errors() -> int:
        state = s.sandbox.admin.get("state", params={"vouchers": "0"}).json()
        return int(state["faults"]["injected"]["error"])

    def shop_calls() -> int:
        return sum(len(s.sandbox.calls(t)) for t in tills)

    async with (
        s.service(
            workers=1,  # it looks at the breaker in this process
            evoucher_base_url=switch.url,
            evoucher_breaker_failures=3,
            evoucher_breaker_open_s=open_s,
            upstream_retry_base_delay_s=0.05,
        ) as service,
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as results,
    ):
        breaker = service.evoucher.guard.breaker
        assert breaker is not None
        ids: set[str] = set()
        warm = [await producer.send("pos.bill_total", t, {"bill_total": "20"}) for t in tills]
        ids |= {c.id for c in warm}
        await results.wait_for({c.id for c in warm}, 30)

        if how == "5xx":
            s.sandbox.faults(error_rate=1.0)
        else:
            await switch.down()
        errors_before, calls_before = injected_errors(), shop_calls()

        # The first command spends its retries: three failures, and the circuit is open.
        started = time.monotonic()
        first = await producer.send("pos.bill_total", tills[0], {"bill_total": "30"})
        ids.add(first.id)
        [tripped] = await results.wait_for({first.id}, 30)
        tripping_s = time.monotonic() - started
        assert (tripped.data["outcome"], tripped.data["reason"]) == (
            "failed",
            "upstream_unavailable",
        )
        assert tripped.data["upstream"]["attempts"] == 3
        assert breaker.state is BreakerState.OPEN
        if how == "5xx":
            assert injected_errors() - errors_before == 3  # opened within the bound
        opened_at = time.monotonic()
        accepted = switch.accepted

        # While open: each command answered at once, nothing sent, one at a time...
        round_trips: list[float] = []
        handler_ms: list[int] = []
        kinds = [
            ("pos.bill_total", {"bill_total": "12"}),
            ("pos.scan", {"voucher_code": "12345678"}),
            ("pos.remove", {"voucher_code": "12345678"}),
            ("pos.redeem", {"voucher_codes": ["12345678", "12345679"]}),
            ("pos.cancel", {"voucher_codes": []}),
        ]
        for i in range(15):
            type_, data = kinds[i % len(kinds)]
            sent_at = time.monotonic()
            command = await producer.send(type_, tills[i % len(tills)], data)
            ids.add(command.id)
            [answer] = await results.wait_for({command.id}, 10)
            round_trips.append(time.monotonic() - sent_at)
            handler_ms.append(answer.data["upstream"]["elapsed_ms"])
            assert (answer.data["outcome"], answer.data["reason"]) == (
                "failed",
                "upstream_unavailable",
            )
            assert "circuit open until" in answer.data["message"]
            assert answer.data["message"].endswith("nothing was sent")
            assert answer.data["upstream"]["attempts"] == 0
        # ...and 40 at once.
        burst_started = time.monotonic()
        burst = [
            await producer.send("pos.scan", tills[i % len(tills)], {"voucher_code": str(i)})
            for i in range(40)
        ]
        ids |= {c.id for c in burst}
        answers = await results.wait_for({c.id for c in burst}, 10)
        burst_s = time.monotonic() - burst_started
        assert {a.data["outcome"] for a in answers} == {"failed"}
        assert time.monotonic() - opened_at < open_s  # all of it while open
        assert shop_calls() == calls_before  # nothing reached the shop
        if how == "5xx":
            assert injected_errors() - errors_before == 3
        else:
            assert switch.accepted == accepted

        # Back: after the open interval a probe goes, it is answered, and the tills go on.
        if how == "5xx":
            s.sandbox.faults(error_rate=0)
        else:
            await switch.up()
        await asyncio.sleep(max(0.0, opened_at + open_s - time.monotonic()))
        # One till first: its call is the probe (in half-open, the others would be refused
        # at once while it is under way: `fail` does not wait).
        probe = await producer.send("pos.bill_total", tills[0], {"bill_total": "40"})
        ids.add(probe.id)
        [probed] = await results.wait_for({probe.id}, 30)
        assert probed.data["outcome"] == "succeeded"
        assert breaker.state is BreakerState.CLOSED
        back = [await producer.send("pos.bill_total", t, {"bill_total": "50"}) for t in tills]
        ids |= {c.id for c in back}
        again = await results.wait_for({c.id for c in back}, 30)
        assert {a.data["outcome"] for a in again} == {"succeeded"}
        await results.settle(1.0)
        _one_result_each(results, ids)
    await switch.down()
    print(
        f"\n[{how}] tripping command {tripping_s * 1000:.0f} ms; while open, produce→result "
        f"p50 {statistics.median(round_trips) * 1000:.0f} ms, max {max(round_trips) * 1000:.0f} "
        f"ms, in the handler max {max(handler_ms)} ms; 40 at once answered in "
        f"{burst_s * 1000:.0f} ms"
    )
    assert max(handler_ms) <= 5
    assert statistics.median(round_trips) < 0.5  # milliseconds of Kafka, not seconds of retries


# -- coupons: wait, then all succeed -------------------------------------------------------------


async def test_coupon_commands_wait_while_the_epin_api_refuses_connections_then_all_succeed(
    stack: Any, epin: EpinSandbox
) -> None:
    s: Stack = await stack(partitions=2)
    s.use_epin(epin)
    switch = Switch(_port(epin.url))
    await switch.up()
    base = random.randint(10_000_000, 90_000_000)
    accounts = [
        epin.add_account(coupons=[{"id": base + i, "balance": "40.00", "wallet_type": "wallet1"}])
        for i in range(3)
    ]
    target = epin.add_account()
    rps, burst, command_timeout_s = 5.0, 2, 5.0
    async with (
        s.service(
            workers=1,  # it looks at the breaker in this process
            epin_base_url=switch.url + "/api/v1",
            epin_breaker_failures=2,
            epin_breaker_open_s=1,
            epin_breaker_max_wait_s=60,
            epin_rate_limit_rps=rps,
            epin_rate_limit_burst=burst,
            command_timeout_s=command_timeout_s,
            upstream_retry_base_delay_s=0.05,
        ) as service,
        CommandProducer(s.bootstrap, s.coupon_commands, source="/backoffice") as office,
        ResultReader(s.bootstrap, s.coupon_results) as results,
    ):
        breaker = service.epin.guard.breaker
        assert breaker is not None and breaker.when_open == "wait"
        warm = [await office.send("coupon.list_wallets", a, None) for a in accounts]
        await results.wait_for({c.id for c in warm}, 30)  # logged in, each

        await switch.down()
        # A read finds it down: two refused connections open the circuit, and it waits.
        first = await office.send("coupon.list_active", accounts[0], {})
        deadline = time.monotonic() + 20
        while breaker.state is BreakerState.CLOSED:
            assert time.monotonic() < deadline, "the circuit never opened"
            await asyncio.sleep(0.05)
        commands = [first]
        for i, account in enumerate(accounts):
            commands.append(
                await office.send("coupon.transfer", account, {"user": target, "epin": base + i})
            )
            commands.append(await office.send("coupon.list_active", account, {}))
            commands.append(await office.send("coupon.history", account, {}))
        ids = {c.id for c in commands}
        down_at = time.monotonic()
        # Longer than a command's own time, and nothing is answered: they wait.
        await asyncio.sleep(command_timeout_s + 2)
        await results.poll(0.5)
        assert results.for_commands(ids) == []
        assert service.dispatcher.in_flight >= len(commands)
        waited_s = time.monotonic() - down_at

        back_at = time.time()
        await switch.up()
        answers = await results.wait_for(ids, 60)
        assert {a.data["outcome"] for a in answers} == {"succeeded"}, [
            a.data for a in answers if a.data["outcome"] != "succeeded"
        ]
        assert breaker.state is BreakerState.CLOSED
        await results.settle(1.0)
        finals = _one_result_each(results, ids)
    await switch.down()

    # Each transfer applied once, to the target.
    coupons = {c["id"]: c for c in epin.state()["coupons"]}
    for i in range(len(accounts)):
        assert (coupons[base + i]["transfers"], coupons[base + i]["owner"]) == (1, target)
    assert all(not f.get("reconciled") for f in finals.values())
    # What reached the API once it was back: no more than the rate limit lets through.
    moments = [c["at"] for a in accounts for c in epin.calls(a) if c["at"] >= back_at - 0.01]
    span = max(moments) - min(moments)
    most = _most_in_a_window(moments, 1.0)
    print(
        f"\nEpin back after {waited_s:.1f} s of waiting (COMMAND_TIMEOUT_S "
        f"{command_timeout_s:g}); {len(moments)} calls in {span:.2f} s "
        f"({(len(moments) - burst) / span:.1f}/s past the burst; limit {rps:g}/s, burst "
        f"{burst}); at most {most} in any second"
    )
    assert len(moments) >= 12  # enough calls for the limit to show
    assert most <= rps + burst + JITTER
    assert span >= (len(moments) - burst) / rps - 0.1


# -- the rate limit ----------------------------------------------------------------------------


async def test_no_more_than_the_configured_rate_reaches_the_shop(stack: Any) -> None:
    s: Stack = await stack(partitions=3)
    tills = [s.terminal() for _ in range(12)]
    rps, burst = 10.0, 2
    async with (
        s.service(evoucher_rate_limit_rps=rps, evoucher_rate_limit_burst=burst),
        CommandProducer(s.bootstrap, s.commands) as producer,
        ResultReader(s.bootstrap, s.results) as results,
    ):
        commands = [
            await producer.send("pos.bill_total", tills[i % len(tills)], {"bill_total": f"{i}"})
            for i in range(60)
        ]
        answers = await results.wait_for({c.id for c in commands}, 60)
        assert {a.data["outcome"] for a in answers} == {"succeeded"}
        await results.settle(0.5)
        _one_result_each(results, {c.id for c in commands})
    moments = [c["at"] for t in tills for c in s.sandbox.calls(t)]
    assert len(moments) == 60
    span = max(moments) - min(moments)
    most = _most_in_a_window(moments, 1.0)
    print(
        f"\neVOUCHER: 60 calls in {span:.2f} s ({(len(moments) - burst) / span:.1f}/s past "
        f"the burst; limit {rps:g}/s, burst {burst}); at most {most} in any second"
    )
    assert most <= rps + burst + JITTER
    assert span >= (60 - burst) / rps - 0.1
