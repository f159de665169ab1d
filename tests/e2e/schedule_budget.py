"""For the schedule tests: a memory budget under which the planner gives a prompt a decreasing schedule."""
from __future__ import annotations

from chunkinfer.kv.placement import PromptCall, plan_prompt
from chunkinfer.planner.plan import Plan


def budget_for_decreasing_schedule(model, call: PromptCall, cache, smallest: int, largest: int,
                                   steps: int = 40) -> tuple[int, Plan]:
    """(budget, plan) for the first of ``steps`` budgets between what the ``smallest`` and the
    ``largest`` chunk need where the planned schedule is not uniform; AssertionError if none is."""
    need = {c: plan_prompt(model, call, cache, chunk_size=c, memory_budget=None).device_bytes
            for c in (smallest, largest)}
    for k in range(1, steps):
        budget = need[smallest] + (need[largest] - need[smallest]) * k // steps
        p = plan_prompt(model, call, cache, chunk_size=None, memory_budget=budget)
        if len(set(p.chunk_schedule)) > 1:
            return budget, p
    raise AssertionError(f"no budget in [{need[smallest]:,}, {need[largest]:,}] gives a decreasing schedule")
