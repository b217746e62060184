"""The engine's policy parts, unit-tested without sockets: endpoint pool, retry policy,
byte budget and request slots, coalescer, stats recording, redirect rules, wire plans.

Clocks are injected (a list the test advances), so nothing here sleeps for real."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import random

import pytest
import torch
from hdrh.histogram import HdrHistogram
from yarl import URL

from asyncvae import EndpointError, InputError, ProtocolError, Retry, RetryExhausted, TransportError
from asyncvae._budget import ByteBudget, FifoSemaphore
from asyncvae._coalesce import Coalescer, Pending, split, stack_body
from asyncvae._exchange import next_hop
from asyncvae._pool import REST_AFTER_FAILURES, REST_MAX, REST_MIN, EndpointPool
from asyncvae._retry import CallContext, RetryPolicy
from asyncvae._stats import Stats
from asyncvae.errors import ClientClosedError
from asyncvae.protocol import DecodeOptions, DecodePlan, EncodePlan, parse_retry_after


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def http(status: int, retry_after: float | None = None) -> EndpointError:
    return EndpointError({"error": "x"}, status=status, retry_after=retry_after)


CONN = TransportError("refused", kind="connection")


# --------------------------------------------------------------------------- endpoint pool


def pool(n: int, clock: Clock) -> EndpointPool:
    return EndpointPool([URL(f"http://h{i}:80/") for i in range(n)], clock=clock)


def test_pool_picks_least_outstanding_and_shares_ties_round_robin():
    clock = Clock()
    p = pool(3, clock)
    p.endpoints[0].outstanding = 2
    p.endpoints[1].outstanding = 1
    p.endpoints[2].outstanding = 1
    picks = {p.pick()[0].index for _ in range(6)}
    assert picks == {1, 2}
    for ep in p.endpoints:
        ep.outstanding = 0
    assert sorted(p.pick()[0].index for _ in range(3)) == [0, 1, 2]


def test_pool_rests_after_failures_then_probes_once_and_doubles_per_failed_probe():
    clock = Clock()
    p = pool(2, clock)
    bad = p.endpoints[0]
    for _ in range(REST_AFTER_FAILURES):
        p.failed(bad, CONN)
    assert bad.rested_until == clock.t + REST_MIN
    assert all(p.pick()[0] is p.endpoints[1] for _ in range(5))  # resting: not chosen
    clock.t += REST_MIN
    # failures of attempts sent before the rest don't stretch it
    p.failed(bad, CONN)
    assert bad.rested_until == clock.t
    seen = [p.pick() for _ in range(4)]
    probes = [(ep.index, probe) for ep, _, probe in seen if ep is bad]
    assert probes == [(0, True)]  # exactly one probe while it is half-open
    p.failed(bad, CONN, probe=True)
    assert bad.rested_until == clock.t + 2 * REST_MIN
    clock.t += 2 * REST_MIN
    _, _, probe = next(x for x in (p.pick() for _ in range(3)) if x[0] is bad)
    assert probe
    p.succeeded(bad, probe=True)
    assert bad.failures == 0 and bad.rests == 0 and not bad.probing


def test_pool_rests_are_bounded_after_thousands_of_failed_probes():
    clock = Clock()
    p = pool(2, clock)
    bad = p.endpoints[0]
    for _ in range(REST_AFTER_FAILURES):
        p.failed(bad, CONN)
    for _ in range(5000):  # 2 ** 5000 would overflow a float
        clock.t = bad.rested_until
        ep, _, probe = p.pick()
        while ep is not bad:
            ep, _, probe = p.pick()
        p.failed(bad, CONN, probe=probe)
    assert bad.rested_until - clock.t == REST_MAX
    p.endpoints[1].outstanding = 0
    assert p.pick()[0] is p.endpoints[1]  # the healthy one is still used


def test_single_endpoint_is_never_rested_by_failures_but_honours_retry_after():
    clock = Clock()
    p = pool(1, clock)
    ep = p.endpoints[0]
    for _ in range(50):
        p.failed(ep, CONN)
    assert p.pick()[1] == 0.0
    p.failed(ep, http(503, retry_after=4.0), retry_after_cap=60)
    _, wait, _ = p.pick()
    assert wait == 4.0  # everyone waits the Retry-After, not just the caller that got it
    p.failed(ep, http(429, retry_after=3600.0), retry_after_cap=10)
    assert p.pick()[1] == 10.0  # capped by max_retry_after


def test_retry_after_rests_an_endpoint_for_everyone_with_several():
    clock = Clock()
    p = pool(2, clock)
    p.failed(p.endpoints[0], http(429, retry_after=2.0), retry_after_cap=60)
    assert all(p.pick()[0].index == 1 for _ in range(4))
    clock.t += 2.0
    assert {p.pick()[0].index for _ in range(4)} == {0, 1}


def test_request_faults_say_nothing_about_endpoint_health():
    clock = Clock()
    p = pool(2, clock)
    ep = p.endpoints[0]
    for _ in range(10):
        p.failed(ep, http(400))
        p.failed(ep, ProtocolError("over max_response_bytes"))  # our limit, not theirs
    assert ep.failures == 0 and ep.rested_until == 0


# --------------------------------------------------------------------------- retry policy


def test_backoff_never_overflows():
    r = Retry()
    assert r.backoff(5000, random.Random(0)) <= r.backoff_max
    assert r.replace(jitter="none").backoff(10**6) == r.backoff_max


@pytest.mark.parametrize("retry_after", [0.0, 0.01, 3.0])
def test_retry_after_has_a_floor_and_jitter(retry_after):
    r = Retry(backoff_base=0.2, backoff_max=10.0)
    rng = random.Random(1)
    for n in range(1, 8):
        cap = min(10.0, 0.2 * 2 ** (n - 1))
        waits = [r.wait_for(n, retry_after, rng) for _ in range(200)]
        assert min(waits) >= max(retry_after, cap / 2)
        assert max(waits) <= max(retry_after, cap / 2) + cap / 2
        assert len(set(waits)) > 100  # jittered: callers told the same thing spread out


def test_retry_after_is_capped_and_can_be_ignored():
    rng = random.Random(0)
    assert Retry(max_retry_after=5).wait_for(1, 3600, rng) <= 5 + 0.1
    w = Retry(respect_retry_after=False, backoff_base=0.2).wait_for(1, 3600, rng)
    assert w <= 0.2


@pytest.mark.parametrize(
    "header",
    [
        "{} GMT",  # IMF-fixdate
        "{} -0000",  # RFC 2822 "unknown zone": still UTC
    ],
)
def test_retry_after_dates_are_utc(header):
    now = 1_700_000_000.0
    when = datetime.datetime.fromtimestamp(now + 30, tz=datetime.UTC)
    text = header.format(when.strftime("%a, %d %b %Y %H:%M:%S"))
    assert parse_retry_after(text, now=now) == pytest.approx(30, abs=1)


def test_retry_after_asctime_date_is_utc():
    now = 1_700_000_000.0
    when = datetime.datetime.fromtimestamp(now + 45, tz=datetime.UTC)
    text = when.strftime("%a %b %d %H:%M:%S %Y")  # asctime: no zone at all
    assert email.utils.parsedate_to_datetime(text).tzinfo is None
    assert parse_retry_after(text, now=now) == pytest.approx(45, abs=1)


def _policy(config: Retry, clock: Clock, log: list) -> RetryPolicy:
    async def sleep(s: float) -> None:
        log.append(("sleep", s))
        clock.t += s

    return RetryPolicy(config, clock=clock, rng=random.Random(0), sleep=sleep,
                       on_retry=lambda kind, w: log.append((kind, round(w, 6))))


def run(coro):
    return asyncio.run(coro)


def test_policy_first_attempt_success_is_a_plain_await():
    clock, log = Clock(), []
    p = _policy(Retry(), clock, log)

    async def ok(ctx):
        return "v"

    assert run(p.run(ok, CallContext())) == "v"
    assert log == []


def test_policy_counts_the_first_failure_as_attempt_one():
    clock, log = Clock(), []
    p = _policy(Retry(attempts=3, backoff_base=0.1), clock, log)
    calls = []

    async def failing(ctx):
        calls.append(clock.t)
        raise http(502)

    with pytest.raises(RetryExhausted) as ei:
        run(p.run(failing, CallContext()))
    assert ei.value.attempts == 3 and len(calls) == 3
    assert [k for k, _ in log if k != "sleep"] == ["http_502", "http_502"]


def test_policy_raises_unretryable_errors_as_they_are():
    clock, log = Clock(), []
    p = _policy(Retry(), clock, log)

    async def bad(ctx):
        raise http(404)

    with pytest.raises(EndpointError):
        run(p.run(bad, CallContext()))
    assert log == []


def test_policy_503_patience_outlasts_attempts_until_it_runs_out():
    clock, log = Clock(), []
    p = _policy(Retry(attempts=2, backoff_base=0.5, backoff_max=1.0, unavailable_patience=30), clock, log)
    n = [0]

    async def starting(ctx):
        n[0] += 1
        raise http(503)

    with pytest.raises(RetryExhausted) as ei:
        run(p.run(starting, CallContext()))
    assert n[0] > 20  # far beyond attempts=2
    assert "unavailable for 30 s" in ei.value.reason


def test_policy_stops_at_the_deadline_with_the_last_real_cause():
    clock, log = Clock(), []
    p = _policy(Retry(attempts=100, backoff_base=1.0, backoff_max=1.0, jitter="none"), clock, log)

    async def failing(ctx):
        raise CONN

    ctx = p.context(2.5)
    with pytest.raises(RetryExhausted) as ei:
        run(p.run(failing, ctx))
    assert ei.value.reason == "deadline passed"
    assert ei.value.last is CONN
    assert clock.t <= ctx.deadline  # no wait runs past the deadline


# --------------------------------------------------------------------------- budget and slots


def test_budget_is_fifo_lets_an_oversize_lease_through_alone_and_resizes():
    async def main():
        b = ByteBudget(100)
        a = await b.reserve(60)
        order = []

        async def want(n, tag):
            lease = await b.reserve(n)
            order.append(tag)
            return lease

        big = asyncio.ensure_future(want(500, "big"))  # over the whole budget
        small = asyncio.ensure_future(want(10, "small"))  # fits now, but waits its turn
        await asyncio.sleep(0)
        assert order == [] and b.waiting == 2
        a.release()
        await asyncio.sleep(0)
        assert order == ["big"]
        (await big).release()
        await asyncio.sleep(0)
        assert order == ["big", "small"]
        s = await small
        s.resize(80)  # growth is taken at once (an answer already arriving)
        assert b.used == 80
        s.resize(5)
        s.release()
        s.release()
        assert b.used == 0

    run(main())


def test_budget_waiter_cancelled_after_its_grant_passes_it_on():
    async def main():
        b = ByteBudget(100)
        held = await b.reserve(100)
        first = asyncio.ensure_future(b.reserve(100))
        second = asyncio.ensure_future(b.reserve(100))
        await asyncio.sleep(0)
        held.release()  # grants `first`...
        first.cancel()  # ...which leaves before it runs
        await asyncio.sleep(0)
        lease = await asyncio.wait_for(second, 1)
        assert b.used == 100
        lease.release()

    run(main())


def test_close_fails_every_waiter_at_once():
    async def main():
        sem = FifoSemaphore(1)
        await sem.acquire()
        b = ByteBudget(10)
        await b.reserve(10)
        waits = [asyncio.ensure_future(sem.acquire()) for _ in range(3)]
        waits += [asyncio.ensure_future(b.reserve(5)) for _ in range(3)]
        await asyncio.sleep(0)
        exc = ClientClosedError("closed")
        sem.close(exc)
        b.close(exc)
        results = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 1)
        assert all(r is exc for r in results)
        with pytest.raises(ClientClosedError):
            await sem.acquire()

    run(main())


# --------------------------------------------------------------------------- coalescer


def _pending(plan: DecodePlan, n: int, loop: asyncio.AbstractEventLoop) -> list[Pending]:
    return [Pending(plan.request(torch.full((1, 4, 8, 8), float(i)).half()), None, loop.create_future())
            for i in range(n)]


def test_coalescer_sends_full_batches_at_once_and_partial_ones_after_the_wait():
    async def main():
        loop = asyncio.get_running_loop()
        plan = DecodePlan(DecodeOptions(output_type="pt", return_type="pt"))
        sent: list[list[Pending]] = []
        c = Coalescer(4, 0.05, sent.append)
        for p in _pending(plan, 10, loop):
            c.submit(p)
        assert [len(b) for b in sent] == [4, 4]
        await asyncio.sleep(0.1)
        assert [len(b) for b in sent] == [4, 4, 2]
        shape, body = stack_body(sent[0])
        assert shape == (4, 4, 8, 8)
        ref = torch.cat([torch.full((1, 4, 8, 8), float(i)).half() for i in range(4)])
        assert body == ref.numpy().tobytes()

    run(main())


def test_coalescer_drops_callers_that_left_and_fails_the_rest_on_close():
    async def main():
        loop = asyncio.get_running_loop()
        plan = DecodePlan(DecodeOptions(output_type="pt", return_type="pt"))
        sent: list[list[Pending]] = []
        c = Coalescer(8, 10.0, sent.append)
        items = _pending(plan, 3, loop)
        for p in items:
            c.submit(p)
        items[1].future.cancel()
        exc = ClientClosedError("closed")
        c.close(exc)
        assert sent == []
        assert items[0].future.exception() is exc and items[2].future.exception() is exc

    run(main())


def test_split_checks_the_leading_dimension():
    t = torch.arange(12).reshape(3, 4)
    assert [p.shape[0] for p in split(t, [1, 2])] == [1, 2]
    with pytest.raises(ProtocolError, match="Limits\\(max_batch=1\\)"):
        split(t, [1, 1])


def test_only_equal_wire_options_share_a_batch_key():
    a = DecodePlan(DecodeOptions(output_type="pt", return_type="pt", scaling_factor=0.18215))
    b = DecodePlan(DecodeOptions(output_type="pt", return_type="pil", partial_postprocess=True,
                                 scaling_factor=0.18215))
    c = DecodePlan(DecodeOptions(output_type="pt", return_type="pt", scaling_factor=0.13025))
    z = torch.zeros(1, 4, 8, 8).half()
    ka, kb, kc = (p.facts(z).batch_key for p in (a, b, c))
    assert ka != kc  # another scaling
    assert ka != kb  # partial_postprocess changes what the endpoint sends
    class Processor:
        def postprocess(self, t, output_type):
            return [t]

    # the processor only matters on the client's side, after the split
    assert ka == DecodePlan(DecodeOptions(output_type="pt", return_type="pil", processor=Processor(),
                                          scaling_factor=0.18215)).facts(z).batch_key
    assert a.facts(torch.zeros(2, 4, 8, 8).half()).batch_key == ka  # leading dim is free
    assert a.facts(z.float()).batch_key != ka
    assert a.facts(torch.zeros(1, 4, 2, 8, 8).half()).batch_key is None  # video: never
    assert DecodePlan(DecodeOptions()).facts(z).batch_key is None  # image answers: never
    assert EncodePlan().facts(torch.zeros(1, 3, 16, 16)).batch_key is not None


def test_plans_check_options_once_and_reject_unsendable_tensors():
    plan = DecodePlan(DecodeOptions(output_type="pt", return_type="pt"))
    with pytest.raises(InputError, match="to_dense"):
        plan.request(torch.zeros(1, 4, 8, 8).to_sparse())
    with pytest.raises(InputError, match="meta device"):
        plan.request(torch.zeros(1, 4, 8, 8, device="meta"))
    with pytest.raises(InputError, match="processor"):
        DecodePlan(DecodeOptions(output_type="pt", return_type="pil"))


def test_copied_body_is_a_snapshot():
    plan = DecodePlan(DecodeOptions(output_type="pt", return_type="pt"))
    t = torch.zeros(1, 4, 8, 8).half()
    view = plan.request(t).body
    snap = plan.request(t, copy=True).body
    t.fill_(1)
    assert bytes(snap) == bytes(512)
    assert bytes(view) != bytes(512)


# --------------------------------------------------------------------------- stats


def test_stats_fold_latencies_exactly_like_recording_each():
    s = Stats()
    h = HdrHistogram(1, 3_600_000_000, 3)
    rng = random.Random(1)
    for _ in range(20_000):
        v = rng.choice([rng.random() * 1e-3, rng.random(), rng.expovariate(1 / 3.0), 4000.0])
        s._item_done(v)
        h.record_value(max(1, min(int(v * 1e6), 3_600_000_000)))
    for q in (1, 50, 90, 99, 99.9, 100):
        assert s.latency.get_value_at_percentile(q) == h.get_value_at_percentile(q)
    assert s.latency.get_total_count() == 20_000


def test_a_listener_that_raises_is_isolated(caplog):
    s = Stats()
    seen = []

    def broken(event, stats):
        raise RuntimeError("bar update failed")

    s.add_listener(broken)
    s.add_listener(lambda e, st: seen.append(e))
    for _ in range(5):
        s._item_done(0.01)
    assert seen == ["completed"] * 5 and s.completed == 5
    assert s.listener_errors == 5
    logged = [r for r in caplog.records if "listener raised" in r.getMessage()]
    assert len(logged) == 3  # logged, not flooded


# --------------------------------------------------------------------------- redirects


PARAMS = (("output_type", "pt"), ("shape", "1"), ("shape", "4"), ("dtype", "float16"))
HEADERS = (("User-Agent", "asyncvae"), ("Authorization", "Bearer t"), ("Cookie", "s=1"),
           ("X-Api-Key", "k"), ("Content-Type", "tensor/binary"))


def test_cross_origin_redirect_drops_every_credential_header():
    url = URL("https://a.example/v1/?" + "&".join(f"{k}={v}" for k, v in PARAMS))
    for location in ("https://b.example/v1/", "http://a.example/v1/", "https://a.example:8443/v1/"):
        _, _, _, h = next_hop(url, "POST", b"x", HEADERS, 307, location, PARAMS)
        assert dict(h) == {"User-Agent": "asyncvae", "Content-Type": "tensor/binary"}, location
    _, _, _, h = next_hop(url, "POST", b"x", HEADERS, 307, "/v2/", PARAMS)
    assert h == HEADERS  # same origin: all kept


def test_redirect_methods_and_parameters():
    url = URL("http://a/v1/?output_type=pt&shape=1&shape=4&dtype=float16")
    target, method, body, _ = next_hop(url, "POST", b"x", (), 303, "/v2/", PARAMS)
    assert (method, body) == ("GET", b"")
    assert target.query.getall("shape") == ["1", "4"]  # re-added where the Location dropped them
    target, method, body, _ = next_hop(url, "POST", b"x", (), 308, "/v2/?dtype=bfloat16", PARAMS)
    assert (method, body) == ("POST", b"x")
    assert target.query.getall("dtype") == ["bfloat16"]  # one the Location kept stays as it is
    assert target.query.getall("shape") == ["1", "4"]


@pytest.mark.parametrize("location", [None, "", "ftp://x/", "http://[::1", "javascript:alert(1)"])
def test_bad_location_is_a_protocol_error(location):
    with pytest.raises(ProtocolError, match="redirect"):
        next_hop(URL("http://a/"), "POST", b"", (), 302, location, ())
