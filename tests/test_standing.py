"""A host's standing as a pure state machine, driven with a fake clock."""

from gateway.standing import (
    COOLDOWN_FAILURES,
    COOLDOWN_S,
    COOLDOWN_WINDOW_S,
    HostState,
    Standing,
)


def up(now: float = 0.0) -> Standing:
    standing = Standing()
    assert standing.updated(now, draining=False)
    return standing


def test_a_status_update_brings_a_host_up_and_a_draining_one_to_draining() -> None:
    standing = Standing()
    assert standing.state is HostState.DOWN and not standing.contacted
    assert standing.updated(1.0, draining=False)
    assert standing.state is HostState.UP and standing.routable and standing.since == 1.0
    assert not standing.updated(2.0, draining=False)  # no change, since stays
    assert standing.since == 1.0
    assert standing.updated(3.0, draining=True)
    assert standing.state is HostState.DRAINING and not standing.routable


def test_a_lost_link_makes_a_host_down_and_says_why() -> None:
    standing = up()
    assert standing.lost(5.0, "no status update for 3 s")
    assert standing.state is HostState.DOWN
    assert standing.detail == "no status update for 3 s"
    assert not standing.lost(6.0, "again")  # down stays down, no new failure counted
    assert len(standing.failures) == 1


def test_failures_within_the_window_start_a_cool_down() -> None:
    standing = up()
    for i in range(COOLDOWN_FAILURES - 1):
        assert not standing.failed(float(i), "UNAVAILABLE")
    assert standing.failed(float(COOLDOWN_FAILURES), "UNAVAILABLE: gone")
    assert standing.state is HostState.COOLING_DOWN
    assert "UNAVAILABLE: gone" in standing.detail
    assert standing.probe_in(COOLDOWN_FAILURES) == COOLDOWN_S[0]


def test_failures_spread_beyond_the_window_do_not() -> None:
    standing = up()
    for i in range(COOLDOWN_FAILURES * 3):
        assert not standing.failed(i * (COOLDOWN_WINDOW_S / 2 + 1), "UNAVAILABLE")
    assert standing.state is HostState.UP


def test_a_flapping_host_cools_down() -> None:
    standing = Standing()
    now = 0.0
    for _ in range(COOLDOWN_FAILURES):
        standing.updated(now, draining=False)
        standing.lost(now + 0.5, "the host ended its status stream")
        now += 1.0
    assert standing.state is HostState.COOLING_DOWN


def test_only_a_probe_ends_a_cool_down_and_failed_probes_back_off_to_the_cap() -> None:
    standing = up()
    for i in range(COOLDOWN_FAILURES):
        standing.failed(float(i), "INTERNAL")
    assert standing.state is HostState.COOLING_DOWN
    now = 10.0
    assert not standing.updated(now, draining=False)  # status updates do not end it
    assert not standing.lost(now, "broken")  # nor does a lost link make it merely down
    assert standing.state is HostState.COOLING_DOWN
    periods = []
    for _ in range(12):
        assert not standing.probed(now, succeeded=False)
        periods.append(standing.probe_in(now))
    assert periods[:3] == [COOLDOWN_S[0] * 2, COOLDOWN_S[0] * 4, COOLDOWN_S[0] * 8]
    assert periods[-1] == COOLDOWN_S[1]
    assert standing.probed(now + 1, succeeded=True)
    assert standing.state is HostState.UP and standing.since == now + 1
    assert standing.cooldown_s == COOLDOWN_S[0]


def test_a_probe_result_outside_a_cool_down_changes_nothing() -> None:
    standing = up()
    assert not standing.probed(1.0, succeeded=False)
    assert standing.state is HostState.UP
