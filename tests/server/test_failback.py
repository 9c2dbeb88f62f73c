"""The failback's one rule, ``failback.plan_catch_up``, as a table: which side's change of a name wins.

Pure and in-process: each row is the main's catalog and tombstones, the
active backup's files and tombstones, and what the main removes and fetches.
The end-to-end cases (real processes, SIGKILL) are in tests/server/test_failover.py.
"""
from __future__ import annotations

import pytest

from minitorrent.server.failback import CatchUpPlan, Change, plan_catch_up

A, B, C = "a" * 64, "b" * 64, "c" * 64  # three contents


def plan(ours: dict | None = None, our_removals: tuple = (), theirs: tuple = (), their_removals: tuple = ()):
    return plan_catch_up(ours or {}, [Change(*t) for t in our_removals], [Change(*f) for f in theirs],
                         [Change(*t) for t in their_removals])


# (why, main's files {name: (sha256, epoch)}, main's tombstones, backup's files, backup's tombstones, plan)
CASES = [
    ("nothing changed anywhere",
     {"x": (A, 1)}, (), (("x", A, 1),), (), CatchUpPlan()),
    ("added on the backup: fetched",
     {}, (), (("x", A, 2),), (), CatchUpPlan(fetch=(("x", A),))),
    ("removed on the backup at a higher epoch: removed on the main",
     {"x": (A, 1)}, (), (), (("x", A, 2),), CatchUpPlan(remove=("x",))),
    ("renamed on the backup: the old name removed, the new one fetched",
     {"old": (A, 1)}, (), (("new", A, 2),), (("old", A, 2),), CatchUpPlan(remove=("old",), fetch=(("new", A),))),
    ("removed then added again with the same content: kept, nothing to do",
     {"x": (A, 1)}, (), (("x", A, 2),), (), CatchUpPlan()),
    ("removed then added again with other content: the old removed, the new fetched under the name",
     {"x": (A, 1)}, (), (("x", B, 2),), (("x", A, 2),), CatchUpPlan(remove=("x",), fetch=(("x", B),))),
    ("the main changed the name to other content meanwhile: its file is not the one removed, kept",
     {"x": (C, 1)}, (), (), (("x", A, 2),), CatchUpPlan()),
    ("the main added the same content again at a later epoch: kept",
     {"x": (A, 3)}, (), (), (("x", A, 2),), CatchUpPlan()),
    ("a tie: within one epoch only the main writes, so its file is kept",
     {"x": (A, 2)}, (), (), (("x", A, 2),), CatchUpPlan()),
    ("the main removed while partitioned what the backup only kept: not fetched back",
     {}, (("x", A, 1),), (("x", A, 1),), (), CatchUpPlan()),
    ("the main removed it, the backup added that content again later: fetched",
     {}, (("x", A, 1),), (("x", A, 2),), (), CatchUpPlan(fetch=(("x", A),))),
    ("the main removed one content, the backup holds another under the name: fetched",
     {}, (("x", A, 1),), (("x", B, 1),), (), CatchUpPlan(fetch=(("x", B),))),
    ("a backup from before tombstones (no epochs): fetched as before",
     {}, (("x", A, 5),), (("x", A, None),), (), CatchUpPlan(fetch=(("x", A),))),
    ("a tombstone without an epoch removes nothing",
     {"x": (A, 1)}, (), (), (("x", A, None),), CatchUpPlan()),
    ("a tombstone of a name the main never had: nothing",
     {}, (), (), (("x", A, 2),), CatchUpPlan()),
    ("different content under one name, nothing removed: fetched (the catalog keeps both, the main's the name)",
     {"x": (A, 1)}, (), (("x", B, 2),), (), CatchUpPlan(fetch=(("x", B),))),
]


class TestPlanCatchUp:
    @pytest.mark.parametrize("why, ours, our_removals, theirs, their_removals, expected", CASES,
                             ids=[case[0] for case in CASES])
    def test_table(self, why, ours, our_removals, theirs, their_removals, expected):
        """Each row: the main's and the backup's names and tombstones give that plan."""
        assert expected == plan(ours, our_removals, theirs, their_removals)
