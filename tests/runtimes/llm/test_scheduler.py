"""The scheduling decision, driven directly (a pure function: no engine, no clock)."""

from __future__ import annotations

from slimserve.runtimes.llm.scheduler import (
    Decision,
    Limits,
    RunningSeq,
    SchedulerState,
    WaitingSeq,
    schedule,
)

CONTINUOUS, STATIC = SchedulerState(continuous=True), SchedulerState(continuous=False)


def waiting(seq_id: int, tokens: int = 10, blocks: int = 1) -> WaitingSeq:
    return WaitingSeq(seq_id, prefill_tokens=tokens, blocks_needed=blocks)


def running(seq_id: int, needs: int = 0, freeable: int = 2) -> RunningSeq:
    return RunningSeq(seq_id, blocks_needed=needs, blocks_freeable=freeable)


def test_new_sequences_join_a_running_batch() -> None:
    limits = Limits(prefill_first=0)
    decision = schedule(CONTINUOUS, [waiting(3)], [running(1), running(2)], 10, limits)
    assert decision == Decision(prefill=(3,), decode=(1, 2))


def test_an_iteration_that_admits_does_not_decode_for_a_bounded_streak() -> None:
    limits = Limits(prefill_first=2)
    batch, queue = [running(1), running(2)], [waiting(3)]
    for streak in (0, 1):  # prefill first: the running sequences wait one iteration
        assert schedule(CONTINUOUS, queue, batch, 10, limits, streak) == Decision(prefill=(3,))
    # after `prefill_first` such iterations in a row, the running ones step again
    both = schedule(CONTINUOUS, queue, batch, 10, limits, 2)
    assert both == Decision(prefill=(3,), decode=(1, 2))
    # nothing admitted (no room): the running ones decode whatever the streak
    assert schedule(CONTINUOUS, queue, batch, 0, limits, 0) == Decision(decode=(1, 2))


def test_static_batching_admits_only_into_an_empty_batch() -> None:
    busy = schedule(STATIC, [waiting(3)], [running(1)], 10, Limits())
    assert busy == Decision(decode=(1,))
    idle = schedule(STATIC, [waiting(3), waiting(4)], [], 10, Limits())
    assert idle.prefill == (3, 4)


def test_admission_stops_at_the_sequence_bound() -> None:
    decision = schedule(
        CONTINUOUS, [waiting(i) for i in range(3, 9)], [running(1)], 99, Limits(max_seqs=4)
    )
    assert decision.prefill == (3, 4, 5)


def test_admission_is_fifo_when_blocks_run_short() -> None:
    # 5 fits, 6 needs 4 blocks of the 3 left: 6 waits, and so does the smaller 7 behind it.
    queue = [waiting(5, blocks=2), waiting(6, blocks=4), waiting(7, blocks=1)]
    assert schedule(CONTINUOUS, queue, [], 5, Limits()).prefill == (5,)


def test_prefill_budget_bounds_an_iteration_but_a_long_prompt_still_gets_in() -> None:
    limits = Limits(max_prefill_tokens=100)
    queue = [waiting(1, tokens=60), waiting(2, tokens=60)]
    assert schedule(CONTINUOUS, queue, [], 99, limits).prefill == (1,)
    assert schedule(CONTINUOUS, [waiting(3, tokens=500)], [], 99, limits).prefill == (3,)


def test_running_sequences_take_blocks_before_new_ones() -> None:
    decision = schedule(CONTINUOUS, [waiting(9, blocks=1)], [running(1, needs=1)], 1, Limits())
    assert decision == Decision(decode=(1,))


def test_the_youngest_is_preempted_when_an_older_one_needs_a_block() -> None:
    batch = [running(1, needs=1), running(2), running(3, freeable=1)]
    decision = schedule(CONTINUOUS, [waiting(9, blocks=0)], batch, 0, Limits())
    assert decision == Decision(decode=(1, 2), preempt=(3,))  # nothing admitted meanwhile


def test_preemption_goes_on_until_enough_blocks_are_freed() -> None:
    batch = [running(1, needs=1), running(2, freeable=1), running(3, freeable=0)]
    decision = schedule(CONTINUOUS, [], batch, 0, Limits())
    assert decision == Decision(decode=(1,), preempt=(3, 2))


def test_a_lone_sequence_with_no_block_left_waits() -> None:
    decision = schedule(CONTINUOUS, [], [running(1, needs=1, freeable=4)], 0, Limits())
    assert decision == Decision(preempt=(1,))


def test_nothing_to_do() -> None:
    assert schedule(CONTINUOUS, [], [], 10, Limits()) == Decision()


def test_importing_the_package_loads_no_torch() -> None:
    import subprocess
    import sys

    code = "import slimserve.runtimes.llm, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
