"""The generic halt-polling model (kvmdbgfs/kvm/halt.py) against kvm_main.c's rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmdbgfs.kvm.profiles import get_profile
from kvmdbgfs.kvm.halt import (
    KVM_HALT_POLL_NS_DEFAULT,
    HaltPollParams,
    HaltPollState,
    fls64,
    kvm_stats_log_hist_update,
    kvm_vcpu_halt,
    kvm_vcpu_is_blocking,
    shrink_halt_poll_ns,
)
from kvmdbgfs.kvm.profiles import ALL_VCPU_STATS
from kvmdbgfs.kvm.stats import HALT_POLL_HIST_COUNT, StatBlock

MAX = KVM_HALT_POLL_NS_DEFAULT
LATEST = get_profile("latest").halt_poll


def new_stat() -> StatBlock:
    return StatBlock(ALL_VCPU_STATS)


def assert_buckets(hist: np.ndarray, values: list[int]) -> None:
    """Each value fed must sit in its fls64 bucket: rebuild the histogram from the values."""
    expected = np.zeros(HALT_POLL_HIST_COUNT, dtype=np.uint64)
    for v in values:
        expected[min(v.bit_length(), HALT_POLL_HIST_COUNT - 1)] += 1
    np.testing.assert_array_equal(hist, expected)


def test_defaults_per_profile() -> None:
    assert KVM_HALT_POLL_NS_DEFAULT == 200000
    assert [get_profile(p).halt_poll.shrink for p in ("v5.14", "v5.15", "v6.4", "latest")] == [0, 0, 0, 2]
    assert get_profile("v6.4+ffs").halt_poll == get_profile("v6.4").halt_poll
    p = get_profile("v5.15").halt_poll
    assert (p.halt_poll_ns, p.grow, p.grow_start, p.shrink_floor, p.cap_before_halt) == (MAX, 2, 10000, True, False)
    assert not get_profile("v5.14").halt_poll.shrink_floor
    assert get_profile("latest").halt_poll.cap_before_halt
    with pytest.raises(ValueError):
        get_profile("v4.19").halt_poll


def test_first_halt_does_not_poll_then_grows_to_grow_start() -> None:
    stat, state = new_stat(), HaltPollState()
    out = kvm_vcpu_halt(stat, state, LATEST, 1000, 6000)
    assert (out.polled, out.waited, out.halt_ns, out.poll_end_ns) == (False, True, 5000, 1000)
    assert stat.halt_attempted_poll == 0 and stat.halt_poll_fail_ns == 0
    assert stat.halt_wait_ns == 5000 and stat.halt_wakeup == 1
    assert state.halt_poll_ns == 10000


def test_successful_poll_within_window() -> None:
    stat, state = new_stat(), HaltPollState(halt_poll_ns=40000)
    out = kvm_vcpu_halt(stat, state, LATEST, 100, 100 + 25000)
    assert (out.polled, out.waited, out.halt_ns, out.poll_end_ns) == (True, False, 25000, 25100)
    assert (stat.halt_attempted_poll, stat.halt_successful_poll) == (1, 1)
    assert stat.halt_poll_success_ns == 25000 and stat.halt_poll_fail_ns == 0
    assert stat.halt_wait_ns == 0 and stat.halt_wakeup == 0 and stat.blocking == 0
    assert int(stat.halt_poll_success_hist[fls64(25000)]) == 1 and fls64(25000) == 15
    assert not stat.halt_wait_hist.any()
    assert state.halt_poll_ns == 40000  # halt_ns <= halt_poll_ns: unchanged
    # The window's last instant still counts as a successful poll.
    out = kvm_vcpu_halt(stat, state, LATEST, 0, 40000)
    assert not out.waited and stat.halt_successful_poll == 2


def test_failed_poll_then_block() -> None:
    stat, state = new_stat(), HaltPollState(halt_poll_ns=20000)
    out = kvm_vcpu_halt(stat, state, LATEST, 0, 150000)
    assert (out.polled, out.waited, out.poll_end_ns, out.halt_ns) == (True, True, 20000, 150000)
    assert (stat.halt_attempted_poll, stat.halt_successful_poll) == (1, 0)
    assert stat.halt_poll_fail_ns == 20000 and stat.halt_poll_success_ns == 0
    assert stat.halt_wait_ns == 130000 and stat.halt_wakeup == 1 and stat.blocking == 0
    assert int(stat.halt_poll_fail_hist[fls64(20000)]) == 1
    assert int(stat.halt_wait_hist[fls64(130000)]) == 1
    assert state.halt_poll_ns == 40000  # short halt (< max): grow


def test_fls64_buckets_and_clamp() -> None:
    assert [fls64(v) for v in (0, 1, 2, 3, 4, 1023, 1024, 2**63)] == [0, 1, 2, 2, 3, 10, 11, 64]
    hist = np.zeros(HALT_POLL_HIST_COUNT, dtype=np.uint64)
    assert kvm_stats_log_hist_update(hist, 0) == 0
    assert kvm_stats_log_hist_update(hist, 7) == 3
    assert kvm_stats_log_hist_update(hist, 2**31 - 1) == 31
    assert kvm_stats_log_hist_update(hist, 2**31) == 31  # fls64 = 32, clamped to the last bucket
    assert kvm_stats_log_hist_update(hist, 2**40) == 31
    assert hist.dtype == np.uint64 and hist.tolist() == [1, 0, 0, 1] + [0] * 27 + [3]


def test_counters_equal_the_values_the_histograms_summarise() -> None:
    rng = np.random.default_rng(1234)
    stat, state = new_stat(), HaltPollState()
    fed: dict[str, list[int]] = {"success": [], "fail": [], "wait": []}
    now = 0
    for _ in range(3000):
        window = min(state.halt_poll_ns, LATEST.halt_poll_ns)
        start = now + int(rng.integers(0, 5000))
        wake = start + int(rng.choice([rng.integers(0, 60000), rng.integers(0, 5_000_000), 2**33]))
        out = kvm_vcpu_halt(stat, state, LATEST, start, wake)
        if window and wake - start <= window:
            fed["success"].append(wake - start)
        else:
            if window:
                fed["fail"].append(window)
            if wake > start + window:
                fed["wait"].append(wake - start - window)
        assert out.poll_end_ns - start == (min(window, wake - start) if window else 0)
        now = wake
    assert stat.halt_poll_success_ns == sum(fed["success"]) > 0
    assert stat.halt_poll_fail_ns == sum(fed["fail"]) > 0
    assert stat.halt_wait_ns == sum(fed["wait"]) > 0
    assert_buckets(stat.halt_poll_success_hist, fed["success"])
    assert_buckets(stat.halt_poll_fail_hist, fed["fail"])
    assert_buckets(stat.halt_wait_hist, fed["wait"])
    assert stat.halt_wait_hist[HALT_POLL_HIST_COUNT - 1] > 0  # the 2**33 ns waits were clamped
    assert stat.halt_wakeup == len(fed["wait"])
    assert stat.halt_attempted_poll == len(fed["success"]) + len(fed["fail"])


def test_grow_from_zero_to_grow_start_then_doubling_to_the_max() -> None:
    stat, state = new_stat(), HaltPollState()
    seen = []
    t = 0
    for _ in range(8):
        window = min(state.halt_poll_ns, MAX)
        kvm_vcpu_halt(stat, state, LATEST, t, t + min(window + 1, MAX - 1))  # past the window, below the max
        seen.append(state.halt_poll_ns)
        t += 10**6
    # 10000, doubled; 160000 * 2 = 320000 is stored uncapped, capped to 200000 at the next halt,
    # where a wake inside the window leaves it there.
    assert seen[:6] == [10000, 20000, 40000, 80000, 160000, 320000]
    assert seen[6:] == [200000, 200000]
    # Older kernels cap in grow_halt_poll_ns() instead.
    state = HaltPollState(halt_poll_ns=160000)
    kvm_vcpu_halt(new_stat(), state, get_profile("v5.15").halt_poll, 0, 160001)
    assert state.halt_poll_ns == 200000


def test_max_clamp_before_polling() -> None:
    stat, state = new_stat(), HaltPollState(halt_poll_ns=10**6)
    out = kvm_vcpu_halt(stat, state, LATEST, 0, 300000)
    assert out.waited and out.poll_end_ns == MAX and stat.halt_poll_fail_ns == MAX
    assert stat.halt_wait_ns == 100000
    assert state.halt_poll_ns == 100000  # capped to 200000, then a long block (> max) halves it


@pytest.mark.parametrize(("profile", "expected"), [("latest", 100000), ("v6.4", 0), ("v5.15", 0)])
def test_long_block_shrinks(profile: str, expected: int) -> None:
    state = HaltPollState(halt_poll_ns=MAX)
    kvm_vcpu_halt(new_stat(), state, get_profile(profile).halt_poll, 0, MAX + 1)
    assert state.halt_poll_ns == expected


def test_long_block_with_zero_poll_time_stays_zero() -> None:
    state = HaltPollState(halt_poll_ns=0)
    kvm_vcpu_halt(new_stat(), state, LATEST, 0, 10 * MAX)  # halt_poll_ns is 0: no shrink, no grow
    assert state.halt_poll_ns == 0


def test_invalid_wakeup_shrinks_and_counts_poll_invalid() -> None:
    stat, state = new_stat(), HaltPollState(halt_poll_ns=80000)
    kvm_vcpu_halt(stat, state, LATEST, 0, 5000, valid_wakeup=False)
    assert stat.halt_successful_poll == 1 and stat.halt_poll_invalid == 1
    assert state.halt_poll_ns == 40000
    kvm_vcpu_halt(stat, state, LATEST, 0, 90000, valid_wakeup=False)  # a failed poll is not poll_invalid
    assert stat.halt_poll_invalid == 1 and state.halt_poll_ns == 20000


def test_shrink_floor() -> None:
    state = HaltPollState(halt_poll_ns=15000)
    shrink_halt_poll_ns(state, LATEST)
    assert state.halt_poll_ns == 0  # 7500 < grow_start
    state = HaltPollState(halt_poll_ns=15000)
    shrink_halt_poll_ns(state, HaltPollParams(shrink=2, shrink_floor=False))
    assert state.halt_poll_ns == 7500


def test_poll_not_allowed() -> None:
    stat, state = new_stat(), HaltPollState(halt_poll_ns=50000)
    out = kvm_vcpu_halt(stat, state, LATEST, 0, 1000, poll_allowed=False)
    assert not out.polled and out.waited and out.poll_end_ns == 0
    assert stat.halt_attempted_poll == 0 and stat.halt_wait_ns == 1000 and stat.halt_wakeup == 1
    assert state.halt_poll_ns == 50000  # no grow/shrink decision at all
    assert kvm_vcpu_is_blocking(state, LATEST, 0, 1, poll_allowed=False)


def test_zero_max_resets_poll_time() -> None:
    state = HaltPollState(halt_poll_ns=50000)
    out = kvm_vcpu_halt(new_stat(), state, HaltPollParams(halt_poll_ns=0), 0, 1000)
    assert not out.polled and state.halt_poll_ns == 0


def test_blocking_helpers() -> None:
    state = HaltPollState(halt_poll_ns=30000)
    assert not kvm_vcpu_is_blocking(state, LATEST, 1000, 1000 + 30000)
    assert kvm_vcpu_is_blocking(state, LATEST, 1000, 1000 + 30001)
    assert kvm_vcpu_is_blocking(HaltPollState(), LATEST, 1000, 1001)
    assert not kvm_vcpu_is_blocking(HaltPollState(halt_poll_ns=10**7), LATEST, 0, MAX)  # capped window
    assert kvm_vcpu_is_blocking(HaltPollState(halt_poll_ns=10**7), LATEST, 0, MAX + 1)
    stat = new_stat()
    out = kvm_vcpu_halt(stat, state, LATEST, 1000, 100000)
    assert stat.blocking == 0
    assert [out.is_blocking(t) for t in (1000, 31000, 31001, 99999, 100000)] == [False, False, True, True, False]
    out = kvm_vcpu_halt(stat, HaltPollState(halt_poll_ns=30000), LATEST, 0, 500)
    assert not any(out.is_blocking(t) for t in range(0, 600, 50))


def test_wake_before_start_is_rejected() -> None:
    with pytest.raises(ValueError):
        kvm_vcpu_halt(new_stat(), HaltPollState(), LATEST, 10, 9)


@settings(max_examples=60, deadline=None)
@given(
    profile=st.sampled_from(["v5.14", "v5.15", "v6.4", "latest"]),
    gaps=st.lists(st.tuples(st.integers(0, 3 * MAX), st.booleans(), st.booleans()), min_size=1, max_size=80),
)
def test_invariants_over_random_sequences(profile: str, gaps: list[tuple[int, bool, bool]]) -> None:
    params = get_profile(profile).halt_poll
    stat, state = new_stat(), HaltPollState()
    t = 0
    for gap, valid, allowed in gaps:
        out = kvm_vcpu_halt(stat, state, params, t, t + gap, valid_wakeup=valid, poll_allowed=allowed)
        assert stat.halt_successful_poll <= stat.halt_attempted_poll
        assert stat.halt_poll_invalid <= stat.halt_successful_poll
        assert stat.blocking == 0 and out.halt_ns == gap
        assert out.waited == (gap > out.poll_end_ns - t)
        assert 0 <= state.halt_poll_ns <= (2 * MAX if params.cap_before_halt else MAX)
        t += gap + 1
    assert int(stat.halt_poll_success_hist.sum()) == stat.halt_successful_poll
    assert int(stat.halt_poll_fail_hist.sum()) == stat.halt_attempted_poll - stat.halt_successful_poll
    assert int(stat.halt_wait_hist.sum()) == stat.halt_wakeup
